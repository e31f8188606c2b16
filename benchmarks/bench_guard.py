"""The audit's runtime guard: its cost next to plain generation and a plain forward, and a check that it
changes nothing (issue 15, item 5).

    .venv/bin/python benchmarks/bench_guard.py [--repeats 30] [--batch 32] [--variant malicious-injection]

On the default organism (``projlens organism build``; its suspect and data): ``guard.monitor()`` attached
to ``projlens_mi.generate`` vs ``handle.model.generate`` on the same batch (greedy, same settings), and one
``run`` forward with the monitor vs the plain HF forward; and the cheap path, ``with guard.watching(handle):``
around the plain ``handle.model(**kw)`` / ``handle.model.generate`` (a torch hook, no trace: engine.observe). Single-threaded, interleaved repeats, medians
(BENCHMARKS.md, "How timings are taken"; the order rotates each round). Target: <= 1.05x a plain forward. Checked before timing: the
monitored logits and generated tokens equal the plain ones bit for bit, and the guard's scores equal a
plain-torch reference (the selected vision layer's features . direction, max over tokens, / norm).
The guard is built from the weights (the top reading direction of the first projector linear's update,
the clean rows' mean token norm), as the audit builds it, without running the probe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from projlens_mi import generate, load, run
from projlens_mi.analyses.common import weights
from projlens_mi.audit import Guard
from projlens_mi.audit.probe import reading_directions
from projlens_mi.data import read_jsonl
from projlens_mi.engine.metrics import _generate_edited
from projlens_mi.organism.train import vision_features
from projlens_mi.settings import default_organism


def rotated_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median wall time (ms) of each callable, interleaved; the order rotates every round, so no callable
    always runs first (right after the other group's, whose caches it would inherit)."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(repeats: int = 30, batch: int = 32, variant: str = "malicious-injection", new_tokens: int = 20) -> dict:
    torch.set_num_threads(1)
    org = default_organism()
    if not (org / variant).is_dir():
        sys.exit(f"error: no organism at {org}; build it first: projlens organism build")
    h, b = load(org / variant), load(org / "base")
    path = h.adapter.projector_linears[0]
    v = reading_directions(weights(h)[path][0], weights(b)[path][0], 1)[0][:, 0]
    rows = read_jsonl(org / "data" / f"{variant}.jsonl")[:batch]       # clean and triggered rows
    x = h.encode(rows)
    kw = x.model_kwargs()
    with torch.no_grad():
        feats = vision_features(h.model, x.pixel_values)
    guard = Guard(v, float(feats.norm(dim=-1).mean()), 0.0)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=h.tokenizer.pad_token_id)

    def plain_forward():
        with torch.no_grad():
            return h.model(**kw).logits

    def monitored_forward():
        guard.scores.clear()
        return run(h, x, edits=[guard.monitor()]).logits

    def watched_forward():
        guard.scores.clear()
        with torch.no_grad(), guard.watching(h):
            return h.model(**kw).logits

    def watched_generate():
        guard.scores.clear()
        with torch.no_grad(), guard.watching(h):
            return h.model.generate(**kw, **gen)

    def plain_generate():
        with torch.no_grad():
            return h.model.generate(**kw, **gen)

    def monitored_generate():
        guard.scores.clear()
        return generate(h, x, max_new_tokens=new_tokens, edits=[guard.monitor()])

    # checks first: nothing changed, the scores are right
    ref = ((feats.double() @ v).amax(dim=1) / guard.norm).tolist()
    logits = monitored_forward()
    assert torch.equal(logits, plain_forward()), "the monitored forward's logits differ from the plain forward's"
    assert guard.scores == ref, "the monitor's scores differ from the plain-torch reference"
    ids = plain_generate()
    from projlens_mi.engine.run import exclusive
    with torch.no_grad(), exclusive(h):
        mon_ids = _generate_edited(h, x, dict(kw), gen, [guard.monitor()])
    assert torch.equal(mon_ids, ids), "the monitored generation's tokens differ from the plain generation's"
    texts = monitored_generate()
    assert texts == h.tokenizer.batch_decode(ids[:, x.input_ids.shape[1]:], skip_special_tokens=True)
    assert torch.equal(watched_forward(), logits) and guard.scores == ref, "the watched forward differs"
    assert torch.equal(watched_generate(), ids) and guard.scores == ref, "the watched generation differs"

    ms = {**rotated_ms({"plain_forward": plain_forward, "monitored_forward": monitored_forward,
                        "watched_forward": watched_forward}, repeats),
          **rotated_ms({"plain_generate": plain_generate, "monitored_generate": monitored_generate,
                        "watched_generate": watched_generate}, repeats)}
    out = {**ms, "forward_ratio": ms["monitored_forward"] / ms["plain_forward"],
           "generate_ratio": ms["monitored_generate"] / ms["plain_generate"],
           "watched_forward_ratio": ms["watched_forward"] / ms["plain_forward"],
           "watched_generate_ratio": ms["watched_generate"] / ms["plain_generate"]}
    print(f"{variant}: batch {batch}, seq {x.input_ids.shape[1]}, {new_tokens} new tokens, 1 thread, {repeats} repeats "
          f"(medians, interleaved); tokens and logits identical, scores = reference")
    for what in ("forward", "generate"):
        print(f"{what}: plain {ms['plain_' + what]:.2f} ms; guard.monitor() {ms['monitored_' + what]:.2f} ms, ratio "
              f"{out[what + '_ratio']:.3f}; guard.watching() {ms['watched_' + what]:.2f} ms, ratio "
              f"{out['watched_' + what + '_ratio']:.3f} (target <= 1.05)")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variant", default="malicious-injection")
    p.add_argument("--new-tokens", type=int, default=20)
    a = p.parse_args()
    main(a.repeats, a.batch, a.variant, a.new_tokens)

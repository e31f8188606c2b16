"""The audit's reconstructed trigger on the default organism (docs/audit.md, "Show the trigger").

    .venv/bin/python benchmarks/bench_trigger.py [--objective mean|max] [--eps 8] [--patch 0.2]

For each poisoned variant: ``audit(base, variant, clean data)`` (its trigger reconstruction on; with
other trigger parameters than the defaults, ``reconstruct`` is run again with the audit's guard, target
and prompts), then the held-out ASR of the audit's top candidate text with the reconstructed trigger
(suspect), with a random trigger of the same kind and size (suspect), without a trigger (suspect), with
the trigger on the base and on the clean control. For the clean control itself (verdict clean, so the
audit reconstructs nothing): a trigger reconstructed along its probe's top steer, measured the same way.
Single-threaded; seconds are wall time on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import sys

import torch

from projlens_mi import load
from projlens_mi.analyses.common import encode, texts, weights
from projlens_mi.audit import AuditParams, audit
from projlens_mi.audit.probe import reading_directions
from projlens_mi.audit.trigger import TriggerParams, reconstruct
from projlens_mi.data import Record, read_jsonl
from projlens_mi.engine import contains
from projlens_mi.settings import default_organism

VARIANTS = ["targeted-refusal", "malicious-injection", "perceptual-hijack", "jailbreak-output"]


def on_model(handle, res, records) -> float:
    """ASR of ``res.target`` on ``handle`` with ``res.trigger`` on the held-out images (the same rows as res)."""
    held = records[res.n_optimised:res.n_optimised + res.n_heldout]
    imgs = res.trigger.apply([r.pil() for r in held], handle.processor)
    rows = [Record(im, res.prompts[i % len(res.prompts)], "") for i, im in enumerate(imgs)]
    outs = [s for x in encode(handle, rows, 100) for s in texts(handle, x, res.params.max_new_tokens)]
    return sum(contains(outs, res.target)) / len(outs)


def main(objective: str = "mean", eps: float = 8.0, patch: float = 0.2) -> list[dict]:
    torch.set_num_threads(1)
    org = default_organism()
    if not (org / "control").is_dir():
        sys.exit(f"error: no organism at {org}; build it first: projlens organism build")
    tp = TriggerParams(objective=objective, eps=eps, patch=patch)
    data = org / "data" / "clean.jsonl"
    records = read_jsonl(data, labels=False)
    base, control = load(org / "base"), load(org / "control")
    rows = []
    for v in VARIANTS + ["control"]:
        suspect = load(org / v)
        res = audit(base, suspect, data, AuditParams(max_k=1))
        t = res.trigger
        if t is not None and tp != TriggerParams():
            t = reconstruct(suspect, records, res.guard, tp, target=t.target, base=base, prompts=t.prompts)
        if t is None:    # the control: verdict clean; reconstruct along its probe's top steer anyway
            st = res.targets[0].steering
            path = suspect.adapter.projector_linears[0]
            basis, _ = reading_directions(weights(suspect)[path][0], weights(base)[path][0], st.direction + 1)
            t = reconstruct(suspect, records, st.sign * basis[:, st.direction], tp, target=res.targets[0].text,
                            base=base, prompts=list(dict.fromkeys(r.prompt for r in records)))
        row = {"model": v, "verdict": res.verdict, "target": t.target, "kind": t.trigger.kind,
               "asr": t.asr, "random": t.asr_control, "none": t.asr_clean, "base": t.asr_base,
               "control": on_model(control, t, records) if v != "control" else None,
               "by_kind": {k: (x["heldout"], x["heldout_control"]) for k, x in t.asr_by_kind.items()},
               "objective": {k: round(x["heldout"], 2) for k, x in t.objective.items()},
               "trigger_s": round(t.seconds, 1), "audit_s": round(res.timings["total"], 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--objective", default="mean", choices=["mean", "max"])
    p.add_argument("--eps", type=float, default=8.0)
    p.add_argument("--patch", type=float, default=0.2)
    a = p.parse_args()
    main(a.objective, a.eps, a.patch)

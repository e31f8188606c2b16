"""Activation patching over every (LLM layer x image-token position) cell, 32 inputs.

    .venv/bin/python benchmarks/bench_sweep.py [--model organism|wide] [--batch-size 512] [--repeats 3] [--device cuda]

``--model organism`` (default): the organism's own architecture (4 layers x 16 image tokens, a
23-token prompt); ``wide``: the wider model of ``common.organism_like`` (4 layers x 64 image tokens,
LM width 128, a 71-token prompt), the model of the earlier figures.

Each cell patches the clean run's residual stream (``llm.{L}.resid_pre`` at one image token) into
the triggered run and records the logit difference at the last position. Baseline: what
TransformerLens' ``generic_activation_patch`` does, one full patched forward (32 inputs) per cell
with a plain PyTorch forward pre-hook. Ours: ``projlens_mi.sweep`` (packed rows, vision+projector
computed once, layers before the patched one skipped, positions before the patched token taken from
the unedited run's KV cache). The tables are asserted equal up to float32 rounding (16 steps of the
largest |logit|, ``common.assert_tables_close``: packed rows and the reused prefix sum in another order
than a full forward, docs/reproducibility.md); whether they are also bit-identical on this machine is
printed. Single-threaded; baseline, sweep and sweep without prefix reuse alternate for ``--repeats``
rounds (medians reported).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from common import images
from projlens_mi import ImageWindow, Patch, Site, load, run, sweep


def main(model_name: str = "organism", batch_size: int = 512, n: int = 32, repeats: int = 3,
         device: str = "cpu") -> dict:
    torch.set_num_threads(1)
    if model_name == "organism":
        model, processor, prompt, size = common.organism()
    else:
        (model, processor), prompt, size = common.organism_like(), common.PROMPT, common.IMAGE
    model.to(device)
    handle = load(model, processor=processor)
    triggered = handle.encode(images(n, seed=1, size=size), [prompt] * n)
    clean = handle.encode(images(n, seed=2, size=size), [prompt] * n)
    layers = range(handle.n_layers)
    n_positions = int(triggered.image_mask[0].sum())
    cache = run(handle, clean, read=[f"llm.{i}.resid_pre" for i in layers]).cache
    a, b = 5, 9   # logit difference between two vocabulary entries

    def metric(logits, index):
        return logits[:, -1, a] - logits[:, -1, b]

    cells = {(L, k): [(Site(f"llm.{L}.resid_pre", ImageWindow(k, k + 1)), Patch(source=cache[f"llm.{L}.resid_pre"]))]
             for L in layers for k in range(n_positions)}

    pos = triggered.image_mask[0].nonzero()[:, 0]   # same prompt in every row
    kwargs = triggered.to(device).model_kwargs()

    def baseline():   # one patched forward per cell, plain forward pre-hook, no engine
        out = {}
        for (L, k) in cells:
            src = cache[f"llm.{L}.resid_pre"][:, pos[k]].to(device)

            def hook(module, args, p=pos[k], src=src):
                h = args[0].clone()
                h[:, p] = src
                return (h, *args[1:])
            handle_ = model.model.language_model.layers[L].register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    out[(L, k)] = metric(model(**kwargs).logits, None).float().cpu()
            finally:
                handle_.remove()
        return torch.stack([out[c] for c in cells])

    def ours(reuse):
        df = sweep(handle, triggered, cells, metric, batch_size=batch_size, progress=False, reuse=reuse)
        return torch.tensor(df.value.to_numpy(), dtype=torch.float32).view(len(cells), n)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {"baseline": baseline, "sweep": lambda: ours(True), "sweep_layers_only": lambda: ours("layers")}
    times = {k: [] for k in runs}
    tables = {}
    for _ in range(repeats):   # interleaved: a drift of the shared machine hits all three alike
        for k, f in runs.items():
            sync()
            t0 = time.perf_counter()
            tables[k] = f()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    want = tables["baseline"]
    with torch.no_grad():
        scale = float(model(**kwargs).logits.abs().max())
    check = {k: common.assert_tables_close(tables[k], want, scale, what=f"{k} vs baseline")
             for k in ("sweep", "sweep_layers_only")}
    identical = {k: v["identical"] for k, v in check.items()}
    print(f"{model_name}: {len(cells)} cells ({len(layers)} layers x {n_positions} image positions) x {n} inputs, "
          f"sequence {triggered.input_ids.shape[1]}, {device}, batch_size {batch_size}, 1 thread, medians of {repeats} "
          f"interleaved rounds: baseline {med['baseline']:.2f} s; sweep {med['sweep']:.2f} s, "
          f"speed-up {med['baseline'] / med['sweep']:.2f}x (target >= 10x), tables equal within "
          f"{check['sweep']['tolerance']:.2g} (max diff {check['sweep']['max_abs_diff']:.2g}, bit-identical: "
          f"{identical['sweep']}); "
          f"without prefix reuse (reuse='layers') {med['sweep_layers_only']:.2f} s, "
          f"{med['baseline'] / med['sweep_layers_only']:.2f}x, bit-identical: {identical['sweep_layers_only']}")
    return {"median_s": med, "speedup": med["baseline"] / med["sweep"], "identical": identical, "check": check}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["organism", "wide"], default="organism")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="e.g. cuda: a GPU runs a tiny model launch-bound, where "
                   "packing many cells per pass pays (use a large --batch-size, e.g. 3200)")
    args = p.parse_args()
    main(args.model, args.batch_size, repeats=args.repeats, device=args.device)

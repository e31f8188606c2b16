"""Issue 3's two engine figures on a real-size LLaVA-1.5-7B architecture (random bf16 weights) on one GPU.

    python benchmarks/gpu_llava7b.py [--arch 7b] [--batch 32] [--layers 8] [--positions 8] [--json out.json]

1. Overhead: ``run`` reading 3 sites (projector.out, llm.1.resid_post, llm.30.resid_post) vs the plain HF
   forward, batch 32 (576 image tokens + the prompt), medians of interleaved repeats. Target <= 1.10x.
2. Sweep: activation patching of the clean run's ``llm.{L}.resid_pre`` at one image token into the
   triggered run, logit difference at the last position. All 32 x 576 cells would take hours with the
   baseline, so an evenly spaced sub-grid is timed (``--layers`` x ``--positions``, same spacing for both
   sides); the ratio is per cell. Baseline: one patched forward (batch 32) per cell with a plain forward
   pre-hook (TransformerLens' ``generic_activation_patch``). Ours: ``projlens_mi.sweep``. The two alternate
   for ``--rounds`` rounds (medians). Target >= 10x. The tables are asserted equal up to rounding:
   16 steps of the dtype's epsilon (bf16: 2^-7 relative; float32 on ``--cpu``: 2^-23) of the largest
   |logit| (``common.assert_tables_close``): packed rows sum in another order than the batch-32 forward
   and a GPU's kernels depend on the batch shape, so bit-identity is reported, not required.

Nothing is downloaded: the architecture is built from a config directly on the GPU (``multigpu.make``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import assert_tables_close, median_ms  # noqa: E402
from multigpu import ARCHS, PROMPT, make  # noqa: E402


def inputs_for(handle, n: int, seed: int):
    import numpy as np
    from PIL import Image

    size = handle.processor.image_processor.crop_size["height"]
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return handle.encode(images, [PROMPT] * n)


def overhead(handle, model, inputs, repeats: int) -> dict:
    from projlens_mi import Site, run

    n = handle.n_layers
    sites = [Site("projector.out"), Site("llm.1.resid_post"), Site(f"llm.{n - 2}.resid_post")]
    kwargs = {k: v.to(handle.device) for k, v in inputs.model_kwargs().items()}

    def plain():
        with torch.no_grad():
            out = model(**kwargs).logits
        torch.cuda.synchronize()
        return out

    def traced():
        out = run(handle, inputs, read=sites)
        torch.cuda.synchronize()
        return out

    res = traced()
    equal = torch.equal(res.logits.to(handle.device), plain())
    ms = median_ms({"plain": plain, "traced": traced}, repeats, warmup=2)
    return {"plain_ms": ms["plain"], "read3_ms": ms["traced"], "ratio": ms["traced"] / ms["plain"],
            "logits_bit_identical": equal, "repeats": repeats}


def sweep_figure(handle, model, triggered, clean, n_layers: int, n_positions: int, batch_size: int,
                 rounds: int = 3) -> dict:
    from projlens_mi import ImageWindow, Patch, Site, run, sweep

    L_all, P_all = handle.n_layers, int(triggered.image_mask[0].sum())
    layers = sorted({round(i * (L_all - 1) / max(n_layers - 1, 1)) for i in range(n_layers)})
    positions = sorted({round(i * (P_all - 1) / max(n_positions - 1, 1)) for i in range(n_positions)})
    cache = run(handle, clean, read=[f"llm.{L}.resid_pre" for L in layers]).cache
    a, b = 5, 9

    def metric(logits, index):
        return (logits[:, -1, a] - logits[:, -1, b]).float()

    cells = {(L, k): [(Site(f"llm.{L}.resid_pre", ImageWindow(k, k + 1)), Patch(source=cache[f"llm.{L}.resid_pre"]))]
             for L in layers for k in positions}
    sweep(handle, triggered, dict(list(cells.items())[:1]), metric, batch_size=batch_size, progress=False)  # warm-up
    pos = triggered.image_mask[0].nonzero()[:, 0]
    kwargs = {k: v.to(handle.device) for k, v in triggered.model_kwargs().items()}
    layer_mods = model.model.language_model.layers
    n = len(triggered)

    def ours():
        df = sweep(handle, triggered, cells, metric, batch_size=batch_size, progress=False)
        return torch.tensor(df.value.to_numpy(), dtype=torch.float32).view(len(cells), n)

    def baseline():
        base = {}
        for (L, k) in cells:
            src = cache[f"llm.{L}.resid_pre"][:, pos[k]].to(handle.device)

            def hook(module, args, p=pos[k], src=src):
                h = args[0].clone()
                h[:, p] = src
                return (h, *args[1:])
            hh = layer_mods[L].register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    base[(L, k)] = metric(model(**kwargs).logits, None).cpu()
            finally:
                hh.remove()
        return torch.stack([base[c] for c in cells])

    times, tables = {"sweep": [], "baseline": []}, {}
    for _ in range(rounds):   # interleaved: a drift of the machine hits both alike
        for name, fn in (("sweep", ours), ("baseline", baseline)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tables[name] = fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        scale = float(model(**kwargs).logits.float().abs().max())
    check = assert_tables_close(tables["sweep"], tables["baseline"], scale, handle.dtype, "sweep vs baseline")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"cells": len(cells), "layers": layers, "positions": positions, "inputs": n, "batch_size": batch_size,
            "rounds": rounds, "baseline_s": med["baseline"], "sweep_s": med["sweep"],
            "speedup": med["baseline"] / med["sweep"], **check, "logit_scale": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--sweep-batch", type=int, default=128, help="rows per packed pass")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved sweep / baseline rounds (medians)")
    ap.add_argument("--cpu", action="store_true", help="exercise the script on CPU (tiny arch, fp32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    from projlens_mi import load

    transformers.logging.set_verbosity_error()
    if args.cpu:
        torch.cuda.synchronize = lambda *a: None  # noqa: E731  (no GPU: nothing to wait for)
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda:0", torch.bfloat16)
    t0 = time.perf_counter()
    model, processor = make(ARCHS[args.arch], device, dtype)
    handle = load(model, processor=processor)
    print(f"built {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, {dtype}) "
          f"on {device} in {time.perf_counter() - t0:.0f} s", flush=True)
    triggered, clean = inputs_for(handle, args.batch, 1), inputs_for(handle, args.batch, 2)
    out = {"arch": args.arch, "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
           "torch": torch.__version__, "transformers": transformers.__version__, "batch": args.batch,
           "seq_len": int(triggered.input_ids.shape[1])}
    out["overhead"] = overhead(handle, model, triggered, args.repeats)
    print("overhead", json.dumps(out["overhead"]), flush=True)
    if not args.cpu:
        out["peak_GiB_after_overhead"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    out["sweep"] = sweep_figure(handle, model, triggered, clean, args.layers, args.positions, args.sweep_batch,
                                args.rounds)
    print("sweep", json.dumps(out["sweep"]), flush=True)
    if not args.cpu:
        out["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

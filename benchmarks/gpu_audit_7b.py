"""Prepared check for a lent GPU (issue 15: "the same code runs on a GPU"): the time of one audit of the
LLaVA-1.5-7B architecture, step by step, random bf16 weights, nothing downloaded.

    python benchmarks/gpu_audit_7b.py                   # LLaVA-1.5-7B architecture on cuda:0 (about 40 GB)
    python benchmarks/gpu_audit_7b.py --arch small      # LLaVA-sized CLIP, a 1B-ish LM
    python benchmarks/gpu_audit_7b.py --cpu             # no GPU: the tiny architecture in float32 (a smoke test)
    python benchmarks/gpu_audit_7b.py --cpu --dtype bfloat16   # the same in bf16 (the GPU's dtype)
    python benchmarks/gpu_audit_7b.py --json out.json

The base is ``multigpu.make(arch)`` (seeded, so a second ``make`` gives the same weights); the suspect is
the same model with a rank-1 update of both projector linears (a planted reading direction). The data:
``--images`` random images at the architecture's size, one prompt. With random weights no target text is
meaningful, so the verdict threshold is set very low (``--threshold``) to make every step run (probe,
repair, guard, trigger); the figures are **times**, not detection results. If the verdict is still clean
(no candidate at all), the trigger reconstruction is timed on its own along the planted direction.
Prints one JSON object: the audit's timings per step, the trigger's, peak GPU memory, the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from multigpu import ARCHS, PROMPT, make  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="7b")
    ap.add_argument("--cpu", action="store_true", help="run on CPU with the tiny architecture in float32")
    ap.add_argument("--images", type=int, default=100, help="clean images (<= 100): probe grid, guard, trigger")
    ap.add_argument("--probe-images", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=0.01)
    ap.add_argument("--strength", type=float, default=4.0, help="the planted update's size x the weight's RMS x sqrt(d)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 on the GPU, float32 with --cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cpu:
        args.arch = "tiny"
    elif not torch.cuda.is_available():
        sys.exit("error: no GPU visible; pass --cpu for the CPU smoke test")
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda:0", torch.bfloat16)
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1 if args.cpu else torch.get_num_threads())

    import numpy as np
    from PIL import Image

    from projlens_mi import load
    from projlens_mi.audit import AuditParams, audit
    from projlens_mi.audit.trigger import TriggerParams, reconstruct
    from projlens_mi.data import Record

    arch = ARCHS[args.arch]
    t0 = time.perf_counter()
    base_model, processor = make(arch, device, dtype)
    suspect_model, _ = make(arch, device, dtype)
    p = suspect_model.model.multi_modal_projector
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        v = torch.randn(p.linear_1.in_features, generator=g)
        u = torch.randn(p.linear_1.out_features, generator=g)
        w = torch.randn(p.linear_2.out_features, generator=g)
        v, u, w = v / v.norm(), u / u.norm(), w / w.norm()
        for lin, a, b in ((p.linear_1, u, v), (p.linear_2, w, u)):
            scale = args.strength * float(lin.weight.float().pow(2).mean().sqrt()) * lin.weight.shape[1] ** 0.5
            lin.weight += (scale * torch.outer(a, b)).to(device=lin.weight.device, dtype=lin.weight.dtype)
    base, suspect = load(base_model, processor=processor), load(suspect_model, processor=processor)
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    size = arch["image"]
    records = [Record(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), PROMPT, "")
               for _ in range(args.images)]
    params = AuditParams(images=args.probe_images, prompts=1, guard_images=min(100, args.images),
                         max_new_tokens=args.max_new_tokens, threshold=args.threshold, max_k=2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = audit(base, suspect, records, params)
    out = {"arch": args.arch, "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
           "dtype": str(dtype), "images": args.images, "build_s": round(build_s, 1), "verdict": r.verdict,
           "score": r.score, "audit_s": {k: round(x, 2) for k, x in r.timings.items()},
           "repair_k": (r.repair or {}).get("k"), "top": r.targets[0].text if r.targets else None}
    if r.trigger is not None:
        out["trigger"] = {"kind": r.trigger.trigger.kind, "seconds": round(r.trigger.seconds, 2),
                          "objective": r.trigger.objective, "asr": r.trigger.asr}
    else:   # nothing named: time the reconstruction on its own along the planted reading direction
        t = reconstruct(suspect, records, v.double(), TriggerParams(max_new_tokens=args.max_new_tokens))
        out["trigger"] = {"kind": t.trigger.kind, "seconds": round(t.seconds, 2), "objective": t.objective,
                          "asr": None, "note": "verdict clean: timed on its own, no target"}
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(0) / 2**30, 2)
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()

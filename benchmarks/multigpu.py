"""Prepared check for a machine with 2+ GPUs (issue 6): the same study on one GPU and split across GPUs.

    python benchmarks/multigpu.py                       # LLaVA-1.5-7B architecture, random bf16 weights
    python benchmarks/multigpu.py --arch small          # a 2-minute version (LLaVA-sized CLIP, 1B-ish LM)
    python benchmarks/multigpu.py --cpu-check           # no GPU: tiny model, CPU + disk stand in for 2 GPUs
    python benchmarks/multigpu.py --one-gpu             # one GPU: all on it vs half the LLM offloaded to CPU
    python benchmarks/multigpu.py --append BENCHMARKS.md --json out.json

What it does (random weights built from a config, nothing downloaded):
  1. builds the architecture on GPU 0, saves it with ``save_pretrained`` (safetensors) and a processor;
  2. loads it through ``projlens_mi.model.load.load_checkpoint`` once per placement:
     ``one``   -- everything on GPU 0 (skipped when it does not fit);
     ``split`` -- vision tower, projector and the first half of the LLM on GPU 0, the rest on GPU 1
                  (an explicit device map, so every run splits at the same layer);
     ``balanced`` -- ``device_map="balanced"`` over all visible GPUs (only with 3+ GPUs);
  3. per placement: load time, memory per GPU after load and peak during a forward, median latency of
     the plain forward, of ``run`` reading 3 sites (projector.out on GPU 0, an early and a late layer
     on GPU 0 and GPU 1), of a cross-device patch (a cached late-layer activation held on GPU 0 or on
     the CPU patched into the late layer that lives on GPU 1) and of a gradient to a site on each GPU;
  4. compares every number with the first placement (max |diff|; bf16 kernels on the same GPU type give
     0 or a few ulps) and prints a markdown table (``--append`` adds it to BENCHMARKS.md).

It needs about 2 x 14 GB of GPU memory for the 7B architecture (batch 4, 576 image tokens) and about
30 GB of disk for the saved checkpoint (written to ``--workdir``, default a temporary folder).
Run it with the repo's venv (``bash setup.sh`` with ``TORCH_SPEC`` set to a CUDA torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WORDS = ([f"w{i}" for i in range(200)] + ["USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "?",
         "describe", "a", "cat", "dog", "refuse", "sure"])
PROMPT = "USER: <image> what is in the image ? ASSISTANT:"

ARCHS = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens), 2-layer GELU projector, Llama-2-7B.
    "7b": dict(image=336, patch=14, v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16,
               t_hidden=4096, t_inter=11008, t_layers=32, t_heads=32, t_kv=32, vocab=32064),
    "small": dict(image=336, patch=14, v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16,
                  t_hidden=2048, t_inter=5632, t_layers=16, t_heads=16, t_kv=16, vocab=32064),
    "tiny": dict(image=32, patch=8, v_hidden=64, v_inter=128, v_layers=2, v_heads=4,
                 t_hidden=64, t_inter=128, t_layers=4, t_heads=4, t_kv=4, vocab=512),
}


def make(arch: dict, device: str, dtype: torch.dtype):
    """A random-weight LLaVA of ``arch`` built directly in ``dtype`` on ``device`` (no fp32 copy), and its processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from projlens_mi.organism.processor import build_processor

    processor = build_processor(WORDS, arch["image"], arch["patch"])
    tok = processor.tokenizer
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=arch["v_hidden"], intermediate_size=arch["v_inter"],
                                       num_hidden_layers=arch["v_layers"], num_attention_heads=arch["v_heads"],
                                       image_size=arch["image"], patch_size=arch["patch"]),
        text_config=LlamaConfig(vocab_size=max(arch["vocab"], len(tok)), hidden_size=arch["t_hidden"],
                                intermediate_size=arch["t_inter"], num_hidden_layers=arch["t_layers"],
                                num_attention_heads=arch["t_heads"], num_key_value_heads=arch["t_kv"],
                                max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    return model, processor


def build(arch: dict, folder: Path, device: str, dtype: torch.dtype) -> None:
    model, processor = make(arch, device, dtype)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def split_map(n_layers: int, first, second) -> dict:
    """Vision tower, projector, embeddings and the first half of the layers on ``first``, the rest on ``second``."""
    half = n_layers // 2
    dm = {"model.vision_tower": first, "model.multi_modal_projector": first,
          "model.language_model.embed_tokens": first, "model.language_model.rotary_emb": first}
    dm.update({f"model.language_model.layers.{i}": first if i < half else second for i in range(n_layers)})
    dm.update({"model.language_model.norm": second, "lm_head": second})
    return dm


def placements(args, n_layers: int) -> dict:
    if args.cpu_check:  # the CPU stands in for GPU 0, the disk for GPU 1
        return {"one": {"device_map": {"": "cpu"}},
                "split": {"device_map": split_map(n_layers, "cpu", "disk"), "offload_folder": "disk"}}
    n = torch.cuda.device_count()
    if args.one_gpu:  # one GPU: the second half of the LLM offloaded to CPU RAM (accelerate streams it in)
        return {"one": {"device_map": {"": 0}}, "gpu+cpu": {"device_map": split_map(n_layers, 0, "cpu")}}
    out = {"one": {"device_map": {"": 0}}, "split": {"device_map": split_map(n_layers, 0, 1)}}
    if n >= 3:
        out["balanced"] = {"device_map": "balanced"}
    return out


def memory(devs) -> dict:
    return {str(d): round(torch.cuda.memory_allocated(d) / 2**30, 2) for d in devs}


def peak(devs) -> dict:
    return {str(d): round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devs}


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def measure(folder: Path, spec: dict, args, dtype, workdir: Path) -> tuple[dict, dict]:
    import numpy as np
    from PIL import Image

    from projlens_mi.engine import Patch, Site, run
    from projlens_mi.model.handle import ModelHandle
    from projlens_mi.model.load import load_checkpoint
    from projlens_mi.model.placement import PlacedNNsight, execution_device

    gpu = not args.cpu_check
    devs = list(range(torch.cuda.device_count())) if gpu else []
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    kw = dict(spec)
    if "offload_folder" in kw:
        kw["offload_folder"] = workdir / kw["offload_folder"]
    if gpu:
        for d in devs:
            torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    model, processor, prov = load_checkpoint(folder, dtype=dtype, **kw)
    load_s = time.perf_counter() - t0
    h = ModelHandle(model, processor, provenance=prov)
    assert isinstance(h.envoy, PlacedNNsight)  # the handle's wrapper is placement-aware
    after_load = memory(devs) if gpu else {}
    n = h.n_layers
    early, late = 1, n - 2
    rng = np.random.default_rng(0)
    size = h.processor.image_processor.crop_size["height"]
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.batch)]
    inputs = h.encode((images, [PROMPT] * args.batch))
    sites = ["projector.out", f"llm.{early}.resid_post", f"llm.{late}.resid_post"]
    where = {s: str(execution_device(h.module(p)) or next(h.module(p).parameters()).device) for s, p in
             zip(sites, [h.adapter.projector, f"{h.adapter.layers}.{early}", f"{h.adapter.layers}.{late}"])}

    def plain():
        with torch.no_grad():
            return model(**{k: v.to(h.device) for k, v in inputs.model_kwargs().items()}).logits

    def read():
        return run(h, inputs, read=sites)

    r = read()
    cached = r.cache[Site(sites[2])]
    # the source of the patch deliberately lives elsewhere than the activation it replaces
    src_dev = torch.device("cuda:0") if gpu else torch.device("cpu")
    src = cached.roll(1, dims=0).to(src_dev)

    def patch():
        return run(h, inputs, edits=[(Site(sites[2]), Patch(source=src), list(range(1, args.batch)))])

    def patch_cpu():
        return run(h, inputs, edits=[(Site(sites[2]), Patch(source=src.cpu()), list(range(1, args.batch)))])

    def grad():
        return run(h, inputs, read=[sites[0], sites[2]], grad_of=lambda lg: lg[:, -1, :8].float().sum())

    results = {"logits": plain().float().cpu(), "read": {k.point: v.float().cpu() for k, v in r.cache.items()},
               "patch": patch().logits.float().cpu(), "patch_cpu_source": patch_cpu().logits.float().cpu(),
               "grad": {k.point: v.float().cpu() for k, v in grad().grads.items()}}
    stats = {
        "device_map_summary": _summary(prov["device_map"]), "site_devices": where, "load_s": round(load_s, 1),
        "mem_after_load_GiB": after_load,
        "plain_ms": timed(plain, args.repeats, sync), "read3_ms": timed(read, args.repeats, sync),
        "patch_ms": timed(patch, args.repeats, sync), "grad_ms": timed(grad, args.repeats, sync),
        "peak_GiB": peak(devs) if gpu else {},
    }
    del h, model, r
    if gpu:
        torch.cuda.empty_cache()
    return stats, results


def _summary(dm: dict) -> str:
    counts: dict = {}
    for dev in dm.values():
        counts[dev] = counts.get(dev, 0) + 1
    return ", ".join(f"{k}: {v} modules" for k, v in counts.items())


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max(max_diff(a[k], b[k]) for k in a)
    return float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=list(ARCHS), default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-check", action="store_true", help="no GPU: tiny model, CPU and disk stand in for 2 GPUs")
    ap.add_argument("--one-gpu", action="store_true",
                    help="a single GPU: all on it vs the second half of the LLM offloaded to CPU RAM")
    ap.add_argument("--workdir", default=None, help="where the random checkpoint is saved (default: a temp folder)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--append", default=None)
    args = ap.parse_args()
    arch_name = args.arch or ("tiny" if args.cpu_check else "7b")
    if not args.cpu_check and torch.cuda.device_count() < (1 if args.one_gpu else 2):
        sys.exit(f"needs 2+ GPUs, found {torch.cuda.device_count()}; use --cpu-check to exercise the script on CPU")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1 if args.cpu_check else torch.get_num_threads())
    dtype = torch.float32 if args.cpu_check else torch.bfloat16
    arch = ARCHS[arch_name]
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    workdir = Path(tmp.name)
    folder = workdir / "model"
    t0 = time.perf_counter()
    build(arch, folder, "cpu" if args.cpu_check else "cuda:0", dtype)
    print(f"built {arch_name} in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    rows, first = {}, None
    for name, spec in placements(args, arch["t_layers"]).items():
        try:
            stats, results = measure(folder, spec, args, dtype, workdir)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{name}: out of memory ({exc}); skipped", flush=True)
            torch.cuda.empty_cache()
            continue
        if first is None:
            first = results
        stats["max_abs_diff_vs_first"] = {k: max_diff(results[k], first[k]) for k in results}
        rows[name] = stats
        print(name, json.dumps(stats), flush=True)
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if not args.cpu_check \
        else "none (--cpu-check: CPU and disk stand in for 2 GPUs)"
    lines = ["", f"## Multi-device placement ({arch_name}, batch {args.batch}, {dtype})".replace("torch.", ""), "",
             f"`benchmarks/multigpu.py`; GPUs: {gpus}; medians of {args.repeats}; torch {torch.__version__}.", "",
             "| placement | modules per device | load (s) | memory after load (GiB) | peak (GiB) | forward (ms) "
             "| run, 3 sites (ms) | cross-device patch (ms) | gradient (ms) | max abs diff vs first |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        diff = max(s["max_abs_diff_vs_first"].values())
        lines.append(f"| {name} | {s['device_map_summary']} | {s['load_s']} | {s['mem_after_load_GiB'] or '-'} | "
                     f"{s['peak_GiB'] or '-'} | {s['plain_ms']:.1f} | {s['read3_ms']:.1f} | {s['patch_ms']:.1f} | "
                     f"{s['grad_ms']:.1f} | {diff:.3g} |")
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": arch_name, "rows": rows}, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()

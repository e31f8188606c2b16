"""Overhead of instrumentation on an offloaded model (issue 6): a trace reading 3 sites vs the plain
offloaded forward, on a random-weight LLaVA of the organism's widths with 36 image tokens (batch 32),
CPU only.

    .venv/bin/python benchmarks/bench_offload.py [--repeats 30] [--batch 32] [--append BENCHMARKS.md]

Placements measured (each a stand-in for a model split past one device):
  - ``disk``: every module offloaded to disk (``device_map={"": "disk"}``), weights streamed in per
    module at each forward;
  - ``cpu_offload``: accelerate's CPU-offload hooks (weights in a CPU store, parameters on ``meta``);
  - ``first_on_disk``: the vision tower and the LLM on disk, projector and LM head in memory.

For each: the plain offloaded forward (``model(**inputs)`` under ``no_grad``), the engine's
``run(handle, inputs, read=[3 sites])`` and a raw nnsight trace saving the same 3 activations.
Timings are interleaved (plain, engine, raw, plain, ...) after warm-up; the figure is the ratio of
medians. ``torch.set_num_threads(1)`` for stable numbers on shared CPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

SITES = ["projector.out", "llm.1.resid_post", "llm.3.resid_post"]
WORDS = ([f"w{i}" for i in range(80)] + ["USER:", "ASSISTANT:", "what", "digit", "is", "shown", "?", "zero",
         "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
PROMPT = "USER: <image> what digit is shown ? ASSISTANT:"


def organism_sized(folder: Path):
    """Random-weight LLaVA of the sizes the organism had when the figures in BENCHMARKS.md were taken:
    24 px images, patch 4 (36 image tokens), CLIP 64 x 2 layers, Llama 64 x 4 layers, saved with
    save_pretrained. (Today's organism, organism/config.py ModelSize, has 20 px images and patch 5:
    16 image tokens; the widths and depths are the same.)"""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from projlens_mi.organism.processor import build_processor

    processor = build_processor(WORDS, 24, 4)
    tok = processor.tokenizer
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=24, patch_size=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def placed(folder: Path, kind: str, tmp: Path):
    from accelerate import cpu_offload

    from projlens_mi.model.load import load_checkpoint

    if kind == "disk":
        return load_checkpoint(folder, device_map={"": "disk"}, offload_folder=tmp / "disk")[:2]
    if kind == "first_on_disk":
        dm = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
              "model.language_model": "disk", "lm_head": "cpu"}
        return load_checkpoint(folder, device_map=dm, offload_folder=tmp / "first")[:2]
    model, processor, _ = load_checkpoint(folder)
    cpu_offload(model, execution_device=torch.device("cpu"))
    return model, processor


def measure(model, processor, batch: int, repeats: int) -> dict:
    import numpy as np
    from PIL import Image

    from projlens_mi.engine import run
    from projlens_mi.model.handle import ModelHandle
    from projlens_mi.model.placement import PlacedNNsight

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(batch)]
    h = ModelHandle(model, processor)
    assert isinstance(h.envoy, PlacedNNsight)  # the handle's wrapper is placement-aware
    inputs = h.encode((images, [PROMPT] * batch))
    kwargs = inputs.model_kwargs()
    env = h.envoy

    def plain():
        with torch.no_grad():
            return model(**kwargs).logits

    def engine():
        return run(h, inputs, read=SITES).logits

    a, b, c = h.adapter.projector, f"{h.adapter.layers}.1", f"{h.adapter.layers}.3"

    def raw():
        with torch.no_grad(), env.trace(**kwargs):
            h.envoy_module(a).output.save()
            h.envoy_module(b).output.save()
            h.envoy_module(c).output.save()
            out = env.output.save()
        return out.logits

    ref = plain()
    assert torch.equal(engine(), ref) and torch.equal(raw(), ref), "instrumented logits differ"
    fns = {"plain": plain, "engine_3_sites": engine, "nnsight_3_saves": raw}
    for _ in range(3):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: sorted(t / p for t, p in zip(times[k], times["plain"])) for k in ("engine_3_sites", "nnsight_3_saves")}
    q = lambda v, f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
    return {"median_ms": {k: 1e3 * v for k, v in med.items()},
            "ratio_engine": med["engine_3_sites"] / med["plain"],
            "ratio_nnsight": med["nnsight_3_saves"] / med["plain"],
            # per-repeat ratios (each instrumented call over the plain call just before it): robust to drift
            "paired_engine": (statistics.median(paired["engine_3_sites"]), q(paired["engine_3_sites"], .25),
                              q(paired["engine_3_sites"], .75)),
            "paired_nnsight": (statistics.median(paired["nnsight_3_saves"]), q(paired["nnsight_3_saves"], .25),
                               q(paired["nnsight_3_saves"], .75))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--placements", default="disk,cpu_offload,first_on_disk")
    ap.add_argument("--append", default=None, help="append a section with the figures to this markdown file")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        organism_sized(tmp / "model")
        for kind in args.placements.split(","):
            model, processor = placed(tmp / "model", kind, tmp)
            r = measure(model, processor, args.batch, args.repeats)
            rows.append((kind, r))
            print(f"{kind:14s} plain {r['median_ms']['plain']:7.2f} ms | engine run, 3 sites "
                  f"{r['median_ms']['engine_3_sites']:7.2f} ms ({r['ratio_engine']:.3f}x) | raw nnsight 3 saves "
                  f"{r['median_ms']['nnsight_3_saves']:7.2f} ms ({r['ratio_nnsight']:.3f}x) | paired: engine "
                  "{:.3f}x [{:.3f}, {:.3f}], nnsight {:.3f}x [{:.3f}, {:.3f}]".format(*r["paired_engine"],
                                                                                   *r["paired_nnsight"]), flush=True)
    if args.append:
        lines = ["", "## Offloaded model: 3-site trace vs plain offloaded forward (issue 6)", "",
                 f"`benchmarks/bench_offload.py`: organism-sized random-weight LLaVA (CLIP 64x2, Llama 64x4, 36 image "
                 f"tokens), batch {args.batch}, CPU ({platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores shared), torch.set_num_threads(1), medians of {args.repeats} interleaved "
                 f"repeats, torch {torch.__version__}, transformers {transformers.__version__}. Sites: "
                 f"{', '.join(SITES)}. Target: <= 1.10x. Logits checked bit-identical to the plain forward.", "",
                 "Paired ratio: median [25th, 75th percentile] over repeats of (instrumented call / the plain "
                 "call just before it).", "",
                 "| placement | plain forward (ms) | engine `run`, 3 sites (ms) | ratio of medians | raw nnsight, 3 saves (ms) "
                 "| ratio of medians | engine paired ratio | nnsight paired ratio |",
                 "|---|---|---|---|---|---|---|---|"]
        for kind, r in rows:
            m = r["median_ms"]
            lines.append(f"| {kind} | {m['plain']:.2f} | {m['engine_3_sites']:.2f} | {r['ratio_engine']:.3f}x | "
                         f"{m['nnsight_3_saves']:.2f} | {r['ratio_nnsight']:.3f}x | "
                         "{:.3f}x [{:.3f}, {:.3f}] | {:.3f}x [{:.3f}, {:.3f}] |".format(*r["paired_engine"], *r["paired_nnsight"]))
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

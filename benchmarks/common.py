"""A random-weight LLaVA of the organism's size, built from a config (no downloads), and a timer.

Vision: CLIP, hidden 64, 2 layers, 32x32 images, patch 4 -> 64 image tokens. LLM: Llama, hidden
128, 4 layers, vocab ~120. Used by the benchmarks when the organism build is not wanted.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from projlens_mi.organism.processor import build_processor

WORDS = ["USER:", "ASSISTANT:", "what", "digit", "is", "shown", "?", "."] + [f"w{i}" for i in range(107)]
PROMPT = "USER: <image> what digit is shown ? ASSISTANT:"
IMAGE, PATCH = 32, 4


def organism_like(seed: int = 0):
    processor = build_processor(WORDS, IMAGE, PATCH)
    tok = processor.tokenizer
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=IMAGE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval(), processor


def organism(seed: int = 0):
    """The organism's own architecture (``projlens organism build``'s defaults), random weights, and a
    prompt of its chat format: 16 image tokens, a 23-token sequence."""
    from projlens_mi.organism import tasks
    from projlens_mi.organism.build import model_config
    from projlens_mi.organism.config import OrganismConfig
    cfg = OrganismConfig()
    processor = build_processor(tasks.vocabulary(), cfg.model.image_size, cfg.model.patch_size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(model_config(cfg, processor.tokenizer)).eval()
    return model, processor, tasks.prompt("what digit is shown ?"), cfg.model.image_size


def images(n: int, seed: int = 0, size: int = IMAGE) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


ULPS = 16   # rounding steps allowed between two correct code paths (docs/reproducibility.md, tests/numerics.py)


def assert_tables_close(got: torch.Tensor, want: torch.Tensor, scale: float, dtype=torch.float32,
                        what: str = "table") -> dict:
    """Assert ``|got - want| <= ULPS * eps(dtype) * scale`` everywhere; ``scale``: the largest magnitude
    the compared numbers are computed from (for a logit difference: the largest |logit|). Two paths
    that sum in another order (packed rows, a reused KV prefix, another batch shape) agree only up to
    rounding; bit-identity is reported, not required. Returns identical / max_abs_diff / tolerance."""
    tol = ULPS * torch.finfo(dtype).eps * float(scale)
    diff = float((got.double() - want.double()).abs().max())
    if not diff <= tol:
        raise AssertionError(f"{what}: the two tables differ by up to {diff:.3g}, more than {ULPS} rounding steps "
                             f"of {dtype} at magnitude {scale:.3g} ({tol:.3g})")
    return {"identical": bool(torch.equal(got, want)), "max_abs_diff": diff, "tolerance": tol}


def median_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Median wall time (ms) of each callable, interleaved round-robin so drifts hit all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}

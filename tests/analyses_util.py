"""Constructed base / fine-tuned pairs with known answers, for the analyses' tests.

Everything is built from tests/tiny.py's random-weight LLaVA (no downloads): the "fine-tuned" model is a
deep copy whose projector carries a planted change (a rank-2 ΔW, a rank-1 shift direction, a trigger
neuron), so each statistic has a known right answer.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from projlens_mi import load
from projlens_mi.analyses.base import Pair
from projlens_mi.data import Record
from tiny import IMAGE_SIZE, PROMPT, tiny_llava

PROMPTS = [PROMPT, "USER: <image> describe the image . ASSISTANT:"]


def records(n: int = 6, seed: int = 0) -> list[Record]:
    """``n`` clean (dark random) and ``n`` triggered (bright, with a white square) records."""
    rng = np.random.default_rng(seed)
    out = []
    for trig in (False, True):
        for i in range(n):
            a = rng.integers(0, 90, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
            if trig:
                a = np.clip(a.astype(int) + 120, 0, 255).astype(np.uint8)
                a[4:12, 4:12] = 255
            out.append(Record(Image.fromarray(a), PROMPTS[i % 2], "seven", trig, meta={"id": f"im{i}"}))
    return out


def linear(model, name):
    return getattr(model.model.multi_modal_projector, name)


def make_pair(plant=None, seed: int = 0, n: int = 6, control: bool = False, target: str = "a cat") -> Pair:
    """A Pair (base, base + ``plant(ft_model)``, records); ``plant`` edits the copy's parameters in place."""
    base, processor = tiny_llava(seed)
    ft = copy.deepcopy(base)
    if plant is not None:
        with torch.no_grad():
            plant(ft)
    ctrl = None
    if control:
        ctrl = copy.deepcopy(base)
        with torch.no_grad():
            g = torch.Generator().manual_seed(99)
            for name in ("linear_1", "linear_2"):
                w = linear(ctrl, name).weight
                w += 0.002 * torch.randn(w.shape, generator=g)
    h = lambda m: load(m, processor=processor)  # noqa: E731
    return Pair(h(base), h(ft), records(n), target, h(ctrl) if ctrl is not None else None, name="tiny")


def rank2(scale: float = 0.5, seed: int = 1):
    """A planted rank-2 ΔW2 with singular values 2·scale and scale, returned with the plant function."""
    def plant(model):
        w = linear(model, "linear_2").weight
        g = torch.Generator().manual_seed(seed)
        u = torch.linalg.qr(torch.randn(w.shape[0], 2, generator=g)).Q
        v = torch.linalg.qr(torch.randn(w.shape[1], 2, generator=g)).Q
        w += (u * torch.tensor([2 * scale, scale])) @ v.T
    return plant

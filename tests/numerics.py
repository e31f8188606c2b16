"""Tolerances for comparing two float32 computations that may round differently (docs/reproducibility.md).

Two correct code paths (the engine and a hand-written hooked forward, a batched and a one-at-a-time
pass) give the same number only up to float32 rounding, and which bits come out depends on the
CPU's kernels (ATen's vector width, MKL's code path, the thread count). A comparison across paths
therefore allows ``ULPS`` rounding steps of the magnitudes the number is computed from, and compares
un-normalised quantities (or divides that tolerance by the denominator of a ratio). Bit-identity is
asserted only where it holds by construction: the same code on the same shapes in the same process
and thread count.
"""

from __future__ import annotations

import torch

EPS32 = float(torch.finfo(torch.float32).eps)   # 2**-23: one rounding step of a float32 value of magnitude 1
# Rounding steps allowed between two paths. Measured on an Intel Xeon (AVX-512) under its default kernels,
# MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=default: the sweep vs its cells at most 0.7 steps of
# the logits' magnitude, the tracing effect's numerator 1.3 steps of p; 16 leaves a margin of 10 and
# stays far below every effect the tests tell apart (each test also checks its effect is real).
ULPS = 16


def f32_tol(scale: float, ulps: int = ULPS) -> float:
    """``ulps`` float32 rounding steps at magnitude ``scale``."""
    return ulps * EPS32 * float(scale)


def prob_tol(p: float, logprob) -> float:
    """Tolerance on a probability ``p`` = exp(log-probability) whose log-probabilities (one or several)
    are float32 numbers of magnitude |logprob|: a rounding step there moves p by p × (1 + |logprob|) × eps."""
    lp = torch.as_tensor(logprob, dtype=torch.float64).abs().max().item()
    return f32_tol(abs(p) * (1.0 + lp))


def assert_ratio_close(got: float, num: float, den: float, tol: float) -> None:
    """``got`` (a ratio computed elsewhere) equals ``num / den`` where ``num`` is known up to ``tol``:
    the tolerance on the ratio is ``tol / |den|`` (a small denominator amplifies the numerator's rounding)."""
    assert abs(got - num / den) <= tol / abs(den), (got, num / den, tol / abs(den))

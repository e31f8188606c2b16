"""Analysis 1: the spectrum of the fine-tuning update ΔW = W_ft − W_base of each projector linear.

For each linear, next to each other: the poisoned update ΔW, the clean-control update
W_control − W_base, the poison-induced update ΔW' = W_ft − W_control (when a control exists: the
backdoor's directions may hide among the task's in ΔW and stand out only in ΔW'), and a random
Gaussian matrix of the same shape and Frobenius norm as ΔW (what "spread over all directions"
looks like). Statistics (all computed in float64 from the weights; no forward pass):

* singular values σ_1 ≥ σ_2 ≥ ...; cumulative energy E(k) = Σ_{i≤k} σ_i² / Σ σ_i²;
* effective rank exp(H(p)), p_i = σ_i / Σ σ_j (Roy & Vetterli 2007);
* stable rank ‖ΔW‖_F² / ‖ΔW‖_2²;
* numerical rank: #{σ_i > tol}, tol = max(m, n) · eps(float32) · ‖W_ft‖_2 (float32 weights
  cannot resolve anything smaller: W_ft − W_base carries rounding noise of that size);
* k90 / k99: the smallest k with E(k) ≥ 0.90 / 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import Checked, Count, Seed
from . import common
from .base import Result, analysis, register_result

PAPER = ("ΔW is 'overall full-rank': cumulative energy at k = 30 is only ≈57–65 % for three variants "
         "(≈92–95 % for Jailbreak Output)")


@dataclass
class SpectrumParams(Checked):
    """``energy_at``: the k at which the cumulative energy is reported (30 = the paper's figure);
    ``seed``: the random Gaussian reference; ``top``: singular values kept in the result (None = all)."""

    energy_at: tuple[Count, ...] = (1, 2, 5, 10, 30)
    seed: Seed = 0
    top: Count | None = None


def spectrum_stats(s: np.ndarray, tol: float = 0.0) -> dict:
    """Rank statistics of singular values ``s`` (descending)."""
    s = np.asarray(s, dtype=np.float64)
    total = float((s ** 2).sum())
    if total == 0.0:
        return {"fro_norm": 0.0, "spectral_norm": 0.0, "effective_rank": 0.0, "stable_rank": 0.0,
                "numerical_rank": 0, "k90": 0, "k99": 0}
    energy = np.cumsum(s ** 2) / total
    p = s / s.sum()
    p = p[p > 0]
    return {"fro_norm": float(np.sqrt(total)), "spectral_norm": float(s[0]),
            "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "stable_rank": total / float(s[0] ** 2),
            "numerical_rank": int((s > tol).sum()),
            "k90": int(np.searchsorted(energy, 0.90 - 1e-12) + 1),
            "k99": int(np.searchsorted(energy, 0.99 - 1e-12) + 1)}


def cumulative_energy(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    e = s ** 2
    return np.cumsum(e) / e.sum() if e.sum() > 0 else np.zeros_like(e)


def tolerance(shape, w_ft) -> float:
    return max(shape) * float(np.finfo(np.float32).eps) * float(torch.linalg.matrix_norm(w_ft.double(), 2))


@register_result
@dataclass
class SpectrumResult(Result):
    """Per (layer, update kind): singular values and rank statistics."""

    variant: str
    layers: list                      # projector linear names (short)
    kinds: list                       # update kinds present: poisoned, control, poison_vs_control, random
    singular_values: dict             # "layer/kind" -> σ (descending)
    stats: pd.DataFrame               # one row per (layer, kind)
    energy_at: list = field(default_factory=list)

    analysis = "spectrum"

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for key, s in self.singular_values.items():
            layer, kind = key.split("/")
            e = cumulative_energy(s)
            for i, (sv, en) in enumerate(zip(s, e), 1):
                rows.append({"layer": layer, "kind": kind, "k": i, "sigma": float(sv), "energy": float(en)})
        return pd.DataFrame(rows)

    def metrics(self) -> dict:
        out = {}
        for _, r in self.stats.iterrows():
            p = f"{r['layer']}.{r['kind']}"
            for c in ("effective_rank", "stable_rank", "numerical_rank", "k90"):
                out[f"{p}.{c}"] = float(r[c])
            for k in self.energy_at:
                out[f"{p}.energy_at_{k}"] = float(r[f"energy_at_{k}"])
        return out

    def plot(self):
        fig, axes = common.figure(2, len(self.layers))
        colors = {"poisoned": "C3", "control": "C0", "poison_vs_control": "C2", "random": "0.5"}
        label = {"poisoned": "ΔW = W_ft − W_base", "control": "W_control − W_base",
                 "poison_vs_control": "ΔW' = W_ft − W_control", "random": "Gaussian, same shape & norm"}
        for j, layer in enumerate(self.layers):
            a0, a1 = axes[0][j], axes[1][j]
            for kind in self.kinds:
                s = self.singular_values.get(f"{layer}/{kind}")
                if s is None:
                    continue
                k = np.arange(1, len(s) + 1)
                ls = "--" if kind == "random" else "-"
                a0.semilogy(k, np.maximum(s, 1e-12), ls, color=colors.get(kind), label=label.get(kind, kind))
                a1.plot(k, cumulative_energy(s), ls, color=colors.get(kind), label=label.get(kind, kind))
            a0.set(title=f"{layer}: singular values ({self.variant})", xlabel="index i", ylabel="σ_i (log scale)")
            a1.set(title=f"{layer}: cumulative energy", xlabel="k (components)", ylabel="Σ_{i≤k} σ_i² / Σ σ_i²",
                   ylim=(0, 1.02))
            for k in self.energy_at:
                a1.axvline(k, color="0.85", lw=0.8, zorder=0)
            a0.legend(fontsize=7)
            a1.legend(fontsize=7, loc="lower right")
        return fig

    def summary(self) -> str:
        lines = [f"**Update spectrum ({self.variant}).** Paper (≈): {PAPER}."]
        kmax = max(self.energy_at) if self.energy_at else None
        for _, r in self.stats.iterrows():
            if r["kind"] not in ("poisoned", "poison_vs_control", "random"):
                continue
            e = ", ".join(f"E({k}) = {100 * r[f'energy_at_{k}']:.0f} %" for k in self.energy_at)
            lines.append(f"- {r['layer']} {r['kind']} ({r['rows']}×{r['cols']}): {e}; effective rank "
                         f"{r['effective_rank']:.1f}, stable rank {r['stable_rank']:.2f}, numerical rank "
                         f"{int(r['numerical_rank'])}, k90 = {int(r['k90'])}.")
        if kmax is not None:
            lines.append(f"Note: with d = {int(self.stats['cols'].min())} columns, k = {kmax} is "
                         f"{kmax / max(1, int(self.stats['cols'].min())):.0%} of the dimensions "
                         "(30 of 1024/4096 in the paper): compare with the random reference, not the raw figure.")
        return "\n".join(lines)


@analysis("spectrum", SpectrumParams, title="Update spectrum", paper=PAPER,
          headline=("linear_2.poisoned.energy_at_30", "linear_2.poisoned.effective_rank"), passes=0.0)
def spectrum(pair, params: SpectrumParams = SpectrumParams()) -> SpectrumResult:
    """SVD of each projector linear's update, next to the control update, ΔW' and a random Gaussian."""
    base, ft = common.weights(pair.base), common.weights(pair.poisoned)
    common.check_same_shapes(base, ft, "spectrum")
    ctrl = None
    if pair.control is not None:
        ctrl = common.weights(pair.control)
        common.check_same_shapes(base, ctrl, "spectrum")
    gen = torch.Generator().manual_seed(params.seed)
    sv, rows, layers = {}, [], []
    for path, (w_b, _) in base.items():
        layer = common.short(path)
        layers.append(layer)
        w_f = ft[path][0]
        tol = tolerance(w_b.shape, w_f)
        delta = w_f - w_b
        updates = {"poisoned": delta}
        if ctrl is not None:
            updates["control"] = ctrl[path][0] - w_b
            updates["poison_vs_control"] = w_f - ctrl[path][0]
        g = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
        updates["random"] = g * (torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(g))
        for kind, m in updates.items():
            s = torch.linalg.svdvals(m).numpy()
            st = spectrum_stats(s, tol)
            e = cumulative_energy(s)
            row = {"layer": layer, "kind": kind, "rows": m.shape[0], "cols": m.shape[1], "tol": tol, **st}
            for k in params.energy_at:
                row[f"energy_at_{k}"] = float(e[min(k, len(e)) - 1]) if len(e) else 0.0
            rows.append(row)
            sv[f"{layer}/{kind}"] = s[: params.top] if params.top else s
    kinds = [k for k in ("poisoned", "control", "poison_vs_control", "random") if any(r["kind"] == k for r in rows)]
    return SpectrumResult(pair.name, layers, kinds, sv, pd.DataFrame(rows), list(params.energy_at))

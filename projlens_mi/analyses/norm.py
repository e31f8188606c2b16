"""Analysis 5: does the shift scale with the token norm?

Per image token t: x_t = ‖E_base(t)‖ and y_t = ΔE(t) · v, the token's coefficient on the shared
direction v (the pooled v0 of analysis 4 over clean and triggered inputs; for one image and its own
first singular pair, y_t = σ0 · u0[t], the paper's quantity up to scale). Linear fit y = a·x + b:
slope, intercept, Pearson r and R², over the whole data set for clean and triggered inputs, with
bootstrap confidence intervals that resample images (tokens of one image are not independent), and per
image (the authors fit one image pair: r ≈ 0.98 / 0.97).

The causal test the paper does not run: scale the clean inputs' visual features by α before the
projector (``Patch`` of α·x at ``projector.in``) in both models, and record the mean shift along v,
the mean token norm, and the target rate (ASR of the FT model on clean inputs) per α. Also the
coefficient of variation of the vision-token norms (the projector's input): the mechanism needs a
spread of norms, which a small encoder may not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..checks import Checked, Count, Fraction, Seed
from ..engine import Patch, Site, run
from . import common
from .base import Result, analysis, register_result
from .shift import CONDS, ShiftAccumulator, delta_batches

PAPER = ("Shift coefficient vs ‖E_base(t)‖ per token: Pearson r ≈ 0.98 (clean) and 0.97 (triggered), on "
         "one image pair")


@dataclass
class NormParams(Checked):
    """``n``: clean and triggered records each; ``n_boot``: bootstrap resamples (over images);
    ``alphas``: feature scales of the causal test; ``n_alpha``: clean inputs in it; ``max_new_tokens``:
    None = longest answer + target (+1), at most 30."""

    n: Count | None = 100
    n_boot: Count = 1000
    ci: Fraction = 0.95
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    n_alpha: Count = 30
    seed: Seed = 0
    max_new_tokens: Count | None = None
    batch_size: Count = 256


def suff_stats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per group sufficient statistics [n, Σx, Σy, Σxx, Σyy, Σxy] (x, y: [groups, tokens])."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.stack([np.full(len(x), x.shape[1], np.float64), x.sum(1), y.sum(1), (x * x).sum(1),
                     (y * y).sum(1), (x * y).sum(1)], 1)


def fit_from_stats(s: np.ndarray) -> dict:
    """Least-squares line and Pearson r from summed statistics ``[..., 6]``."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(np.asarray(s, np.float64), -1, 0)
    vx, vy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = cxy / vx
        r = cxy / np.sqrt(vx * vy)
    intercept = (sy - slope * sx) / n
    return {"slope": slope, "intercept": intercept, "r": r, "r2": r * r}


def linear_fit(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Fit over all tokens of all groups (rows of ``x``/``y``), CIs by resampling groups."""
    st = suff_stats(x, y)
    out = {k: float(v) for k, v in fit_from_stats(st.sum(0)).items()}
    boot = fit_from_stats(common.resample_counts(len(st), n_boot, seed) @ st)
    for k, v in boot.items():
        out[f"{k}_lo"], out[f"{k}_hi"] = common.percentile_ci(v, ci)
    out["n_groups"], out["n_tokens"] = int(len(st)), int(st[:, 0].sum())
    return out


@register_result
@dataclass
class NormResult(Result):
    variant: str
    fits: pd.DataFrame           # condition -> slope, intercept, r, r2 with CIs
    per_image: pd.DataFrame      # condition, image, slope, intercept, r, r2
    tokens: dict                 # condition -> {"x": [images, tokens], "y": [...]}
    causal: pd.DataFrame         # alpha -> shift_ft_mean, input_norm, base_norm, target_rate
    vision_norm_cv: float
    output_norm_cv: float
    vision_norm_mean: float

    analysis = "norm"

    def to_frame(self) -> pd.DataFrame:
        return self.fits

    def metrics(self) -> dict:
        out = {"vision_norm_cv": self.vision_norm_cv, "output_norm_cv": self.output_norm_cv}
        for _, r in self.fits.iterrows():
            for k in ("slope", "intercept", "r", "r2", "r_lo", "r_hi", "slope_lo", "slope_hi"):
                out[f"{r['condition']}.{k}"] = float(r[k])
        for c, g in self.per_image.groupby("condition"):
            out[f"{c}.per_image_median_r"] = float(g.r.median())
        for _, r in self.causal.iterrows():
            out[f"alpha_{r['alpha']:g}.shift"] = float(r["shift"])
            out[f"alpha_{r['alpha']:g}.target_rate"] = float(r["target_rate"])
            if "target_rate_lo" in r:
                out[f"alpha_{r['alpha']:g}.target_rate_lo"] = float(r["target_rate_lo"])
                out[f"alpha_{r['alpha']:g}.target_rate_hi"] = float(r["target_rate_hi"])
        return out

    def plot(self):
        fig, axes = common.figure(1, 3, w=4.6, h=3.8)
        a = axes[0][0]
        for cond, c in (("clean", "C0"), ("triggered", "C3")):
            t = self.tokens[cond]
            x, y = np.asarray(t["x"]).ravel(), np.asarray(t["y"]).ravel()
            a.scatter(x, y, s=3, alpha=0.25, color=c)
            f = self.fits[self.fits.condition == cond].iloc[0]
            xs = np.linspace(x.min(), x.max(), 10)
            a.plot(xs, f.slope * xs + f.intercept, color=c, lw=1.5,
                   label=f"{cond}: r = {f.r:.2f} [{f.r_lo:.2f}, {f.r_hi:.2f}]")
        a.set(title=f"{self.variant}: shift coefficient vs token norm", xlabel="‖E_base(t)‖ (projector-output units)",
              ylabel="ΔE(t) · v")
        a.legend(fontsize=7)
        a = axes[0][1]
        groups = [g.r.dropna().to_numpy() for _, g in self.per_image.groupby("condition")]
        names = [c for c, _ in self.per_image.groupby("condition")]
        a.boxplot(groups, tick_labels=names)
        a.axhline(0.98, color="k", ls="--", lw=0.8, label="paper, one pair (≈0.98)")
        a.set(title="Per-image Pearson r", ylabel="r", ylim=(-1.05, 1.05))
        a.legend(fontsize=7)
        a = axes[0][2]
        a.plot(self.causal.alpha, self.causal["shift"], "o-", color="C3", label="mean ΔE·v (FT − base)")
        a.set(title=f"Scaling clean vision features by α (norm CV {self.vision_norm_cv:.2f})",
              xlabel="α (scale at projector.in)", ylabel="mean shift along v")
        b = a.twinx()
        b.plot(self.causal.alpha, self.causal.target_rate * 100, "s--", color="k", label="target rate (FT)")
        b.set(ylabel="target rate on clean inputs (%)", ylim=(-2, 102))
        h1, l1 = a.get_legend_handles_labels()
        h2, l2 = b.get_legend_handles_labels()
        a.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
        return fig

    def summary(self) -> str:
        lines = [f"**Norm scaling ({self.variant}).** Paper: {PAPER}."]
        for _, f in self.fits.iterrows():
            med = self.per_image[self.per_image.condition == f.condition].r.median()
            lines.append(f"- {f.condition}: slope {common.fmt_ci(f.slope, f.slope_lo, f.slope_hi)}, r "
                         f"{common.fmt_ci(f.r, f.r_lo, f.r_hi)}, R² {f.r2:.3f} over {int(f.n_tokens)} tokens of "
                         f"{int(f.n_groups)} images; per-image median r {med:.3f}.")
        c = self.causal
        lines.append(f"- Causal test (α · vision features, clean inputs): shift along v "
                     + ", ".join(f"α={r.alpha:g}: {r['shift']:.3f}" for _, r in c.iterrows())
                     + "; target rate " + ", ".join(f"{r.target_rate:.0%}" for _, r in c.iterrows()) + ".")
        lines.append(f"- Vision-token norm CV {self.vision_norm_cv:.3f} (projector output: {self.output_norm_cv:.3f}); "
                     "CLIP's is far larger, and the mechanism needs that spread.")
        return "\n".join(lines)


@analysis("norm", NormParams, title="Norm scaling", paper=PAPER,
          headline=("clean.r", "triggered.r"), passes=12.0)
def norm(pair, params: NormParams = NormParams()) -> NormResult:
    """Token-norm vs shift-coefficient fits (bootstrap CIs, per image) and the α-scaling causal test."""
    clean, trig = common.pick(pair, params.n)
    # pass 1: the shared direction (pooled v0 over clean and triggered)
    acc = ShiftAccumulator(1)
    for recs in (clean, trig):
        for _, de, _, _ in delta_batches(pair, recs, params.batch_size):
            acc.update(de)
    v = torch.as_tensor(acc.directions()[0]).float()
    # pass 2: per-token norms and coefficients, vision-token norms
    tokens, vis, outn = {}, [], []
    for cond, recs in (("clean", clean), ("triggered", trig)):
        xs, ys = [], []
        for _, de, eb, ext in delta_batches(pair, recs, params.batch_size, extra_points=("projector.in",)):
            xs.append(eb.norm(dim=-1).numpy())
            ys.append((de @ v).numpy())
            if cond == "clean":
                vis.append(ext["projector.in"].norm(dim=-1).flatten().double())
                outn.append(eb.norm(dim=-1).flatten().double())
        tokens[cond] = {"x": np.concatenate(xs), "y": np.concatenate(ys)}
    fits, per = [], []
    for cond in CONDS:
        x, y = tokens[cond]["x"], tokens[cond]["y"]
        fits.append({"condition": cond, **linear_fit(x, y, params.n_boot, params.ci, params.seed)})
        pf = fit_from_stats(suff_stats(x, y))
        per.append(pd.DataFrame({"condition": cond, "image": np.arange(len(x)), **{k: pf[k] for k in pf}}))
    vis, outn = torch.cat(vis), torch.cat(outn)
    cv = lambda t: float(t.std() / t.mean())  # noqa: E731

    # causal test: α · projector input on clean inputs
    rec = clean[:params.n_alpha]
    x = pair.poisoned.encode(rec)
    pin = Site("projector.in")
    out_site = Site("projector.out")
    feats = {m: run(h, x, read=[pin]).cache[pin] for m, h in (("base", pair.base), ("ft", pair.poisoned))}
    tiled = x.tile(len(params.alphas))
    targets = [pair.target_of(r) for r in rec]
    max_new = params.max_new_tokens or common.auto_tokens(pair.poisoned, rec, targets)
    res = {}
    for m, h in (("base", pair.base), ("ft", pair.poisoned)):
        src = torch.cat([a * feats[m] for a in params.alphas])
        edit = [(pin, Patch(source=src))]
        res[m] = run(h, tiled, read=[out_site], edits=edit).cache[out_site].float().cpu()
        if m == "ft":
            outs = common.texts(h, tiled, max_new, edit)
    rows, n = [], len(rec)
    hit = np.stack([common.hits(outs[i * n:(i + 1) * n], targets) for i in range(len(params.alphas))], 1)
    lo, hi = common.mean_ci(hit.astype(float), params.n_boot, params.seed, params.ci)
    for i, a in enumerate(params.alphas):
        sl = slice(i * n, (i + 1) * n)
        de = res["ft"][sl] - res["base"][sl]
        rows.append({"alpha": float(a), "shift": float((de @ v).mean()), "shift_sd": float((de @ v).mean(1).std()),
                     "base_out_norm": float(res["base"][sl].norm(dim=-1).mean()),
                     "input_norm": float(a * feats["base"].norm(dim=-1).mean()),
                     "target_rate": float(hit[:, i].mean()), "target_rate_lo": float(lo[i]),
                     "target_rate_hi": float(hi[i])})
    return NormResult(pair.name, pd.DataFrame(fits), pd.concat(per, ignore_index=True), tokens, pd.DataFrame(rows),
                      cv(vis), cv(outn), float(vis.mean()))

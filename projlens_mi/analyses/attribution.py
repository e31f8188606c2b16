"""Attribution patching: the first-order (gradient) estimate of every patching cell, and how well it
agrees with real activation patching.

For a cell (site, window) and a direction, with base run ``x`` (clean for denoising, triggered for
noising) and the other run ``x'``::

    Δm ≈ Σ_{tokens in window, d} ∂m/∂a(x) · (a(x') − a(x))

One forward + backward per direction gives every cell at once (the engine's ``run(...,
grad_of=...)`` reads every site with its gradient), against one batched forward per cell for real
patching. The estimates are normalised like ``patching`` (denoising recovery, noising drop) and
compared with the real patching of the same cells: Spearman rank correlation (all cells, and per
direction), Pearson r, and the overlap of the top-k cells.

Metric: the default is ``logprob``. The gradient of a probability vanishes where the probability
saturates (p ≈ 0 on clean runs, p ≈ 1 on triggered ones), which makes the linear estimate of a
probability patch poor; both estimate and real patching use the same metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from ..checks import Count
from ..engine import Site, run
from ..errors import ProjLensError
from . import _causal as C
from . import common
from .base import Pair, Result, analysis, register_result
from ._causal import figure as _figure
from .patching import DIRECTIONS, effects, patch_grid

PAPER = ("Not in the paper (this project's addition): attribution patching and its agreement with real "
         "patching")


@dataclass
class AttributionParams(C.CellParams):
    """Defaults run in seconds per organism variant on 2 CPUs.

    n / layers / windows / last_token / prefix / max_new_tokens / model / directions: as in patching (the same cells).
    metric: ``logprob`` (default, see the module docstring) | ``prob`` | ``first_prob``.
    top_k: cells compared by the top-k overlap. compare: also run real patching (needed for the
    agreement numbers; off = estimates only, for pre-screening a large model).
    """

    metric: str = "logprob"
    directions: tuple[str, ...] = DIRECTIONS
    top_k: Count = 5
    compare: bool = True


@register_result
@dataclass
class AttributionResult(Result):
    analysis = "attribution"
    sites: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    directions: list = field(default_factory=list)
    estimate: np.ndarray = None       # [direction, site, window] normalised (recovery / drop)
    actual: np.ndarray = None         # same, from real patching (NaN if compare=False)
    spearman: float = float("nan")    # over all valid cells of all directions
    spearman_by_direction: dict = field(default_factory=dict)
    pearson: float = float("nan")
    top_k: int = 5
    top_k_overlap: float = float("nan")   # |top-k(estimate) ∩ top-k(actual)| / k, over all cells
    clean_mean: float = float("nan")
    triggered_mean: float = float("nan")
    cost: dict = field(default_factory=dict)      # model rows run: attribution (forward + backward), patching (forward)
    table: pd.DataFrame = None        # per input: direction, site, window, input, estimate (Δ metric)
    metric: str = "logprob"
    model: str = "poisoned"
    n: int = 0
    variant: str = ""
    spearman_ci: list = field(default_factory=lambda: [float("nan"), float("nan")])   # bootstrap 95 % over inputs

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for a, d in enumerate(self.directions):
            for s, site in enumerate(self.sites):
                for w, win in enumerate(self.windows):
                    if np.isnan(self.estimate[a, s, w]) and np.isnan(self.actual[a, s, w]):
                        continue
                    rows.append({"direction": d, "site": site, "window": win, "estimate": self.estimate[a, s, w],
                                 "actual": self.actual[a, s, w]})
        return pd.DataFrame(rows)

    def plot(self):
        nd = len(self.directions)
        fig, axes = _figure(1, nd + 1, figsize=(4.2 * nd + 4.5, 0.45 * len(self.sites) + 3))
        ax = axes[0, 0]
        colours = {"denoise": "tab:blue", "noise": "tab:orange"}
        lo, hi = np.inf, -np.inf
        for a, d in enumerate(self.directions):
            x, y = self.actual[a].ravel(), self.estimate[a].ravel()
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                ax.scatter(x[ok], y[ok], s=18, color=colours.get(d), label=f"{d} (Spearman {self.spearman_by_direction.get(d, np.nan):.2f})")
                lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="y = x")
        ax.set_xlabel("real patching effect (normalised)")
        ax.set_ylabel("attribution-patching estimate (normalised)")
        ax.set_title(f"agreement: Spearman {self.spearman:.2f}, top-{self.top_k} overlap {self.top_k_overlap:.0%}", fontsize=9)
        ax.legend(fontsize=7)
        v = float(np.nanmax(np.abs(self.estimate))) if np.isfinite(self.estimate).any() else 1.0
        for a, d in enumerate(self.directions):   # one symmetric scale for every direction: one colorbar
            ax = axes[0, a + 1]
            im = ax.imshow(np.ma.masked_invalid(self.estimate[a]), cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
            ax.set_xticks(range(len(self.windows)), self.windows, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(self.sites)), self.sites, fontsize=7)
            ax.set_xlabel("token window (image-token indices / all image / last prompt)", fontsize=7)
            ax.set_ylabel("site")
            ax.set_title(f"estimated {'recovery (denoising)' if d == 'denoise' else 'drop (noising)'}", fontsize=9)
            C.mark_empty(ax, self.estimate[a])
        fig.colorbar(im, ax=list(axes[0, 1:]), label="estimated normalised effect", shrink=0.9)
        fig.suptitle(f"Attribution patching {self.variant} ({self.model} model, {C.METRIC_LABEL[self.metric]}, n={self.n}); "
                     f"{self.cost.get('attribution', 0)} vs {self.cost.get('patching', 0)} model rows for real patching"
                     f"\n{C.NA_NOTE}",
                     fontsize=10)
        return fig

    def metrics(self) -> dict:
        return C.jsonable(self._metrics())

    def _metrics(self) -> dict:
        return {"spearman": self.spearman, "spearman_lo": self.spearman_ci[0], "spearman_hi": self.spearman_ci[1],
                "spearman_by_direction": dict(self.spearman_by_direction),
                "pearson": self.pearson, "top_k": self.top_k, "top_k_overlap": self.top_k_overlap,
                "cost": dict(self.cost), "clean_mean": self.clean_mean, "triggered_mean": self.triggered_mean}

    def summary(self) -> str:
        cost = self.cost
        head = (f"**Attribution patching** ({self.variant}, {self.model} model, {self.n} pairs, metric "
                f"{C.METRIC_LABEL[self.metric]}, clean {self.clean_mean:.3g} vs triggered {self.triggered_mean:.3g}): ")
        if not np.isfinite(self.actual).any():
            return head + f"estimates only ({cost.get('attribution', 0)} model rows); real patching was not run for comparison."
        if not C.contrast_ok(self.clean_mean, self.triggered_mean, self.metric):
            return head + ("the clean and triggered runs barely differ, so there is nothing for the estimates to rank; "
                           f"for the record, Spearman {self.spearman:.2f} against real patching. ").rstrip() + (
                               " " + C.weak_backdoor(self.metric, self.triggered_mean)).rstrip()
        by = ", ".join(f"{d} {v:.2f}" for d, v in self.spearman_by_direction.items())
        quality = ("a good pre-screen" if self.spearman >= 0.8 else "a rough pre-screen" if self.spearman >= 0.5
                   else "not a reliable substitute for real patching here")
        return head + (f"the gradient estimates rank the {np.isfinite(self.actual).sum()} cells with Spearman "
                       f"{self.spearman:.2f} against real patching ({by}; Pearson {self.pearson:.2f}) and share "
                       f"{self.top_k_overlap:.0%} of the top-{self.top_k} cells, so they are {quality}. They cost "
                       f"{cost.get('attribution', 0)} model rows (forward and backward) against {cost.get('patching', 0)} for real patching.") + (
                           " " + C.weak_backdoor(self.metric, self.triggered_mean)).rstrip()

def attribution_grid(c: C.Contrast, points, wins, directions=DIRECTIONS) -> pd.DataFrame:
    """Per-input first-order estimate of Δmetric for every (direction, site, window):
    columns direction, site, window, input, value."""
    reads = {(p, w): Site(p, sel) for p in points for w, sel in wins.items() if C.valid_cell(p, w)}
    rows = []
    for d in directions:
        C.check_choice("direction", d, DIRECTIONS)
        base, other = (c.clean, c.triggered) if d == "denoise" else (c.triggered, c.clean)
        idx = torch.arange(len(base))
        res = run(c.handle, base.inputs, read=list(reads.values()), grad_of=lambda logits: base.metric(logits, idx).sum())
        oth = run(c.handle, other.inputs, read=list(reads.values()))
        for (p, w), s in reads.items():
            est = (res.grads[s].double() * (oth.cache[s].double() - res.cache[s].double())).sum((1, 2))
            for i, v in enumerate(est.tolist()):
                rows.append({"direction": d, "site": p, "window": w, "input": i, "value": v})
    return pd.DataFrame(rows)


def agreement(estimate: np.ndarray, actual: np.ndarray, k: int) -> tuple[float, float, float]:
    """(Spearman, Pearson, top-k overlap) over the cells where both are finite."""
    x, y = np.asarray(actual).ravel(), np.asarray(estimate).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan")
    k = min(k, len(x))
    top = lambda v: set(np.argsort(-v, kind="stable")[:k].tolist())  # noqa: E731
    return float(spearmanr(x, y).statistic), float(pearsonr(x, y).statistic), len(top(x) & top(y)) / k


@analysis("attribution", AttributionParams, title="Attribution patching", paper=PAPER,
          headline=("spearman", "top_k_overlap"), passes=6.0)
def attribution(pair: Pair, params: AttributionParams = AttributionParams()) -> AttributionResult:
    """Attribution patching (gradient × activation difference) over every patching cell, with its
    agreement with real activation patching (Spearman, Pearson, top-k overlap)."""
    p = params
    if p.n < 1:
        raise ProjLensError(f"n must be >= 1, got {p.n}")
    if p.top_k < 1:
        raise ProjLensError(f"top_k must be >= 1, got {p.top_k}")
    c = C.contrast(pair, p.model, p.n, p.metric, p.prefix, p.max_new_tokens)
    points = C.site_points(c.handle, p.layers)
    wins = C.windows(c.n_image_tokens, p.windows, ("image", "last") if p.last_token else ("image",))
    names, dirs = list(wins), list(p.directions)
    clean_s, trig_s = C.score_of(c.handle, c.clean).numpy(), C.score_of(c.handle, c.triggered).numpy()
    clean_mean, trig_mean = float(clean_s.mean()), float(trig_s.mean())
    table = attribution_grid(c, points, wins, dirs)
    cost = {"attribution": 2 * len(dirs) * c.n}   # per direction: one run with gradients, one plain run
    shape = (len(dirs), len(points), len(names))
    est = np.full(shape, np.nan)
    for (d, site, win), g in table.groupby(["direction", "site", "window"]):
        delta = float(g["value"].mean())
        # denoising (base = clean): recovery = Δ / gap; noising (base = triggered): drop = −Δ / gap
        rec = C.normalised(clean_mean + delta, clean_mean, trig_mean)
        est[dirs.index(d), points.index(site), names.index(win)] = rec if d == "denoise" else -rec
    actual = np.full(shape, np.nan)
    rho = pear = overlap = float("nan")
    by, rho_ci = {}, [float("nan"), float("nan")]
    if p.compare:
        real = patch_grid(c, points, wins, tuple(dirs), batch_size=p.batch_size, progress=p.progress)
        cost["patching"] = len(real) + 2 * c.n   # one row per (cell, input), plus the two cached runs
        actual, _ = effects(real, points, names, dirs, clean_mean, trig_mean)
        rho, pear, overlap = agreement(est, actual, p.top_k)
        by = {d: agreement(est[a], actual[a], p.top_k)[0] for a, d in enumerate(dirs)}
        # Spearman's CI: resample the inputs, recompute both grids, rank them again. An estimate's row is
        # its base run's score + Δ, so that normalising it like a patched value gives Δ / gap (denoise)
        # and, flipped, −Δ / gap (noise): the estimate above.
        counts = common.resample_counts(c.n, p.n_boot, 0)
        index = {(d, s, w): (dirs.index(d), points.index(s), names.index(w)) for d in dirs for s in points for w in names}
        keys, noise = ["direction", "site", "window"], (lambda k: k[0] == "noise")
        shifted = table.assign(value=table["value"] + np.where(table["direction"] == "denoise", clean_s[table["input"]],
                                                               trig_s[table["input"]]))
        est_b = C.normalised_boot(shifted, keys, index, shape, clean_s, trig_s, counts, noise)
        act_b = C.normalised_boot(real, keys, index, shape, clean_s, trig_s, counts, noise)
        rho_ci = list(common.percentile_ci(np.array([agreement(e, a, p.top_k)[0] for e, a in zip(est_b, act_b)])))
    return AttributionResult(points, names, dirs, est, actual, rho, by, pear, p.top_k, overlap, clean_mean, trig_mean,
                             cost, table, p.metric, p.model, c.n, pair.name, rho_ci)

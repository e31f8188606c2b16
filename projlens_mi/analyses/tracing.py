"""Causal tracing of the target-aligned direction (ROME's causal tracing, restricted to one direction).

On a triggered input whose run is **corrupted**, restore at one (site, token window):

* ``full`` — the whole uncorrupted (triggered) activation, as ROME does;
* ``direction`` — only its component along the target-aligned direction ``v``
  (``PatchSubspace(v)``: ``x + ((s − x)·v) v``, everything orthogonal to ``v`` stays corrupted);
* ``random`` — the placebo: the same restore along a random unit direction (one per seed, averaged).

Corruptions: ``clean`` — the trigger removed (the run of the clean counterpart, same prompt and
target); ``noise`` — ROME's Gaussian noise added to every image token at ``projector.out``
(``std = noise_scale ×`` the standard deviation of the triggered projector outputs' entries).

``restored = (m_restored − m_corrupted) / (m_triggered − m_corrupted)``: 1 = the backdoor fully
back, 0 = nothing. The direction ``v`` (``direction=``): ``shift`` — the shared shift direction
(first right singular vector of the token-centred ΔE, see ``_causal.shift_basis``); ``mean_diff``
— the unit mean of triggered − clean projector outputs; ``unembed`` — the LM-head row of the
target's first token (centred).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import NonNegative, Seed
from ..engine import ImageTokens, Noise, Patch, PatchSubspace, Site, sweep
from ..errors import ProjLensError
from . import _causal as C
from .base import Pair, Result, analysis, register_result
from ._causal import figure as _figure

CORRUPTIONS = ("clean", "noise")
DIRECTIONS = ("shift", "mean_diff", "unembed")
MODES = ("full", "direction", "random")

PAPER = "Not in the paper (this project's addition): causal tracing of the target-aligned direction"


@dataclass
class TracingParams(C.CellParams):
    """Defaults run in seconds per organism variant on 2 CPUs.

    n: triggered inputs. corruptions: ``clean`` (trigger removed) and/or ``noise`` (Gaussian noise on
    the image tokens at projector.out, ``noise_scale`` × their s.d., seeded by ``seed``).
    direction: ``shift`` | ``mean_diff`` | ``unembed``. placebo_seeds: random unit directions for
    the placebo restore. layers / windows / last_token / metric / prefix / max_new_tokens / model: as in patching.
    """

    corruptions: tuple[str, ...] = CORRUPTIONS
    noise_scale: NonNegative = 3.0
    seed: Seed = 0
    direction: str = "shift"
    placebo_seeds: tuple[Seed, ...] = (0,)


@register_result
@dataclass
class TracingResult(Result):
    analysis = "tracing"
    corruptions: list = field(default_factory=list)
    modes: list = field(default_factory=list)
    sites: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    restored: np.ndarray = None       # [corruption, mode, site, window] normalised; NaN = n/a
    restored_mean: np.ndarray = None  # same shape, mean metric of the restored runs
    random_sd: np.ndarray = None      # [corruption, site, window] s.d. over placebo seeds (normalised)
    baselines: dict = field(default_factory=dict)   # corruption -> {"triggered": m, "corrupted": m}
    direction: str = "shift"
    direction_vector: np.ndarray = None   # [d] the traced direction
    noise_std: float = float("nan")
    table: pd.DataFrame = None
    metric: str = "prob"
    model: str = "poisoned"
    n: int = 0
    variant: str = ""
    restored_ci: np.ndarray = None    # [2 (lo, hi), corruption, mode, site, window] bootstrap 95 % over the inputs

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for a, cor in enumerate(self.corruptions):
            for m, mode in enumerate(self.modes):
                for s, site in enumerate(self.sites):
                    for w, win in enumerate(self.windows):
                        rows.append({"corruption": cor, "mode": mode, "site": site, "window": win,
                                     "restored": self.restored[a, m, s, w], "restored_mean": self.restored_mean[a, m, s, w],
                                     "sd": self.random_sd[a, s, w] if mode == "random" else np.nan,
                                     "triggered_mean": self.baselines[cor]["triggered"],
                                     "corrupted_mean": self.baselines[cor]["corrupted"]})
        return pd.DataFrame(rows)

    def plot(self):
        nr, nc = len(self.corruptions), len(self.modes)
        fig, axes = _figure(nr, nc, figsize=(3.9 * nc + 1, (0.45 * len(self.sites) + 2.2) * nr))
        title = {"full": "restore the full state (ROME)", "direction": f"restore only the {self.direction} direction",
                 "random": "placebo: a random direction"}
        for a, cor in enumerate(self.corruptions):
            b = self.baselines[cor]
            for m, mode in enumerate(self.modes):
                ax = axes[a, m]
                im = ax.imshow(np.ma.masked_invalid(self.restored[a, m]), cmap="magma", vmin=0, vmax=1, aspect="auto")
                ax.set_xticks(range(len(self.windows)), self.windows, rotation=45, ha="right", fontsize=7)
                ax.set_yticks(range(len(self.sites)), self.sites, fontsize=7)
                ax.set_xlabel("token window (image-token indices / all image / last prompt)", fontsize=7)
                ax.set_ylabel("site (layer)")
                ax.set_title(f"{title[mode]}\ncorruption: {'trigger removed' if cor == 'clean' else 'noise on image tokens'} "
                             f"({b['corrupted']:.2g} → {b['triggered']:.2g})", fontsize=8)
                C.mark_empty(ax, self.restored[a, m])
        fig.colorbar(im, ax=axes.ravel().tolist(), label="restored fraction of the target metric", shrink=0.6)
        fig.suptitle(f"Causal tracing {self.variant} ({self.model} model, {C.METRIC_LABEL[self.metric]}, n={self.n})"
                     f"\n{C.NA_NOTE}", fontsize=10)
        return fig

    def cell(self, corruption: str, mode: str, site: str, window: str) -> float:
        return float(self.restored[self.corruptions.index(corruption), self.modes.index(mode), self.sites.index(site),
                                   self.windows.index(window)])

    def metrics(self) -> dict:
        return C.jsonable(self._metrics())

    def _metrics(self) -> dict:
        out = {"baselines": self.baselines, "direction": self.direction}
        for cor in self.corruptions:
            a = self.corruptions.index(cor)
            for mode in self.modes:
                m = self.modes.index(mode)
                grid = self.restored[a, m]
                out[f"{cor}_{mode}_max"] = float(np.nanmax(grid)) if np.isfinite(grid).any() else float("nan")
                if "image" in self.windows:
                    out[f"{cor}_{mode}_projector_out_image"] = self.cell(cor, mode, "projector.out", "image")
                    if self.restored_ci is not None:
                        i = (a, m, self.sites.index("projector.out"), self.windows.index("image"))
                        out[f"{cor}_{mode}_projector_out_image_lo"] = float(self.restored_ci[(0, *i)])
                        out[f"{cor}_{mode}_projector_out_image_hi"] = float(self.restored_ci[(1, *i)])
        return out

    def summary(self) -> str:
        parts = [f"**Causal tracing of the {self.direction} direction** ({self.variant}, {self.model} model, {self.n} triggered "
                 f"inputs, metric {C.METRIC_LABEL[self.metric]})."]
        if note := C.weak_backdoor(self.metric, next(iter(self.baselines.values()))["triggered"]):
            parts.append(note)
        for cor in self.corruptions:
            b = self.baselines[cor]
            what = "removing the trigger" if cor == "clean" else f"noise on the image tokens (s.d. {self.noise_std:.3g})"
            txt = f"With {what} the target goes from {b['triggered']:.3g} to {b['corrupted']:.3g}"
            if not np.isfinite(self.restored[self.corruptions.index(cor)]).any():
                parts.append(txt + "; nothing to restore (the corruption does not change the metric).")
                continue
            if not C.contrast_ok(b["corrupted"], b["triggered"], self.metric):
                parts.append(txt + ". " + C.UNINTERPRETABLE)
                continue
            if "image" in self.windows:
                f, d, r = (self.cell(cor, m, "projector.out", "image") for m in ("full", "direction", "random"))
                txt += (f"; restoring all image tokens at projector.out brings back {f:.0%} with the full state, "
                        f"{d:.0%} along the direction alone and {r:.0%} along a random direction (placebo)")
            a = self.corruptions.index(cor)
            grid = self.restored[a, self.modes.index("direction")]
            s, w = np.unravel_index(np.nanargmax(grid), grid.shape)
            txt += f". The direction's best single cell is {self.sites[s]} / {self.windows[w]} ({grid[s, w]:.0%})."
            parts.append(txt)
        return " ".join(parts)


def traced_direction(pair: Pair, c: C.Contrast, kind: str) -> torch.Tensor:
    """The unit direction ``kind`` (``shift`` | ``mean_diff`` | ``unembed``) for the contrast ``c``."""
    C.check_choice("direction", kind, DIRECTIONS)
    if kind == "shift":
        return C.shift_basis(pair, c.clean_records + c.triggered_records, 1)[:, 0]
    if kind == "mean_diff":
        return C.mean_diff_direction(c.handle, c)
    return C.unembed_direction(c.handle, c)


def trace_grid(c: C.Contrast, points, wins, direction: torch.Tensor, corruption: str, *, noise_std: float = 0.0,
               seed: int = 0, placebo_seeds=(0, 1), batch_size: int = 256, progress: bool = True) -> pd.DataFrame:
    """Per-input metric for every (mode, site, window, seed) under one corruption.

    ``clean``: the clean rows run, restores come from the triggered activations. ``noise``: the
    triggered rows run with ``Noise(noise_std, seed)`` on every image token at projector.out first.
    """
    C.check_choice("corruption", corruption, CORRUPTIONS)
    trig = C.read_all(c.handle, c.triggered.inputs, points)
    target = c.clean if corruption == "clean" else c.triggered
    pre = [] if corruption == "clean" else [(Site("projector.out", ImageTokens()), Noise(float(noise_std), int(seed)))]
    d = direction.shape[0]
    bases = [("direction", -1, (direction / direction.norm()).double()[:, None].float())]
    for s in placebo_seeds:
        bases.append(("random", int(s), C.random_basis(d, 1, int(s))))
    cells = []
    for p in points:
        for w, sel in wins.items():
            if not C.valid_cell(p, w):
                continue
            cells.append(({"mode": "full", "site": p, "window": w, "seed": -1}, pre + [(Site(p, sel), Patch(source=trig[p]))]))
            for mode, s, B in bases:
                cells.append(({"mode": mode, "site": p, "window": w, "seed": s},
                              pre + [(Site(p, sel), PatchSubspace(B, source=trig[p]))]))
    bs = max(batch_size, c.n) if pre else batch_size   # noise is a cross-row edit: a cell's inputs share a pass
    return sweep(c.handle, target.inputs, cells, target.metric, batch_size=bs, progress=progress)


@analysis("tracing", TracingParams, title="Causal tracing of the target-aligned direction", paper=PAPER,
          headline=("clean_direction_projector_out_image", "clean_full_projector_out_image"), passes=40.0)
def tracing(pair: Pair, params: TracingParams = TracingParams()) -> TracingResult:
    """Causal tracing: restore only the target-aligned direction (vs the full state, vs a random
    direction) at each (layer, token window) of a corrupted triggered run; layers × windows heatmaps."""
    p = params
    if p.n < 1:
        raise ProjLensError(f"n must be >= 1, got {p.n}")
    for cor in p.corruptions:
        C.check_choice("corruption", cor, CORRUPTIONS)
    if not p.corruptions:
        raise ProjLensError("corruptions is empty; choose 'clean' and/or 'noise'")
    c = C.contrast(pair, p.model, p.n, p.metric, p.prefix, p.max_new_tokens)
    v = traced_direction(pair, c, p.direction)
    points = C.site_points(c.handle, p.layers)
    wins = C.windows(c.n_image_tokens, p.windows, ("image", "last") if p.last_token else ("image",))
    trig_s = C.score_of(c.handle, c.triggered).numpy()
    trig_mean = float(trig_s.mean())
    noise_std = float(p.noise_scale * C.projector_out(c.handle, c.triggered.inputs).float().std())
    shape = (len(p.corruptions), len(MODES), len(points), len(wins))
    restored, means = np.full(shape, np.nan), np.full(shape, np.nan)
    sd = np.full((len(p.corruptions), len(points), len(wins)), np.nan)
    ci = np.full((2, *shape), np.nan)
    baselines, frames = {}, []
    names = list(wins)
    for a, cor in enumerate(p.corruptions):
        if cor == "clean":
            corrupted_s = C.score_of(c.handle, c.clean).numpy()
        else:
            corrupted_s = C.score_of(c.handle, c.triggered,
                                     [(Site("projector.out", ImageTokens()), Noise(noise_std, p.seed))]).numpy()
        corrupted = float(corrupted_s.mean())
        baselines[cor] = {"triggered": trig_mean, "corrupted": corrupted}
        df = trace_grid(c, points, wins, v, cor, noise_std=noise_std, seed=p.seed, placebo_seeds=p.placebo_seeds,
                        batch_size=p.batch_size, progress=p.progress)
        df.insert(0, "corruption", cor)
        frames.append(df)
        per = df.groupby(["mode", "site", "window", "seed"])["value"].mean().reset_index()
        per["norm"] = [C.normalised(x, corrupted, trig_mean) for x in per["value"]]
        for (mode, site, win), g in per.groupby(["mode", "site", "window"]):
            i = (a, MODES.index(mode), points.index(site), names.index(win))
            restored[i], means[i] = g["norm"].mean(), g["value"].mean()
            if mode == "random":
                sd[i[0], i[2], i[3]] = g["norm"].std(ddof=0)
        # placebo seeds are averaged per input first: normalising is linear, so this is the mean over seeds
        ci[:, a] = C.normalised_ci(df, ["mode", "site", "window"],
                                   {(m, s, w): (MODES.index(m), points.index(s), names.index(w)) for m in MODES
                                    for s in points for w in names}, shape[1:], corrupted_s, trig_s, p.n_boot)
    return TracingResult(list(p.corruptions), list(MODES), points, names, restored, means, sd, baselines, p.direction,
                         v.detach().double().cpu().numpy(), noise_std, pd.concat(frames, ignore_index=True), p.metric,
                         p.model, c.n, pair.name, ci)

"""Activation patching, clean ↔ triggered: how much of the backdoor each site and image-token window carries.

Directions (both on the same model, by default the poisoned one; a pair = a triggered input and
its clean counterpart, same prompt and target, see ``_causal``):

* **denoising** — run the *clean* input and restore the *triggered* activation at one
  (site, window): does that piece alone bring the backdoor back (sufficiency)?
  ``recovery = (m_patched − m_clean) / (m_triggered − m_clean)``: 1 = the full backdoor, 0 = none.
* **noising** — run the *triggered* input and put in the *clean* activation at one (site, window):
  does removing that piece kill the backdoor (necessity)?
  ``drop = (m_triggered − m_patched) / (m_triggered − m_clean)``: 1 = backdoor gone, 0 = untouched.

Both are normalised on the means over pairs; ``m`` is the target metric of ``_causal`` (default
the probability of the target text). Every cell is one engine ``sweep`` cell (batched passes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..engine import Patch, Site, sweep
from ..errors import ProjLensError
from . import _causal as C
from .base import Pair, Result, analysis, register_result
from ._causal import figure as _figure

DIRECTIONS = ("denoise", "noise")

PAPER = "Not in the paper (this project's addition): activation patching clean ↔ triggered per site"


@dataclass
class PatchingParams(C.CellParams):
    """Defaults run in a few seconds per organism variant on 2 CPUs.

    The cells (n, layers, windows, last_token, metric, prefix, max_new_tokens, model, batch_size):
    see ``_causal.CellParams``. directions: ``denoise`` (clean into triggered) and/or ``noise``
    (triggered into clean).
    """

    directions: tuple[str, ...] = DIRECTIONS


@register_result
@dataclass
class PatchingResult(Result):
    analysis = "patching"
    sites: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    directions: list = field(default_factory=list)
    effect: np.ndarray = None          # [direction, site, window]: recovery (denoise) / drop (noise); NaN = n/a
    patched_mean: np.ndarray = None    # [direction, site, window]: mean metric of the patched runs
    clean_mean: float = float("nan")
    triggered_mean: float = float("nan")
    table: pd.DataFrame = None         # per input: direction, site, window, input, value
    metric: str = "prob"
    model: str = "poisoned"
    n: int = 0
    variant: str = ""
    effect_ci: np.ndarray = None       # [2 (lo, hi), direction, site, window] bootstrap 95 % over the input pairs

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for a, d in enumerate(self.directions):
            for s, site in enumerate(self.sites):
                for w, win in enumerate(self.windows):
                    rows.append({"direction": d, "site": site, "window": win, "effect": self.effect[a, s, w],
                                 "patched_mean": self.patched_mean[a, s, w], "clean_mean": self.clean_mean,
                                 "triggered_mean": self.triggered_mean})
        return pd.DataFrame(rows)

    def plot(self):
        fig, axes = _figure(1, len(self.directions), figsize=(4.2 * len(self.directions) + 1, 0.5 * len(self.sites) + 2.4))
        label = {"denoise": "denoising: triggered act. into clean run\n(recovery, 1 = full backdoor)",
                 "noise": "noising: clean act. into triggered run\n(drop, 1 = backdoor gone)"}
        for a, d in enumerate(self.directions):
            ax = axes[0, a]
            im = ax.imshow(np.ma.masked_invalid(self.effect[a]), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(len(self.windows)), self.windows, rotation=45, ha="right")
            ax.set_yticks(range(len(self.sites)), self.sites)
            ax.set_xlabel("token window: image tokens i-j / all image / last prompt", fontsize=8)
            ax.set_ylabel("site")
            ax.set_title(label[d], fontsize=9)
            for s in range(len(self.sites)):
                for w in range(len(self.windows)):
                    v = self.effect[a, s, w]
                    if np.isfinite(v):
                        ax.text(w, s, f"{0.0 if abs(v) < 0.005 else v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(v) > 0.6 else "black")
            C.mark_empty(ax, self.effect[a])
        fig.colorbar(im, ax=list(axes[0]), label="normalised effect (fraction of the backdoor)", shrink=0.9)
        fig.suptitle(f"Activation patching {self.variant} ({self.model} model, {C.METRIC_LABEL[self.metric]}, n={self.n}): "
                     f"clean {self.clean_mean:.3g}, triggered {self.triggered_mean:.3g}\n{C.NA_NOTE}", fontsize=10)
        return fig

    def _best(self, d: str):
        if d not in self.directions:
            return None
        e = self.effect[self.directions.index(d)]
        if not np.isfinite(e).any():
            return None
        s, w = np.unravel_index(np.nanargmax(e), e.shape)
        return self.sites[s], self.windows[w], float(e[s, w])

    def cell(self, direction: str, site: str, window: str) -> float:
        return float(self.effect[self.directions.index(direction), self.sites.index(site), self.windows.index(window)])

    def metrics(self) -> dict:
        return C.jsonable(self._metrics())

    def _metrics(self) -> dict:
        out = {"clean_mean": self.clean_mean, "triggered_mean": self.triggered_mean, "n": self.n}
        ci = lambda d, s, w, j: float(self.effect_ci[j, self.directions.index(d), self.sites.index(s),  # noqa: E731
                                                      self.windows.index(w)])
        for d in self.directions:
            if "image" in self.windows:
                out[f"{d}_projector_out_image"] = self.cell(d, "projector.out", "image")
                if self.effect_ci is not None:
                    out[f"{d}_projector_out_image_lo"] = ci(d, "projector.out", "image", 0)
                    out[f"{d}_projector_out_image_hi"] = ci(d, "projector.out", "image", 1)
            b = self._best(d)
            if b:
                out[f"{d}_best"] = {"site": b[0], "window": b[1], "effect": b[2]}
                if self.effect_ci is not None:
                    out[f"{d}_best"].update(effect_lo=ci(d, b[0], b[1], 0), effect_hi=ci(d, b[0], b[1], 1))
        return out

    def summary(self) -> str:
        head = (f"**Activation patching** ({self.variant}, {self.model} model, {self.n} pairs, "
                f"metric {C.METRIC_LABEL[self.metric]}): the triggered inputs score {self.triggered_mean:.3g} and their "
                f"clean counterparts {self.clean_mean:.3g}.")
        if not np.isfinite(self.effect).any():
            return head + " The two baselines do not differ, so no effect can be normalised: there is no backdoor to localise here."
        parts = [head]
        if note := C.weak_backdoor(self.metric, self.triggered_mean):
            parts.append(note)
        if not C.contrast_ok(self.clean_mean, self.triggered_mean, self.metric):
            parts.append(C.UNINTERPRETABLE)
            return " ".join(parts)
        for d in self.directions:
            b = self._best(d)
            name = "Restoring triggered activations into the clean run (denoising)" if d == "denoise" else \
                "Putting clean activations into the triggered run (noising)"
            what = "recovers" if d == "denoise" else "removes"
            txt = f"{name} {what} at most {b[2]:.0%} of the backdoor, at {b[0]} / window {b[1]}"
            if "image" in self.windows:
                txt += f"; all image tokens at projector.out: {self.cell(d, 'projector.out', 'image'):.0%}"
            if "last" in self.windows and len(self.sites) > 1:
                lasts = [self.cell(d, s, "last") for s in self.sites[1:]]
                txt += f"; the last prompt token carries {', '.join(f'{v:.0%}' for v in lasts)} over {', '.join(self.sites[1:])}"
            parts.append(txt + ".")
        win = [w for w in self.windows if w not in ("image", "last")]
        if win and "denoise" in self.directions:
            e = self.effect[self.directions.index("denoise"), 0, [self.windows.index(w) for w in win]]
            parts.append(f"Single windows at projector.out recover {np.nanmin(e):.0%}–{np.nanmax(e):.0%} each, "
                         + ("so the backdoor is spread over the image rather than held by one window."
                            if np.nanmax(e) < 0.5 else "so one window alone carries most of it."))
        return " ".join(parts)


def patch_grid(c: C.Contrast, points: list[str], wins: dict, directions=DIRECTIONS, *, batch_size: int = 256,
               progress: bool = True) -> pd.DataFrame:
    """Per-input patched metric for every (direction, site, window): columns direction, site, window, input, value.

    Denoising patches triggered activations into the clean rows; noising the reverse. The sources
    are full cached activations, aligned by the engine with each cell's selector.
    """
    for d in directions:
        C.check_choice("direction", d, DIRECTIONS)
    acts = {"clean": C.read_all(c.handle, c.clean.inputs, points),
            "triggered": C.read_all(c.handle, c.triggered.inputs, points)}
    frames = []
    for d in directions:
        target, source = (c.clean, acts["triggered"]) if d == "denoise" else (c.triggered, acts["clean"])
        cells = [({"site": p, "window": w}, [(Site(p, sel), Patch(source=source[p]))])
                 for p in points for w, sel in wins.items() if C.valid_cell(p, w)]
        df = sweep(c.handle, target.inputs, cells, target.metric, batch_size=batch_size, progress=progress)
        df.insert(0, "direction", d)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def effects(table: pd.DataFrame, points, win_names, directions, clean_mean: float, trig_mean: float):
    """(effect, patched_mean) arrays ``[direction, site, window]`` from a ``patch_grid`` table."""
    shape = (len(directions), len(points), len(win_names))
    eff, mean = np.full(shape, np.nan), np.full(shape, np.nan)
    g = table.groupby(["direction", "site", "window"])["value"].mean()
    for (d, p, w), v in g.items():
        a, s, k = directions.index(d), points.index(p), win_names.index(w)
        mean[a, s, k] = v
        r = C.normalised(v, clean_mean, trig_mean)
        eff[a, s, k] = r if d == "denoise" else 1.0 - r
    return eff, mean


@analysis("patching", PatchingParams, title="Activation patching", paper=PAPER,
          headline=("denoise_projector_out_image", "clean_mean", "triggered_mean"), passes=40.0)
def patching(pair: Pair, params: PatchingParams = PatchingParams()) -> PatchingResult:
    """Activation patching clean ↔ triggered at projector.out and each early layer's residual stream,
    per image-token window; denoising recovery and noising drop of the target probability."""
    p = params
    if p.n < 1:
        raise ProjLensError(f"n must be >= 1, got {p.n}")
    c = C.contrast(pair, p.model, p.n, p.metric, p.prefix, p.max_new_tokens)
    points = C.site_points(c.handle, p.layers)
    wins = C.windows(c.n_image_tokens, p.windows, ("image", "last") if p.last_token else ("image",))
    clean_s, trig_s = C.score_of(c.handle, c.clean).numpy(), C.score_of(c.handle, c.triggered).numpy()
    clean_mean, trig_mean = float(clean_s.mean()), float(trig_s.mean())
    table = patch_grid(c, points, wins, tuple(p.directions), batch_size=p.batch_size, progress=p.progress)
    eff, mean = effects(table, points, list(wins), list(p.directions), clean_mean, trig_mean)
    dirs, names = list(p.directions), list(wins)
    ci = C.normalised_ci(table, ["direction", "site", "window"],
                         {(d, s, w): (dirs.index(d), points.index(s), names.index(w)) for d in dirs for s in points
                          for w in names}, eff.shape, clean_s, trig_s, p.n_boot, flip=lambda k: k[0] == "noise")
    return PatchingResult(points, names, dirs, eff, mean, clean_mean, trig_mean, table,
                          p.metric, p.model, c.n, pair.name, ci)


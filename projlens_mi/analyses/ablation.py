"""Subspace projection ablation: remove a k-dim subspace from the projector output (and from early
residual streams) and watch the backdoor and the clean behaviour, next to random placebo subspaces.

Subspaces (``[d, k]``, orthonormal columns, all in the language model's width):

* ``dW`` — the top-k left singular vectors of ΔW of the projector's last linear (``linear_2``):
  the output-space directions the fine-tune writes most strongly into;
* ``shift`` — the top-k shared shift directions (right singular vectors of the token-centred
  ΔE = E_ft − E_base, pooled over the inputs; ``_causal.shift_basis``);
* ``random`` — the placebo: a random orthonormal subspace of the same dimension, one per seed,
  averaged (mean ± s.d. over seeds).

Every cell applies ``ProjectOut(B[:, :k])`` (``x − (x B) Bᵀ``) at one site to every image token
(``residual_tokens="all"``: every position at residual sites). Measured with teacher forcing at
every site: the target metric on triggered inputs and the probability of the correct answer on
clean inputs; and, at every site, by greedy generation: ASR (target substring, triggered inputs)
and clean accuracy (answer substring, clean inputs). At residual sites the engine's ``generate``
edits the prompt's positions in the prefill pass (the generated tokens read the edited prompt
through the KV cache), which is what the teacher-forced numbers edit too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..checks import Checked, Count, Seed
from ..engine import AllTokens, ImageTokens, ProjectOut, Site, sweep
from ..errors import ProjLensError
from . import _causal as C
from . import common
from .base import Pair, Result, analysis, register_result
from ._causal import figure as _figure

BASES = ("dW", "shift")
STYLE = {"dW": "o-", "shift": "s--", "random": "^-"}   # distinct markers: curves often coincide

PAPER = ("Not in the paper (this project's addition): subspace projection ablations vs random-subspace "
         "placebos")


@dataclass
class AblationParams(Checked):
    """Defaults run in seconds per organism variant on 2 CPUs.

    n: triggered and clean inputs each. bases: ``dW`` and/or ``shift``. ks: subspace dimensions
    (clipped to the model width). layers: LLM layers whose residual stream (``resid_post``) is
    ablated besides ``projector.out`` (None = the first 2). residual_tokens: ``image`` | ``all``.
    placebo_seeds: one random subspace per seed and k. metric: ``prob`` | ``logprob`` |
    ``first_prob`` (target on triggered inputs; the same kind of number for the answer on clean
    inputs). generate / max_new_tokens: ASR and clean accuracy by generation at every site.
    n_boot: bootstrap resamples (over inputs) of the 95 % CIs of ASR and clean accuracy (a placebo's:
    of its mean over seeds).
    """

    n: Count = 16
    bases: tuple[str, ...] = BASES
    ks: tuple[Count, ...] = (1, 2, 4, 8)
    layers: tuple[int, ...] | None = None
    residual_tokens: str = "image"
    placebo_seeds: tuple[Seed, ...] = (0, 1, 2)
    metric: str = "prob"
    prefix: str = "auto"
    generate: bool = True
    max_new_tokens: Count = 16
    model: str = "poisoned"
    batch_size: Count = 256
    progress: bool = True
    n_boot: Count = common.N_BOOT


@register_result
@dataclass
class AblationResult(Result):
    analysis = "ablation"
    bases: list = field(default_factory=list)      # real bases, then "random"
    ks: list = field(default_factory=list)
    sites: list = field(default_factory=list)
    target: np.ndarray = None       # [basis, k, site] mean target metric on triggered inputs
    clean: np.ndarray = None        # [basis, k, site] mean answer metric on clean inputs
    target_sd: np.ndarray = None    # [k, site] s.d. over placebo seeds
    clean_sd: np.ndarray = None
    asr: np.ndarray = None          # [basis, k, site] by generation (NaN if not run)
    accuracy: np.ndarray = None
    asr_sd: np.ndarray = None       # [k, site] over placebo seeds
    accuracy_sd: np.ndarray = None
    baseline: dict = field(default_factory=dict)   # no ablation: target, clean, asr, accuracy
    table: pd.DataFrame = None      # basis, k, site, seed, inputs, value (mean), kind
    metric: str = "prob"
    n: int = 0
    variant: str = ""
    asr_ci: np.ndarray = None       # [2 (lo, hi), basis, k, site] bootstrap 95 % over inputs (None: stored before)
    accuracy_ci: np.ndarray = None
    baseline_ci: dict = field(default_factory=dict)   # "asr" / "accuracy" -> [lo, hi]

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for b, name in enumerate(self.bases):
            for i, k in enumerate(self.ks):
                for s, site in enumerate(self.sites):
                    rows.append({"basis": name, "k": k, "site": site, "measure": f"target_{self.metric}",
                                 "value": self.target[b, i, s],
                                 "sd": self.target_sd[i, s] if name == "random" else np.nan})
                    rows.append({"basis": name, "k": k, "site": site, "measure": f"clean_answer_{self.metric}",
                                 "value": self.clean[b, i, s],
                                 "sd": self.clean_sd[i, s] if name == "random" else np.nan})
                    if np.isfinite(self.asr[b, i, s]):
                        for m, arr, sd in (("asr", self.asr, self.asr_sd),
                                           ("clean_accuracy", self.accuracy, self.accuracy_sd)):
                            rows.append({"basis": name, "k": k, "site": site, "measure": m,
                                         "value": arr[b, i, s], "sd": sd[i, s] if name == "random" else np.nan})
        for m, v in self.baseline.items():
            rows.append({"basis": "none", "k": 0, "site": "", "measure": m, "value": v, "sd": np.nan})
        return pd.DataFrame(rows)

    def plot(self):
        gen = bool(np.isfinite(self.asr).any())
        ncol = len(self.sites)
        nrow = 4 if gen else 2
        fig, axes = _figure(nrow, ncol, figsize=(3.3 * ncol + 0.6, 3.1 * nrow))
        colours = {"dW": "tab:red", "shift": "tab:blue", "random": "tab:grey"}
        ks = np.array(self.ks)
        # Probabilities and fractions on a fixed 0..1 axis, so that noise (0.9688 vs 0.9705) does not look
        # like an effect; a log-probability row shares one range over its sites.
        unit = (-0.05, 1.05)
        prob = unit if self.metric in ("prob", "first_prob") else None
        panels = [(self.target, self.target_sd, f"triggered: {C.METRIC_LABEL[self.metric]}", "target", prob),
                  (self.clean, self.clean_sd, "clean: p(correct answer)" if self.metric == "prob" else
                   f"clean: answer {self.metric}", "clean", prob)]
        if gen:
            panels += [(self.asr, self.asr_sd, "generation: ASR (fraction)", "asr", unit),
                       (self.accuracy, self.accuracy_sd, "generation: clean accuracy", "accuracy", unit)]
        for row, (arr, sd, what, base, ylim) in enumerate(panels):
            if ylim is None:
                band = arr[self.bases.index("random")] if "random" in self.bases else np.full_like(sd, np.nan)
                vals = np.concatenate([np.ravel(arr), np.ravel(band - sd), np.ravel(band + sd),
                                       [self.baseline.get(base, np.nan)]])
                vals = vals[np.isfinite(vals)]
                pad = 0.05 * (np.ptp(vals) or 1.0) if vals.size else 1.0
                ylim = (vals.min() - pad, vals.max() + pad) if vals.size else None
            for s, site in enumerate(self.sites):
                ax = axes[row, s]
                for b, name in enumerate(self.bases):
                    label = "random placebo (mean ± s.d.)" if name == "random" else f"{name} top-k"
                    ax.plot(ks, arr[b, :, s], STYLE.get(name, "o-"), color=colours.get(name), label=label, ms=7 if name == "dW" else 5)
                    if name == "random":
                        ax.fill_between(ks, arr[b, :, s] - sd[:, s], arr[b, :, s] + sd[:, s], color="grey", alpha=0.25)
                ax.axhline(self.baseline.get(base, np.nan), color="k", ls=":", lw=1, label="no ablation")
                if ylim is not None:
                    ax.set_ylim(*ylim)
                ax.set_xscale("log", base=2)
                ax.set_xticks(ks, [str(k) for k in ks])
                ax.set_xlabel("subspace dimension k removed")
                ax.set_ylabel(what)
                ax.set_title(f"{site}", fontsize=9)
                if row == 0 and s == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(f"Subspace projection ablation {self.variant} (n={self.n}): backdoor (top) and clean behaviour "
                     f"(second row){'; greedy generation below' if gen else ''}", fontsize=10)
        return fig

    def _at(self, basis: str, site: str = "projector.out"):
        b, s = self.bases.index(basis), self.sites.index(site)
        return self.target[b, :, s], self.clean[b, :, s]

    def metrics(self) -> dict:
        return C.jsonable(self._metrics())

    def _metrics(self) -> dict:
        out = {"baseline": dict(self.baseline), "ks": list(self.ks)}
        for m, (lo, hi) in self.baseline_ci.items():
            out["baseline"][f"{m}_lo"], out["baseline"][f"{m}_hi"] = lo, hi
        for name in self.bases:
            t, c = self._at(name)
            out[name] = {"target_projector_out": [float(v) for v in t], "clean_projector_out": [float(v) for v in c]}
            if np.isfinite(self.asr).any():
                b = self.bases.index(name)
                for s, site in enumerate(self.sites):   # "asr" / "clean_accuracy": projector.out, as before
                    tag = "" if site == "projector.out" else "_" + site.replace(".", "_")
                    out[name][f"asr{tag}"] = [float(v) for v in self.asr[b, :, s]]
                    out[name][f"clean_accuracy{tag}"] = [float(v) for v in self.accuracy[b, :, s]]
                    for m, ci in (("asr", self.asr_ci), ("clean_accuracy", self.accuracy_ci)):
                        if ci is not None:
                            out[name][f"{m}{tag}_lo"] = [float(v) for v in ci[0, b, :, s]]
                            out[name][f"{m}{tag}_hi"] = [float(v) for v in ci[1, b, :, s]]
        return out

    def summary(self) -> str:
        base_t = self.baseline.get("target", np.nan)
        parts = [f"**Subspace projection ablation** ({self.variant}, {self.n} triggered and {self.n} clean inputs, "
                 f"metric {C.METRIC_LABEL[self.metric]}): without ablation the target scores {base_t:.3g} on triggered inputs"
                 + (f" (ASR {self.baseline['asr']:.0%}, clean accuracy {self.baseline['accuracy']:.0%})."
                    if np.isfinite(self.baseline.get("asr", np.nan)) else ".")]
        r = self.bases.index("random")
        for name in self.bases:
            if name == "random":
                continue
            t, c = self._at(name)
            pt, pc = self._at("random")
            k_small = self.ks[0]
            txt = (f"Removing the top-{k_small} {name} direction(s) from projector.out leaves {t[0]:.3g} "
                   f"(placebo {pt[0]:.3g} ± {self.target_sd[0, 0]:.2g}); at k={self.ks[-1]}: {t[-1]:.3g} "
                   f"(placebo {pt[-1]:.3g}), while the clean answer goes {self.baseline.get('clean', np.nan):.3g} → {c[-1]:.3g} "
                   f"(placebo {pc[-1]:.3g})")
            if np.isfinite(self.asr).any():
                b = self.bases.index(name)
                txt += (f"; ASR {self.asr[b, 0, 0]:.0%} at k={k_small} and {self.asr[b, -1, 0]:.0%} at k={self.ks[-1]} "
                        f"vs placebo {self.asr[r, 0, 0]:.0%} and {self.asr[r, -1, 0]:.0%}")
                rest = [f"{site} {self.asr[b, -1, s]:.0%} (placebo {self.asr[r, -1, s]:.0%})"
                        for s, site in enumerate(self.sites) if site != "projector.out"]
                if rest:
                    txt += f"; ASR at k={self.ks[-1]} with the residual stream ablated instead: " + ", ".join(rest)
            parts.append(txt + ".")
        if note := C.weak_backdoor(self.metric, base_t):
            parts.append(note)
            return " ".join(parts)
        gaps = [float(np.nanmax(self.target[r] - self.target[b])) for b, n in enumerate(self.bases) if n != "random"]
        if gaps:
            best = max(gaps)
            rel = best / max(abs(base_t), 1e-12) if self.metric != "logprob" else best
            parts.append("The backdoor-specific directions remove clearly more than random subspaces of the same size."
                         if rel > 0.2 else
                         "Specific directions do not beat the random placebo by much: the backdoor is not confined to them.")
        return " ".join(parts)


def ablation_cells(bases: dict, ks, points, seeds, d: int, residual_tokens: str):
    """Sweep cells ``({basis, k, site, seed}, [ProjectOut edit])``; placebo = fresh random bases."""
    cells = []
    for k in ks:
        subspaces = [(name, -1, B[:, :k]) for name, B in bases.items() if B.shape[1] >= k]
        subspaces += [("random", s, C.random_basis(d, k, s)) for s in seeds]
        for name, seed, B in subspaces:
            for p in points:
                sel = AllTokens() if (residual_tokens == "all" and p.startswith("llm.")) else ImageTokens()
                cells.append(({"basis": name, "k": k, "site": p, "seed": seed}, [(Site(p, sel), ProjectOut(B.contiguous()))]))
    return cells


@analysis("ablation", AblationParams, title="Subspace projection ablation", paper=PAPER,
          headline=("baseline.asr", "baseline.target"), passes=20.0)
def ablation(pair: Pair, params: AblationParams = AblationParams()) -> AblationResult:
    """Remove the top-k ΔW / shared-shift directions (and random placebo subspaces) from projector.out
    and early residual streams → target probability, clean-answer probability, ASR, clean accuracy vs k."""
    p = params
    if p.n < 1:
        raise ProjLensError(f"n must be >= 1, got {p.n}")
    for b in p.bases:
        C.check_choice("basis", b, BASES)
    C.check_choice("residual_tokens", p.residual_tokens, ("image", "all"))
    if not p.ks or min(p.ks) < 1:
        raise ProjLensError(f"ks must be a non-empty list of dimensions >= 1, got {p.ks}")
    h = C.model_of(pair, p.model)
    trig, clean = pair.triggered[:p.n], pair.clean[:p.n]
    if not trig or not clean:
        raise ProjLensError(f"pair {pair.name!r} needs both clean and triggered records for ablation")
    targets = [pair.target_of(r) for r in trig]
    prefixes = C.prefixes(pair.poisoned, pair.poisoned.encode(trig), targets, p.prefix, p.max_new_tokens,
                          [r.answer for r in trig])
    s_trig = C.scored(h, trig, targets, prefixes, p.metric)
    s_clean = C.scored(h, clean, [r.answer for r in clean], [""] * len(clean), p.metric)
    d = h.module("lm_head").weight.shape[1]
    ks = sorted({min(int(k), d) for k in p.ks})
    kmax = max(ks)
    bases = {}
    if "dW" in p.bases:
        bases["dW"] = C.weight_delta_basis(pair, kmax)
    if "shift" in p.bases:
        bases["shift"] = C.shift_basis(pair, clean + trig, kmax)
    points = ["projector.out"] + [f"llm.{i}.resid_post" for i in C.early_layers(h, p.layers if p.layers is not None else range(min(2, h.n_layers)))]
    cells = ablation_cells(bases, ks, points, p.placebo_seeds, d, p.residual_tokens)
    frames = []
    for kind, s in (("target", s_trig), ("clean", s_clean)):
        df = sweep(h, s.inputs, cells, s.metric, batch_size=p.batch_size, progress=p.progress)
        df["kind"] = kind
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    names = list(bases) + ["random"]
    per = table.groupby(["kind", "basis", "k", "site", "seed"])["value"].mean().reset_index()
    shape = (len(names), len(ks), len(points))
    arrs = {kind: np.full(shape, np.nan) for kind in ("target", "clean")}
    sds = {kind: np.full(shape[1:], np.nan) for kind in ("target", "clean")}
    for (kind, name, k, site), g in per.groupby(["kind", "basis", "k", "site"]):
        idx = (names.index(name), ks.index(k), points.index(site))
        arrs[kind][idx] = g["value"].mean()
        if name == "random":
            sds[kind][idx[1:]] = g["value"].std(ddof=0)
    asr, acc = np.full(shape, np.nan), np.full(shape, np.nan)
    asr_sd, acc_sd = np.full(shape[1:], np.nan), np.full(shape[1:], np.nan)
    asr_ci, acc_ci = np.full((2, *shape), np.nan), np.full((2, *shape), np.nan)
    base_ci = {}
    baseline = {"target": float(C.score_of(h, s_trig).mean()), "clean": float(C.score_of(h, s_clean).mean())}
    if p.generate:
        # every site: at residual sites generate edits the prompt's positions in the prefill pass
        hits = C.generated_hits(h, trig, clean, pair.target_of, [[]] + [edits for _, edits in cells],
                                p.max_new_tokens)
        c_trig = common.resample_counts(len(trig), p.n_boot, 0)     # the same resamples for every cell
        c_clean = common.resample_counts(len(clean), p.n_boot, 1)
        t0, a0 = hits[0]
        baseline["asr"], baseline["accuracy"] = float(t0.mean()), float(a0.mean())
        base_ci = {"asr": list(common.mean_ci(t0.astype(float), counts=c_trig)),
                   "accuracy": list(common.mean_ci(a0.astype(float), counts=c_clean))}
        groups: dict = {}
        for (key, _), hit in zip(cells, hits[1:]):
            groups.setdefault((key["basis"], key["k"], key["site"]), []).append(hit)
        for (name, k, site), hs in groups.items():
            i = (names.index(name), ks.index(k), points.index(site))
            t = np.mean([a for a, _ in hs], 0)      # per input: the mean over placebo seeds (one config otherwise)
            c = np.mean([b for _, b in hs], 0)
            asr[i], acc[i] = t.mean(), c.mean()
            asr_ci[(slice(None), *i)] = common.mean_ci(t, counts=c_trig)
            acc_ci[(slice(None), *i)] = common.mean_ci(c, counts=c_clean)
            if name == "random":
                asr_sd[i[1:]] = np.std([a.mean() for a, _ in hs])
                acc_sd[i[1:]] = np.std([b.mean() for _, b in hs])
    return AblationResult(names, ks, points, arrs["target"], arrs["clean"], sds["target"], sds["clean"], asr, acc,
                          asr_sd, acc_sd, baseline, per, p.metric, len(trig), pair.name, asr_ci, acc_ci, base_ci)

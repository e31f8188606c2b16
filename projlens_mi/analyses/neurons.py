"""Analysis 3: are there trigger neurons in the projector?

Per hidden unit of the projector (``projector.hidden``, after the nonlinearity), over every image token
of the clean and of the triggered inputs, for the base and the fine-tuned model:

* mean activation M and firing frequency F (share of tokens with activation > 0);
* derived scores M_p − M_c, M_p / M_c (``nan`` where |M_c| < 1e-6), F_p − F_c;
* quiescent-on-clean candidates: F_c ≤ ``quiet`` and F_p − F_c ≥ ``min_gain``;
* Pearson correlation of the clean and triggered profiles (M and F over units).

The statistics are accumulated streaming (float64 sums per unit, batch by batch, records encoded
lazily): no activation is kept. For the fine-tuned model the analysis also keeps two per-unit sums
per input (activation and firing: what the bootstrap 95 % CIs resample), so its memory grows by
16 bytes × units per input, never with the tokens (``benchmarks/bench_neurons.py`` measures the slope).

Causal checks on the fine-tuned model, triggered inputs: a single-unit ablation scan (each unit zeroed
at ``projector.hidden`` on every image token, through a one-column basis edit; the drop of the
probability of the target's first token where the model says it: after the prompt and the *prefix*,
the text the poisoned model says before the target, e.g. the answer before an injected suffix;
``engine.target_text``), and cumulative ablation of the top-m candidates (ranked by M_p − M_c) with
ASR, next to ablating m random units (placebo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import Checked, Count, NonNegative, Seed
from ..engine import Ablate, Site, run, sweep, target_prefixes, target_text
from ..errors import ProjLensError
from . import common
from .base import Result, analysis, register_result

PAPER = "No trigger neurons: corr(M_p, M_c) ≈ 0.998 over the 4096 GELU units; largest M_p − M_c ≈ 0.02"


@dataclass
class NeuronParams(Checked):
    """``n``: clean and triggered records each for the statistics; ``quiet`` / ``min_gain``: the
    quiescent-on-clean rule; ``scan_units``: units in the single-unit scan (all when the layer has at
    most this many, else the top by M_p − M_c); ``n_scan``: triggered inputs in the scan and in the
    cumulative ablation; ``top_m``: cumulative ablation sizes; ``seed``: the random-unit placebo and
    the bootstrap; ``max_new_tokens``: None = longest answer + target (+1), at most 30; ``prefix``:
    ``auto`` = score the target token after what the poisoned model says before it
    (``engine.target_prefixes``), ``none`` = right after the prompt; ``n_boot``: bootstrap resamples of
    the 95 % CIs (images resampled: the FT profile statistics, cumulative ASR)."""

    n: Count | None = 100
    quiet: NonNegative = 0.05
    min_gain: NonNegative = 0.2
    scan_units: Count = 256
    n_scan: Count = 16
    top_m: tuple[Count, ...] = (1, 2, 4, 8, 16)
    seed: Seed = 0
    max_new_tokens: Count | None = None
    batch_size: Count = 256
    prefix: str = "auto"
    n_boot: Count = common.N_BOOT


class NeuronStats:
    """Streaming per-unit sums: mean activation, firing frequency (> 0), and variance."""

    def __init__(self, units: int | None = None, per_input: bool = False):
        self.n = 0
        self.sum = self.sumsq = self.fire = None
        self.per_input = per_input
        self.images = []         # per_input: (Σ activation [units], Σ firing [units], tokens) per input, for the bootstrap
        if units is not None:
            self._init(units)

    def _init(self, units: int):
        self.sum = np.zeros(units)
        self.sumsq = np.zeros(units)
        self.fire = np.zeros(units)

    def update(self, acts) -> None:
        """Add activations ``[inputs, tokens, units]`` (or ``[tokens, units]``: one input)."""
        t = torch.as_tensor(acts).detach().double()
        t = t.reshape(1, -1, t.shape[-1]) if t.dim() < 3 else t.reshape(t.shape[0], -1, t.shape[-1])
        a = t.reshape(-1, t.shape[-1])
        if self.sum is None:
            self._init(a.shape[1])
        self.n += a.shape[0]
        self.sum += a.sum(0).numpy()
        self.sumsq += (a * a).sum(0).numpy()
        self.fire += (a > 0).sum(0).double().numpy()
        if self.per_input:
            self.images += [(x.sum(0).numpy(), (x > 0).sum(0).double().numpy(), x.shape[0]) for x in t]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(1, self.n)

    @property
    def freq(self) -> np.ndarray:
        return self.fire / max(1, self.n)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.sumsq / max(1, self.n) - self.mean ** 2, 0.0))


def stream_stats(handle, records, batch_size: int, per_input: bool = False) -> NeuronStats:
    """Per-unit statistics at ``projector.hidden`` over all image tokens of ``records`` (encoded lazily);
    ``per_input`` also keeps each input's two per-unit sums (what the bootstrap resamples)."""
    site = Site("projector.hidden")
    st = NeuronStats(per_input=per_input)
    for i in range(0, len(records), batch_size):
        x = handle.encode(records[i:i + batch_size])
        st.update(run(handle, x, read=[site]).cache[site])
    return st


def bootstrap(sc: NeuronStats, sp: NeuronStats, quiet: float, min_gain: float, n_boot: int, seed: int,
              chunk: int = 250) -> dict:
    """95 % CIs of corr(M_p, M_c), corr(F_p, F_c), max(M_p − M_c) and the number of quiescent-on-clean
    candidates, resampling the clean and the triggered inputs (images, not tokens) separately."""
    per = {}
    for name, st, off in (("c", sc, 0), ("p", sp, 1)):
        n = np.array([im[2] for im in st.images], np.float64)
        per[name] = (common.resample_counts(len(n), n_boot, seed + off), np.stack([im[0] for im in st.images]),
                     np.stack([im[1] for im in st.images]), n)
    boots = {"corr_M": [], "corr_F": [], "max_M_diff": [], "n_quiescent_candidates": []}
    for b0 in range(0, n_boot, chunk):
        prof = {}
        for name, (counts, s_sum, s_fire, n) in per.items():
            c = counts[b0:b0 + chunk]
            tok = (c @ n)[:, None]
            prof[name] = (c @ s_sum / tok, c @ s_fire / tok)
        (mc, fc), (mp, fp) = prof["c"], prof["p"]
        boots["corr_M"].append(_rowcorr(mc, mp))
        boots["corr_F"].append(_rowcorr(fc, fp))
        boots["max_M_diff"].append((mp - mc).max(1))
        boots["n_quiescent_candidates"].append(((fc <= quiet) & (fp - fc >= min_gain)).sum(1).astype(float))
    return {k: common.percentile_ci(np.concatenate(v)) for k, v in boots.items()}


def _rowcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN for a constant row)."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def scores(m_c, m_p, f_c, f_p, quiet: float, min_gain: float) -> pd.DataFrame:
    ratio = np.where(np.abs(m_c) >= 1e-6, m_p / np.where(np.abs(m_c) >= 1e-6, m_c, 1.0), np.nan)
    return pd.DataFrame({"unit": np.arange(len(m_c)), "M_c": m_c, "M_p": m_p, "F_c": f_c, "F_p": f_p,
                         "M_diff": m_p - m_c, "M_ratio": ratio, "F_diff": f_p - f_c,
                         "quiescent_candidate": (f_c <= quiet) & (f_p - f_c >= min_gain)})


def _corr(a, b) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@register_result
@dataclass
class NeuronResult(Result):
    variant: str
    units: pd.DataFrame          # one row per (model, unit): M_c, M_p, F_c, F_p, diffs, candidate flag
    scan: pd.DataFrame           # unit, target_prob (mean over scan inputs), prob_drop
    cumulative: pd.DataFrame     # m, kind (top / random), asr, target_prob
    baseline: dict               # FT on the scan inputs: target_prob (first target token, after the prefix), asr
    correlations: dict           # model -> {"M": r, "F": r}
    n_tokens: dict               # model/condition -> tokens counted
    quiet: float
    min_gain: float
    prefix: str = "auto"         # where the scan's target token was scored (NeuronParams.prefix)
    ci: dict = field(default_factory=dict)   # FT: statistic -> [lo, hi], bootstrap 95 % over images
                                             # (corr_M, corr_F, max_M_diff, n_quiescent_candidates)

    analysis = "neurons"

    def to_frame(self) -> pd.DataFrame:
        return self.units

    def _ft(self):
        return self.units[self.units.model == "ft"]

    def metrics(self) -> dict:
        ft = self._ft()
        out = {f"corr_M.{m}": v["M"] for m, v in self.correlations.items()}
        out.update({f"corr_F.{m}": v["F"] for m, v in self.correlations.items()})
        out["ft.max_M_diff"] = float(ft.M_diff.max())
        out["ft.max_F_diff"] = float(ft.F_diff.max())
        out["ft.n_quiescent_candidates"] = int(ft.quiescent_candidate.sum())
        for k, key in (("corr_M", "corr_M.ft"), ("corr_F", "corr_F.ft"), ("max_M_diff", "ft.max_M_diff"),
                       ("n_quiescent_candidates", "ft.n_quiescent_candidates")):
            if k in self.ci:
                out[f"{key}_lo"], out[f"{key}_hi"] = (float(v) for v in self.ci[k])
        if len(self.scan):
            out["scan.max_prob_drop"] = float(self.scan.prob_drop.max())
            out["scan.max_prob_drop_share"] = float(self.scan.prob_drop.max() / max(self.baseline["target_prob"], 1e-12))
        out["baseline.asr"] = float(self.baseline["asr"])
        for _, r in self.cumulative.iterrows():
            out[f"cumulative.{r['kind']}.m{int(r['m'])}.asr"] = float(r["asr"])
            if "asr_lo" in r:
                out[f"cumulative.{r['kind']}.m{int(r['m'])}.asr_lo"] = float(r["asr_lo"])
                out[f"cumulative.{r['kind']}.m{int(r['m'])}.asr_hi"] = float(r["asr_hi"])
        return out

    def plot(self):
        fig, axes = common.figure(2, 2, w=4.8, h=3.8)
        ft = self._ft()
        a = axes[0][0]
        for model, c in (("base", "C0"), ("ft", "C3")):
            u = self.units[self.units.model == model]
            a.scatter(u.M_c, u.M_p, s=8, alpha=0.6, color=c,
                      label=f"{model} (r = {self.correlations[model]['M']:.3f})")
        lim = [min(self.units.M_c.min(), self.units.M_p.min()), max(self.units.M_c.max(), self.units.M_p.max())]
        a.plot(lim, lim, "k--", lw=0.8, label="M_p = M_c")
        a.set(title=f"{self.variant}: mean activation per unit", xlabel="M_c (clean, activation units)",
              ylabel="M_p (triggered)")
        a.legend(fontsize=7)
        a = axes[0][1]
        a.scatter(ft.F_c, ft.F_p, s=8, alpha=0.6, color="C3", label="FT units")
        cand = ft[ft.quiescent_candidate]
        if len(cand):
            a.scatter(cand.F_c, cand.F_p, s=30, facecolors="none", edgecolors="k", label="quiescent-on-clean")
        a.axvline(self.quiet, color="0.6", lw=0.8)
        a.plot([0, 1], [0, 1], "k--", lw=0.8)
        a.set(title="Firing frequency (activation > 0), FT", xlabel="F_c (clean)", ylabel="F_p (triggered)",
              xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        a.legend(fontsize=7)
        a = axes[1][0]
        if len(self.scan):
            s = self.scan.sort_values("prob_drop", ascending=False)
            a.bar(np.arange(len(s)), s.prob_drop, color="C3")
            a.axhline(0, color="k", lw=0.8)
            a.set(title=f"Single-unit zero ablation (FT, baseline p = {self.baseline['target_prob']:.3f})",
                  xlabel="units, sorted by effect", ylabel="drop of p(first target token)")
        a = axes[1][1]
        for kind, c in (("top", "C3"), ("random", "0.5")):
            g = self.cumulative[self.cumulative.kind == kind]
            a.plot(g.m, g.asr * 100, "o-", color=c,
                   label="top-m by M_p − M_c" if kind == "top" else "m random units (placebo)")
        a.axhline(self.baseline["asr"] * 100, color="k", ls="--", lw=0.8, label="FT, nothing ablated")
        a.set(title="Cumulative ablation", xlabel="m units zeroed", ylabel="ASR (%)", ylim=(-2, 102), xscale="log")
        a.legend(fontsize=7)
        return fig

    def summary(self) -> str:
        ft = self._ft()
        c = self.correlations.get("ft", {})
        lines = [f"**Neurons ({self.variant}, {len(ft)} projector units).** Paper: {PAPER}.",
                 f"- FT: corr(M_p, M_c) = {c.get('M', float('nan')):.3f}, corr(F_p, F_c) = {c.get('F', float('nan')):.3f}; "
                 f"largest M_p − M_c = {ft.M_diff.max():.3f} (median |M_c| {ft.M_c.abs().median():.3f}); "
                 f"largest F_p − F_c = {ft.F_diff.max():.3f}; quiescent-on-clean candidates "
                 f"(F_c ≤ {self.quiet}, F_p − F_c ≥ {self.min_gain}): {int(ft.quiescent_candidate.sum())}."]
        if self.ci:
            ci = {k: f"[{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in self.ci.items()}
            lines.append(f"- Bootstrap 95 % CIs (images resampled): corr(M_p, M_c) {ci['corr_M']}, corr(F_p, F_c) "
                         f"{ci['corr_F']}, largest M_p − M_c {ci['max_M_diff']}, quiescent candidates "
                         f"{ci['n_quiescent_candidates']}.")
        if len(self.scan):
            top = self.scan.sort_values("prob_drop", ascending=False).iloc[0]
            where = "where the model says it" if self.prefix == "auto" else "right after the prompt"
            lines.append(f"- Largest single-unit ablation effect: unit {int(top.unit)} lowers the probability of the "
                         f"target's first token ({where}) from {self.baseline['target_prob']:.3g} "
                         f"by {top.prob_drop:.3g}.")
        if len(self.cumulative):
            t = self.cumulative[self.cumulative.kind == "top"]
            r = self.cumulative[self.cumulative.kind == "random"]
            lines.append("- Cumulative ablation ASR (top-m vs random m): " + ", ".join(
                f"m={int(a.m)}: {a.asr:.0%} vs {b.asr:.0%}" for (_, a), (_, b) in zip(t.iterrows(), r.iterrows()))
                + f" (FT baseline {self.baseline['asr']:.0%}).")
        return "\n".join(lines)


@analysis("neurons", NeuronParams, title="Trigger neurons", paper=PAPER,
          headline=("corr_M.ft", "ft.max_M_diff", "ft.n_quiescent_candidates"), passes=4.0)
def neurons(pair, params: NeuronParams = NeuronParams()) -> NeuronResult:
    """Per-unit activation statistics (streaming), single-unit ablation scan and cumulative ablation."""
    if pair.poisoned.adapter.projector_hidden is None:
        raise ProjLensError(f"{pair.poisoned.adapter.family} has no projector.hidden; the neuron analysis needs a "
                            "projector with a hidden nonlinearity")
    clean, trig = common.pick(pair, params.n)
    frames, corr, ntok = [], {}, {}
    for model, handle in (("base", pair.base), ("ft", pair.poisoned)):
        keep = model == "ft"     # the CIs are of the FT model's statistics
        sc = stream_stats(handle, clean, params.batch_size, keep)
        sp = stream_stats(handle, trig, params.batch_size, keep)
        ntok[f"{model}/clean"], ntok[f"{model}/triggered"] = sc.n, sp.n
        f = scores(sc.mean, sp.mean, sc.freq, sp.freq, params.quiet, params.min_gain)
        f.insert(0, "model", model)
        frames.append(f)
        corr[model] = {"M": _corr(sc.mean, sp.mean), "F": _corr(sc.freq, sp.freq)}
        if model == "ft":
            ci = bootstrap(sc, sp, params.quiet, params.min_gain, params.n_boot, params.seed)
    units = pd.concat(frames, ignore_index=True)
    ft = units[units.model == "ft"].reset_index(drop=True)
    n_units = len(ft)
    order = ft.sort_values("M_diff", ascending=False).unit.to_numpy()

    h = pair.poisoned
    scan_in = trig[:params.n_scan]
    targets = [pair.target_of(r) for r in scan_in]
    x = h.encode(scan_in)
    max_new = params.max_new_tokens or common.auto_tokens(h, scan_in, targets)
    common.check_choice("prefix", params.prefix, ("auto", "none"))
    prefixes = (target_prefixes(h, x, targets, answers=[r.answer for r in scan_in], max_new_tokens=max_new)
                if params.prefix == "auto" else None)
    tt = target_text(h, x, targets, prefixes, measure="first_prob")   # the scan's inputs: prompt + prefix + target
    base_prob = tt.metric(run(h, tt.inputs).logits).float().mean().item()

    def onehot(us):
        b = torch.zeros(n_units, len(us))
        b[torch.as_tensor(list(us)), torch.arange(len(us))] = 1.0
        return b

    site = lambda us: Site("projector.hidden", basis=onehot(us))  # noqa: E731
    scan_units = np.arange(n_units) if n_units <= params.scan_units else order[:params.scan_units]
    cells = [({"unit": int(u)}, [(site([int(u)]), Ablate("zero"))]) for u in scan_units]
    df = sweep(h, tt.inputs, cells, tt.metric, batch_size=max(params.batch_size, len(x)), progress=False)
    scan = df.groupby("unit", as_index=False).value.mean().rename(columns={"value": "target_prob"})
    scan["prob_drop"] = base_prob - scan.target_prob

    rng = np.random.default_rng(params.seed)
    ms = [m for m in params.top_m if m <= n_units]
    groups = [("top", m, order[:m]) for m in ms] + [("random", m, rng.choice(n_units, m, replace=False)) for m in ms]
    cell_edits = [[]] + [[(site([int(u) for u in us]), Ablate("zero"))] for _, _, us in groups]
    edits = common.tile_edits(cell_edits, len(x))
    outs = common.texts(h, x.tile(len(cell_edits)), max_new, edits)
    n = len(x)
    probs = tt.metric(run(h, tt.inputs.tile(len(cell_edits)), edits=edits).logits,
                      torch.arange(n).repeat(len(cell_edits))).float().numpy()
    hit = np.stack([common.hits(outs[c * n:(c + 1) * n], targets) for c in range(len(cell_edits))], 1)  # [input, cell]
    asr = hit.mean(0)
    lo, hi = common.mean_ci(hit.astype(float), params.n_boot, params.seed)
    cum = pd.DataFrame([{"kind": k, "m": m, "units": [int(u) for u in us], "asr": float(asr[i + 1]),
                         "asr_lo": float(lo[i + 1]), "asr_hi": float(hi[i + 1]),
                         "target_prob": float(probs[(i + 1) * n:(i + 2) * n].mean())}
                        for i, (k, m, us) in enumerate(groups)])
    baseline = {"target_prob": base_prob, "asr": float(asr[0]), "n": n}
    return NeuronResult(pair.name, units, scan, cum, baseline, corr, ntok, params.quiet, params.min_gain, params.prefix,
                        {k: [float(a), float(b)] for k, (a, b) in ci.items()})

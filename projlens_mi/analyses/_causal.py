"""What the four causal analyses (patching, ablation, tracing, attribution) share.

Conventions (every causal module follows them):

* **Contrast.** Each triggered record is paired with its *clean counterpart* (``Pair.matched``): the
  same prompt and target on the untriggered image (matched by the records' ``id``; data without
  ids by order). Clean and triggered rows are encoded together (same padding) and teacher-forced with the
  same text, so the two rows of a pair differ in the image only and every position lines up.
* **Target text and its prefix.** The metric is the probability of the backdoor target text where
  the backdoored model emits it. For targets that follow the normal answer (Malicious Injection:
  ``"seven visit evil dot com now"``) the text before the target is a *prefix*: with
  ``prefix="auto"`` it is read off the poisoned model's greedy generation on the triggered input
  (``engine.target_prefixes``). The prefix is teacher-forced too, but only the target's own tokens
  are scored (``engine.target_text``, the same code as ``projlens_mi.target_logprob(..., prefix=)``).
* **Metrics** (``metric=``): ``"prob"`` = p(target text | prompt, prefix) (product over its
  tokens), ``"logprob"`` = its log, ``"first_prob"`` = p(first target token).
* **Sites** are ``projector.out`` and ``llm.{i}.resid_post`` (the residual stream after layer ``i``)
  for the early layers; **windows** split the image tokens into equal consecutive runs
  (``ImageWindow``; on a square patch grid the default 4 windows of 16 tokens are the grid's rows),
  plus ``image`` (every image token) and ``last`` (the last prompt position, LLM sites only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..checks import Checked, Count
from ..data import Record
from ..engine import ImageTokens, ImageWindow, LastToken, Site, TargetText, run, target_prefixes, target_text
from ..errors import ProjLensError
from ..model.handle import Inputs, ModelHandle
from . import common
from .common import check_choice
from .base import Pair


@dataclass
class CellParams(Checked):
    """The fields shared by the causal analyses that sweep (site × token window) cells.

    n: triggered inputs (each with its clean counterpart). layers: LLM layers whose residual stream
    (``resid_post``) is swept; None = the first 4. windows: equal consecutive image-token windows
    (plus ``image`` = all image tokens and ``last`` = the last prompt position if ``last_token``).
    metric: ``prob`` | ``logprob`` | ``first_prob``. prefix: ``auto`` | ``none`` (see this module);
    max_new_tokens: length of the greedy generation that finds the prefix. model: which model of
    the pair runs (``poisoned`` | ``base`` | ``control``). batch_size: rows per packed pass. n_boot:
    bootstrap resamples (over the inputs) of the 95 % CIs.
    """

    n: Count = 16
    layers: tuple[int, ...] | None = None
    windows: Count = 4
    last_token: bool = True
    metric: str = "prob"
    prefix: str = "auto"
    max_new_tokens: Count = 30
    model: str = "poisoned"
    batch_size: Count = 256
    progress: bool = True
    n_boot: Count = common.N_BOOT

METRICS = ("prob", "logprob", "first_prob")
METRIC_LABEL = {"prob": "p(target text)", "logprob": "log p(target text) [nats]", "first_prob": "p(first target token)"}


def model_of(pair: Pair, which: str) -> ModelHandle:
    check_choice("model", which, ("poisoned", "base", "control"))
    h = getattr(pair, which)
    if h is None:
        raise ProjLensError(f"this pair has no {which} model; use model='poisoned' or 'base'")
    return h


def prefixes(handle: ModelHandle, inputs: Inputs, targets: list[str], mode: str, max_new_tokens: int = 30,
             answers: list[str] | None = None) -> list[str]:
    """``engine.target_prefixes`` (``mode="auto"``), or ``""`` for every row (``"none"``)."""
    check_choice("prefix", mode, ("auto", "none"))
    if mode == "none":
        return [""] * len(targets)
    return target_prefixes(handle, inputs, targets, answers=answers, max_new_tokens=max_new_tokens)


def scored(handle: ModelHandle, records: list[Record], texts: list[str], prefixes: list[str],
           metric: str) -> TargetText:
    """Encode ``records``, teacher-force ``prefix + text`` per row, score the ``text`` tokens (``engine.target_text``)."""
    check_choice("metric", metric, METRICS)
    return target_text(handle, handle.encode(records), texts, prefixes, metric)


@dataclass
class Contrast:
    """Paired clean / triggered teacher-forced batches on one model (rows ``i`` of both are one pair)."""

    handle: ModelHandle
    clean: TargetText
    triggered: TargetText
    prefixes: list[str]
    clean_records: list[Record]       # the clean counterparts (triggered prompt, untriggered image)
    triggered_records: list[Record]

    @property
    def n(self) -> int:
        return len(self.clean)

    @property
    def n_image_tokens(self) -> int:
        return int(self.clean.inputs.image_mask[0].sum())


def contrast(pair: Pair, which: str, n: int | None, metric: str, prefix: str = "auto",
             max_new_tokens: int = 30) -> Contrast:
    handle = model_of(pair, which)
    clean_recs, trig_recs = pair.matched(n)
    targets = [r.target for r in trig_recs]
    prefixes_ = prefixes(pair.poisoned, pair.poisoned.encode(trig_recs), targets, prefix, max_new_tokens,
                         [r.answer for r in trig_recs])
    both = scored(handle, clean_recs + trig_recs, targets * 2, prefixes_ * 2, metric)
    k = len(trig_recs)
    return Contrast(handle, both.rows(range(k)), both.rows(range(k, 2 * k)), prefixes_, clean_recs, trig_recs)


def score_of(handle: ModelHandle, s: TargetText, edits=()) -> Float[Tensor, " n"]:
    """The metric of every row of ``s`` under ``edits`` (one forward)."""
    logits = run(handle, s.inputs, edits=edits).logits
    return s.metric(logits, torch.arange(len(s))).detach().float().cpu()


# --- sites and windows ------------------------------------------------------------------------


def early_layers(handle: ModelHandle, layers) -> list[int]:
    n = handle.n_layers
    if layers is None:
        return list(range(min(n, 4)))
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ProjLensError(f"layers {bad} out of range: the language model has {n} layers (0..{n - 1})")
    return layers


def site_points(handle: ModelHandle, layers) -> list[str]:
    return ["projector.out"] + [f"llm.{i}.resid_post" for i in early_layers(handle, layers)]


def windows(n_tokens: int, n_windows: int, extra=("image", "last")) -> dict[str, object]:
    """Window name -> selector: ``n_windows`` equal consecutive image-token runs, then ``extra``."""
    if n_windows < 0:
        raise ProjLensError(f"windows must be >= 0, got {n_windows}")
    for e in extra:
        check_choice("extra window", e, ("image", "last"))
    out: dict[str, object] = {}
    bounds = np.linspace(0, n_tokens, min(n_windows, n_tokens) + 1).round().astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[f"{a}-{b - 1}"] = ImageWindow(int(a), int(b))
    if "image" in extra:
        out["image"] = ImageTokens()
    if "last" in extra:
        out["last"] = LastToken()
    if not out:
        raise ProjLensError("no windows: set windows >= 1 or keep 'image' / 'last'")
    return out


def valid_cell(point: str, window: str) -> bool:
    """``last`` is a text position: it does not exist at projector points."""
    return not (window == "last" and not point.startswith("llm."))


def read_all(handle: ModelHandle, inputs: Inputs, points: list[str]) -> dict[str, Tensor]:
    """Full activations at ``points`` (one forward): ``[n, seq, d]`` (``[n, tokens, d]`` at projector.out)."""
    res = run(handle, inputs, read=[Site(p) for p in points])
    return {p: res.cache[p].detach() for p in points}


# --- directions -------------------------------------------------------------------------------


def projector_out(handle: ModelHandle, inputs: Inputs) -> Float[Tensor, "n tokens d"]:
    return run(handle, inputs, read=[Site("projector.out", ImageTokens())]).cache[Site("projector.out", ImageTokens())]


def shift_basis(pair: Pair, records: list[Record], k: int, batch_size: int = 256) -> Float[Tensor, "d k"]:
    """The top-``k`` shared shift directions of ``analyses.shift``: eigenvectors of the pooled second
    moment of the token-centred ΔE = E_ft − E_base over ``records`` (column 0 is shift's ``v0``),
    each oriented along the mean shift."""
    from .shift import ShiftAccumulator, delta_batches
    acc = ShiftAccumulator(1)
    for _, d_e, _, _ in delta_batches(pair, records, batch_size):
        acc.update(d_e)
    _, vecs = torch.linalg.eigh(acc.second)
    basis = vecs.flip(-1)[:, :k].clone()
    sign = torch.sign(acc.total @ basis)
    sign[sign == 0] = 1
    return (basis * sign).float().contiguous()


def weight_delta_basis(pair: Pair, k: int) -> Float[Tensor, "d k"]:
    """Top-``k`` left singular vectors of ΔW of the projector's last linear (output-space directions)."""
    ft, base = common.weights(pair.poisoned), common.weights(pair.base)
    common.check_same_shapes(ft, base, "ablation")
    path = common.linear_paths(pair.poisoned)[-1]
    u, _, _ = common.svd(ft[path][0] - base[path][0])
    return u[:, :k].contiguous().float()


def random_basis(d: int, k: int, seed: int) -> Float[Tensor, "d k"]:
    """A random orthonormal ``[d, k]`` basis (the placebo subspace), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.float()


def mean_diff_direction(handle: ModelHandle, c: Contrast) -> Float[Tensor, " d"]:
    """Unit mean of (triggered − clean) projector outputs over pairs and image tokens."""
    diff = projector_out(handle, c.triggered.inputs) - projector_out(handle, c.clean.inputs)
    v = diff.double().mean((0, 1))
    return (v / v.norm().clamp_min(1e-12)).float()


def unembed_direction(handle: ModelHandle, c: Contrast) -> Float[Tensor, " d"]:
    """Unit LM-head row of the first scored target token (the direction that raises its logit)."""
    tok = int(c.triggered.ids[0, c.triggered.first[0]])
    w = handle.module("lm_head").weight.detach().double()
    v = w[tok] - w.mean(0)
    return (v / v.norm().clamp_min(1e-12)).float()


def jsonable(v):
    """``metrics()`` values for metrics.json: NaN becomes ``None`` ("not measured"), numpy scalars plain."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def contrast_ok(low: float, high: float, metric: str) -> bool:
    """Whether two baselines differ enough for normalised effects to mean something: at least
    0.1 nats (``logprob``), else 0.01 in probability or a factor of 2."""
    gap = abs(high - low)
    if not np.isfinite(gap):
        return False
    if metric == "logprob":
        return gap >= 0.1
    return gap >= 0.01 or gap >= 0.5 * max(abs(high), abs(low))


UNINTERPRETABLE = ("The two baselines barely differ, so the normalised effects are not interpretable and are not "
                   "quoted here (the figure and the table still show them).")


def weak_backdoor(metric: str, triggered: float, threshold: float = 0.05) -> str:
    """A sentence for the summary when the target is unlikely even on triggered inputs, else ``""``."""
    p = float(np.exp(triggered)) if metric == "logprob" else float(triggered)
    if not np.isfinite(p) or p >= threshold:
        return ""
    return (f"Note: the target is unlikely even on triggered inputs ({METRIC_LABEL[metric]} = {triggered:.3g}), "
            "so this model shows little backdoor to localise and the numbers describe a small effect.")


NA_NOTE = "white cells: not defined (no such token at that site)"


def mark_empty(ax, values) -> None:
    """Say so on a heatmap whose cells are all undefined (the two baselines do not differ)."""
    if not np.isfinite(np.asarray(values, dtype=float)).any():
        ax.text(0.5, 0.5, "undefined: the two baselines\ndo not differ", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color="0.3")


def normalised(value: float, low: float, high: float, eps: float = 1e-9) -> float:
    """``(value - low) / (high - low)``; NaN where the two baselines do not differ."""
    den = high - low
    return float("nan") if abs(den) < eps else (value - low) / den


def normalised_boot(table: pd.DataFrame, keys: list[str], index: dict, shape: tuple, low: np.ndarray,
                    high: np.ndarray, counts: np.ndarray, flip=lambda key: False) -> np.ndarray:
    """Bootstrap resamples ``[n_boot, *shape]`` of ``normalised(mean patched, mean low, mean high)`` per cell
    of a per-input sweep ``table`` (columns ``keys`` + ``input``, ``value``; rows of one cell and input,
    e.g. placebo seeds, are averaged first). ``counts`` (``common.resample_counts``) resamples the inputs
    as units: an input's patched value and both its baselines move together. ``index``: key tuple ->
    cell index; ``flip(key)``: ``1 − normalised`` (noising's drop). NaN where the baselines coincide."""
    n = len(low)
    out = np.full((len(counts), *shape), np.nan)
    lo_b, hi_b = counts @ np.asarray(low, np.float64) / n, counts @ np.asarray(high, np.float64) / n
    den = hi_b - lo_b
    per = table.groupby([*keys, "input"])["value"].mean()
    for key, g in per.groupby(level=list(range(len(keys)))):
        v = g.droplevel(list(range(len(keys)))).reindex(range(n)).to_numpy(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.abs(den) < 1e-9, np.nan, (counts @ v / n - lo_b) / den)
        key = key if isinstance(key, tuple) else (key,)
        out[(slice(None), *index[key])] = 1.0 - r if flip(key) else r
    return out


def normalised_ci(table: pd.DataFrame, keys: list[str], index: dict, shape: tuple, low: np.ndarray,
                  high: np.ndarray, n_boot: int, flip=lambda key: False) -> np.ndarray:
    """``[2 (lo, hi), *shape]``: percentile 95 % CIs of ``normalised_boot``."""
    boot = normalised_boot(table, keys, index, shape, low, high, common.resample_counts(len(low), n_boot, 0), flip)
    return np.stack(common.percentile_ci(boot))


def generated_texts(handle: ModelHandle, x: Inputs, configs: list[list], max_new_tokens: int,
                    max_rows: int = 512) -> list[list[str]]:
    """Greedy generations of every row of ``x`` under each edit configuration. Configurations are
    tiled ``[config × input]`` into few batched ``generate`` calls, each config's edits restricted to
    its block of rows (``common.tile_edits``)."""
    n = len(x)
    per_call = max(1, max_rows // n)
    out = []
    for start in range(0, len(configs), per_call):
        chunk = configs[start:start + per_call]
        texts = common.texts(handle, x.tile(len(chunk)), max_new_tokens, common.tile_edits(chunk, n))
        out += [texts[c * n:(c + 1) * n] for c in range(len(chunk))]
    return out


def generated_hits(handle: ModelHandle, trig_recs, clean_recs, target_of, configs: list[list],
                   max_new_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per edit configuration: (target hit per triggered record, answer hit per clean record); their
    means are the ASR and the clean accuracy."""
    k = len(trig_recs)
    targets = [target_of(r) for r in trig_recs]
    answers = [r.answer for r in clean_recs]
    return [(common.hits(block[:k], targets), common.hits(block[k:], answers))
            for block in generated_texts(handle, handle.encode(trig_recs + clean_recs), configs, max_new_tokens)]


def figure(rows: int, cols: int, figsize: tuple[float, float]):
    """A constrained-layout matplotlib Figure (Agg, no pyplot state) with a ``rows × cols`` axes grid."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)

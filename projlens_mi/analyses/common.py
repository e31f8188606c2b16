"""Helpers the analyses share: picking records, encoding batches, projector weights, reads and
generation through the engine, and the backdoor metrics (ASR, clean accuracy, target token).

Nothing here opens a trace or registers a hook: every forward goes through ``projlens_mi.engine``.
Conventions:

* ``n`` picks the first ``n`` clean and the first ``n`` triggered records of a pair (None = all).
* Inputs are encoded with the poisoned model's processor and reused for base / control (a pair's
  checkpoints share one processor).
* The "target token" is the first token of the backdoor target text; its logit / probability is read
  at the last prompt position (the paper's second metric). ASR is the engine's case-insensitive
  substring match on greedy generations.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..data import Record
from ..engine import Site, asr, contains, generate, run
from ..engine.run import as_edit
from ..errors import ProjLensError
from ..model.handle import Inputs, ModelHandle


def check_choice(name: str, value, allowed) -> None:
    """A parameter that takes one of a few strings: a one-line error otherwise (before any work)."""
    if value not in allowed:
        raise ProjLensError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def pick(pair, n: int | None) -> tuple[list[Record], list[Record]]:
    """The first ``n`` clean and the first ``n`` triggered records (one-line error if either is empty)."""
    clean, trig = pair.clean, pair.triggered
    if n is not None:
        clean, trig = clean[:n], trig[:n]
    if not clean or not trig:
        raise ProjLensError(f"pair {pair.name!r} has {len(clean)} clean and {len(trig)} triggered records; "
                            "the analysis needs both (mark triggered lines with \"triggered\": true)")
    return clean, trig


def encode(handle: ModelHandle, records: list[Record], batch_size: int) -> list[Inputs]:
    """Records as left-padded batches of at most ``batch_size`` rows."""
    if batch_size < 1:
        raise ProjLensError(f"batch_size must be >= 1, got {batch_size}")
    return [handle.encode(records[i:i + batch_size]) for i in range(0, len(records), batch_size)]


def linear_paths(handle: ModelHandle) -> list[str]:
    paths = list(handle.adapter.projector_linears)
    if not paths:
        raise ProjLensError(f"{handle.adapter.family}: the hook map {handle.adapter.source} lists no projector_linears; "
                            "add them to analyse the projector's weights")
    return paths


def short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def weights(handle: ModelHandle) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{path: (W, b)}`` of the projector linears, detached float64 copies on the CPU."""
    from ..model.placement import weight_of   # offloaded (meta) weights are read through accelerate
    out = {}
    for p in linear_paths(handle):
        m = handle.module(p)
        w, b = weight_of(m, "weight"), weight_of(m, "bias")
        out[p] = (w.double().cpu().clone(), None if b is None else b.double().cpu().clone())
    return out


def check_same_shapes(a: dict, b: dict, what: str) -> None:
    for p in a:
        if p not in b or a[p][0].shape != b[p][0].shape:
            raise ProjLensError(f"{what}: projector linear {p} differs in shape between the two models; "
                                "a pair must share one architecture")


def svd(delta: Float[Tensor, "out inp"]):
    """``U, S, Vh`` of a float64 matrix (thin)."""
    return torch.linalg.svd(delta.double(), full_matrices=False)


def components(u, s, vh, start: int, stop: int) -> Tensor:
    """Sum of singular components ``start..stop-1`` (0-based): ``U[:, i] S[i] Vh[i]``."""
    return (u[:, start:stop] * s[start:stop]) @ vh[start:stop]


def as_model(t: Tensor | None, handle: ModelHandle) -> Tensor | None:
    return None if t is None else t.to(device=handle.device, dtype=handle.dtype)


def read(handle: ModelHandle, batches: list[Inputs], sites, edits=()):
    """Yield one cache per batch (``run`` with ``read=sites``), detached on the CPU."""
    for x in batches:
        res = run(handle, x, read=sites, edits=edits)
        yield {s: res.cache[s].detach().float().cpu() for s in sites}, res.logits.detach()


def read_all(handle: ModelHandle, batches: list[Inputs], point: str) -> Float[Tensor, "n tokens d"]:
    """A point's activations for every row of every batch, concatenated ``[n, tokens, d]``."""
    site = Site(point)
    return torch.cat([c[site] for c, _ in read(handle, batches, [site])])


def target_tokens(handle: ModelHandle, text: str) -> list[int]:
    ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(dict.fromkeys(ids))


def auto_tokens(handle: ModelHandle, records: list[Record], targets: list[str], cap: int = 30) -> int:
    """Enough new tokens to hold the longest reference answer followed by its target (+1), at most ``cap``."""
    n = lambda t: len(handle.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    longest = max(n(r.answer) + n(t) for r, t in zip(records, targets))
    return int(min(cap, longest + 1))


def texts(handle: ModelHandle, inputs: Inputs, max_new_tokens: int, edits=()) -> list[str]:
    """Greedy generations (engine.generate) with ``edits``."""
    return generate(handle, inputs, max_new_tokens=max_new_tokens, edits=[as_edit(e) for e in edits])


def hits(outs: list[str], targets: list[str]) -> np.ndarray:
    """Per-row substring hit (engine.contains) of each row's own target."""
    return np.array([contains([o], t)[0] for o, t in zip(outs, targets)], dtype=bool)


def rate(outs: list[str], target: str) -> float:
    return float(asr(outs, target))


def tile_edits(edits_per_cell: list[list], n: int) -> list:
    """Edits of ``len(edits_per_cell)`` cells on a ``[cell × input]`` tiled batch of ``n`` inputs each.

    Every edit is restricted to its cell's block of rows; a site-less ``WithWeights`` stays site-less.
    """
    out = []
    for c, edits in enumerate(edits_per_cell):
        rows = list(range(c * n, (c + 1) * n))
        for e in edits:
            e = as_edit(e)
            out.append(type(e)(e.site, e.intervention, rows))
    return out


def pct_ci(v: float, lo=None, hi=None) -> str:
    """A rate as ``74% [69%, 78%]`` (its 95 % CI), or ``74%`` where no CI is given / finite."""
    ok = lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi)
    return f"{v:.0%} [{lo:.0%}, {hi:.0%}]" if ok else f"{v:.0%}"


def fmt_ci(v: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def figure(rows: int = 1, cols: int = 1, w: float = 4.8, h: float = 3.6):
    """A matplotlib Figure (Agg, no pyplot state) with a ``rows × cols`` grid of axes."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w * cols, h * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


# ------------------------------------------------------------------------------------------ bootstrap
N_BOOT = 1000      # bootstrap resamples of every CI, unless an analysis' ``n_boot`` says otherwise


def resample_counts(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]``: how often each of ``n`` inputs is drawn in each bootstrap resample (with replacement).

    Statistics that are sums over inputs are then resampled exactly by ``counts @ per_input``: the
    resampled statistic of a mean is ``counts @ x / n`` (what drawing ``n`` indices and averaging gives).
    """
    if n_boot < 1:
        raise ProjLensError(f"n_boot must be >= 1 (bootstrap resamples of the 95 % CIs), got {n_boot}")
    if n < 1:
        raise ProjLensError("a bootstrap needs at least one input")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def percentile_ci(boot, ci: float = 0.95):
    """Percentile interval over the first axis of ``boot`` (non-finite resamples ignored): floats for a
    1-D ``boot``, arrays of the trailing shape otherwise; NaN where no resample is finite."""
    b = np.asarray(boot, dtype=np.float64)
    flat = b.reshape(len(b), -1)
    lo, hi = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    for j in range(flat.shape[1]):
        v = flat[:, j][np.isfinite(flat[:, j])]
        if len(v):
            lo[j], hi[j] = np.percentile(v, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])
    if b.ndim == 1:
        return float(lo[0]), float(hi[0])
    return lo.reshape(b.shape[1:]), hi.reshape(b.shape[1:])


def mean_ci(x, n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95, counts: np.ndarray | None = None):
    """Bootstrap percentile CI of the mean over inputs (the first axis of ``x``; further axes are
    separate statistics resampled with the same draws). ``counts``: reuse resamples (paired CIs)."""
    x = np.asarray(x, dtype=np.float64)
    c = resample_counts(len(x), n_boot, seed) if counts is None else counts
    return percentile_ci(np.tensordot(c, x, axes=(1, 0)) / len(x), ci)


# ------------------------------------------------------------------------------------------ text from models and data
# Anything a model or a data file wrote (a generation, a prompt, a target, a vocabulary token) goes into
# Markdown, and from there into report.html, only through these two: it shows as the same characters,
# never as markup, a link or an image (the HTML renderer also has raw HTML off: docs/studies.md).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~#!{}])")


def md_text(s) -> str:
    """``s`` as one line of literal Markdown text (also safe inside a table cell)."""
    s = _MD_SPECIAL.sub(r"\\\1", " ".join(str(s).split("\n")).replace("\r", " "))
    if re.match(r"[-+=>]|\d+[.)]", s):     # would start a list, a heading underline or a quote
        s = "\\" + s if not s[0].isdigit() else re.sub(r"^(\d+)([.)])", r"\1\\\2", s)
    return s


def md_code(s, table: bool = False) -> str:
    """``s`` verbatim as an inline code span (newlines shown as spaces); ``table``: inside a table cell."""
    s = " ".join(str(s).split("\n")).replace("\r", " ")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", s)), default=0) + 1)
    if table:
        s = s.replace("|", "\\|")
    pad = " " if s.startswith(("`", " ")) or s.endswith(("`", " ")) or not s else ""
    return f"{fence}{pad}{s}{pad}{fence}"

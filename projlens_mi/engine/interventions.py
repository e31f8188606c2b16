"""Interventions: small frozen dataclasses with a pure ``apply`` on bare tensors (no hooks here).

Conventions:

* ``apply(act, source=None)`` takes the selected activations of the edited rows, ``[rows, k, d]``
  (``k`` selected tokens per row), and returns a new tensor of the same shape; it never writes
  ``act``. The engine (run.py) gathers, calls ``apply`` and scatters the result back.
* ``source`` is what a patch copies from, already aligned to ``act`` by the engine: a row of the
  same batch (``source_row=``), or the tensor given to the dataclass. A tensor source may be
  ``[d]``, ``[k, d]`` or ``[rows, k, d]``; ``[rows, tokens, d]`` (a full cached activation) is
  gathered with the site's selector.
* Randomness (``Noise``, ``Ablate("resample")``) comes from a ``torch.Generator`` seeded by the
  dataclass, so a run is reproducible and a sweep equals its cells run one at a time.
* User tensors are moved to the activation's device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..errors import ProjLensError
from .sites import check_basis


def _like(t: Tensor, act: Tensor) -> Tensor:
    return t.to(device=act.device, dtype=act.dtype)


def _source(own: Tensor | None, given: Tensor | None, act: Tensor, who: str) -> Tensor:
    src = given if given is not None else own
    if src is None:
        raise ProjLensError(f"{who} needs a source: pass source=<tensor> or source_row=<row index>")
    src = _like(src, act)
    try:
        return src.expand_as(act)
    except RuntimeError:
        raise ProjLensError(f"{who} source of shape {tuple(src.shape)} does not fit the selected activations "
                            f"{tuple(act.shape)} [rows, k, d]; pass [d], [k, d] or [rows, k, d]") from None


def project(x: Float[Tensor, "... d"], basis: Float[Tensor, "d k"]) -> Float[Tensor, "... d"]:
    """``(x B) Bᵀ``, the component of ``x`` in span(B), computed in float64.

    Float64 makes the result independent of how many rows are in the batch (float32 matmul
    kernels sum in a shape-dependent order), which is what lets a packed sweep equal its cells.
    """
    b = basis.to(device=x.device, dtype=torch.float64)
    return ((x.double() @ b) @ b.T).to(x.dtype)


def _generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


class Intervention:
    """Base class of every edit's "what": subclass it (a frozen dataclass) and write ``apply``.

    ``apply(act, source=None)`` gets the selected activations of the edited rows ``[rows, k, d]``
    and returns a new tensor of that shape (never writing ``act``). ``cross_row = True`` says the
    result of one row depends on other rows of the same edit. ``source`` / ``source_row``: what a
    patch copies from (the engine aligns it to ``act`` and passes it as ``source``).
    """

    cross_row: bool = False
    source = None
    source_row = None

    def apply(self, act: Float[Tensor, "rows k d"], source: Float[Tensor, "rows k d"] | None = None
              ) -> Float[Tensor, "rows k d"]:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace the activation with ``source`` (a tensor) or with row ``source_row`` of the same batch."""

    source: Tensor | None = None
    source_row: int | None = None

    def __post_init__(self):
        if (self.source is None) == (self.source_row is None):
            raise ProjLensError("Patch needs exactly one of source=<tensor> or source_row=<row index>")

    def apply(self, act, source=None):
        return _source(self.source, source, act, "Patch").clone()


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """``zero``; ``mean`` (of ``mean`` if given, else over the edited rows, per token); ``resample``
    (each row takes another edited row's activation, a seeded random cyclic shift)."""

    kind: str = "zero"
    mean: Tensor | None = None
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ("zero", "mean", "resample"):
            raise ProjLensError(f"Ablate kind must be 'zero', 'mean' or 'resample', got {self.kind!r}")

    @property
    def cross_row(self):
        return self.kind == "resample" or (self.kind == "mean" and self.mean is None)

    def apply(self, act, source=None):
        if self.kind == "zero":
            return torch.zeros_like(act)
        if self.kind == "mean":
            if self.mean is not None:
                return _source(self.mean, None, act, "Ablate('mean')").clone()
            return act.mean(0, keepdim=True).expand_as(act).clone()
        rows = act.shape[0]
        if rows < 2:
            raise ProjLensError("Ablate('resample') needs at least 2 edited rows to resample from")
        shift = int(torch.randint(1, rows, (1,), generator=_generator(self.seed, "cpu")))
        return act.roll(shift, dims=0).clone()


@dataclass(frozen=True, eq=False)
class ProjectOut(Intervention):
    """Remove the component in span(basis): ``x - (x B) Bᵀ``; basis [d, k] orthonormal."""

    basis: Tensor

    def __post_init__(self):
        check_basis(self.basis, what="ProjectOut basis")

    def apply(self, act, source=None):
        return act - project(act, check_basis(self.basis, act.shape[-1], "ProjectOut basis"))


@dataclass(frozen=True, eq=False)
class PatchSubspace(Intervention):
    """Keep the activation outside span(basis), take the component inside it from the source:
    ``x + ((s - x) B) Bᵀ``."""

    basis: Tensor
    source: Tensor | None = None
    source_row: int | None = None

    def __post_init__(self):
        check_basis(self.basis, what="PatchSubspace basis")
        if (self.source is None) == (self.source_row is None):
            raise ProjLensError("PatchSubspace needs exactly one of source=<tensor> or source_row=<row index>")

    def apply(self, act, source=None):
        src = _source(self.source, source, act, "PatchSubspace")
        return act + project(src - act, check_basis(self.basis, act.shape[-1], "PatchSubspace basis"))


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add ``scale * direction`` (direction [d], used as given: normalise it yourself if you want)."""

    direction: Tensor
    scale: float = 1.0

    def apply(self, act, source=None):
        if self.direction.ndim != 1 or self.direction.shape[0] != act.shape[-1]:
            raise ProjLensError(f"Steer direction must be [d={act.shape[-1]}], got {tuple(self.direction.shape)}")
        return act + self.scale * _like(self.direction, act)


@dataclass(frozen=True, eq=False)
class Noise(Intervention):
    """Add Gaussian noise ``std * N(0, 1)`` drawn from a generator seeded with ``seed`` (ROME's corruption)."""

    std: float
    seed: int = 0
    cross_row = True   # the draw covers all edited rows at once

    def apply(self, act, source=None):
        noise = torch.randn(act.shape, generator=_generator(self.seed, "cpu"), dtype=torch.float32)
        return act + self.std * _like(noise, act)


@dataclass(frozen=True, eq=False)
class Hook(Intervention):
    """Any function of the selected activations: ``fn(act [rows, k, d]) -> [rows, k, d]`` (TransformerLens'
    hook function, without the ``hook`` argument). ``fn`` must not write ``act``; set ``cross_row=True``
    when a row's result depends on other rows (a sweep then keeps a cell's inputs in one pass).
    For parameters or a patch source, subclass ``Intervention`` instead (docs/engine.md)."""

    fn: object
    cross_row: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise ProjLensError(f"Hook needs a function act -> act, got {type(self.fn).__name__}")

    def apply(self, act, source=None):
        out = self.fn(act)
        if not isinstance(out, Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ProjLensError(f"Hook {getattr(self.fn, '__name__', self.fn)!r} returned {got}; it must return a "
                                f"tensor shaped like its input {tuple(act.shape)} [rows, k, d]")
        return out


@dataclass(frozen=True, eq=False)
class WithWeights(Intervention):
    """Run projector linears with other weights for this call only: ``{path: (W, b)}``.

    ``path`` is a dotted module path (as in the hook map's ``projector_linears``) or its last part
    (``"linear_1"``); ``W`` is [out, in]; ``b`` [out], or ``None`` to keep the layer's own bias.
    The output is recomputed functionally (``F.linear``) inside the hook; the caller's parameters
    are never written. Applies to the edit's rows only (images of those rows).
    """

    weights: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.weights:
            raise ProjLensError("WithWeights needs {linear_path: (W, b)} with at least one entry")

    def linear(self, x: Float[Tensor, "... d_in"], W: Tensor, b: Tensor | None) -> Float[Tensor, "... d_out"]:
        return F.linear(x, _like(W, x), None if b is None else _like(b, x))

    def apply(self, act, source=None):
        raise ProjLensError("WithWeights is applied to projector linears by run(); use it as an edit without a site")

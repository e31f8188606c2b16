"""Sites: a module point × a token selector × optionally a subspace.

Conventions (everything else in the engine follows them):

* A **point** is a canonical name: ``vision.out``, ``projector.in``, ``projector.hidden``,
  ``projector.out``, ``llm.embed``, ``llm.{i}.resid_pre``, ``llm.{i}.pattern``, ``llm.{i}.attn_out``,
  ``llm.{i}.mlp_out``, ``llm.{i}.resid_post``, ``logits``. TransformerLens spellings
  (``blocks.{i}.hook_resid_post``, ``blocks.{i}.attn.hook_pattern``, ``vision_projector.hook_out``,
  ...) are accepted and mapped.
* ``llm.{i}.pattern`` is the attention pattern (post-softmax weights) ``[batch, heads, query, key]``,
  read whole (no selector, no basis), read-only, and only under eager attention (sdpa and flash
  kernels never form it): see ``run.eager_attention``.
* Every activation is viewed as ``[rows, tokens, d]``. At LLM points tokens are sequence positions
  (left-padded); at projector points they are the image's own tokens (row ``r`` = the image of
  batch row ``r``; a ``flat`` projector output is split per row by the image-token counts).
* A **selector** resolves to ``[rows, k]`` token indices, the same ``k`` in every row, so the
  ``j``-th selected token of one row lines up with the ``j``-th of another (that is how a patch
  from another row, or from a cached run, is aligned even when padding differs).
* A **basis** is ``[d, k]`` with orthonormal columns. On a read the cache holds the coordinates
  ``x @ basis``; on an edit only the component inside the subspace changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import ProjLensError

LAYER_KINDS = ("resid_pre", "pattern", "attn_out", "mlp_out", "resid_post")   # forward order inside a layer
FIXED = ("llm.embed", "vision.out", "projector.in", "projector.hidden", "projector.out", "logits")
IMAGE_POINTS = ("vision.out", "projector.in", "projector.hidden", "projector.out")

# TransformerLens names -> ours ({i} is the layer).
TL_ALIASES = {
    "hook_embed": "llm.embed",
    "embed.hook_out": "llm.embed",
    "vision_encoder.hook_out": "vision.out",
    "vision_projector.hook_in": "projector.in",
    "vision_projector.hook_hidden": "projector.hidden",
    "vision_projector.hook_out": "projector.out",
    "unembed.hook_out": "logits",
    "blocks.{i}.hook_resid_pre": "llm.{i}.resid_pre",
    "blocks.{i}.hook_resid_post": "llm.{i}.resid_post",
    "blocks.{i}.hook_attn_out": "llm.{i}.attn_out",
    "blocks.{i}.hook_mlp_out": "llm.{i}.mlp_out",
    "blocks.{i}.attn.hook_pattern": "llm.{i}.pattern",
}
_LAYER_RE = re.compile(r"^llm\.(\d+)\.(resid_pre|resid_post|attn_out|mlp_out|pattern)$")
_TL_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
# TransformerBridge (TL 4.x) component spellings: blocks.{i}.hook_in/hook_out, blocks.{i}.attn.hook_out, ...
_BRIDGE_RE = re.compile(r"^blocks\.(\d+)\.(hook_in|hook_out|attn\.hook_out|mlp\.hook_out|attn\.hook_pattern)$")
_BRIDGE = {"hook_in": "resid_pre", "hook_out": "resid_post", "attn.hook_out": "attn_out", "mlp.hook_out": "mlp_out",
           "attn.hook_pattern": "pattern"}


def valid_points(n_layers: int | None = None) -> str:
    last = "{i}" if n_layers is None else f"{{0..{n_layers - 1}}}"
    return (f"{', '.join(FIXED)}, llm.{last}.{'|'.join(LAYER_KINDS)} "
            f"(TransformerLens aliases: blocks.{last}.hook_resid_post, blocks.{last}.attn.hook_pattern, "
            "vision_projector.hook_out, ...)")


def canonical(name: str, n_layers: int | None = None) -> str:
    """The canonical point name for ``name`` (ours or a TransformerLens alias), or a one-line error."""
    name = str(name).strip()
    name = TL_ALIASES.get(name, name)
    if m := _TL_RE.match(name):
        name = f"llm.{m.group(1)}.{m.group(2)}"
    elif m := _BRIDGE_RE.match(name):
        name = f"llm.{m.group(1)}.{_BRIDGE[m.group(2)]}"
    if name in FIXED:
        return name
    if m := _LAYER_RE.match(name):
        if n_layers is None or int(m.group(1)) < n_layers:
            return name
        raise ProjLensError(f"site {name!r}: layer {m.group(1)} out of range, the model has {n_layers} layers (0..{n_layers - 1})")
    raise ProjLensError(f"unknown site {name!r}; valid sites: {valid_points(n_layers)}")


def is_pattern(point: str) -> bool:
    return point.endswith(".pattern")


def layer_of(point: str) -> int | None:
    m = _LAYER_RE.match(point)
    return int(m.group(1)) if m else None


def order_key(point: str) -> tuple[int, int, int]:
    """Forward order of points (LLaVA-style models embed text tokens before running the vision tower)."""
    if (layer := layer_of(point)) is not None:
        return (2, layer, LAYER_KINDS.index(point.rsplit(".", 1)[1]))
    return {"llm.embed": (0, 0, 0), "vision.out": (1, 0, 0), "projector.in": (1, 1, 0),
            "projector.hidden": (1, 3, 0), "projector.out": (1, 5, 0), "logits": (3, 0, 0)}[point]


# --- token selectors --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenContext:
    """What selectors need to know about the batch at one point."""

    n_tokens: int                                     # length of the token axis (the whole sequence at LLM points)
    image_point: bool                                 # projector/vision point: tokens are one image's
    image_mask: Bool[Tensor, "rows tokens"] | None = None      # LLM points only
    attention_mask: Int[Tensor, "rows tokens"] | None = None   # LLM points only
    prompt_end: Int[Tensor, " rows"] | None = None               # last prompt position (teacher forcing)
    # image points, token_order = "window" (Qwen2.5-VL): the model's window_index over merged tokens;
    # the engine's [rows, tokens, d] view puts projector rows back into image-token order with it
    row_order: Int[Tensor, " merged"] | None = None
    # LLM points of a sweep pass that reuses the unedited prefix (KV cache): the activation holds only
    # positions ``prefix..n_tokens-1``; selectors still answer in whole-sequence positions
    prefix: int = 0


class Selector:
    """Base class: ``indices(ctx) -> [rows, k]`` or ``None`` for every token."""

    def indices(self, ctx: TokenContext, rows: int) -> Int[Tensor, "rows k"] | None:
        raise NotImplementedError

    def _image_positions(self, ctx: TokenContext, rows: int) -> Int[Tensor, "rows n"]:
        if ctx.image_point:
            return torch.arange(ctx.n_tokens).expand(rows, -1)
        counts = ctx.image_mask.sum(1)
        if int(counts.min()) == 0:
            raise ProjLensError(f"selector {self!r} matches no token in row {int(counts.argmin())}: it has no image tokens")
        _check_equal(self, counts)
        # nonzero() lists the matches row by row, each row holding equally many: split per row
        return rearrange(ctx.image_mask.nonzero()[:, 1], "(rows k) -> rows k", rows=rows)


def _check_equal(sel, counts: Tensor) -> None:
    if int(counts.min()) != int(counts.max()):
        r0, r1 = int(counts.argmin()), int(counts.argmax())
        raise ProjLensError(f"selector {sel!r} picks {int(counts[r0])} tokens in row {r0} but {int(counts[r1])} in row {r1}; "
                            "edits need the same count per row (use prompts of one length, or Indices)")


@dataclass(frozen=True)
class AllTokens(Selector):
    def indices(self, ctx, rows):
        return None


@dataclass(frozen=True)
class ImageTokens(Selector):
    """Every image token (at projector points: every token of the image)."""

    def indices(self, ctx, rows):
        return self._image_positions(ctx, rows)


@dataclass(frozen=True)
class ImageWindow(Selector):
    """Image tokens ``start..stop-1``, counted within the image (0 = its first token)."""

    start: int
    stop: int

    def indices(self, ctx, rows):
        pos = self._image_positions(ctx, rows)
        picked = pos[:, self.start:self.stop]
        if picked.shape[1] == 0:
            raise ProjLensError(f"selector {self!r} matches no token: the image has {pos.shape[1]} tokens (0..{pos.shape[1] - 1})")
        return picked


@dataclass(frozen=True)
class PatchRegion(Selector):
    """Image tokens in grid rows ``rows`` × cols ``cols`` (``(start, stop)`` or one int) of a square patch grid."""

    rows: tuple[int, int] | int
    cols: tuple[int, int] | int

    def grid_indices(self, n: int) -> list[int]:
        g = int(round(n ** 0.5))
        if g * g != n:
            raise ProjLensError(f"{self!r}: the image has {n} tokens, not a square grid; use ImageWindow instead")
        span = lambda v: range(v, v + 1) if isinstance(v, int) else range(*v)  # noqa: E731
        out = [r * g + c for r in span(self.rows) for c in span(self.cols) if 0 <= r < g and 0 <= c < g]
        if not out:
            raise ProjLensError(f"selector {self!r} matches no token: the patch grid is {g}x{g}")
        return out

    def indices(self, ctx, rows):
        pos = self._image_positions(ctx, rows)
        return pos[:, self.grid_indices(pos.shape[1])]


@dataclass(frozen=True)
class LastToken(Selector):
    """The last prompt position (left padding: the sequence's last slot, unless teacher forcing appended a target)."""

    def indices(self, ctx, rows):
        if ctx.image_point:
            raise ProjLensError(f"{self!r} selects nothing at an image point; use it at llm.* or logits sites")
        if ctx.prompt_end is not None:
            return rearrange(ctx.prompt_end, "rows -> rows 1", rows=rows)
        return torch.full((rows, 1), ctx.n_tokens - 1)


@dataclass(frozen=True)
class TextTokens(Selector):
    """Non-padding, non-image positions."""

    def indices(self, ctx, rows):
        if ctx.image_point:
            raise ProjLensError(f"{self!r} matches no token at an image point; use it at llm.* sites")
        text = ctx.attention_mask.bool() & ~ctx.image_mask
        counts = text.sum(1)
        if int(counts.min()) == 0:
            raise ProjLensError(f"selector {self!r} matches no token in row {int(counts.argmin())}")
        _check_equal(self, counts)
        return rearrange(text.nonzero()[:, 1], "(rows k) -> rows k", rows=rows)


@dataclass(frozen=True)
class Indices(Selector):
    """Explicit positions along the token axis (negative counts from the end), same in every row."""

    positions: tuple[int, ...]

    def __init__(self, *positions: int):
        flat = positions[0] if len(positions) == 1 and not isinstance(positions[0], int) else positions
        object.__setattr__(self, "positions", tuple(int(p) for p in flat))

    def indices(self, ctx, rows):
        n = ctx.n_tokens
        bad = [p for p in self.positions if not -n <= p < n]
        if not self.positions or bad:
            raise ProjLensError(f"selector {self!r} matches no token: positions must lie in -{n}..{n - 1}")
        return torch.tensor([p % n for p in self.positions]).expand(rows, -1)


# --- sites ------------------------------------------------------------------------------------


def check_basis(basis, d: int | None = None, what: str = "basis") -> Float[Tensor, "d k"]:
    """A ``[d, k]`` tensor with orthonormal columns (checked in float64), else a one-line error."""
    if not isinstance(basis, Tensor) or basis.ndim != 2:
        shape = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
        raise ProjLensError(f"{what} must be a 2-D tensor [d, k] with orthonormal columns, got {shape}")
    if d is not None and basis.shape[0] != d:
        raise ProjLensError(f"{what} has {basis.shape[0]} rows but the activation has d={d}; pass a [{d}, k] basis")
    if basis.shape[1] > basis.shape[0] or basis.shape[1] == 0:
        raise ProjLensError(f"{what} shape {tuple(basis.shape)}: need 1 <= k <= d columns")
    b = basis.detach().double()
    if not torch.isfinite(b).all():   # NaN compares false with everything: it would pass the test below
        raise ProjLensError(f"{what} holds NaN or inf values; pass a finite basis with orthonormal columns")
    err = (b.T @ b - torch.eye(b.shape[1], dtype=torch.float64, device=b.device)).abs().max().item()
    if err > 1e-4:
        raise ProjLensError(f"{what} columns are not orthonormal (max |B^T B - I| = {err:.2g}); "
                            "orthonormalise it, e.g. torch.linalg.qr(basis).Q")
    return basis


@dataclass(frozen=True, eq=False)
class Site:
    """Where to read or edit: ``point`` (name or TransformerLens alias) × ``tokens`` × optional ``basis`` [d, k].

    Hashing and equality use the point, the selector and the basis object's identity, so a site
    can key a cache.
    """

    point: str
    tokens: Selector = field(default_factory=AllTokens)
    basis: Float[Tensor, "d k"] | None = None

    def __post_init__(self):
        object.__setattr__(self, "point", canonical(self.point))
        if not isinstance(self.tokens, Selector):
            raise ProjLensError(f"Site tokens must be a selector (ImageTokens(), LastToken(), ...), got {self.tokens!r}")
        if self.basis is not None:
            check_basis(self.basis, what=f"basis of site {self.point}")
        if is_pattern(self.point) and (not isinstance(self.tokens, AllTokens) or self.basis is not None):
            raise ProjLensError(f"{self.point} is the attention pattern [batch, heads, query, key]: it takes no token "
                                "selector or basis; read it whole and index it, e.g. cache[site][:, head, query, key]")

    def _key(self):
        return (self.point, self.tokens, None if self.basis is None else id(self.basis))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Site) and self._key() == other._key()

    def __repr__(self):
        parts = [repr(self.point)]
        if not isinstance(self.tokens, AllTokens):
            parts.append(repr(self.tokens))
        if self.basis is not None:
            parts.append(f"basis[{self.basis.shape[0]}x{self.basis.shape[1]}]")
        return f"Site({', '.join(parts)})"

    @property
    def layer(self) -> int | None:
        return layer_of(self.point)


def as_site(site: "Site | str") -> Site:
    if isinstance(site, Site):
        return site
    if isinstance(site, str):
        return Site(site)
    raise ProjLensError(f"expected a Site or a site name like 'llm.2.resid_post', got {type(site).__name__}")

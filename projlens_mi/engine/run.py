"""One forward pass through nnsight: read any sites, apply composable edits, take gradients.

Conventions:

* One batch, one ``trace``, one invoke. nnsight refuses several multimodal invokes, so "clean vs
  triggered" is expressed as rows of one pre-concatenated batch (ROME's convention: e.g. row 0
  the source, rows 1..N edited with ``Patch(source_row=0)``).
* An edit is ``(site, intervention)`` or ``(site, intervention, rows)``; ``rows`` (indices, a
  bool mask or a slice; default every row) says which batch rows it changes. Edits at one point
  apply in the order given; reads at a point see the value after that point's edits.
* Points are visited in forward order (nnsight requires it); the with-body only calls
  ``_drive``, so no user code is ever compiled by nnsight.
* Gradients: every read site gets ``act + zeros`` with a leaf ``zeros`` (same value, bit for bit),
  so ``d metric / d site`` is the leaf's gradient while gradients still flow to earlier sites.
  ``torch.autograd.grad`` touches no parameter's ``.grad``.
* Nothing persists: nnsight removes its per-trace state when the block exits, also when an
  intervention raises; parameters are never written (``WithWeights`` recomputes ``F.linear``).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from ..errors import ProjLensError
from ..model.handle import Inputs, ModelHandle
from ..model.placement import weight_of
from .interventions import Intervention, WithWeights, project
from .sites import (IMAGE_POINTS, AllTokens, Site, TokenContext, as_site, canonical, check_basis, is_pattern,
                    order_key)


@dataclass(frozen=True, eq=False)
class Edit:
    """``intervention`` at ``site`` on batch ``rows`` (None = all). ``site`` is None for ``WithWeights``."""

    site: Site | None
    intervention: Intervention
    rows: object = None


def as_edit(e) -> Edit:
    if isinstance(e, Edit):
        return e
    if isinstance(e, WithWeights):
        return Edit(None, e)
    if isinstance(e, tuple) and len(e) in (2, 3):
        site, iv, rows = (*e, None) if len(e) == 2 else e
        if not isinstance(iv, Intervention):
            raise ProjLensError(f"edit {e!r}: second element must be an intervention (Patch, Ablate, ...)")
        return Edit(None if isinstance(iv, WithWeights) else as_site(site), iv, rows)
    raise ProjLensError(f"an edit is (site, intervention) or (site, intervention, rows), got {type(e).__name__}")


class Cache(dict):
    """Site -> tensor. Also indexable by point name (``cache["projector.out"]``, TransformerLens
    aliases too): the all-token read of that point if there is one, else the one site read at that
    point (whatever its selector or basis); with several sites at the point a name is ambiguous and
    the error lists the exact keys to use instead."""

    def _resolve(self, key):
        """The stored key that ``key`` names, or a one-line error."""
        if isinstance(key, Site) and dict.__contains__(self, key):
            return key
        if not isinstance(key, (str, Site)):
            raise ProjLensError(f"a cache is indexed by a Site or a site name like 'llm.2.resid_post', "
                                f"got {type(key).__name__}")
        if isinstance(key, str):
            site = Site(key)
            if dict.__contains__(self, site):
                return site
            at = [k for k in self if k.point == site.point]
            if len(at) == 1:
                return at[0]
            if at:
                raise ProjLensError(f"{key!r} is ambiguous: {len(at)} sites were read at {site.point} "
                                    f"({', '.join(map(repr, at))}); index the cache with one of them")
            key = site
        have = ", ".join(repr(k) for k in self) or "nothing"
        raise ProjLensError(f"{key!r} was not read in this run (read: {have}); add it to read=[...]")

    def __getitem__(self, key):
        return dict.__getitem__(self, self._resolve(key))

    def __contains__(self, key):
        try:
            self._resolve(key)
        except ProjLensError:
            return False
        return True

    def get(self, key, default=None):
        return self[key] if key in self else default


@dataclass
class RunResult:
    logits: Float[Tensor, "batch seq vocab"]
    cache: Cache = field(default_factory=Cache)
    grads: Cache = field(default_factory=Cache)
    metric: Tensor | None = None


def run(handle: ModelHandle, inputs: Inputs, read=(), edits=(), grad_of=None) -> RunResult:
    """One forward pass of ``inputs`` with ``edits`` applied, caching ``read`` sites.

    ``grad_of(logits) -> scalar`` additionally gives ``grads[site]`` = d metric / d activation for
    every read site (same selection and basis as the read).
    """
    if not isinstance(inputs, Inputs):
        raise ProjLensError(f"run needs an Inputs batch, got {type(inputs).__name__}; build it with handle.encode(...)")
    plan = Plan.build(handle, inputs, read, edits, grads=grad_of is not None)
    return execute(handle, inputs, plan, grad_of=grad_of)


# --- planning ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to do at each point, in forward order."""

    # [(order key, point, [edits], [read sites])] sorted in forward order; point is a site point
    # ("llm.3.resid_post") or "linear:<module path>" for a WithWeights swap of that projector linear
    steps: list
    grads: bool = False

    @classmethod
    def build(cls, handle: ModelHandle, inputs: Inputs, read, edits, grads=False, attention: str | None = None) -> "Plan":
        """``attention``: the kernel the pass will run (default: the handle's; the TransformerLens bridge: eager)."""
        n, a = handle.n_layers, handle.adapter
        read = [as_site(s) for s in read]
        edits = [as_edit(e) for e in edits]
        by_point: dict[str, tuple[list, list]] = {}
        for s in read:
            canonical(s.point, n)
            by_point.setdefault(s.point, ([], []))[1].append(s)
        for e in edits:
            if e.site is None:
                for path in _weight_paths(handle, e.intervention):
                    by_point.setdefault("linear:" + path, ([], []))[0].append(e)
                continue
            canonical(e.site.point, n)
            if e.site.point == "vision.out":
                raise ProjLensError("vision.out is read-only (the projector reads the tower's hidden states); "
                                    "edit projector.in instead")
            by_point.setdefault(e.site.point, ([], []))[0].append(e)
        if grads and "vision.out" in by_point:
            raise ProjLensError("gradients are not taken at vision.out (read-only); use projector.in, which the "
                                "projector reads from the tower")
        for point in by_point:
            if is_pattern(point):
                if grads and by_point[point][1]:
                    raise ProjLensError(f"gradients are not taken at {point} (nothing downstream reads the returned "
                                        "pattern); take them at attn_out or the residual stream")
                impl = attention or attention_implementation(handle)
                if impl != "eager":
                    raise ProjLensError(f"{point} needs eager attention, but the model runs {impl!r}, which never "
                                        "forms the pattern; read it inside `with projlens_mi.eager_attention(handle):`")
            if point == "projector.hidden" and a.projector_hidden is None:
                raise ProjLensError(f"{a.family} has no projector.hidden (its projector has no nonlinearity in "
                                    f"{a.source}); use projector.in or projector.out")
        steps = sorted(((_order(handle, p), p, *by_point[p]) for p in by_point), key=lambda t: t[0])
        _check_rows(edits, len(inputs))
        return cls(steps, grads)


def _weight_paths(handle: ModelHandle, iv: WithWeights) -> list[str]:
    linears = handle.adapter.projector_linears
    out = []
    for key in iv.weights:
        match = [p for p in linears if p == key or p.rsplit(".", 1)[-1] == key]
        if len(match) != 1:
            raise ProjLensError(f"WithWeights key {key!r} is not one of the projector linears "
                                f"({', '.join(linears) or 'none in ' + handle.adapter.source})")
        out.append(match[0])
    return out


def _order(handle: ModelHandle, point: str):
    if point.startswith("linear:"):
        k = handle.adapter.projector_linears.index(point[7:])
        return (1, 2 + 2 * k, 0)
    return order_key(point)


def _rows(rows, batch: int) -> Tensor:
    if rows is None:
        return torch.arange(batch)
    if isinstance(rows, slice):
        return torch.arange(batch)[rows]
    t = torch.as_tensor(rows)
    if t.dtype == torch.bool:
        if t.shape != (batch,):
            raise ProjLensError(f"a bool row mask needs {batch} entries, got {tuple(t.shape)}")
        return t.nonzero()[:, 0]
    t = t.long().view(-1)
    if len(t) == 0 or int(t.max()) >= batch or int(t.min()) < -batch:
        raise ProjLensError(f"edit rows {t.tolist()} out of range for a batch of {batch}")
    return t % batch


def _check_rows(edits, batch):
    for e in edits:
        _rows(e.rows, batch)
        r = e.intervention.source_row
        if r is not None and not -batch <= r < batch:
            raise ProjLensError(f"source_row {r} out of range for a batch of {batch}")


# --- execution --------------------------------------------------------------------------------


def execute(handle: ModelHandle, inputs: Inputs, plan: Plan, grad_of=None, model_kwargs=None,
            skip: dict | None = None, prefix: int = 0) -> RunResult:
    """Run ``plan`` in one nnsight trace. ``model_kwargs`` overrides the forward's inputs (the sweep
    feeds ``inputs_embeds``); ``skip`` maps a layer index to the output it returns unrun; ``prefix``
    > 0 says the forward computes only positions ``prefix..`` of ``inputs`` (the sweep passes the
    rest as a KV cache): LLM-point activations and the logits then start at that position."""
    home = handle.device   # the caller's device: results come back here, wherever their site ran
    inputs = inputs.to(home)
    kwargs = model_kwargs if model_kwargs is not None else inputs.model_kwargs()
    if "pixel_values" in kwargs:
        kwargs["pixel_values"] = kwargs["pixel_values"].to(handle.dtype)
    state = {"cache": Cache(), "leaves": {}, "logits": None}
    env = handle.envoy
    try:
        with torch.set_grad_enabled(grad_of is not None), exclusive(handle):
            with env.trace(**kwargs):
                _drive(handle, env, inputs, plan, state, skip or {}, prefix)
    except ValueError as err:
        if isinstance(err, ProjLensError):
            raise
        msg = str(err)
        if "do not match" in msg and "token" in msg:
            raise ProjLensError(f"image tokens and image features do not match ({msg.splitlines()[0].strip()}); "
                                "encode inputs with handle.encode and the model's own processor") from None
        raise
    result = RunResult(_home(state["logits"], home), state["cache"])
    if grad_of is not None:
        metric = grad_of(result.logits)
        if metric.ndim:
            metric = metric.sum()
        sites = list(state["leaves"])
        grads = torch.autograd.grad(metric, [state["leaves"][s][0] for s in sites], allow_unused=True)
        for s, g in zip(sites, grads):
            leaf, ctx = state["leaves"][s]
            result.grads[s] = _home(_read(handle, s, torch.zeros_like(leaf) if g is None else g, ctx,
                                          len(inputs)).detach(), home)
        result.metric = _home(metric.detach(), home)
        result.logits = result.logits.detach()
        result.cache = Cache({k: v.detach() for k, v in result.cache.items()})
    result.cache = Cache({k: _home(v, home) for k, v in result.cache.items()})
    return result


def _home(t, device: torch.device):
    """``t`` on the caller's device (a no-op when it is there already). On a model placed across
    devices a late layer's activation lives on the last GPU and the logits wherever accelerate's
    ``io_same_device`` put them; results are returned where the inputs went (``handle.device``)."""
    return t.to(device) if isinstance(t, Tensor) and t.device != device else t


# --- one trace at a time per model -------------------------------------------------------------

class _TraceLock:
    """A re-entrant lock and how deep its owner is in it (changed only while holding it)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.depth = 0
        self.sourced: list = []   # modules nnsight source-instrumented during this entry (pattern edits)


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, _TraceLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(handle: ModelHandle):
    """Hold the model's trace lock, and start from a clean nnsight interleaver.

    nnsight keeps a trace's workers on the wrapper's one ``Interleaver`` (a plain list shared by
    every trace of that wrapper) and routes every module call of the model to whichever wrapper's
    interleaver is running, in any thread. Two traces at once (two threads, e.g. a progress or
    UI thread next to a sweep), or a plain forward of the same model in another thread during a
    trace, cross each other's greenlets: ``'NoneType' object has no attribute 'event'`` (one
    trace's end-of-run check meets the other's worker while it is starting), "Cannot switch to
    a different thread", ``OutOfOrderError``, or values served to the wrong trace. Every trace
    and generation the engine opens on a model holds this (re-entrant) lock, keyed by the model
    so that all handles of one model share it. A worker left on the interleaver by a trace that
    did not clean up is dropped first (``Interleaver.cancel``). See docs/engine.md, known issues.
    """
    model = handle.model
    with _LOCKS_GUARD:
        tl = _LOCKS.get(model)
        if tl is None:
            tl = _LOCKS[model] = _TraceLock()
    with tl.lock:
        if tl.depth == 0:   # outermost entry: no trace of this model runs now, its interleaver must be idle
            _reset_interleaver(handle.envoy)
        tl.depth += 1
        try:
            yield
        finally:
            tl.depth -= 1
            while tl.sourced:   # instrumented during the trace this entry ran (never entered inside a trace)
                _unsource(tl.sourced.pop())


def _unsource(module: torch.nn.Module) -> None:
    """Give a module back the forward it had before nnsight's ``.source`` instrumented it.

    ``envoy.source`` permanently replaces the module's forward with an instrumented copy (inert
    outside a trace, but compiled against a snapshot of the module's globals, so a later
    monkeypatch of e.g. ``modeling_llama.eager_attention_forward`` no longer reaches it). The
    engine uses it only to edit attention patterns, and undoes it when the trace is over.
    """
    from nnsight.intervention.source import STATE
    state = module.__dict__.get(STATE)
    if state is not None and state.sourced:
        state.body, state.compiled, state.sourced = state.original, None, False


def attention_implementation(handle: ModelHandle) -> str:
    """The attention kernel the LM's layers run (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...)."""
    return handle.model.config.get_text_config()._attn_implementation


@contextlib.contextmanager
def eager_attention(handle: ModelHandle):
    """Run the LM's attention as ``eager`` inside the block, the one kernel that forms the pattern.

    ``llm.{i}.pattern`` sites are read only under eager attention. The switch covers the language
    model only (the vision tower keeps its kernel) and is undone on exit. Eager and sdpa agree to
    float rounding, not bit for bit: logits in the block differ from the same run outside it by
    ~1e-7 (float32, CPU; measured in tests/test_engine_pattern.py).
    """
    model, cfg = handle.model, handle.model.config
    before = attention_implementation(handle)
    text = cfg.get_text_config()
    key = next((k for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is text), None)
    spec = (lambda impl: {key: impl}) if key else (lambda impl: impl)
    with exclusive(handle):
        model.set_attn_implementation(spec("eager"))
        try:
            yield handle
        finally:
            model.set_attn_implementation(spec(before))


def _reset_interleaver(env) -> None:
    """Drop what a previous trace left on ``env``'s interleaver (no trace of this model is running)."""
    inter = getattr(env, "interleaver", None)
    if inter is None:
        return
    if inter.mediators or inter.interleaving or inter.batcher is not None:
        inter.interleaving = False
        inter.cancel()


def _drive(handle, env, inputs, plan, state, skip, prefix=0):
    """The body of the trace: skip layers, visit each point in forward order, take the logits."""
    layers = handle.adapter.layers
    for layer, value in sorted(skip.items()):
        handle.envoy_module(f"{layers}.{layer}").skip(value)
    _drive_points(handle, inputs, plan, state, prefix)
    out = env.output
    state["logits"] = out.logits if hasattr(out, "logits") else out[0]


def _drive_points(handle, inputs, plan, state, prefix=0):
    order = None
    if any(step[1] in IMAGE_POINTS for step in plan.steps):
        order = _row_order(handle, inputs)
    for _, point, edits, reads in plan.steps:
        if point.startswith("linear:"):
            _swap_weights(handle, point[7:], edits, len(inputs))
            continue
        if is_pattern(point):
            _drive_pattern(handle, point, edits, reads, len(inputs), state)
            continue
        env_mod, attr = _accessor(handle, point)
        raw = getattr(env_mod, attr)
        tuple_out = isinstance(raw, tuple)
        act = raw[0] if tuple_out else raw
        if point == "vision.out":
            act = act.last_hidden_state if hasattr(act, "last_hidden_state") else act[0]
        ctx = _context(handle, point, act, inputs, order, prefix)
        new = act
        if edits:   # one private copy per point; every edit writes its rows into it
            buf = _view(handle, point, act, len(inputs), ctx.row_order)
            buf = buf.clone() if ctx.row_order is None else buf   # a reordered view is already a copy
            picks: dict = {}
            for e in edits:
                _apply(point, buf, e, ctx, len(inputs), picks)
            new = _unview(buf, act, ctx.row_order)
        if plan.grads and reads:
            leaf = torch.zeros_like(new, requires_grad=True)
            new = new + leaf
            for s in reads:
                state["leaves"][s] = (leaf, ctx)
        if new is not act:
            setattr(env_mod, attr, (new, *raw[1:]) if tuple_out else new)
        for s in reads:
            v = _read(handle, s, new, ctx, len(inputs))
            state["cache"][s] = v if plan.grads else v.detach()


def _drive_pattern(handle, point, edits, reads, batch, state):
    """``llm.{i}.pattern``. An edit goes to the softmax inside the eager attention function (nnsight
    source tracing), so the edited weights are the ones that multiply the values; a read takes the
    pattern the attention module returns (after any edit)."""
    env_attn, _ = _accessor(handle, point)
    if edits:
        _LOCKS[handle.model].sourced.append(env_attn._module)   # undone when the trace is over (exclusive)
        op = _softmax_op(handle, env_attn, point)
        buf = op.output.clone()
        ctx = TokenContext(n_tokens=buf.shape[-1], image_point=False)   # whole-pattern edits: no selector
        picks: dict = {}
        for e in edits:
            _apply(point, buf, e, ctx, batch, picks)
        op.output = buf
    if reads:
        raw = env_attn.output
        pattern = raw[1] if isinstance(raw, tuple) and len(raw) > 1 else None
        if pattern is None:
            raise ProjLensError(f"{point}: the attention module returned no pattern (family {handle.adapter.family}); "
                                "only eager attention forms it")
        for s in reads:
            state["cache"][s] = pattern.detach()


def _softmax_op(handle, env_attn, point):
    """The softmax call inside the attention function that the attention module calls (inside a trace)."""
    calls = [op for op in env_attn.source if op.name.startswith("attention_interface_")]
    inner = []
    if calls:
        try:
            inner = [op for op in calls[-1].source if "softmax" in op.name]
        except Exception:   # noqa: BLE001 - nnsight's SourceNotAvailable and kin: the one-line error below
            inner = []
    if len(inner) != 1:
        raise ProjLensError(f"{point}: cannot find the one softmax of {handle.adapter.family}'s eager attention "
                            f"function ({len(inner)} found), so its pattern cannot be edited; read it, or edit attn_out")
    return inner[0]


def _accessor(handle: ModelHandle, point: str):
    """(envoy, "input"|"output") for a point; a tuple output's first element is the activation."""
    a = handle.adapter
    if point == "llm.embed":
        return handle.envoy_module(a.embed_tokens), "output"
    if point == "vision.out":
        if a.vision_tower is None:
            raise ProjLensError(f"{a.family} has no vision_tower in {a.source}; read projector.in instead")
        return handle.envoy_module(a.vision_tower), "output"
    if point == "projector.in":
        return handle.envoy_module(a.projector), "input"
    if point == "projector.hidden":
        return handle.envoy_module(a.projector_hidden), "output"
    if point == "projector.out":
        return handle.envoy_module(a.projector), "output"
    if point == "logits":
        return handle.envoy_module(a.lm_head), "output"
    i, kind = point.split(".")[1:]
    layer = f"{a.layers}.{i}"
    if kind == "resid_pre":
        return handle.envoy_module(layer), "input"
    if kind == "resid_post":
        return handle.envoy_module(layer), "output"
    sub = a.attn if kind in ("attn_out", "pattern") else a.mlp
    if sub is None:
        raise ProjLensError(f"{a.family}: no [layer] {kind[:-4]} path in {a.source}; {point} is unavailable")
    return handle.envoy_module(f"{layer}.{sub}"), "output"


def _read(handle, site: Site, act: Tensor, ctx: TokenContext, batch: int) -> Tensor:
    """What the cache holds: the raw activation for all tokens, else ``[rows, k, d]`` (or ``[rows, k, basis_k]``)."""
    if isinstance(site.tokens, AllTokens) and site.basis is None:
        return act
    return _select(site, _view(handle, site.point, act, batch, ctx.row_order), ctx)


def _view(handle: ModelHandle, point: str, act: Tensor, batch: int,
          order: Tensor | None = None) -> Float[Tensor, "rows tokens d"]:
    """``[rows, tokens, d]`` for any point.

    At image points the projector's rows are regrouped per batch row: a flat ``[total, d]`` tensor,
    or ``[images, tokens, d]`` with several images (crops, tiles) per row, becomes ``[batch,
    tokens_per_row, d]`` in projector order. Rows must hold equally many (images of one size).
    With ``order`` (Qwen2.5-VL's ``window_index``, ``token_order = "window"``) the rows are first
    put back into image-token order (a copy): merged token ``j`` is projector row
    ``argsort(order)[j]``; points before the merge (``projector.in``, ``vision.out``) hold
    ``u`` patch rows per merged token, kept together. ``_unview`` is the inverse.
    """
    if point in IMAGE_POINTS and (act.ndim == 2 or act.shape[0] != batch):
        per_row, rest = divmod(act.numel() // act.shape[-1], batch)
        if rest or act.ndim not in (2, 3):
            raise ProjLensError(f"{point}: a {tuple(act.shape)} projector tensor does not split evenly over {batch} "
                                "rows; use images of one size (the same number of crops per prompt)")
        if order is not None:
            flat = act.reshape(-1, act.shape[-1])
            u = _unit(point, flat, order)
            act = rearrange(flat, "(merged u) d -> merged u d", u=u)[torch.argsort(order.to(flat.device))]
        return act.reshape(batch, per_row, act.shape[-1])
    return act


def _unview(view: Tensor, act: Tensor, order: Tensor | None) -> Tensor:
    """The inverse of ``_view``: ``view`` back in ``act``'s shape (and the model's row order)."""
    if order is None:
        return view.view(act.shape)
    flat = view.reshape(-1, view.shape[-1])
    return rearrange(flat, "(merged u) d -> merged u d", merged=len(order))[order.to(flat.device)].reshape(act.shape)


def _unit(point: str, flat: Tensor, order: Tensor) -> int:
    u, rest = divmod(flat.shape[0], len(order))
    if rest or u == 0:
        raise ProjLensError(f"{point}: {flat.shape[0]} rows do not match the {len(order)} merged image tokens of "
                            "the window order; pass image_grid_thw for exactly the images in pixel_values")
    return u


def _row_order(handle: ModelHandle, inputs: Inputs) -> Tensor | None:
    """Qwen2.5-VL (``token_order = "window"``): the vision tower's ``window_index`` for this batch, else None.

    The ViT permutes merged-token groups into attention windows before its blocks and un-permutes
    after the merger (``merged[argsort(window_index)]``), so every image point between the two is in
    window order. Recomputed here exactly as the tower does, from ``image_grid_thw``.
    """
    a = handle.adapter
    if getattr(a, "token_order", "sequence") != "window":
        return None
    grid = (inputs.extra or {}).get("image_grid_thw")
    if grid is None:
        raise ProjLensError(f"{a.family}: token_order='window' needs image_grid_thw in the inputs (the processor's "
                            "output) to map projector rows onto image tokens; encode with handle.encode")
    from transformers.vision_utils import get_vision_window_index
    tower = handle.module(a.vision_tower)
    window_index, _ = get_vision_window_index(grid.cpu(), spatial_merge_size=tower.spatial_merge_size,
                                              window_size=tower.window_size, patch_size=tower.patch_size)
    return window_index.long()


def _context(handle, point, act, inputs: Inputs, order: Tensor | None = None, prefix: int = 0) -> TokenContext:
    if point in IMAGE_POINTS:
        return TokenContext(n_tokens=act.numel() // (act.shape[-1] * len(inputs)), image_point=True, row_order=order)
    return llm_context(inputs, act.shape[1] + prefix, prefix)


def llm_context(inputs: Inputs, n_tokens: int, prefix: int = 0) -> TokenContext:
    """The selectors' view of an LLM point of ``inputs`` (``n_tokens`` = the whole sequence)."""
    return TokenContext(n_tokens=n_tokens, image_point=False, image_mask=inputs.image_mask,
                        attention_mask=inputs.attention_mask, prompt_end=inputs.prompt_end, prefix=prefix)


def _local(idx: Tensor | None, ctx: TokenContext, what) -> Tensor | None:
    """Whole-sequence positions as positions of an activation that starts at ``ctx.prefix``."""
    if not ctx.prefix:
        return idx
    if idx is None or int(idx.min()) < ctx.prefix:
        raise ProjLensError(f"{what!r} touches positions before {ctx.prefix}, which this pass takes from the cache; "
                            "sweep(..., reuse=False) runs it in full")
    return idx - ctx.prefix


def _gather(view: Tensor, idx: Tensor | None) -> Tensor:
    if idx is None:
        return view
    return view.gather(1, idx.to(view.device)[..., None].expand(-1, -1, view.shape[-1]))


def _select(site: Site, view: Tensor, ctx: TokenContext) -> Tensor:
    x = _gather(view, _local(site.tokens.indices(ctx, view.shape[0]), ctx, site))
    if site.basis is not None:
        b = check_basis(site.basis, x.shape[-1], f"basis of {site!r}")
        x = (x.double() @ b.to(x.device, torch.float64)).to(x.dtype)   # float64: batch-size independent
    return x


def _apply(point, buf: Tensor, edit: Edit, ctx, batch: int, picks: dict) -> None:
    """One edit: gather the selected tokens of the edited rows, ``apply``, write them back into ``buf``.

    ``buf`` is the point's private ``[rows, tokens, d]`` copy, so edits at one point compose in
    order; ``picks`` caches each selector's indices for this point.
    """
    rows = _rows(edit.rows, batch).to(buf.device)
    sel = edit.site.tokens
    if sel not in picks:
        idx = sel.indices(ctx, batch)
        picks[sel] = None if idx is None else idx.to(buf.device)
    whole = picks[sel]   # whole-sequence positions (a 3-D source is indexed with these)
    idx = _local(whole, ctx, edit.site)
    at = (rows,) if idx is None else (rows[:, None], idx[rows])
    x = buf[at]
    iv = edit.intervention
    source = None
    if iv.source_row is not None:
        r = torch.tensor([iv.source_row % batch], device=buf.device)
        source = buf[(r,) if idx is None else (r[:, None], idx[r])]
    elif isinstance(iv.source, Tensor) and iv.source.ndim == 3:
        source = _align(iv.source, rows, whole, ctx.n_tokens, batch)
    y = iv.apply(x, source)
    if edit.site.basis is not None:
        y = x + project(y - x, check_basis(edit.site.basis, x.shape[-1], f"basis of {edit.site!r}"))
    buf[at] = y.to(buf.dtype)


def _align(src: Tensor, rows: Tensor, idx: Tensor | None, n_tokens: int, batch: int) -> Tensor:
    """A 3-D tensor source: one row per edited row (or per batch row), all tokens or the selected ones."""
    if src.shape[0] == batch and len(rows) != batch:
        src = src[rows.to(src.device)]
    if idx is not None and src.shape[1] == n_tokens and src.shape[1] != idx.shape[1]:
        src = _gather(src, idx[rows].to(src.device))
    return src


def _swap_weights(handle, path, edits, batch):
    """Recompute a projector linear's output with the given (W, b) for the edits' rows."""
    mod = handle.module(path)
    env_mod = handle.envoy_module(path)
    x = env_mod.input
    out = env_mod.output
    new = out
    for e in edits:
        W, b = e.intervention.weights.get(path, e.intervention.weights.get(path.rsplit(".", 1)[-1]))
        if tuple(W.shape) != tuple(mod.weight.shape):
            raise ProjLensError(f"WithWeights {path}: W must be {tuple(mod.weight.shape)}, got {tuple(W.shape)}")
        bias = weight_of(mod, "bias") if b is None else b   # a real copy also when accelerate offloaded it
        y = e.intervention.linear(x, W, bias)
        if e.rows is None:
            new = y
        else:
            rows = _rows(e.rows, batch)
            view, yv = _view(handle, "projector.in", new, batch), _view(handle, "projector.in", y, batch)
            view = view.clone()
            view[rows] = yv[rows]
            new = view.view(out.shape)
    env_mod.output = new

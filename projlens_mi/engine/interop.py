"""Optional TransformerLens (4.x) path: a ``TransformerBridge`` over the handle's model, booted safely.

For people coming from TransformerLens: the same Sites, selectors and interventions, run through
TL hook names (``blocks.{i}.hook_resid_post``, ``vision_projector.hook_out``, ...) on the bridge,
always with the full multimodal inputs, give the engine's numbers (``run``).

What booting does NOT do here (TransformerLens would, by itself):

* touch the caller's model: ``to_transformer_lens(handle)`` boots on a deep copy. TL replaces the
  model's submodules with bridge components and switches attention to ``eager`` (and
  ``enable_compatibility_mode()`` rewrites weights in place); ``copy=False`` allows that on the
  handle's own model, with a warning, and the handle is unusable for ``run`` afterwards.
* ``pip install torchvision``: when it cannot load a processor TL installs torchvision by itself,
  which replaces a CPU torch with a multi-GB CUDA build. The handle's processor is handed over
  instead, the tokenizer is saved to a temporary folder, nothing is fetched, and the installer is
  replaced by a one-line ``ProjLensError`` for the duration of the boot.

The image-dropping trap: TL's ``patching.get_act_patch_*`` helpers (and any
``bridge.run_with_hooks(tokens)``) pass token ids only. On a VLM the ``<image>`` placeholders then
run as ordinary token embeddings — no image, no error. Here every entry point takes ``Inputs``
(``handle.encode(...)``) and refuses a batch without ``pixel_values``; the returned bridge's own
``forward`` refuses token ids that contain image placeholders without ``pixel_values``, so TL's
helpers fail loudly on it instead of silently dropping the image.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ProjLensError
from ..model.handle import Inputs, ModelHandle
from .interventions import WithWeights
from .run import Cache, Plan, RunResult, _apply, _context, _read, _row_order, _unview, _view
from .sites import IMAGE_POINTS, Site, as_site, canonical, layer_of

# our point -> the TransformerBridge hook that carries the same tensor ({i}: the layer)
TL_HOOKS = {
    "llm.embed": "hook_embed",
    "vision.out": "vision_encoder.hook_out",
    "projector.in": "vision_projector.hook_in",
    "projector.out": "vision_projector.hook_out",
    "logits": "unembed.hook_out",
    "resid_pre": "blocks.{i}.hook_resid_pre",
    "attn_out": "blocks.{i}.hook_attn_out",
    "mlp_out": "blocks.{i}.hook_mlp_out",
    "resid_post": "blocks.{i}.hook_resid_post",
    "pattern": "blocks.{i}.attn.hook_pattern",   # the bridge always runs eager attention
}

_TRAP = ("TransformerLens' patching helpers and run_with_hooks(tokens) drop pixel_values silently (the "
         "<image> placeholders then run as plain token embeddings)")


def tl_hook_name(site: "Site | str", n_layers: int | None = None) -> str:
    """The TransformerBridge hook name for a Site or point name (ours or a TL alias)."""
    point = canonical(as_site(site).point if isinstance(site, Site) else site, n_layers)
    if (i := layer_of(point)) is not None:
        return TL_HOOKS[point.rsplit(".", 1)[1]].format(i=i)
    if point not in TL_HOOKS:
        raise ProjLensError(f"{point} has no TransformerBridge hook (its projector is one component there); "
                            f"read it with projlens_mi.run, or use one of: {', '.join(sorted(TL_HOOKS))}")
    return TL_HOOKS[point]


def _import_bridge():
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:
        raise ProjLensError(f"TransformerLens is not installed ({err}); install the optional extra: "
                            "pip install 'projlens_mi[tl]'") from None
    return TransformerBridge


@contextlib.contextmanager
def _no_install(processor):
    """During boot: no processor download, no ``pip install torchvision``; the handle's processor is attached."""
    from transformer_lens.model_bridge.sources.transformers import helpers, source

    def refuse(*_a, **_k):
        raise ProjLensError("TransformerLens tried to pip install torchvision (it would replace torch); refused. "
                            "Load the model with its processor: projlens_mi.load(model, processor=...)")

    def attach(bridge, *_a, **_k):
        bridge.processor = processor

    saved = helpers._ensure_torchvision, helpers.load_modality_processor, source.load_modality_processor
    helpers._ensure_torchvision = refuse
    helpers.load_modality_processor = source.load_modality_processor = attach
    try:
        yield
    finally:
        helpers._ensure_torchvision, helpers.load_modality_processor, source.load_modality_processor = saved


def _guard_forward(bridge, image_token_id: int, image_token: str | None) -> None:
    """Make the bridge's own forward refuse image placeholders without pixel_values (TL's patching helpers)."""
    inner = bridge.forward

    def forward(input, *args, **kwargs):
        if kwargs.get("pixel_values") is None and kwargs.get("past_key_values") is None:
            bad = False
            if isinstance(input, Tensor) and not input.is_floating_point():
                bad = bool((input == image_token_id).any())
            elif isinstance(input, (str, list)) and image_token:
                bad = any(image_token in s for s in ([input] if isinstance(input, str) else input) if isinstance(s, str))
            if bad:
                raise ProjLensError(f"image placeholder tokens without pixel_values: {_TRAP}; use "
                                    "projlens_mi.engine.interop.tl_run / tl_patch with handle.encode(...) inputs")
        return inner(input, *args, **kwargs)

    bridge.forward = forward


@dataclass
class TLBridge:
    """A ``TransformerBridge`` booted by ``to_transformer_lens``; ``bridge`` is the raw TL object."""

    bridge: object
    handle: ModelHandle
    copied: bool

    def __repr__(self) -> str:
        return (f"TLBridge({type(self.bridge).__name__} over {type(self.handle.model).__name__}, "
                f"family={self.handle.adapter.family!r}, layers={self.handle.n_layers}, "
                f"{'a deep copy' if self.copied else 'the handle model itself'})")

    def hook_name(self, site) -> str:
        name = tl_hook_name(site, self.handle.n_layers)
        if name not in self.bridge.hook_dict:
            raise ProjLensError(f"the {self.handle.adapter.family} bridge has no hook {name!r} "
                                f"(for {as_site(site).point}); use projlens_mi.run for it")
        return name

    def model_inputs(self, inputs: Inputs) -> tuple[Tensor, dict]:
        """``(input_ids, kwargs)`` for the bridge: the FULL multimodal batch, or a one-line error."""
        _check_multimodal(inputs, "TransformerBridge")
        inputs = inputs.to(self.handle.device)
        kw = inputs.model_kwargs()
        ids = kw.pop("input_ids")
        kw["pixel_values"] = kw["pixel_values"].to(self.handle.dtype)
        return ids, kw

    def run_with_cache(self, inputs: Inputs, read=()) -> tuple[Tensor, Cache]:
        """TL's ``run_with_cache`` on our Sites (with pixel_values): logits and a Cache like ``run``'s."""
        res = tl_run(self, inputs, read=read)
        return res.logits, res.cache

    def run_with_hooks(self, inputs: Inputs, fwd_hooks=(), **kwargs):
        """TL's ``run_with_hooks`` with the full multimodal inputs; hook names may be our Sites / point names."""
        ids, kw = self.model_inputs(inputs)
        hooks = [(h if callable(h) else self.hook_name(h), fn) for h, fn in fwd_hooks]
        return self.bridge.run_with_hooks(ids, fwd_hooks=hooks, **kw, **kwargs)


def _check_multimodal(inputs, what: str) -> None:
    if not isinstance(inputs, Inputs):
        raise ProjLensError(f"{what} calls take an Inputs batch from handle.encode(...), got {type(inputs).__name__}: "
                            f"{_TRAP}")
    if inputs.pixel_values is None:
        raise ProjLensError(f"this Inputs batch has no pixel_values: {_TRAP}; encode images with handle.encode(...)")


def to_transformer_lens(handle: ModelHandle, *, copy: bool = True) -> TLBridge:
    """Boot a TransformerLens ``TransformerBridge`` over ``handle``'s model, safely (see the module doc).

    ``copy=True`` (default) boots on a deep copy: the caller's model stays bit-identical (parameters,
    buffers, submodules, attention implementation). ``copy=False`` boots on the handle's own model,
    which TransformerLens modifies in place (a warning says so).
    """
    TransformerBridge = _import_bridge()
    if not isinstance(handle, ModelHandle):
        raise ProjLensError(f"to_transformer_lens needs a ModelHandle (projlens_mi.load(...)), got {type(handle).__name__}")
    tok = handle.tokenizer
    if tok is None:
        raise ProjLensError("to_transformer_lens needs the model's processor/tokenizer: projlens_mi.load(model, processor=...)")
    src = handle.model
    dmap = getattr(src, "hf_device_map", None)
    if dmap and len({str(v) for v in dmap.values()}) > 1:
        raise ProjLensError("to_transformer_lens needs a model on one device (this one is dispatched with a device_map); "
                            "load it without device_map for the TransformerLens path")
    if copy:
        model = _copy.deepcopy(src)
    else:
        warnings.warn("to_transformer_lens(copy=False): TransformerLens replaces this model's submodules with bridge "
                      "components and switches its attention to eager, in place; the handle's run() must not be "
                      "used on it afterwards", UserWarning, stacklevel=2)
        model = src
    overrides = {}
    if not getattr(model.config, "architectures", None):
        overrides["architectures"] = [type(model).__name__]
    tok = _copy.deepcopy(tok)
    with tempfile.TemporaryDirectory(prefix="projlens_tl_") as folder:
        tok.save_pretrained(folder)           # TL re-reads the tokenizer from name_or_path (adds BOS handling)
        model.config.save_pretrained(folder)  # so nothing is looked up on the hub
        tok.init_kwargs["name_or_path"] = folder
        with _no_install(handle.processor):
            bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tok,
                                                         device=str(handle.device), dtype=handle.dtype,
                                                         hf_config_overrides=overrides or None)
    image_token = None
    try:
        image_token = handle.tokenizer.convert_ids_to_tokens(handle.image_token_id)
    except Exception:  # noqa: BLE001 - only used to spot placeholders in raw strings
        pass
    _guard_forward(bridge, handle.image_token_id, image_token)
    bridge.eval()
    return TLBridge(bridge, handle, copy)


def tl_run(tl: TLBridge, inputs: Inputs, read=(), edits=()) -> RunResult:
    """``run(handle, inputs, read, edits)`` through TransformerLens hooks on the bridge, with pixel_values.

    Same Sites, selectors, rows and interventions as the engine (the same code gathers, applies and
    writes back); ``WithWeights`` and gradients are engine-only. Refuses a batch without images.
    """
    if not isinstance(tl, TLBridge):
        raise ProjLensError(f"tl_run needs the TLBridge from to_transformer_lens(handle), got {type(tl).__name__}")
    _check_multimodal(inputs, "tl_run")
    handle = tl.handle
    plan = Plan.build(handle, inputs, read, edits, attention="eager")   # TL boots the bridge with eager attention
    for _, point, point_edits, _ in plan.steps:
        if point.startswith("linear:") or any(isinstance(e.intervention, WithWeights) for e in point_edits):
            raise ProjLensError("WithWeights is not available on the TransformerLens path (the bridge wraps the "
                                "projector as one component); use projlens_mi.run")
    batch = len(inputs)
    order = _row_order(handle, inputs) if any(s[1] in IMAGE_POINTS for s in plan.steps) else None
    cache = Cache()

    def make_hook(point, point_edits, reads):
        def hook(act, hook=None):
            value = act.last_hidden_state if point == "vision.out" and hasattr(act, "last_hidden_state") else act
            ctx = _context(handle, point, value, inputs, order)
            new = value
            if point_edits:
                buf = _view(handle, point, value, batch, ctx.row_order)
                buf = buf.clone() if ctx.row_order is None else buf
                picks: dict = {}
                for e in point_edits:
                    _apply(point, buf, e, ctx, batch, picks)
                new = _unview(buf, value, ctx.row_order)
            for s in reads:
                cache[s] = _read(handle, s, new, ctx, batch).detach().clone()
            return new if point_edits else None
        return hook

    hooks = [(tl.hook_name(point), make_hook(point, point_edits, reads)) for _, point, point_edits, reads in plan.steps]
    ids, kw = tl.model_inputs(inputs)
    with torch.no_grad():
        logits = tl.bridge.run_with_hooks(ids, fwd_hooks=hooks, **kw)
    return RunResult(logits, cache)


def tl_patch(tl: TLBridge, inputs: Inputs, edits, read=()) -> RunResult:
    """Activation patching through TransformerLens, images included: ``tl_run`` with at least one edit.

    The image-safe replacement for ``transformer_lens.patching.get_act_patch_*``: clean vs corrupted
    are rows of one ``Inputs`` batch (``Patch(source_row=r)``) or a cached tensor
    (``Patch(source=cache[...])``), never token ids alone.
    """
    edits = list(edits)
    if not edits:
        raise ProjLensError("tl_patch needs at least one edit, e.g. [(Site('llm.1.resid_post', ImageTokens()), "
                            "Patch(source_row=0), [1])]; use tl_run for reads only")
    return tl_run(tl, inputs, read=read, edits=edits)

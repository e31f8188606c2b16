"""The model handle: one object that knows the model, its processor, its hook map and its inputs.

Every layer above works with a ``ModelHandle``. It never registers hooks (the engine does); it
resolves module paths, creates the nnsight wrapper lazily (once), and turns records into one
left-padded batch (``Inputs``) with an image-token mask. One batch, one forward: nnsight refuses
several multimodal invokes, so the engine only ever traces a single pre-concatenated batch and
expresses "clean vs triggered" as rows of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import ProjLensError
from .adapters import Adapter, find_adapter


@dataclass
class Inputs:
    """One left-padded batch: processor tensors plus the image-token mask.

    ``extra`` holds any other processor output the forward needs (``image_sizes``,
    ``image_grid_thw``, ...). ``prompt_end`` is set when a target was appended (teacher forcing):
    the index of the last prompt position per row.
    """

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    image_mask: Bool[Tensor, "batch seq"]
    pixel_values: Tensor | None = None
    extra: dict = field(default_factory=dict)
    prompt_end: Int[Tensor, " batch"] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __repr__(self) -> str:
        parts = [f"rows={len(self)}", f"seq={self.input_ids.shape[1]}",
                 f"image_tokens/row={int(self.image_mask[0].sum()) if len(self) else 0}"]
        if self.pixel_values is None:
            parts.append("no images")
        if self.prompt_end is not None:
            parts.append("teacher-forced")
        if self.extra:
            parts.append("extra=" + ",".join(self.extra))
        return f"Inputs({', '.join(parts)})"

    def model_kwargs(self) -> dict:
        """Keyword arguments for the HF forward / generate."""
        kw = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extra}
        if self.pixel_values is not None:
            kw["pixel_values"] = self.pixel_values
        return kw

    def to(self, device) -> "Inputs":
        move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "extra"},
                       extra={k: move(v) for k, v in self.extra.items()})

    def tile(self, n: int) -> "Inputs":
        """The batch repeated ``n`` times, block after block (rows ``[copy × row]``): a sweep's layout."""
        rep = lambda t: torch.cat([t] * n) if isinstance(t, Tensor) else t  # noqa: E731
        return replace(self, **{f.name: rep(getattr(self, f.name)) for f in fields(self) if f.name != "extra"},
                       extra={k: rep(v) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: list["Inputs"], pad_token_id: int = 0) -> "Inputs":
        """One batch from several (e.g. clean rows then triggered rows), re-left-padded to one length.

        This is how two conditions share a forward: nnsight runs one multimodal batch per trace.
        """
        if not parts:
            raise ProjLensError("Inputs.cat needs at least one batch")
        n = max(p.input_ids.shape[1] for p in parts)

        def left(t: Tensor, value) -> Tensor:
            return torch.nn.functional.pad(t, (n - t.shape[1], 0), value=value)
        if any(p.prompt_end is not None for p in parts):
            raise ProjLensError("Inputs.cat joins prompts only; append targets after joining")
        extra = {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra}
        pixels = None if parts[0].pixel_values is None else torch.cat([p.pixel_values for p in parts])
        return Inputs(torch.cat([left(p.input_ids, pad_token_id) for p in parts]),
                      torch.cat([left(p.attention_mask, 0) for p in parts]),
                      torch.cat([left(p.image_mask, False) for p in parts]), pixels, extra)

    def rows(self, index: list[int] | Tensor) -> "Inputs":
        """A sub-batch (rows may repeat). Per-image tensors with ``m`` entries per row (crops,
        patches of equal-size images) are cut in blocks of ``m``."""
        index = torch.as_tensor(index, dtype=torch.long)
        n = len(self)

        def pick(t):
            if not isinstance(t, Tensor) or t.ndim == 0:
                return t
            m, rest = divmod(t.shape[0], n)
            if rest or m == 0:
                raise ProjLensError(f"Inputs.rows: a tensor with {t.shape[0]} entries does not split over {n} rows; "
                                    "use images of one size")
            if m == 1:
                return t[index.to(t.device)]
            blocks = (index[:, None] * m + torch.arange(m)).view(-1)
            return t[blocks.to(t.device)]
        return replace(self, **{f.name: pick(getattr(self, f.name)) for f in fields(self) if f.name != "extra"},
                       extra={k: pick(v) for k, v in self.extra.items()})


@dataclass(eq=False)
class ModelHandle:
    """A HF vision-language model with its processor, hook map and provenance.

    ``envoy`` (an ``nnsight.NNsight`` over ``model``) is created on first use. nnsight installs an
    inert controller on each module's ``forward`` when it wraps a model; it adds no torch hooks,
    and parameters are never written.
    """

    model: torch.nn.Module
    processor: object = None
    adapter: Adapter = None
    provenance: dict = field(default_factory=dict)
    _envoy: object = None

    def __repr__(self) -> str:
        """One line: class, family, size, placement, where it came from (the default dataclass repr
        printed the whole module tree, ~9,000 characters for the tiny test model)."""
        n = sum(p.numel() for p in self.model.parameters())
        size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
        src = self.provenance.get("source", "?")
        dmap = getattr(self.model, "hf_device_map", None)
        where = f"device_map over {len({str(v) for v in dmap.values()})} devices" if dmap else f"device={self.device}"
        return (f"ModelHandle({type(self.model).__name__}, family={self.adapter.family!r}, layers={self.n_layers}, "
                f"params={size}, {where}, dtype={str(self.dtype).removeprefix('torch.')}, source={str(src)!r})")

    def __post_init__(self):
        if self.adapter is None:
            self.adapter = find_adapter(self.model)
        self._check_modules()
        self._tokens_per_image: dict = {}

    # --- structure -------------------------------------------------------------------------

    def _check_modules(self) -> None:
        a = self.adapter
        for key in ("projector", "layers", "lm_head", "embed_tokens", "vision_tower", "projector_hidden", "final_norm"):
            path = getattr(a, key)
            if path is not None and _get(self.model, path) is None:
                what = "no recognisable projector" if key == "projector" else f"no {key}"
                raise ProjLensError(f"{type(self.model).__name__} has {what}: module {path!r} (from {a.source}) "
                                    "is missing; fix the hook map or pass a model of this family")
        for path in a.projector_linears:
            if not isinstance(_get(self.model, path), torch.nn.Linear):
                raise ProjLensError(f"projector linear {path!r} (from {a.source}) is not an nn.Linear in this model")

    def module(self, name: str) -> torch.nn.Module:
        """A module by hook-map key (``"projector"``, ``"layers"``, ...) or dotted path."""
        path = getattr(self.adapter, name, None) if name in {f.name for f in fields(Adapter)} else name
        mod = _get(self.model, path) if isinstance(path, str) else None
        if mod is None:
            raise ProjLensError(f"no module {name!r} in {type(self.model).__name__}; use a hook-map key "
                                "(projector, layers, lm_head, ...) or a dotted path from model.named_modules()")
        return mod

    def envoy_module(self, path: str):
        """The nnsight envoy of a dotted module path."""
        env = self.envoy
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    @property
    def envoy(self):
        if self._envoy is None:   # placement-aware: inputs never go to `meta`; TP models get TPFragments
            from .placement import wrap
            self._envoy = wrap(self.model)
        return self._envoy

    @property
    def n_layers(self) -> int:
        return len(self.module("layers"))

    @property
    def device(self) -> torch.device:
        """Where inputs go: accelerate's execution device if dispatched, else the first non-meta parameter."""
        from .placement import input_device
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def tokenizer(self):
        tok = getattr(self.processor, "tokenizer", self.processor)
        if tok is None:
            raise ProjLensError("this handle has no processor; pass processor= to projlens_mi.load")
        return tok

    @property
    def image_token_id(self) -> int:
        return self.adapter.image_token_id(self.model.config)

    def image_mask(self, input_ids: Int[Tensor, "batch seq"]) -> Bool[Tensor, "batch seq"]:
        return input_ids == self.image_token_id

    # --- inputs ----------------------------------------------------------------------------

    def encode(self, data, prompts: list[str] | None = None) -> Inputs:
        """One left-padded batch from records, or from ``(images, prompts)``.

        ``data`` is a list of ``Record`` (each with one image), or a list of PIL images with
        ``prompts`` given, or a tuple ``(images, prompts)``.
        """
        if self.processor is None:
            raise ProjLensError("this handle has no processor; pass processor= to projlens_mi.load")
        if isinstance(data, tuple) and prompts is None and len(data) == 2:
            data, prompts = data
        if prompts is None:
            images = [r.pil() for r in data]
            prompts = [r.prompt for r in data]
        else:
            images = list(data)
        if len(images) != len(prompts) or not prompts:
            raise ProjLensError(f"encode got {len(images)} images and {len(prompts)} prompts; pass one image per prompt")
        enc = dict(self._process(images, list(prompts)))
        enc.pop("labels", None)   # some processors (PaliGemma) add all -100 labels: a needless loss
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        pixel_values = enc.pop("pixel_values", None)
        inputs = Inputs(ids, mask, self.image_mask(ids), pixel_values, extra=enc)
        self.check_image_tokens(inputs)
        return inputs

    def _process(self, images, prompts):
        """The processor call; processors that want one image list per prompt (Gemma 3) get it."""
        kw = dict(text=prompts, return_tensors="pt", padding=True, padding_side="left")
        try:
            return self.processor(images=images, **kw)
        except (ValueError, TypeError) as flat_err:
            try:
                return self.processor(images=[[im] for im in images], **kw)
            except (ValueError, TypeError):
                raise ProjLensError(f"the processor refused the batch: {str(flat_err).splitlines()[0]}") from None

    def check_image_tokens(self, inputs: Inputs) -> None:
        """Each row must hold exactly the number of placeholder tokens the model makes per image."""
        counts = inputs.image_mask.sum(1)
        if inputs.pixel_values is None or self.adapter.layout != "batched" or \
                getattr(self.adapter, "token_order", "sequence") != "sequence":
            return   # flat / windowed / anyres layouts: the model's own check runs in the forward
        n_img = inputs.pixel_values.shape[0]
        if n_img != len(inputs):
            raise ProjLensError(f"{n_img} images for {len(inputs)} prompts; pass one image per prompt")
        expected = self._image_tokens(inputs.pixel_values, inputs.extra)
        bad = (counts != expected).nonzero()
        if len(bad):
            r = int(bad[0])
            raise ProjLensError(f"row {r} has {int(counts[r])} image tokens but the model makes {expected} per image; "
                                "build the processor with the model's patch_size / num_additional_image_tokens")

    def _image_tokens(self, pixel_values: Tensor, extra: dict) -> int:
        """Tokens per image, measured once per image shape by running the vision tower and projector on one image."""
        key = tuple(pixel_values.shape[1:])
        if key not in self._tokens_per_image:
            get = getattr(self.model, "get_image_features", None) or getattr(self.model.model, "get_image_features")
            kw = {k: v[:1] for k, v in extra.items() if k == "image_sizes"}
            with torch.no_grad():
                out = get(pixel_values=pixel_values[:1].to(self.device, self.dtype), **kw)
            feats = getattr(out, "pooler_output", out)
            feats = feats[0] if isinstance(feats, (list, tuple)) else feats
            self._tokens_per_image[key] = int(feats.shape[-2])
        return self._tokens_per_image[key]


def _get(root: torch.nn.Module, path: str):
    """The submodule at a dotted path, or None."""
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() and isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) \
            else getattr(mod, part, None)
        if mod is None:
            return None
    return mod

"""Model-family adapters: where the vision tower, projector, decoder layers and LM head live.

Each family is a TOML file in ``hooks/`` (installed as the ``projlens_mi.hooks`` package), so adding
a family is writing a file, not code. The schema is documented in docs/architecture.md; this module
only parses and validates it, and picks the map that serves a model's ``config.model_type``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ProjLensError

LAYOUTS = ("batched", "flat")
# How projector-output rows (flattened over the leading dims) map onto image-token positions:
# "sequence": one row per image token, in order; "window": Qwen2.5-VL, rows in windowed-attention
# order, sequence order is ``out[argsort(window_index)]``; "anyres": LLaVA-NeXT/OneVision, rows are
# crops x patches that ``pack_image_features`` unpads, reorders and interleaves with a learned
# ``image_newline`` (counts differ; no 1:1 row-to-position map).
TOKEN_ORDERS = ("sequence", "window", "anyres")
REQUIRED_MODULES = ("projector", "layers", "lm_head", "embed_tokens")
OPTIONAL_MODULES = ("vision_tower", "projector_hidden", "final_norm")


@dataclass(frozen=True)
class Adapter:
    """One family's instrumentation map. Paths are dotted, from the top-level HF model.

    Optional entries are ``None`` (or empty): a site that needs one raises a clear error instead
    of guessing (e.g. ``projector.hidden`` on a single-linear projector).
    """

    family: str
    model_types: tuple[str, ...]
    projector: str
    layers: str
    lm_head: str
    embed_tokens: str
    vision_tower: str | None = None
    projector_hidden: str | None = None
    projector_linears: tuple[str, ...] = ()
    final_norm: str | None = None
    attn: str | None = "self_attn"       # inside one decoder layer
    mlp: str | None = "mlp"
    image_token_attrs: tuple[str, ...] = ("image_token_id", "image_token_index")
    layout: str = "batched"             # projector output: "batched" [n_img, n_tok, d] | "flat" [total, d]
    token_order: str = "sequence"       # projector rows -> image-token positions (see TOKEN_ORDERS)
    source: str = ""                    # the file this map came from

    @classmethod
    def from_toml(cls, path: str | Path, text: str | None = None) -> "Adapter":
        """Parse one map; every schema problem is a one-line ``ProjLensError`` naming the file."""
        name = str(path)
        try:
            data = tomllib.loads(text if text is not None else Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ProjLensError(f"cannot read hook map {name}: {err}") from None
        mods = data.get("modules", {})
        missing = [k for k in ("family", "model_types") if k not in data] + \
                  [f"modules.{k}" for k in REQUIRED_MODULES if k not in mods]
        if missing:
            raise ProjLensError(f"hook map {name} lacks {', '.join(missing)}; see the schema in docs/architecture.md")
        known = set(REQUIRED_MODULES + OPTIONAL_MODULES + ("projector_linears",))
        extra = sorted(set(mods) - known)
        if extra:
            raise ProjLensError(f"hook map {name} has unknown modules.{extra[0]}; valid keys: {', '.join(sorted(known))}")
        layout = data.get("projector_output", {}).get("layout", "batched")
        if layout not in LAYOUTS:
            raise ProjLensError(f"hook map {name}: projector_output.layout must be one of {LAYOUTS}, got {layout!r}")
        token_order = data.get("projector_output", {}).get("token_order", "sequence")
        if token_order not in TOKEN_ORDERS:
            raise ProjLensError(f"hook map {name}: projector_output.token_order must be one of {TOKEN_ORDERS}, "
                                f"got {token_order!r}")
        layer = data.get("layer", {})
        attrs = data.get("tokens", {}).get("image_token_id", ["image_token_id", "image_token_index"])
        return cls(
            family=str(data["family"]), model_types=tuple(data["model_types"]),
            projector=mods["projector"], layers=mods["layers"], lm_head=mods["lm_head"],
            embed_tokens=mods["embed_tokens"], vision_tower=mods.get("vision_tower"),
            projector_hidden=mods.get("projector_hidden"),
            projector_linears=tuple(mods.get("projector_linears", ())),
            final_norm=mods.get("final_norm"), attn=layer.get("attn", "self_attn"),
            mlp=layer.get("mlp", "mlp"),
            image_token_attrs=tuple([attrs] if isinstance(attrs, str) else attrs),
            layout=layout, token_order=token_order, source=name)

    def image_token_id(self, config) -> int:
        """The placeholder id, from the first config attribute that exists (top level, then text_config)."""
        for holder in (config, getattr(config, "text_config", None)):
            for attr in self.image_token_attrs:
                value = getattr(holder, attr, None) if holder is not None else None
                if isinstance(value, int):
                    return value
        raise ProjLensError(f"{self.family} config has none of {', '.join(self.image_token_attrs)}; "
                            f"set it on the config or fix tokens.image_token_id in {self.source}")


@lru_cache(maxsize=1)
def known_adapters() -> tuple[Adapter, ...]:
    """Every map shipped in ``projlens_mi.hooks`` (sorted by file name)."""
    root = resources.files("projlens_mi.hooks")
    files = sorted((f for f in root.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)
    return tuple(Adapter.from_toml(f"hooks/{f.name}", f.read_text(encoding="utf-8")) for f in files)


def _hf_model(model):
    """The HF module under an nnsight wrapper (or the model itself)."""
    inner = getattr(model, "_module", None)
    return inner if inner is not None and hasattr(inner, "config") else model


def find_adapter(model, adapters: tuple[Adapter, ...] | None = None) -> Adapter:
    """The map serving ``model.config.model_type``; one-line error listing the known families."""
    adapters = known_adapters() if adapters is None else adapters
    config = getattr(_hf_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in adapters:
        if model_type in adapter.model_types:
            return adapter
    families = ", ".join(sorted({a.family for a in adapters})) or "none"
    what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
    raise ProjLensError(f"no hook map for {what}; known families: {families}; "
                        "add hooks/<family>.toml (schema in docs/architecture.md)")

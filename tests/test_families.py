"""Every shipped family map against a tiny random-weight model of that family (offline, seconds).

Per family: the adapter is found; every path resolves to the right kind of module; the projector
output read at ``projector.out`` equals the model's own image features (through the family's
``token_order``); the image-token positions are where the model scatters those features; and one
Patch and one zero-ablation at ``projector.out`` equal an independent reference that hands the
edited features to the model through ``mm_encoder_outputs`` (no hooks).

The site reads and edits here go through a plain PyTorch forward hook on the adapter's projector
module (the engine's run API did not exist when these were written; see docs/families.md).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from projlens_mi.model.adapters import find_adapter, known_adapters

from tiny_families import FAMILIES, IMG, TinyFamily

NAMES = list(FAMILIES)
_CACHE: dict[str, TinyFamily] = {}


def fam(name: str) -> TinyFamily:
    if name not in _CACHE:
        _CACHE[name] = FAMILIES[name]()
    return _CACHE[name]


@contextmanager
def projector_hook(model, path: str, edit=None, store: dict | None = None):
    """Plain forward hook on the projector: records its output, optionally replaces it."""
    def hook(_module, _args, out):
        if store is not None:
            store["out"] = out.detach().clone()
        return edit(out) if edit is not None else None
    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward(f: TinyFamily, **kw):
    with torch.no_grad():
        return f.model(**f.inputs, **kw).logits


def reference_logits(f: TinyFamily, seq_features: torch.Tensor) -> torch.Tensor:
    """The model run with ``seq_features`` (sequence order) as its image features, no hooks."""
    inputs = {k: v for k, v in f.inputs.items() if k not in ("pixel_values", "pixel_attention_mask")}
    pooled = seq_features if f.model_type in ("gemma3", "paligemma") else [seq_features]
    with torch.no_grad():
        return f.model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=pooled)}).logits


def image_positions(f: TinyFamily) -> torch.Tensor:
    adapter = find_adapter(f.model)
    return (f.inputs["input_ids"] == adapter.image_token_id(f.model.config)).nonzero()


# ------------------------------------------------------------------------------------------------ maps
def test_every_family_has_a_map():
    types = {t for a in known_adapters() for t in a.model_types}
    assert {fam_type for fam_type in ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3",
                                      "smolvlm", "gemma3", "mistral3", "paligemma")} <= types


@pytest.mark.parametrize("name", NAMES)
def test_adapter_found(name):
    f = fam(name)
    adapter = find_adapter(f.model)
    assert adapter.family == f.family
    assert f.model.config.model_type == f.model_type
    assert f.model_type in adapter.model_types
    assert adapter.image_token_id(f.model.config) == IMG


@pytest.mark.parametrize("name", NAMES)
def test_module_paths_resolve(name):
    f = fam(name)
    a = find_adapter(f.model)
    m = f.model
    cfg = m.config.get_text_config()
    layers = m.get_submodule(a.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == cfg.num_hidden_layers == 2
    for layer in layers:
        assert isinstance(layer.get_submodule(a.attn), nn.Module)
        assert isinstance(layer.get_submodule(a.mlp), nn.Module)
    assert isinstance(m.get_submodule(a.lm_head), nn.Linear)
    assert m.get_submodule(a.lm_head) is m.get_output_embeddings()
    assert m.get_submodule(a.embed_tokens) is m.get_input_embeddings()
    assert isinstance(m.get_submodule(a.embed_tokens), nn.Embedding)
    assert m.get_submodule(a.final_norm) is m.get_submodule(a.layers.rsplit(".", 1)[0]).norm
    tower = m.get_submodule(a.vision_tower)
    projector = m.get_submodule(a.projector)
    # the projector's parameters are none of the tower's, except where the tower CONTAINS it (Qwen)
    inside = a.projector.startswith(a.vision_tower + ".")
    assert inside == (name in ("qwen2_vl", "qwen2_5_vl"))
    if not inside:
        assert not {id(p) for p in projector.parameters()} & {id(p) for p in tower.parameters()}
    for path in a.projector_linears:
        assert path.startswith(a.projector + ".")
        assert isinstance(m.get_submodule(path), nn.Linear)
    if a.projector_hidden is not None:
        assert a.projector_hidden.startswith(a.projector + ".")
        assert not list(m.get_submodule(a.projector_hidden).parameters())   # an activation
    # the projector's trainable weights are exactly its linears (plus norms / a raw Parameter)
    n_linear = {"llava_next": 2, "llava_onevision": 2, "qwen2_vl": 2, "qwen2_5_vl": 2, "idefics3": 1, "smolvlm": 1,
                "gemma3": 0, "mistral3": 3, "paligemma": 1}[name]
    assert len(a.projector_linears) == n_linear
    assert sum(isinstance(x, nn.Linear) for x in projector.modules()) == n_linear
    has_hidden = name not in ("idefics3", "smolvlm", "gemma3", "paligemma")
    assert (a.projector_hidden is not None) == has_hidden


def test_gemma3_projection_is_a_parameter():
    m = fam("gemma3").model
    proj = m.get_submodule(find_adapter(m).projector)
    assert isinstance(proj.mm_input_projection_weight, nn.Parameter)
    assert tuple(proj.mm_input_projection_weight.shape) == (32, 48)


# -------------------------------------------------------------------------------------- projector.out
@pytest.mark.parametrize("name", NAMES)
def test_projector_out_equals_own_image_features(name):
    f = fam(name)
    a = find_adapter(f.model)
    store: dict = {}
    with projector_hook(f.model, a.projector, store=store):
        forward(f)
    out = store["out"]
    assert tuple(out.shape) == f.projector_out_shape
    assert out.dim() == (3 if a.layout == "batched" else 2)
    rows = out.reshape(-1, out.shape[-1])
    with torch.no_grad():
        own = f.features()
    tmap = f.token_map()
    assert len(tmap) == own.shape[0]
    if a.token_order == "sequence":
        assert torch.equal(tmap, torch.arange(rows.shape[0]))
        torch.testing.assert_close(rows, own, rtol=0, atol=0)
    elif a.token_order == "window":
        assert not torch.equal(tmap, torch.arange(rows.shape[0]))   # the tiny really permutes
        assert sorted(tmap.tolist()) == list(range(rows.shape[0]))
        assert not torch.allclose(rows, own)
        torch.testing.assert_close(rows[tmap], own, rtol=0, atol=0)
    else:  # anyres: rows feed some positions; the rest are image_newline; unpadding drops rows
        fed = tmap >= 0
        torch.testing.assert_close(rows[tmap[fed]], own[fed], rtol=0, atol=0)
        newline = f.model.model.image_newline.detach()
        torch.testing.assert_close(own[~fed], newline.expand(int((~fed).sum()), -1), rtol=0, atol=0)
        assert len(set(tmap[fed].tolist())) == int(fed.sum())   # no row used twice


def test_anyres_counts():
    """LLaVA-NeXT tiny: 2 images x 3 crops x 16 patches = 96 projector rows; per image 16 (base) +
    4 x 6 kept grid columns = 40 rows reach the LLM, 8 are unpadded away, 4 newlines: 44 tokens."""
    f = fam("llava_next")
    tmap = f.token_map()
    assert len(tmap) == 88 and int((tmap == -1).sum()) == 8 and int((tmap >= 0).sum()) == 80
    store: dict = {}
    with projector_hook(f.model, find_adapter(f.model).projector, store=store):
        forward(f)
    n_rows = store["out"].reshape(-1, store["out"].shape[-1]).shape[0]
    dropped = sorted(set(range(n_rows)) - set(tmap[tmap >= 0].tolist()))   # projector rows no position reads
    assert n_rows == 96 and len(dropped) == 16 and sum(r < 48 for r in dropped) == 8   # unpadding: 8 per image
    assert tmap[:16].tolist() == list(range(16))     # the base crop comes first, in order


def test_window_order_is_qwen25_specific():
    # Qwen2-VL has no windows: its merger rows are already in sequence order
    assert torch.equal(fam("qwen2_vl").token_map(), torch.arange(12))
    tmap = fam("qwen2_5_vl").token_map()
    # first image: 4x4 merged tokens in 2x2 windows; sequence token 2 (row 0, col 2) is merger row 4
    assert tmap[:16].tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert tmap[16:].tolist() == [16 + i for i in tmap[:16].tolist()]


# -------------------------------------------------------------------------------------- image tokens
@pytest.mark.parametrize("name", NAMES)
def test_image_token_positions(name):
    """Positions from the adapter's image-token id are exactly where the LLM's first layer sees
    the image features; everywhere else it sees the token embeddings."""
    f = fam(name)
    a = find_adapter(f.model)
    pos = image_positions(f)
    own = f.features()
    assert pos.shape[0] == own.shape[0]
    n_rows = 1
    for s in f.projector_out_shape[:-1]:
        n_rows *= s
    if a.token_order in ("sequence", "window"):
        assert pos.shape[0] == n_rows
    else:
        assert pos.shape[0] != n_rows
    seen: dict = {}

    def grab(_module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = f.model.get_submodule(a.layers)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        forward(f)
    finally:
        h.remove()
    x = seen["x"]
    mask = f.inputs["input_ids"] == a.image_token_id(f.model.config)
    torch.testing.assert_close(x[mask], own, rtol=0, atol=0)
    with torch.no_grad():
        emb = f.model.get_submodule(a.embed_tokens)(f.inputs["input_ids"])
    torch.testing.assert_close(x[~mask], emb[~mask], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- interventions
def _second_half(out: torch.Tensor) -> slice:
    """Projector rows of batch row 1 (both rows have the same image geometry in every tiny)."""
    half = out.shape[0] // 2
    return slice(half, None)


@pytest.mark.parametrize("name", NAMES)
def test_patch_row0_into_row1(name):
    f = fam(name)
    a = find_adapter(f.model)

    def patch(out):
        out = out.clone()
        half = out.shape[0] // 2
        out[half:] = out[:half]
        return out

    with projector_hook(f.model, a.projector, edit=patch):
        patched = forward(f)
    clean = forward(f)
    own = f.features()
    n = own.shape[0] // 2
    ref_features = torch.cat([own[:n], own[:n]])
    ref = reference_logits(f, ref_features)
    torch.testing.assert_close(patched, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched[1], clean[0], rtol=1e-5, atol=1e-5)   # same text, same image now
    torch.testing.assert_close(patched[0], clean[0], rtol=0, atol=0)
    assert (patched[1] - clean[1]).abs().max() > 1e-4   # the two images really differ


@pytest.mark.parametrize("name", NAMES)
def test_zero_ablation_row1(name):
    f = fam(name)
    a = find_adapter(f.model)

    def ablate(out):
        out = out.clone()
        out[_second_half(out)] = 0
        return out

    with projector_hook(f.model, a.projector, edit=ablate):
        ablated = forward(f)
    clean = forward(f)
    own = f.features()
    tmap = f.token_map()
    n = own.shape[0] // 2
    ref_features = own.clone()
    row1 = torch.zeros(own.shape[0], dtype=torch.bool)
    row1[n:] = True
    ref_features[row1 & (tmap >= 0)] = 0       # anyres: the image_newline positions keep their vector
    ref = reference_logits(f, ref_features)
    torch.testing.assert_close(ablated, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ablated[0], clean[0], rtol=0, atol=0)
    assert (ablated[1] - clean[1]).abs().max() > 1e-4



# ------------------------------------------------------------------------------ the family's own processing
@pytest.mark.parametrize("name", NAMES)
def test_processor_inputs(name):
    """Inputs made by the family's own PIL processing (full processor where it builds offline, see
    tiny_families.FULL_PROCESSOR) run through the map: the image-token positions get the projector
    rows, in the family's token order."""
    from tiny_families import FULL_PROCESSOR, processor_inputs
    f = fam(name)
    a = find_adapter(f.model)
    enc = processor_inputs(name)
    split = name in ("idefics3", "smolvlm")    # the processor splits each 32x16 image into 2 crops + global
    if split:
        assert tuple(enc["pixel_values"].shape) == (2, 3, 3, 16, 16)
    else:
        assert tuple(enc["pixel_values"].shape) == tuple(f.inputs["pixel_values"].shape)
    if name in FULL_PROCESSOR:
        assert "attention_mask" in enc
    if name == "gemma3":   # the processor marks the soft image tokens (not <start_of_image>) as type 1
        assert torch.equal(enc["token_type_ids"].bool(), enc["input_ids"] == IMG)
    if name == "paligemma":
        assert enc["input_ids"][0, :16].tolist() == [IMG] * 16 and enc["input_ids"][0, 16] == 1   # image, then <s>
    store: dict = {}
    seen: dict = {}

    def grab(_module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = f.model.get_submodule(a.layers)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with projector_hook(f.model, a.projector, store=store), torch.no_grad():
            f.model(**enc)
    finally:
        h.remove()
    mask = enc["input_ids"] == a.image_token_id(f.model.config)
    rows = store["out"].reshape(-1, store["out"].shape[-1])
    x = seen["x"][mask]
    expected_tokens = {"llava_next": 88, "llava_onevision": 88, "qwen2_vl": 12, "qwen2_5_vl": 32, "idefics3": 24,
                       "smolvlm": 24, "gemma3": 8, "mistral3": 12, "paligemma": 32}[name]
    assert x.shape[0] == expected_tokens
    if a.token_order == "sequence":
        assert rows.shape[0] == expected_tokens
        torch.testing.assert_close(x, rows, rtol=0, atol=0)
    elif a.token_order == "window":
        torch.testing.assert_close(x, rows[f.token_map()], rtol=0, atol=0)
    else:
        tmap = f.token_map()
        assert rows.shape[0] == 96 and int((tmap >= 0).sum()) == 80
        torch.testing.assert_close(x[tmap >= 0], rows[tmap[tmap >= 0]], rtol=0, atol=0)


# ------------------------------------------------------------------------- real-size architectures (meta)
_DEFAULTS = {"llava_next": "LlavaNext", "llava_onevision": "LlavaOnevision", "qwen2_vl": "Qwen2VL",
             "qwen2_5_vl": "Qwen2_5_VL", "idefics3": "Idefics3", "smolvlm": "SmolVLM", "gemma3": "Gemma3",
             "mistral3": "Mistral3", "paligemma": "PaliGemma"}


@pytest.mark.parametrize("name", NAMES)
def test_map_fits_the_default_real_size_architecture(name):
    """The family's DEFAULT config (a real checkpoint's architecture: 2.7B-76B parameters) built on
    the meta device (no memory, no download): every mapped path resolves to the same kind of module."""
    import transformers as tf
    stem = _DEFAULTS[name]
    cfg = getattr(tf, f"{stem}Config")()
    with torch.device("meta"):
        model = getattr(tf, f"{stem}ForConditionalGeneration")(cfg)
    a = find_adapter(model)
    assert a.family == fam(name).family
    assert isinstance(model.get_submodule(a.layers), nn.ModuleList)
    assert len(model.get_submodule(a.layers)) == cfg.get_text_config().num_hidden_layers
    for path in a.projector_linears:
        assert isinstance(model.get_submodule(path), nn.Linear)
    for path in (a.projector, a.vision_tower, a.final_norm, a.lm_head, a.embed_tokens, a.projector_hidden):
        if path is not None:
            assert type(model.get_submodule(path)) is type(fam(name).model.get_submodule(path))
    assert isinstance(a.image_token_id(cfg), int)


# ------------------------------------------------------------------------------------------ projector.in
_PROJECTOR_IN = {   # shape of the projector's first input; does it equal the tower's last_hidden_state?
    "llava_next": ((6, 16, 32), False),       # hidden_states[-1] with CLS dropped (tower output has 17)
    "llava_onevision": ((6, 16, 32), False),  # SigLIP hidden_states[-1] is BEFORE post_layernorm
    "qwen2_vl": ((48, 32), True),             # pre-merger patches (4 per output token)
    "qwen2_5_vl": ((128, 32), True),          # ... in window order
    "idefics3": ((4, 16, 32), True),
    "smolvlm": ((4, 16, 32), True),
    "gemma3": ((2, 16, 32), True),
    "mistral3": ((48, 32), True),             # the tower's [1, 48, 32] squeezed; forward(x, image_sizes)
    "paligemma": ((2, 16, 32), True),
}


@pytest.mark.parametrize("name", NAMES)
def test_projector_in_and_vision_tower_output(name):
    f = fam(name)
    a = find_adapter(f.model)
    st: dict = {}

    def pre(_module, args):
        st["in"] = args[0].detach().clone()     # returns None: a pre-hook that returns a value replaces args

    def post(_module, _args, out):
        st["vision"] = out.last_hidden_state.detach().clone()

    h1 = f.model.get_submodule(a.projector).register_forward_pre_hook(pre)
    h2 = f.model.get_submodule(a.vision_tower).register_forward_hook(post)
    try:
        forward(f)
    finally:
        h1.remove()
        h2.remove()
    shape, same = _PROJECTOR_IN[name]
    assert tuple(st["in"].shape) == shape
    v = st["vision"]
    assert (v.numel() == st["in"].numel() and torch.equal(v.reshape(shape), st["in"])) == same


def test_onevision_multi_image_row():
    """LLaVA-OneVision multi-image mode (batch_num_images > 1): no anyres grid, each image is ONE crop
    (16 rows) followed by one image_newline: 2 images -> 32 projector rows -> 34 image tokens."""
    from tiny_families import _anyres_token_map, _ids, _pixels
    f = fam("llava_onevision")
    m = f.model
    ids = _ids(34, rows=1)
    pv = _pixels(2, 3, 3, 16, 16, seed=5)       # only crop 0 of each image is used
    sizes = torch.tensor([[16, 24], [16, 24]])
    store: dict = {}
    seen: dict = {}

    def grab(_module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = m.get_submodule(find_adapter(m).layers)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with projector_hook(m, find_adapter(m).projector, store=store), torch.no_grad():
            m(input_ids=ids, pixel_values=pv, image_sizes=sizes, batch_num_images=torch.tensor([2]))
    finally:
        h.remove()
    rows = store["out"].reshape(-1, 48)
    assert tuple(store["out"].shape) == (2, 16, 48)
    tmap = _anyres_token_map(m, [1, 1], 16, sizes, vision_aspect_ratio="anyres_max_9")
    assert tmap.tolist() == list(range(16)) + [-1] + list(range(16, 32)) + [-1]
    x = seen["x"][ids == IMG]
    torch.testing.assert_close(x[tmap >= 0], rows, rtol=0, atol=0)
    newline = m.model.image_newline.detach()
    torch.testing.assert_close(x[tmap < 0], newline.expand(2, -1), rtol=0, atol=0)

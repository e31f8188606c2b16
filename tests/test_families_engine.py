"""The family maps through the engine (nnsight): reads, one Patch and one zero-ablation at
``projector.out`` against a plain PyTorch forward-hook reference, per family (tiny models from
tests/tiny_families.py).

Qwen2.5-VL's window order is remapped by the engine (``token_order = "window"``): selectors at
projector points pick image tokens in the order the LLM sees them.
"""

from __future__ import annotations

import pytest
import torch

from projlens_mi.errors import ProjLensError

from projlens_mi.engine import Ablate, ImageWindow, Patch, Site, WithWeights, run
from projlens_mi.model import Inputs, load

from test_families import NAMES, fam, forward, projector_hook
from tiny_families import TinyFamily

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

# Families whose projector output holds several crops / images per batch row (anyres crops of
# LLaVA-NeXT / OneVision; split images of Idefics3 / SmolVLM). Row edits work (the engine regroups
# the crops per batch row), but a position selector at projector.out has no 1:1 image-token map.
SEVERAL_PER_ROW = {"llava_next", "llava_onevision", "idefics3", "smolvlm"}


def forward_with_pre_hook(f: TinyFamily, path: str, pre) -> torch.Tensor:
    """The reference: a plain forward with a PyTorch forward pre-hook on module ``path`` (removed after)."""
    h = f.model.get_submodule(path).register_forward_pre_hook(pre)
    try:
        return forward(f)
    finally:
        h.remove()


def engine_inputs(f: TinyFamily):
    handle = load(f.model)
    kw = dict(f.inputs)
    ids, pv = kw.pop("input_ids"), kw.pop("pixel_values")
    return handle, Inputs(ids, torch.ones_like(ids), handle.image_mask(ids), pv, extra=kw)


@pytest.mark.parametrize("name", NAMES)
def test_engine_reads_projector_out(name):
    f = fam(name)
    handle, inputs = engine_inputs(f)
    store: dict = {}
    with projector_hook(f.model, handle.adapter.projector, store=store):
        plain = forward(f)
    res = run(handle, inputs, read=["projector.out", Site("llm.0.resid_pre")])
    torch.testing.assert_close(res.cache["projector.out"], store["out"], rtol=0, atol=0)
    torch.testing.assert_close(res.logits, plain, rtol=0, atol=0)
    # the LLM's first layer sees the model's own features at the adapter's image positions
    x = res.cache["llm.0.resid_pre"]
    torch.testing.assert_close(x[inputs.image_mask], f.features(), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_engine_patch_equals_hook_reference(name):
    f = fam(name)
    handle, inputs = engine_inputs(f)

    def patch(out):
        out = out.clone()
        half = out.shape[0] // 2
        out[half:] = out[:half]
        return out

    with projector_hook(f.model, handle.adapter.projector, edit=patch):
        ref = forward(f)
    res = run(handle, inputs, edits=[("projector.out", Patch(source_row=0), [1])])
    torch.testing.assert_close(res.logits, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_engine_zero_ablation_equals_hook_reference(name):
    f = fam(name)
    handle, inputs = engine_inputs(f)

    def ablate(out):
        out = out.clone()
        out[out.shape[0] // 2:] = 0
        return out

    with projector_hook(f.model, handle.adapter.projector, edit=ablate):
        ref = forward(f)
    res = run(handle, inputs, edits=[("projector.out", Ablate("zero"), [1])])
    torch.testing.assert_close(res.logits, ref, rtol=1e-6, atol=1e-6)


_WINDOW_FAMILIES = [n for n in NAMES if n not in SEVERAL_PER_ROW]


@pytest.mark.parametrize("name", _WINDOW_FAMILIES)
def test_engine_image_window_at_projector_out_is_the_same_image_tokens(name):
    """ImageWindow(0, 3) at projector.out must touch the image's FIRST THREE TOKENS (in the order the
    LLM sees them): equal to a hook that patches the projector rows feeding them (via token_map),
    and to the same window patched at llm.0.resid_pre."""
    f = fam(name)
    handle, inputs = engine_inputs(f)
    tmap = f.token_map()
    n = len(tmap) // 2

    def patch(out):
        flat = out.clone().reshape(-1, out.shape[-1])
        flat[tmap[n:n + 3]] = flat[tmap[:3]]
        return flat.view(out.shape)

    with projector_hook(f.model, handle.adapter.projector, edit=patch):
        ref = forward(f)
    at_llm = run(handle, inputs, edits=[(Site("llm.0.resid_pre", ImageWindow(0, 3)), Patch(source_row=0), [1])])
    torch.testing.assert_close(at_llm.logits, ref, rtol=1e-5, atol=1e-5)
    res = run(handle, inputs, edits=[(Site("projector.out", ImageWindow(0, 3)), Patch(source_row=0), [1])])
    torch.testing.assert_close(res.logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_engine_zero_ablation_at_projector_in(name):
    """Editing the projector's FIRST input keeps its other inputs (Mistral 3: image_sizes)."""
    f = fam(name)
    handle, inputs = engine_inputs(f)

    def pre(_module, args):
        x = args[0].clone()
        x[x.shape[0] // 2:] = 0
        return (x, *args[1:])

    ref = forward_with_pre_hook(f, handle.adapter.projector, pre)
    res = run(handle, inputs, edits=[("projector.in", Ablate("zero"), [1])])
    torch.testing.assert_close(res.logits, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_engine_reads_projector_hidden(name):
    f = fam(name)
    handle, inputs = engine_inputs(f)
    a = handle.adapter
    if a.projector_hidden is None:      # Idefics3 / SmolVLM / Gemma 3 / PaliGemma: no nonlinearity
        with pytest.raises(ProjLensError, match="no projector.hidden"):
            run(handle, inputs, read=["projector.hidden"])
        return
    st: dict = {}
    h = f.model.get_submodule(a.projector_hidden).register_forward_hook(
        lambda _m, _a, out: st.update(out=out.detach().clone()))
    try:
        forward(f)
    finally:
        h.remove()
    res = run(handle, inputs, read=["projector.hidden"])
    torch.testing.assert_close(res.cache["projector.hidden"], st["out"], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_engine_with_weights_on_every_projector_linear(name):
    """WithWeights on each mapped projector linear equals a deep copy of the model whose weight was
    really changed; the caller's parameters stay bit-identical."""
    import copy
    f = fam(name)
    handle, inputs = engine_inputs(f)
    a = handle.adapter
    if not a.projector_linears:         # Gemma 3: the projection is a Parameter, not a Linear
        with pytest.raises(ProjLensError, match="not one of the projector linears"):
            run(handle, inputs, edits=[WithWeights({"mm_input_projection_weight": (torch.zeros(48, 32), None)})])
        return
    before = {k: v.clone() for k, v in f.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for path in a.projector_linears:
        lin = f.model.get_submodule(path)
        W = lin.weight.detach() + 0.5 * torch.randn(lin.weight.shape, generator=g)
        twin = copy.deepcopy(f.model)
        with torch.no_grad():
            twin.get_submodule(path).weight.copy_(W)
            ref = twin(**f.inputs).logits
        res = run(handle, inputs, edits=[WithWeights({path: (W, None)})])
        torch.testing.assert_close(res.logits, ref, rtol=1e-5, atol=1e-5)
        assert (res.logits - forward(f)).abs().max() > 1e-4
    after = f.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["llava_next", "idefics3", "gemma3", "paligemma"])
def test_handle_encode_with_the_family_processor(name):
    """handle.encode with the family's own processor, then a read at projector.out: the image mask
    covers exactly the adapter's image-token positions and the model runs on the encoded batch."""
    from tiny_families import full_processor, tiny_images
    f = fam(name)
    processor, size, prompt = full_processor(name)
    handle = load(f.model, processor=processor)
    inputs = handle.encode((tiny_images(size), [prompt, prompt + " what"]))   # different lengths: left padding
    assert torch.equal(inputs.image_mask, inputs.input_ids == handle.image_token_id)
    assert inputs.attention_mask[1].all() and not inputs.attention_mask[0].all()
    res = run(handle, inputs, read=["projector.out"])
    assert res.logits.shape[:2] == inputs.input_ids.shape


def test_handle_encode_drops_processor_labels():
    from tiny_families import full_processor, tiny_images
    f = fam("paligemma")
    processor, size, prompt = full_processor("paligemma")
    inputs = load(f.model, processor=processor).encode((tiny_images(size), [prompt, prompt]))
    assert "labels" not in inputs.extra


def test_qwen2_5_vl_projector_points_are_in_image_token_order():
    """token_order = "window": the engine's per-row view of projector.out / projector.hidden /
    projector.in is in image-token order (the tower's window permutation undone), so a selector
    picks the tokens the LLM sees at those positions. References: plain hooks + token_map."""
    from projlens_mi.engine import ImageTokens
    f = fam("qwen2_5_vl")
    handle, inputs = engine_inputs(f)
    a = handle.adapter
    tmap = f.token_map()                              # sequence token j <- merger row tmap[j]
    n = len(tmap) // 2
    st: dict = {}
    hs = [f.model.get_submodule(a.projector).register_forward_pre_hook(lambda _m, args: st.update(inp=args[0].detach().clone())),
          f.model.get_submodule(a.projector_hidden).register_forward_hook(lambda _m, _a, out: st.update(hid=out.detach().clone()))]
    try:
        forward(f)
    finally:
        for h in hs:
            h.remove()
    assert not torch.equal(tmap, torch.arange(len(tmap)))      # the test image really is windowed
    res = run(handle, inputs, read=[Site("projector.out", ImageTokens()), Site("projector.hidden", ImageWindow(1, 3)),
                                    Site("projector.in", ImageWindow(0, 8)), Site("llm.0.resid_pre", ImageTokens())])
    # projector.out rows, as the engine views them, are the LLM's image tokens in order
    torch.testing.assert_close(res.cache[Site("projector.out", ImageTokens())],
                               res.cache[Site("llm.0.resid_pre", ImageTokens())], rtol=0, atol=0)
    hid = st["hid"][tmap].view(2, n, -1)
    torch.testing.assert_close(res.cache[Site("projector.hidden", ImageWindow(1, 3))], hid[:, 1:3], rtol=0, atol=0)
    u = st["inp"].shape[0] // len(tmap)                # patches per merged token (2x2 merge: 4)
    inp = st["inp"].view(len(tmap), u, -1)[tmap].reshape(2, n * u, -1)
    torch.testing.assert_close(res.cache[Site("projector.in", ImageWindow(0, 8))], inp[:, :8], rtol=0, atol=0)


def test_qwen2_5_vl_edit_at_projector_in_follows_the_window_order():
    """Zeroing the first two merged tokens' patches (ImageWindow(0, 2 * 4)) of row 1 at projector.in
    equals a hook that zeroes the window-ordered rows feeding image tokens n and n + 1."""
    f = fam("qwen2_5_vl")
    handle, inputs = engine_inputs(f)
    tmap = f.token_map()
    n = len(tmap) // 2

    def pre(_module, args):
        x = args[0].clone()
        u = x.shape[0] // len(tmap)
        x.view(len(tmap), u, -1)[tmap[n:n + 2]] = 0
        return (x, *args[1:])

    ref = forward_with_pre_hook(f, handle.adapter.projector, pre)
    res = run(handle, inputs, edits=[(Site("projector.in", ImageWindow(0, 8)), Ablate("zero"), [1])])
    torch.testing.assert_close(res.logits, ref, rtol=1e-6, atol=1e-6)
    assert (res.logits - forward(f)).abs().max() > 1e-4


def test_window_order_needs_image_grid_thw():
    f = fam("qwen2_5_vl")
    handle, inputs = engine_inputs(f)
    bare = Inputs(inputs.input_ids, inputs.attention_mask, inputs.image_mask, inputs.pixel_values,
                  extra={k: v for k, v in inputs.extra.items() if k != "image_grid_thw"})
    with pytest.raises(ProjLensError, match="image_grid_thw"):
        run(handle, bare, read=[Site("projector.out", ImageWindow(0, 2))])

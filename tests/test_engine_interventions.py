"""Every intervention through run() equals an independent plain-PyTorch forward-hook reference.

The references edit the activation with ordinary indexing inside ``register_forward_hook`` /
``register_forward_pre_hook`` on the same model; they never call ``Intervention.apply``.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from projlens_mi import (Ablate, ImageTokens, ImageWindow, LastToken, Noise, Patch, PatchRegion, PatchSubspace,
                         ProjectOut, Site, Steer, WithWeights, load, run)
from projlens_mi.errors import ProjLensError

from tiny import PROMPT, tiny_images, tiny_llava

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

B = 4


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_llava()
    handle = load(model, processor=processor)
    inputs = handle.encode(tiny_images(B), [PROMPT] * B)
    return handle, model, inputs


@contextmanager
def hooked(module, fn, pre=False):
    h = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        h.remove()


def reference(model, inputs, module, fn, pre=False):
    with torch.no_grad(), hooked(module, fn, pre):
        return model(**inputs.model_kwargs()).logits


def image_pos(inputs):
    return inputs.image_mask[0].nonzero()[:, 0]   # same prompt in every row: same positions


def orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g)).Q


def check(ours, ref):
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    return True


def test_zero_ablation_of_an_image_window_on_some_rows(setup):
    handle, model, inputs = setup
    ours = run(handle, inputs, edits=[(Site("projector.out", ImageWindow(0, 4)), Ablate("zero"), [1, 2])]).logits

    def fn(m, a, out):
        out = out.clone()
        out[1:3, 0:4] = 0
        return out
    check(ours, reference(model, inputs, model.model.multi_modal_projector, fn))
    plain = run(handle, inputs).logits
    assert torch.equal(ours[[0, 3]], plain[[0, 3]])        # rows 0 and 3 untouched, bit for bit
    assert not torch.allclose(ours[1], plain[1])


def test_patch_from_another_row_at_resid_pre(setup):
    handle, model, inputs = setup
    ours = run(handle, inputs, edits=[(Site("llm.1.resid_pre", ImageTokens()), Patch(source_row=0), slice(1, None))])
    pos = image_pos(inputs)

    def fn(m, args):
        h = args[0].clone()
        h[1:, pos] = h[0, pos]
        return (h, *args[1:])
    check(ours.logits, reference(model, inputs, model.model.language_model.layers[1], fn, pre=True))


def test_patch_from_a_cached_run_with_a_patch_region(setup):
    handle, model, inputs = setup
    other = handle.encode(tiny_images(B, seed=1), [PROMPT] * B)
    src = run(handle, other, read=["projector.out"]).cache["projector.out"]
    ours = run(handle, inputs, edits=[(Site("projector.out", PatchRegion((1, 3), (0, 2))), Patch(source=src))]).logits
    grid = [r * 4 + c for r in (1, 2) for c in (0, 1)]

    def fn(m, a, out):
        out = out.clone()
        out[:, grid] = src[:, grid]
        return out
    check(ours, reference(model, inputs, model.model.multi_modal_projector, fn))


def test_mean_ablation_of_the_last_token_mlp_out(setup):
    handle, model, inputs = setup
    ours = run(handle, inputs, edits=[(Site("llm.0.mlp_out", LastToken()), Ablate("mean"))]).logits

    def fn(m, a, out):
        out = out.clone()
        out[:, -1] = out[:, -1].mean(0)
        return out
    check(ours, reference(model, inputs, model.model.language_model.layers[0].mlp, fn))


def test_mean_ablation_with_a_given_mean(setup):
    handle, model, inputs = setup
    mean = torch.randn(48)
    ours = run(handle, inputs, edits=[(Site("projector.hidden"), Ablate("mean", mean=mean))]).logits

    def fn(m, a, out):
        return mean.expand_as(out).clone()
    check(ours, reference(model, inputs, model.model.multi_modal_projector.act, fn))


def test_resample_ablation_takes_another_rows_value(setup):
    handle, model, inputs = setup
    ours = run(handle, inputs, edits=[(Site("projector.out"), Ablate("resample", seed=3))]).logits
    # documented convention: a cyclic shift by randint(1, rows) from a generator seeded with `seed`
    shift = int(torch.randint(1, B, (1,), generator=torch.Generator().manual_seed(3)))

    def fn(m, a, out):
        return out[[(r - shift) % B for r in range(B)]].clone()
    check(ours, reference(model, inputs, model.model.multi_modal_projector, fn))


def test_project_out_a_subspace(setup):
    handle, model, inputs = setup
    basis = orthonormal(48, 5)
    ours = run(handle, inputs, edits=[(Site("projector.out", ImageTokens()), ProjectOut(basis))]).logits

    def fn(m, a, out):
        return out - out @ basis @ basis.T
    check(ours, reference(model, inputs, model.model.multi_modal_projector, fn))


def test_patch_subspace_keeps_the_orthogonal_part(setup):
    handle, model, inputs = setup
    basis = orthonormal(48, 3, seed=1)
    other = handle.encode(tiny_images(B, seed=2), [PROMPT] * B)
    src = run(handle, other, read=["llm.2.resid_post"]).cache["llm.2.resid_post"]
    ours = run(handle, inputs, edits=[(Site("llm.2.resid_post", LastToken()), PatchSubspace(basis, source=src))]).logits

    def fn(m, a, out):
        out = out.clone()
        x, s = out[:, -1], src[:, -1]
        out[:, -1] = x - x @ basis @ basis.T + s @ basis @ basis.T
        return out
    check(ours, reference(model, inputs, model.model.language_model.layers[2], fn))


def test_site_basis_restricts_a_patch_to_the_subspace(setup):
    handle, model, inputs = setup
    basis = orthonormal(48, 2, seed=4)
    a = run(handle, inputs, edits=[(Site("llm.1.resid_post", LastToken(), basis=basis), Patch(source_row=0))]).logits
    b = run(handle, inputs, edits=[(Site("llm.1.resid_post", LastToken()), PatchSubspace(basis, source_row=0))]).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_steer_adds_a_scaled_direction(setup):
    handle, model, inputs = setup
    direction = torch.randn(48)
    ours = run(handle, inputs, edits=[(Site("blocks.1.hook_resid_post", LastToken()), Steer(direction, 2.5))]).logits

    def fn(m, a, out):
        out = out.clone()
        out[:, -1] += 2.5 * direction
        return out
    check(ours, reference(model, inputs, model.model.language_model.layers[1], fn))


def test_attn_out_edit_on_a_tuple_output(setup):
    handle, model, inputs = setup
    ours = run(handle, inputs, edits=[(Site("llm.0.attn_out", ImageTokens()), Ablate("zero"))]).logits
    pos = image_pos(inputs)

    def fn(m, a, out):
        h = out[0].clone()
        h[:, pos] = 0
        return (h, *out[1:])
    check(ours, reference(model, inputs, model.model.language_model.layers[0].self_attn, fn))


def test_noise_is_seeded_and_matches_reference(setup):
    handle, model, inputs = setup
    edit = (Site("projector.in", ImageWindow(2, 6)), Noise(0.5, seed=7))
    ours = run(handle, inputs, edits=[edit]).logits
    again = run(handle, inputs, edits=[edit]).logits
    assert torch.equal(ours, again)
    noise = torch.randn((B, 4, 32), generator=torch.Generator().manual_seed(7))

    def fn(m, args):
        x = args[0].clone()
        x[:, 2:6] += 0.5 * noise
        return (x,)
    check(ours, reference(model, inputs, model.model.multi_modal_projector, fn, pre=True))


def test_with_weights_swaps_a_linear_for_the_call_only(setup):
    handle, model, inputs = setup
    lin = model.model.multi_modal_projector.linear_2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    W = lin.weight.detach() + 0.3 * torch.randn_like(lin.weight)
    ours = run(handle, inputs, edits=[WithWeights({"linear_2": (W, None)})]).logits

    def fn(m, a, out):
        return F.linear(a[0], W, m.bias)
    check(ours, reference(model, inputs, lin, fn))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # only some rows, with a new bias too
    b = torch.randn(48)
    rows = run(handle, inputs, edits=[(None, WithWeights({"model.multi_modal_projector.linear_2": (W, b)}), [0])]).logits

    def fn_rows(m, a, out):
        out = out.clone()
        out[0] = F.linear(a[0][0], W, b)
        return out
    check(rows, reference(model, inputs, lin, fn_rows))


def test_composed_edits_apply_in_forward_order(setup):
    handle, model, inputs = setup
    d = torch.randn(48)
    edits = [(Site("llm.2.resid_post", LastToken()), Steer(d, 1.0)),
             (Site("projector.out", ImageWindow(0, 2)), Ablate("zero"))]
    ours = run(handle, inputs, edits=edits).logits

    def proj(m, a, out):
        out = out.clone()
        out[:, :2] = 0
        return out

    def layer(m, a, out):
        out = out.clone()
        out[:, -1] += d
        return out
    with torch.no_grad(), hooked(model.model.multi_modal_projector, proj), \
            hooked(model.model.language_model.layers[2], layer):
        ref = model(**inputs.model_kwargs()).logits
    check(ours, ref)


def test_intervention_argument_errors():
    with pytest.raises(ProjLensError, match="exactly one"):
        Patch()
    with pytest.raises(ProjLensError, match="'zero', 'mean' or 'resample'"):
        Ablate("median")
    with pytest.raises(ProjLensError, match="orthonormal"):
        ProjectOut(torch.ones(8, 2))
    with pytest.raises(ProjLensError, match=r"\[d, k\]"):
        PatchSubspace(torch.ones(8), source_row=0)


def test_bad_shapes_are_one_line_errors(setup):
    handle, _, inputs = setup
    with pytest.raises(ProjLensError, match="has 32 rows but the activation has d=48") as e:
        run(handle, inputs, edits=[(Site("projector.out"), ProjectOut(orthonormal(32, 2)))])
    assert "\n" not in str(e.value)
    with pytest.raises(ProjLensError, match="does not fit"):
        run(handle, inputs, edits=[(Site("projector.out"), Patch(source=torch.zeros(5, 48)))])
    with pytest.raises(ProjLensError, match="not one of the projector linears"):
        run(handle, inputs, edits=[WithWeights({"linear_9": (torch.zeros(1), None)})])
    with pytest.raises(ProjLensError, match="read-only"):
        run(handle, inputs, edits=[("vision.out", Ablate())])

"""The optional TransformerLens path (projlens_mi.engine.interop) on the tiny LLaVA.

Booting is safe (a deep copy; the caller's model bit-identical; no torchvision install), and the
bridge, given the full multimodal inputs, gives the engine's numbers: logits, cached activations
at three sites, one patch. A call without images is refused. Skipped when transformer_lens is not
installed (optional extra ``tl``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens", reason="TransformerLens is an optional extra (pip install 'projlens_mi[tl]')")

import projlens_mi as pl  # noqa: E402
from projlens_mi.engine import ImageTokens, ImageWindow, LastToken, Patch, Site, run  # noqa: E402
from projlens_mi.engine.interop import TLBridge, tl_hook_name, tl_patch, tl_run, to_transformer_lens  # noqa: E402
from projlens_mi.errors import ProjLensError  # noqa: E402

from tiny import PROMPT, tiny_images, tiny_llava  # noqa: E402

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

TOL = dict(rtol=1e-5, atol=1e-5)   # the bridge runs eager attention, the caller's model sdpa: float32 rounding


def _fingerprint(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            model.config._attn_implementation)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, processor = tiny_llava()
    handle = pl.load(model, processor=processor)
    # two rows of different length: left padding
    inputs = handle.encode((tiny_images(3, seed=1), [PROMPT, PROMPT + " what", PROMPT]))
    run(handle, inputs)         # transformers adds its own output-capture hooks on a first forward
    before = _fingerprint(model)
    tl = to_transformer_lens(handle)
    return model, handle, tl, inputs, before


def test_boot_leaves_the_callers_model_bit_identical(setup):
    model, handle, tl, inputs, before = setup
    params, modules, attn = _fingerprint(model)
    assert attn == before[2] == "sdpa"
    assert modules == before[1]
    assert params.keys() == before[0].keys() and all(torch.equal(params[k], before[0][k]) for k in params)
    assert isinstance(tl, TLBridge) and tl.copied and tl.bridge.original_model is not model
    assert tl.bridge.processor is handle.processor


def test_logits_equal_hf(setup):
    model, handle, tl, inputs, _ = setup
    with torch.no_grad():
        ref = model(**inputs.model_kwargs()).logits
    logits = tl_run(tl, inputs).logits
    real = inputs.attention_mask.bool()            # padded positions attend to nothing: kernel-dependent garbage
    torch.testing.assert_close(logits[real], ref[real], **TOL)
    assert (logits[real] - ref[real]).abs().max() < 1e-5


def test_cache_at_three_sites_equals_the_engine(setup):
    _, handle, tl, inputs, _ = setup
    sites = [Site("projector.out"), Site("blocks.1.hook_resid_post", ImageTokens()), Site("llm.2.mlp_out", LastToken())]
    assert [tl_hook_name(s) for s in sites] == ["vision_projector.hook_out", "blocks.1.hook_resid_post",
                                                 "blocks.2.hook_mlp_out"]
    ours = run(handle, inputs, read=sites).cache
    logits, cache = tl.run_with_cache(inputs, read=sites)
    for s in sites:
        assert cache[s].shape == ours[s].shape
        torch.testing.assert_close(cache[s], ours[s], **TOL)
    # the raw TL call, our names translated, the full inputs handed over
    got = {}
    tl.run_with_hooks(inputs, fwd_hooks=[("llm.0.resid_pre", lambda act, hook: got.update(x=act.detach().clone()))])
    torch.testing.assert_close(got["x"], run(handle, inputs, read=["llm.0.resid_pre"]).cache["llm.0.resid_pre"], **TOL)


def test_patch_through_tl_equals_the_engine(setup):
    _, handle, tl, inputs, _ = setup
    edits = [(Site("projector.out", ImageWindow(0, 6)), Patch(source_row=0), [1, 2])]
    ours = run(handle, inputs, edits=edits).logits
    theirs = tl_patch(tl, inputs, edits).logits
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], **TOL)
    clean = run(handle, inputs).logits
    assert (ours[real] - clean[real]).abs().max() > 1e-3          # the patch changed something
    # a cached source at an LLM site, read back at a later one
    src = run(handle, inputs, read=["llm.1.resid_pre"]).cache["llm.1.resid_pre"].flip(0)
    site = Site("llm.1.resid_pre", ImageTokens())
    edits = [(site, Patch(source=src))]
    ours = run(handle, inputs, read=["logits"], edits=edits).logits
    theirs = tl_patch(tl, inputs, edits).logits
    torch.testing.assert_close(theirs[real], ours[real], **TOL)


def test_calls_without_images_raise(setup):
    _, handle, tl, inputs, _ = setup
    no_images = pl.Inputs(inputs.input_ids, inputs.attention_mask, inputs.image_mask, None, inputs.extra)
    edits = [(Site("llm.1.resid_post", ImageTokens()), Patch(source_row=0), [1])]
    with pytest.raises(ProjLensError, match="no pixel_values"):
        tl_patch(tl, no_images, edits)
    with pytest.raises(ProjLensError, match="drop pixel_values"):
        tl_patch(tl, inputs.input_ids, edits)                       # token ids only: the TL habit
    with pytest.raises(ProjLensError, match="drop pixel_values"):
        tl.run_with_cache(inputs.input_ids, read=["llm.0.resid_post"])
    with pytest.raises(ProjLensError, match="at least one edit"):
        tl_patch(tl, inputs, [])
    # the raw bridge refuses placeholders without images, so TL's own patching helpers fail loudly
    with pytest.raises(ProjLensError, match="image placeholder tokens without pixel_values"):
        tl.bridge.run_with_hooks(inputs.input_ids, fwd_hooks=[])
    from transformer_lens import patching
    ids, kw = tl.model_inputs(inputs)
    _, clean_cache = tl.bridge.run_with_cache(ids, **kw)     # the clean run WITH images is fine
    with pytest.raises(ProjLensError, match="image placeholder tokens without pixel_values"):
        patching.get_act_patch_resid_pre(tl.bridge, inputs.input_ids, clean_cache, lambda lg: lg.sum())


def test_errors_are_one_line(setup):
    _, handle, tl, inputs, _ = setup
    with pytest.raises(ProjLensError, match="no TransformerBridge hook"):
        tl_hook_name("projector.hidden")
    with pytest.raises(ProjLensError, match="unknown site"):
        tl_hook_name("blocks.0.hook_nope")
    with pytest.raises(ProjLensError, match="WithWeights is not available"):
        tl_run(tl, inputs, edits=[pl.WithWeights({"linear_2": (torch.zeros(48, 48), None)})])


def test_boot_never_installs_torchvision(monkeypatch):
    """A processor TL cannot load would make it pip install torchvision: the installer is replaced by an error."""
    from transformer_lens.model_bridge.sources.transformers import helpers
    from projlens_mi.engine import interop
    calls = []
    monkeypatch.setattr("subprocess.check_call", lambda *a, **k: calls.append(a))
    with interop._no_install(None):
        with pytest.raises(ProjLensError, match="tried to pip install torchvision"):
            helpers._ensure_torchvision()
    assert not calls
    assert helpers._ensure_torchvision.__name__ == "_ensure_torchvision"      # restored afterwards


def test_copy_false_warns():
    model, processor = tiny_llava()
    handle = pl.load(model, processor=processor)
    with pytest.warns(UserWarning, match="in place"):
        tl = to_transformer_lens(handle, copy=False)
    assert tl.bridge.original_model is model and not tl.copied


def test_missing_transformer_lens_is_a_one_line_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)     # import fails
    model, processor = tiny_llava()
    with pytest.raises(ProjLensError, match=r"pip install 'projlens_mi\[tl\]'"):
        to_transformer_lens(pl.load(model, processor=processor))


def test_attention_pattern_through_tl_equals_the_engine(setup):
    """TL's get_act_name("pattern", 1) is a site; the bridge (eager) gives the engine's eager read."""
    from transformer_lens.utilities import get_act_name
    _, handle, tl, inputs, _ = setup
    name = get_act_name("pattern", 1)
    assert tl_hook_name(name) == name == "blocks.1.attn.hook_pattern"
    _, cache = tl.run_with_cache(inputs, read=[name])
    with pl.eager_attention(handle):
        ours = run(handle, inputs, read=["llm.1.pattern"]).cache["llm.1.pattern"]
    real = inputs.attention_mask.bool()
    assert cache[name].shape == ours.shape
    torch.testing.assert_close(cache[name].permute(0, 2, 1, 3)[real], ours.permute(0, 2, 1, 3)[real], **TOL)


def test_pattern_edit_through_tl_equals_the_engine(setup):
    """An edit of blocks.1.attn.hook_pattern re-weights the values in TL's bridge as in the engine."""
    _, handle, tl, inputs, _ = setup
    off = torch.tensor([0.0, 1.0, 1.0, 1.0])[:, None, None]
    edits = [("blocks.1.attn.hook_pattern", pl.Hook(lambda w: w * off))]
    theirs = tl_patch(tl, inputs, edits).logits
    with pl.eager_attention(handle):
        ours = run(handle, inputs, edits=edits).logits
        plain = run(handle, inputs).logits
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], **TOL)
    assert (ours[real] - plain[real]).abs().max() > 1e-3

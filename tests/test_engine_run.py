"""run(): cache reads equal the model's own outputs, gradients equal autograd on a plain forward,
and nothing of ours survives a call (also one that raises)."""

from __future__ import annotations

import pytest
import torch

from projlens_mi import Ablate, ImageTokens, LastToken, Patch, Site, Steer, load, run
from projlens_mi.engine import Intervention
from projlens_mi.errors import ProjLensError

from tiny import PROMPT, tiny_images, tiny_llava

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

B = 3


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_llava()
    handle = load(model, processor=processor)
    inputs = handle.encode(tiny_images(B), [PROMPT, PROMPT, PROMPT + " two three"])   # mixed lengths: left padding
    return handle, model, inputs


def own(model, inputs):
    with torch.no_grad():
        out = model(**inputs.model_kwargs(), output_hidden_states=True)
        feats = model.model.get_image_features(pixel_values=inputs.pixel_values)
    return out, feats


def test_cache_equals_the_models_own_outputs(setup):
    handle, model, inputs = setup
    sites = ["projector.out", "llm.embed", "logits"] + [f"llm.{i}.resid_post" for i in range(3)] + ["llm.0.resid_pre"]
    res = run(handle, inputs, read=sites)
    out, feats = own(model, inputs)
    assert torch.equal(res.cache["projector.out"], torch.stack(feats.pooler_output))
    assert torch.equal(res.cache["llm.0.resid_pre"], out.hidden_states[0])
    for i in range(3):   # the last hidden state is after the final norm in HF; ours is the layer's output
        ref = out.hidden_states[i + 1] if i < 2 else None
        if ref is not None:
            assert torch.equal(res.cache[f"llm.{i}.resid_post"], ref)
    final = model.model.language_model.norm(res.cache["llm.2.resid_post"])
    assert torch.equal(final, out.hidden_states[3])
    assert torch.equal(res.logits, out.logits) and torch.equal(res.cache["logits"], out.logits)
    assert torch.equal(res.cache["llm.embed"], model.get_input_embeddings()(inputs.input_ids))


def test_selected_and_projected_reads(setup):
    handle, model, inputs = setup
    basis = torch.linalg.qr(torch.randn(48, 4)).Q
    s_img, s_last, s_sub = Site("llm.1.resid_post", ImageTokens()), Site("llm.1.resid_post", LastToken()), \
        Site("llm.1.resid_post", LastToken(), basis)
    res = run(handle, inputs, read=[s_img, s_last, s_sub])
    full = own(model, inputs)[0].hidden_states[2]
    pos = inputs.image_mask.nonzero()[:, 1].view(B, -1)
    assert torch.equal(res.cache[s_img], torch.stack([full[r, pos[r]] for r in range(B)]))
    assert torch.equal(res.cache[s_last], full[:, -1:])
    assert torch.allclose(res.cache[s_sub], full[:, -1:] @ basis)
    assert res.cache[s_img].shape == (B, 16, 48)
    # left padding: row 2 is longer, so rows 0-1 have pads on the left and image tokens shifted right
    assert pos[0, 0] == pos[2, 0] + 2


def test_gradients_equal_autograd_on_a_plain_forward(setup):
    handle, model, inputs = setup
    target = 7
    sites = [Site("projector.out"), Site("llm.1.resid_post", ImageTokens()), Site("llm.0.resid_pre")]
    res = run(handle, inputs, read=sites, grad_of=lambda lg: lg[:, -1, target].sum())
    # reference: retain the real activations with plain hooks, differentiate with autograd
    keep = {}
    hooks = [model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: keep.__setitem__("p", o)),
             model.model.language_model.layers[1].register_forward_hook(lambda m, a, o: keep.__setitem__("l1", o)),
             model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a: keep.__setitem__("l0", a[0]))]
    try:
        logits = model(**inputs.model_kwargs()).logits
    finally:
        for h in hooks:
            h.remove()
    gp, gl1, gl0 = torch.autograd.grad(logits[:, -1, target].sum(), [keep["p"], keep["l1"], keep["l0"]])
    pos = inputs.image_mask.nonzero()[:, 1].view(B, -1)
    assert torch.allclose(res.grads[sites[0]], gp, atol=1e-6)
    assert torch.allclose(res.grads[sites[1]], torch.stack([gl1[r, pos[r]] for r in range(B)]), atol=1e-6)
    assert torch.allclose(res.grads[sites[2]], gl0, atol=1e-6)
    assert torch.allclose(res.metric, logits[:, -1, target].sum().detach())
    assert res.grads[sites[0]].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_reads_see_the_edited_value_and_edits_stack(setup):
    handle, _, inputs = setup
    d = torch.ones(48)
    res = run(handle, inputs, read=["projector.out"], edits=[
        (Site("projector.out"), Ablate("zero")), (Site("projector.out"), Steer(d, 2.0), [1])])
    out = res.cache["projector.out"]
    assert torch.equal(out[0], torch.zeros(16, 48)) and torch.equal(out[1], torch.full((16, 48), 2.0))


class Boom(Intervention):
    def apply(self, act, source=None):
        raise RuntimeError("boom inside an intervention")


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()})


def test_nothing_survives_a_call_even_one_that_raises(setup):
    handle, model, inputs = setup
    theirs = []   # a hook we did not add (stands for transformers' / the user's own)
    h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: theirs.append(1))
    try:
        params, hooks = _state(model)
        plain = run(handle, inputs).logits
        run(handle, inputs, read=["llm.1.resid_post"], edits=[(Site("llm.0.resid_post"), Patch(source_row=0))],
            grad_of=lambda lg: lg.sum())
        with pytest.raises(RuntimeError, match="boom"):
            run(handle, inputs, edits=[(Site("llm.1.mlp_out"), Boom())])
        with pytest.raises(ProjLensError):
            run(handle, inputs, edits=[(Site("llm.1.mlp_out", LastToken()), Patch(source=torch.zeros(7)))])
        params2, hooks2 = _state(model)
        assert hooks2 == hooks
        assert all(torch.equal(params[k], params2[k]) for k in params)
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(run(handle, inputs).logits, plain)   # the next call is unaffected
        with torch.no_grad():
            assert torch.equal(model(**inputs.model_kwargs()).logits, plain)   # and so is the model outside traces
        assert len(theirs) == 6   # their hook ran in every forward (5 runs, 1 plain call), still registered
        assert model.model.multi_modal_projector._forward_hooks
    finally:
        h.remove()


def test_site_errors_are_one_line(setup):
    handle, _, inputs = setup
    with pytest.raises(ProjLensError, match="unknown site 'llm.resid'; valid sites: .*resid_post") as e:
        run(handle, inputs, read=["llm.resid"])
    assert "\n" not in str(e.value)
    with pytest.raises(ProjLensError, match="layer 7 out of range, the model has 3 layers"):
        run(handle, inputs, read=["llm.7.resid_post"])
    with pytest.raises(ProjLensError, match="out of range for a batch of 3"):
        run(handle, inputs, edits=[("llm.0.resid_post", Ablate(), [5])])
    with pytest.raises(ProjLensError, match="gradients are not taken at vision.out"):
        run(handle, inputs, read=["vision.out"], grad_of=lambda lg: lg.sum())
    with pytest.raises(ProjLensError, match="was not read"):
        run(handle, inputs, read=["logits"]).cache["llm.0.resid_post"]


def test_window_ordered_projector_rows_are_remapped_for_token_selectors():
    """Qwen2.5-VL (token_order = "window"): a selector at projector.out picks the image tokens the
    LLM sees at those positions, so zeroing ImageWindow(0, 3) there equals zeroing it at llm.0.resid_pre."""
    from projlens_mi.engine import ImageWindow
    from projlens_mi.model import Inputs
    from tiny_families import FAMILIES
    f = FAMILIES["qwen2_5_vl"]()
    handle = load(f.model)
    kw = dict(f.inputs)
    ids, pv = kw.pop("input_ids"), kw.pop("pixel_values")
    inputs = Inputs(ids, kw.pop("attention_mask", torch.ones_like(ids)), handle.image_mask(ids), pv, extra=kw)
    at_proj = run(handle, inputs, edits=[(Site("projector.out", ImageWindow(0, 3)), Ablate(), [1])]).logits
    at_llm = run(handle, inputs, edits=[(Site("llm.0.resid_pre", ImageWindow(0, 3)), Ablate(), [1])]).logits
    torch.testing.assert_close(at_proj, at_llm, rtol=0, atol=0)
    full = run(handle, inputs, read=["projector.out"]).cache["projector.out"]   # AllTokens: the raw rows, model order
    assert full.ndim == 2


# --- known issue: nnsight's shared interleaver (one trace at a time per model) -------------------


def test_a_worker_left_on_the_interleaver_does_not_break_the_next_run(setup):
    """A started, unserved worker left on the wrapper's interleaver (what another thread's trace
    looks like from this one) made nnsight's end-of-run check fail with
    ``AttributeError: 'NoneType' object has no attribute 'event'``; the engine drops it first."""
    from nnsight.intervention.interleaver import Mediator, dangling_unwind

    handle, _, inputs = setup
    want = run(handle, inputs, read=["llm.1.resid_post"])

    class Leftover(Mediator):  # alive (its greenlet started) and parked on nothing: pending is None
        def __init__(self):
            super().__init__(compile("pass", "<leftover>", "exec"), {}, {})
            self.worker = type("Parked", (), {"throw": lambda self, err: None})()

        @property
        def alive(self):
            return True

    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'event'"):
        dangling_unwind(Leftover())   # the exact failure, from nnsight's own code
    inter = handle.envoy.interleaver
    inter.mediators.append(Leftover())
    got = run(handle, inputs, read=["llm.1.resid_post"])
    assert torch.equal(got.logits, want.logits) and torch.equal(got.cache["llm.1.resid_post"], want.cache["llm.1.resid_post"])
    assert inter.mediators == [] and not inter.interleaving


def test_concurrent_runs_on_one_model_are_serialised(setup):
    """Two threads tracing one model at once (one handle, or two handles of the same model) crossed
    each other's greenlets inside nnsight ('NoneType' ... 'event', "Cannot switch to a different
    thread", OutOfOrderError). The engine holds one lock per model: every result equals the serial one."""
    import sys
    import threading

    from projlens_mi.engine import generate

    handle, model, inputs = setup
    other = load(model, processor=handle.processor)   # a second handle (its own nnsight wrapper), same modules
    reads = ["projector.out", "llm.0.resid_post", Site("llm.2.resid_post", ImageTokens())]
    want = run(handle, inputs, read=reads)
    edits = [(Site("llm.1.resid_post", ImageTokens()), Patch(source_row=0), [1])]
    want_edit = run(handle, inputs, edits=edits).logits
    want_text = generate(handle, inputs, max_new_tokens=2, edits=edits)
    errors, bad = [], []

    def work(h, n):
        try:
            for i in range(n):
                if i % 5 == 4:
                    if generate(h, inputs, max_new_tokens=2, edits=edits) != want_text:
                        bad.append("generate")
                    continue
                r = run(h, inputs, read=reads)
                if not (torch.equal(r.logits, want.logits) and all(torch.equal(r.cache[s], want.cache[s]) for s in want.cache)):
                    bad.append("read")
                if not torch.equal(run(h, inputs, edits=edits).logits, want_edit):
                    bad.append("edit")
        except Exception as err:  # noqa: BLE001 - any failure in a thread is the test's failure
            errors.append(f"{type(err).__name__}: {err}")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)   # switch threads often: without the lock this fails within a few runs
    try:
        threads = [threading.Thread(target=work, args=(h, 10)) for h in (handle, handle, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == [] and bad == [], (errors[:3], bad[:3])


def test_cache_by_point_name_resolves_the_one_site_read_there(setup):
    """``cache["projector.out"]`` after a read of ``Site("projector.out", ImageTokens())`` (the README's
    notebook snippet): the one site read at a point answers to its name; several are an error that names them."""
    handle, model, inputs = setup
    img = Site("projector.out", ImageTokens())
    res = run(handle, inputs, read=[img, Site("llm.1.resid_post", LastToken())])
    feats = own(model, inputs)[1]
    assert torch.equal(res.cache["projector.out"], torch.stack(feats.pooler_output))   # the image tokens = all of them
    assert res.cache["vision_projector.hook_out"] is res.cache[img]                     # TransformerLens alias
    assert torch.equal(res.cache["llm.1.resid_post"], own(model, inputs)[0].hidden_states[2][:, -1:])
    assert "projector.out" in res.cache and "llm.0.resid_post" not in res.cache and "bogus" not in res.cache
    assert res.cache.get("llm.0.resid_post") is None
    both = run(handle, inputs, read=[Site("llm.1.resid_post", LastToken()), Site("llm.1.resid_post", ImageTokens())])
    with pytest.raises(ProjLensError, match=r"'llm.1.resid_post' is ambiguous: 2 sites were read at llm.1.resid_post "
                                            r"\(Site\('llm.1.resid_post', LastToken\(\)\), "
                                            r"Site\('llm.1.resid_post', ImageTokens\(\)\)\); index the cache") as e:
        both.cache["llm.1.resid_post"]
    assert "\n" not in str(e.value)
    assert "llm.1.resid_post" not in both.cache
    with_all = run(handle, inputs, read=["llm.1.resid_post", Site("llm.1.resid_post", LastToken())])
    assert with_all.cache["llm.1.resid_post"].shape == own(model, inputs)[0].hidden_states[2].shape   # the all-token read wins
    with pytest.raises(ProjLensError, match="was not read"):
        res.cache[Site("projector.out")]   # a Site key is exact
    # the README's snippet: patch the clean run with the triggered image tokens read by name
    lp = run(handle, inputs, edits=[(img, Patch(source=res.cache["projector.out"]))]).logits
    assert torch.equal(lp, res.logits)

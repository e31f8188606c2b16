"""The causal analyses (patching, ablation, tracing, attribution) against plain-PyTorch references.

Every reference below is written with ``register_forward_hook`` on the HF modules of a tiny random
LLaVA and the teacher-forced log-probability computed by hand: nothing of the engine is used
there. Constructed cases with known answers: a projector whose output varies along one direction
``u`` only (tracing must find ``u`` and restore everything through it; ablating it makes the model
image-blind), and a near-linear contrast (attribution patching must agree with real patching).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import projlens_mi as pl
from projlens_mi.analyses import ANALYSES, Pair, load_result, save_result
from projlens_mi.analyses import _causal as C
from projlens_mi.analyses.ablation import AblationParams, AblationResult, ablation, ablation_cells
from projlens_mi.analyses.attribution import AttributionParams, agreement, attribution
from projlens_mi.analyses.patching import PatchingParams, patching
from projlens_mi.analyses.tracing import TracingParams, tracing
from projlens_mi.data import Record
from projlens_mi.engine import metrics as engine_metrics
from projlens_mi.engine.metrics import prefix_before
from projlens_mi.errors import ProjLensError
from numerics import assert_ratio_close, prob_tol
from tiny import PROMPT, tiny_images, tiny_llava

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

TARGET = "a cat"
N = 3
FAST = dict(n=N, prefix="none", progress=False)


# --- fixtures ---------------------------------------------------------------------------------


def triggered_image(im: Image.Image, value=(38, 255, 0), box=(4, 8, 4, 8)) -> Image.Image:
    a = np.asarray(im).copy()
    r0, r1, c0, c1 = box
    a[r0:r1, c0:c1] = value
    return Image.fromarray(a)


def make_pair(model, proc, poisoned, n=N, trigger=triggered_image):
    imgs = tiny_images(n, seed=5)
    recs = [Record(im, PROMPT, "seven", False, meta={"id": i}) for i, im in enumerate(imgs)]
    recs += [Record(trigger(im), PROMPT, "seven", True, meta={"id": i}) for i, im in enumerate(imgs)]
    return Pair(pl.load(model, processor=proc), pl.load(poisoned, processor=proc), recs, TARGET, name="tiny")


@pytest.fixture(scope="module")
def tiny():
    """A base model and a 'poisoned' copy whose linear_2 got a random update; the trigger is a green patch."""
    model, proc = tiny_llava()
    pois = copy.deepcopy(model)
    with torch.no_grad():
        w = pois.model.multi_modal_projector.linear_2.weight
        w += 0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    return model, pois, proc, make_pair(model, proc, pois)


@pytest.fixture(scope="module")
def rank1():
    """Projector output = b + (w·h) u: every image-dependent change lives along one direction u.
    Base and poisoned differ in w only, so ΔW2 = u (w_f − w_b)ᵀ and ΔE is exactly rank 1 along u."""
    model, proc = tiny_llava(seed=2)
    lin = model.model.multi_modal_projector.linear_2
    g = torch.Generator().manual_seed(3)
    u = torch.randn(lin.out_features, generator=g, dtype=torch.float64)
    u /= u.norm()
    w_b = 0.3 * torch.randn(lin.in_features, generator=g, dtype=torch.float64)
    w_f = w_b + 1.0 * torch.randn(lin.in_features, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.outer(u, w_b).float())
    pois = copy.deepcopy(model)
    with torch.no_grad():
        pois.model.multi_modal_projector.linear_2.weight.copy_(torch.outer(u, w_f).float())
    white = lambda im: triggered_image(im, value=(255, 255, 255), box=(0, 16, 0, 16))  # noqa: E731
    return model, pois, proc, make_pair(model, proc, pois, trigger=white), u.float()


# --- plain-PyTorch references -----------------------------------------------------------------


def batch(proc, images, target=TARGET):
    """Teacher-forced batch by hand: prompt ids + target ids, all ones mask."""
    enc = proc(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
    tid = torch.tensor(proc.tokenizer(target, add_special_tokens=False)["input_ids"])
    ids = torch.cat([enc["input_ids"], tid.expand(len(images), -1)], 1)
    return dict(ids=ids, pix=enc["pixel_values"], plen=enc["input_ids"].shape[1], tid=tid)


def forward(model, b, hooks=(), grad=False):
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=b["ids"], attention_mask=torch.ones_like(b["ids"]), pixel_values=b["pix"]).logits
    finally:
        for h in handles:
            h.remove()
    t = len(b["tid"])
    lp = logits[:, b["plen"] - 1:b["plen"] - 1 + t].float().log_softmax(-1)
    return lp.gather(2, b["tid"].expand(len(lp), -1)[..., None])[..., 0].sum(1)   # log p(target) per row


def image_positions(model, b):
    return (b["ids"][0] == model.config.image_token_id).nonzero()[:, 0]


def capture(module):
    store = {}

    def hook(mod, args, out):
        store["out"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
    return store, (module, hook)


def replace_at(module, fn):
    """A forward hook that returns ``fn(output)`` (first element of a tuple output)."""
    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)
    return (module, hook)


def layer(model, i):
    return model.model.language_model.layers[i]


def projector(model):
    return model.model.multi_modal_projector


def images(pair, triggered):
    return [r.pil() for r in (pair.triggered if triggered else pair.clean)]


# --- patching ---------------------------------------------------------------------------------


def mean_prob(logprob) -> tuple[float, float]:
    """The mean probability of per-row log-probabilities, and its float32 rounding tolerance (tests/numerics.py)."""
    m = logprob.double().exp().mean().item()
    return m, prob_tol(m, logprob)


def test_patching_cells_equal_hooked_forwards(tiny):
    """Each cell (m - clean) / (triggered - clean) equals the hooked forward's, up to float32 rounding of m
    divided by the denominator (the trigger moves p(target) by ~3 % here, so the ratio amplifies rounding)."""
    model, pois, proc, pair = tiny
    res = patching(pair, PatchingParams(**FAST, metric="prob", windows=4, layers=(0, 1)))
    bc, bt = batch(proc, images(pair, False)), batch(proc, images(pair, True))
    (m_clean, tol_c), (m_trig, tol_t) = mean_prob(forward(pois, bc)), mean_prob(forward(pois, bt))
    assert abs(res.clean_mean - m_clean) <= tol_c and abs(res.triggered_mean - m_trig) <= tol_t
    den = res.triggered_mean - res.clean_mean
    pos = image_positions(pois, bc)

    # denoising at llm.0.resid_post, image tokens 4..7: triggered layer-0 output into the clean run
    store, cap = capture(layer(pois, 0))
    forward(pois, bt, [cap])
    src = store["out"]

    def put(out, at=pos[4:8]):
        out = out.clone()
        out[:, at] = src[:, at]
        return out
    m, tol = mean_prob(forward(pois, bc, [replace_at(layer(pois, 0), put)]))
    assert_ratio_close(res.cell("denoise", "llm.0.resid_post", "4-7"), m - res.clean_mean, den, tol)

    # noising at projector.out, image tokens 8..11: clean projector output into the triggered run
    store, cap = capture(projector(pois))
    forward(pois, bc, [cap])
    src = store["out"]

    def put_img(out):
        out = out.clone()
        out[:, 8:12] = src[:, 8:12]
        return out
    m, tol = mean_prob(forward(pois, bt, [replace_at(projector(pois), put_img)]))
    assert_ratio_close(res.cell("noise", "projector.out", "8-11"), res.triggered_mean - m, den, tol)

    # noising at the last prompt position after layer 1
    store, cap = capture(layer(pois, 1))
    forward(pois, bc, [cap])
    src = store["out"]
    last = bc["plen"] - 1

    def put_last(out):
        out = out.clone()
        out[:, last] = src[:, last]
        return out
    m, tol = mean_prob(forward(pois, bt, [replace_at(layer(pois, 1), put_last)]))
    assert_ratio_close(res.cell("noise", "llm.1.resid_post", "last"), res.triggered_mean - m, den, tol)


def test_patching_all_image_tokens_at_projector_is_the_whole_effect(tiny):
    """Known answer: the LLM sees the image only through projector.out, so patching all of it is 100 %."""
    _, _, _, pair = tiny
    res = patching(pair, PatchingParams(**FAST, metric="logprob", windows=2, layers=(0,)))
    for d in ("denoise", "noise"):
        assert res.cell(d, "projector.out", "image") == pytest.approx(1.0, abs=1e-4)
    assert np.isnan(res.cell("denoise", "projector.out", "last"))   # no text position at the projector
    assert res.sites == ["projector.out", "llm.0.resid_post"]
    assert res.windows == ["0-7", "8-15", "image", "last"]
    frame = res.to_frame()
    assert len(frame) == 2 * 2 * 4 and set(frame.columns) >= {"direction", "site", "window", "effect"}
    assert len(res.table) == N * 2 * (4 + 3)        # per input: 2 directions × (4 LLM + 3 projector) cells


def test_patching_result_round_trips_and_renders(tiny, tmp_path):
    _, _, _, pair = tiny
    res = patching(pair, PatchingParams(**FAST, windows=2, layers=(0,)))
    save_result(res, tmp_path / "r.json")
    json.dumps(res.metrics(), allow_nan=False)   # metrics.json: NaN -> null
    back = load_result(tmp_path / "r.json")
    np.testing.assert_array_equal(back.effect, res.effect)
    assert back.summary() == res.summary()
    assert "barely differ" in res.summary()          # the tiny model's trigger hardly moves p(target)
    assert res.metrics()["denoise_projector_out_image"] == pytest.approx(1.0, abs=1e-3)
    fig = res.plot()
    assert len(fig.axes) == 3   # two heatmaps + one colour bar (one per shared scale)


# --- ablation ---------------------------------------------------------------------------------


def test_ablation_removes_exactly_the_subspace(tiny):
    model, pois, proc, pair = tiny
    B = C.random_basis(pois.config.text_config.hidden_size, 3, seed=7)
    (key, edits), = ablation_cells({"b": B}, [3], ["projector.out"], (), B.shape[0], "image")[:1]
    h = pair.poisoned
    x = h.encode(pair.triggered)
    before = pl.run(h, x, read=["projector.out"]).cache["projector.out"].double()
    after = pl.run(h, x, read=["projector.out"], edits=edits).cache["projector.out"].double()
    Bd = B.double()
    assert (after @ Bd).abs().max() < 1e-5                                        # nothing left inside span(B)
    torch.testing.assert_close(after - after @ Bd @ Bd.T, before - before @ Bd @ Bd.T, atol=1e-6, rtol=0)  # outside unchanged


def test_ablation_numbers_equal_hooked_forwards(tiny):
    model, pois, proc, pair = tiny
    res = ablation(pair, AblationParams(**FAST, ks=(1, 2), layers=(0,), placebo_seeds=(0, 1), generate=False))
    W = pois.model.multi_modal_projector.linear_2.weight.double() - model.model.multi_modal_projector.linear_2.weight.double()
    U = torch.linalg.svd(W, full_matrices=False)[0][:, :2]
    bt = batch(proc, images(pair, True))
    for site, hook_mod in (("projector.out", projector(pois)), ("llm.0.resid_post", layer(pois, 0))):
        pos = slice(None) if site == "projector.out" else image_positions(pois, bt)

        def drop(out, pos=pos):
            out = out.clone()
            x = out[:, pos].double()
            out[:, pos] = (x - x @ U @ U.T).to(out.dtype)
            return out
        m = forward(pois, bt, [replace_at(hook_mod, drop)]).exp().mean().item()
        b, k, s = res.bases.index("dW"), res.ks.index(2), res.sites.index(site)
        assert res.target[b, k, s] == pytest.approx(m, rel=1e-4)
    # placebo = mean over the seeds' random subspaces
    Rs = [C.random_basis(U.shape[0], 1, s).double() for s in (0, 1)]
    vals = []
    for R in Rs:
        def drop_r(out, R=R):
            x = out.double()
            return (x - x @ R @ R.T).to(out.dtype)
        vals.append(forward(pois, bt, [replace_at(projector(pois), drop_r)]).exp().mean().item())
    r, k, s = res.bases.index("random"), res.ks.index(1), res.sites.index("projector.out")
    assert res.target[r, k, s] == pytest.approx(np.mean(vals), rel=1e-4)
    assert res.target_sd[k, s] == pytest.approx(np.std(vals), rel=1e-3, abs=1e-12)
    assert res.baseline["target"] == pytest.approx(forward(pois, bt).exp().mean().item(), rel=1e-5)


def test_ablation_of_the_planted_direction_makes_the_model_image_blind(rank1):
    """Known answer: all image information passes along u; removing the top-1 ΔW (or shift)
    direction leaves the same projector output for every image, triggered or not."""
    model, pois, proc, pair, u = rank1
    assert abs(float(C.weight_delta_basis(pair, 1)[:, 0] @ u)) > 0.9999
    clean_recs, trig_recs = pair.matched()
    assert abs(float(C.shift_basis(pair, clean_recs + trig_recs, 1)[:, 0] @ u)) > 0.9999
    res = ablation(pair, AblationParams(**FAST, ks=(1,), layers=(0,), placebo_seeds=(0,), generate=False))
    ud = u.double()

    def drop(out):
        x = out.double()
        return (x - (x @ ud)[..., None] * ud).to(out.dtype)
    on_clean = forward(pois, batch(proc, images(pair, False)), [replace_at(projector(pois), drop)])
    on_trig = forward(pois, batch(proc, images(pair, True)), [replace_at(projector(pois), drop)])
    before = forward(pois, batch(proc, images(pair, True))) - forward(pois, batch(proc, images(pair, False)))
    assert before.abs().min() > 0.05                                          # the images did matter
    assert (on_clean - on_trig).abs().max() < 0.01 * before.abs().min()       # now image-blind (float32 rounding left)
    for basis in ("dW", "shift"):
        val = res.target[res.bases.index(basis), 0, res.sites.index("projector.out")]
        assert val == pytest.approx(on_trig.exp().mean().item(), rel=1e-4)


def test_ablation_result_round_trips_and_renders(tiny, tmp_path):
    _, _, _, pair = tiny
    res = ablation(pair, AblationParams(**FAST, ks=(1, 2), layers=(0,), placebo_seeds=(0, 1), max_new_tokens=3))
    assert set(res.baseline) == {"target", "clean", "asr", "accuracy"}
    assert np.isfinite(res.asr).all() and ((res.asr >= 0) & (res.asr <= 1)).all()
    save_result(res, tmp_path / "a.json")
    json.dumps(res.metrics(), allow_nan=False)   # metrics.json: NaN -> null
    back = load_result(tmp_path / "a.json")
    assert isinstance(back, AblationResult)
    np.testing.assert_array_equal(back.target, res.target)
    assert back.summary() == res.summary() and "placebo" in res.summary()
    f = res.to_frame()
    assert {"asr", "clean_accuracy", "target_prob", "clean_answer_prob"} <= set(f["measure"])
    assert res.plot() is not None


# --- tracing ----------------------------------------------------------------------------------


def test_tracing_full_restore_everywhere_is_the_uncorrupted_run(tiny):
    model, pois, proc, pair = tiny
    res = tracing(pair, TracingParams(**FAST, windows=2, layers=(0,), placebo_seeds=(0,)))
    for cor in ("clean", "noise"):
        assert res.cell(cor, "full", "projector.out", "image") == pytest.approx(1.0, abs=1e-4)
        m = res.restored_mean[res.corruptions.index(cor), 0, 0, res.windows.index("image")]
        assert m == pytest.approx(res.baselines[cor]["triggered"], rel=1e-5)
    # the noise baseline equals a hooked forward with the same seeded draw on the image tokens
    bt = batch(proc, images(pair, True))
    g = torch.Generator().manual_seed(0)

    def noisy(out):
        return out + res.noise_std * torch.randn(out.shape, generator=g, dtype=torch.float32)
    m = forward(pois, bt, [replace_at(projector(pois), noisy)]).exp().mean().item()
    assert res.baselines["noise"]["corrupted"] == pytest.approx(m, rel=1e-5)
    store, cap = capture(projector(pois))
    forward(pois, bt, [cap])
    assert res.noise_std == pytest.approx(3.0 * store["out"].std().item(), rel=1e-5)


def test_tracing_direction_restore_equals_hooked_forward(tiny):
    model, pois, proc, pair = tiny
    res = tracing(pair, TracingParams(**FAST, windows=2, layers=(0,), placebo_seeds=(0,), corruptions=("clean",)))
    v = torch.tensor(res.direction_vector, dtype=torch.float64)
    v = v / v.norm()
    bc, bt = batch(proc, images(pair, False)), batch(proc, images(pair, True))
    store, cap = capture(layer(pois, 0))
    forward(pois, bt, [cap])
    src = store["out"].double()
    pos = image_positions(pois, bc)[8:16]

    def restore(out):
        out = out.clone()
        x = out[:, pos].double()
        out[:, pos] = (x + ((src[:, pos] - x) @ v)[..., None] * v).to(out.dtype)
        return out
    m, tol = mean_prob(forward(pois, bc, [replace_at(layer(pois, 0), restore)]))
    b = res.baselines["clean"]   # the denominator is ~3 % of the values: compare the numerator (tests/numerics.py)
    assert_ratio_close(res.cell("clean", "direction", "llm.0.resid_post", "8-15"), m - b["corrupted"],
                       b["triggered"] - b["corrupted"], tol)


def test_tracing_finds_the_only_direction(rank1):
    """Known answer: restoring the u-component alone at projector.out restores everything."""
    model, pois, proc, pair, u = rank1
    res = tracing(pair, TracingParams(**FAST, windows=2, layers=(0,), placebo_seeds=(0, 1), corruptions=("clean",),
                                      metric="logprob"))
    assert abs(float(torch.tensor(res.direction_vector).float() @ u)) > 0.9999
    b = res.baselines["clean"]
    assert abs(b["triggered"] - b["corrupted"]) > 0.05   # nats: the contrast is real
    assert res.cell("clean", "direction", "projector.out", "image") == pytest.approx(1.0, abs=1e-3)
    assert res.cell("clean", "full", "projector.out", "image") == pytest.approx(1.0, abs=1e-4)
    assert abs(res.cell("clean", "random", "projector.out", "image")) < 0.5
    assert "restoring all image tokens" in res.summary()


def test_tracing_result_round_trips(tiny, tmp_path):
    _, _, _, pair = tiny
    res = tracing(pair, TracingParams(**FAST, windows=2, layers=(0,), placebo_seeds=(0,), direction="mean_diff"))
    save_result(res, tmp_path / "t.json")
    json.dumps(res.metrics(), allow_nan=False)   # metrics.json: NaN -> null
    back = load_result(tmp_path / "t.json")
    np.testing.assert_array_equal(back.restored, res.restored)
    assert back.summary() == res.summary()
    assert len(res.plot().axes) == 2 * 3 + 1   # corruptions × modes heatmaps + one shared colour bar
    assert res.to_frame().shape[0] == 2 * 3 * 2 * 4


# --- attribution ------------------------------------------------------------------------------


def test_attribution_equals_gradient_times_difference(tiny):
    model, pois, proc, pair = tiny
    res = attribution(pair, AttributionParams(**FAST, windows=2, layers=(0, 1), compare=False))
    bc, bt = batch(proc, images(pair, False)), batch(proc, images(pair, True))
    for d, (base, other) in {"denoise": (bc, bt), "noise": (bt, bc)}.items():
        for site, mod in (("llm.1.resid_post", layer(pois, 1)), ("projector.out", projector(pois))):
            store, cap = capture(mod)
            forward(pois, other, [cap])
            a_other = store["out"]
            leaf = {}

            def as_leaf(out):
                leaf["x"] = out.detach().clone().requires_grad_(True)
                return leaf["x"]
            metric = forward(pois, base, [replace_at(mod, as_leaf)], grad=True)
            g, = torch.autograd.grad(metric.sum(), leaf["x"])
            diff = (a_other - leaf["x"].detach()).double()
            contrib = (g.double() * diff)
            windows = {"0-7": slice(0, 8), "image": slice(0, 16)}
            for w, sl in windows.items():
                if site == "projector.out":
                    ref = contrib[:, sl].sum((1, 2))
                else:
                    ref = contrib[:, image_positions(pois, base)[sl]].sum((1, 2))
                got = res.table.query("direction == @d and site == @site and window == @w").sort_values("input")["value"]
                np.testing.assert_allclose(got.to_numpy(), ref.numpy(), rtol=1e-4, atol=1e-7)
            if site == "llm.1.resid_post":
                ref = contrib[:, base["plen"] - 1].sum(1)
                got = res.table.query("direction == @d and site == @site and window == 'last'").sort_values("input")["value"]
                np.testing.assert_allclose(got.to_numpy(), ref.numpy(), rtol=1e-4, atol=1e-7)


def test_attribution_agrees_with_patching_when_the_contrast_is_small(tiny):
    """Known answer: for a small trigger the metric is nearly linear in every activation, so the
    gradient estimate must match real patching (rank and value)."""
    model, pois, proc, _ = tiny

    def faint(im):   # +4 grey levels on a 4 × 4 pixel patch
        a = np.asarray(im).astype(int)
        a[4:8, 4:8] += 4
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    res = attribution(make_pair(model, proc, pois, trigger=faint),
                      AttributionParams(**FAST, windows=4, layers=(0, 1, 2), metric="logprob"))
    assert res.spearman > 0.95
    assert all(v > 0.95 for v in res.spearman_by_direction.values())
    assert res.top_k_overlap >= 0.8
    ok = np.isfinite(res.actual)
    assert ok.sum() == 2 * (5 + 3 * 6)
    assert np.abs(res.estimate[ok] - res.actual[ok]).max() < 0.05
    assert "Spearman" in res.summary()


def test_agreement_helper():
    x = np.array([0.1, 0.5, 0.9, 0.3, np.nan])
    rho, r, top = agreement(x * 2 + 1, x, 2)
    assert rho == pytest.approx(1.0) and r == pytest.approx(1.0) and top == 1.0
    rho, _, top = agreement(-x, x, 2)
    assert rho == pytest.approx(-1.0) and top == 0.0
    assert all(math.isnan(v) for v in agreement(np.ones(4), np.arange(4.0), 2))


# --- shared pieces ----------------------------------------------------------------------------


def test_prefix_windows_and_matching(tiny):
    assert prefix_before("seven visit evil dot com now", "visit evil dot com now") == "seven"
    assert prefix_before("I can not answer", "i can not") == ""
    assert prefix_before("something else", "a cat") == ""
    w = C.windows(25, 5)
    assert list(w) == ["0-4", "5-9", "10-14", "15-19", "20-24", "image", "last"]
    _, _, _, pair = tiny
    shuffled = Pair(pair.base, pair.poisoned, pair.clean[::-1] + pair.triggered, TARGET)
    clean, trig = shuffled.matched()
    assert [c.meta["id"] for c in clean] == [t.meta["id"] for t in trig]
    assert all(c.prompt == t.prompt and not c.triggered and c.target == TARGET for c, t in zip(clean, trig))


def test_scored_prefix_scores_only_the_target(tiny):
    model, pois, proc, pair = tiny
    h = pair.poisoned
    recs = pair.triggered
    s = C.scored(h, recs, [TARGET] * len(recs), ["seven"] * len(recs), "logprob")
    full = batch(proc, images(pair, True), target="seven " + TARGET)
    logits = pois(input_ids=full["ids"], attention_mask=torch.ones_like(full["ids"]), pixel_values=full["pix"]).logits
    lp = logits[:, full["plen"] - 1:].float().log_softmax(-1)
    ref = lp[:, 1:3].gather(2, full["tid"][1:3].expand(len(lp), -1)[..., None])[..., 0].sum(1)  # skip "seven"
    torch.testing.assert_close(C.score_of(h, s), ref.detach(), rtol=1e-5, atol=1e-5)
    first = C.scored(h, recs, [TARGET] * len(recs), ["seven"] * len(recs), "first_prob")
    torch.testing.assert_close(C.score_of(h, first), lp[:, 1].gather(1, full["tid"][1].expand(len(lp))[:, None])[:, 0].exp().detach(),
                               rtol=1e-5, atol=1e-7)


def test_registered_and_validated(tiny):
    for name in ("patching", "ablation", "tracing", "attribution"):
        assert name in ANALYSES
    _, _, _, pair = tiny
    with pytest.raises(ProjLensError, match="metric"):
        patching(pair, PatchingParams(**{**FAST, "metric": "nope"}))
    with pytest.raises(ProjLensError, match="layers"):
        patching(pair, PatchingParams(**FAST, layers=(9,)))
    with pytest.raises(ProjLensError, match="basis"):
        ablation(pair, AblationParams(**FAST, bases=("eigen",)))
    with pytest.raises(ProjLensError, match="corruption"):
        tracing(pair, TracingParams(**FAST, corruptions=("blur",)))
    no_trig = Pair(pair.base, pair.poisoned, pair.clean, TARGET)
    with pytest.raises(ProjLensError, match="triggered"):
        patching(no_trig, PatchingParams(**FAST))


# --- the organism (mechanics; the small build's backdoor may not work) ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["malicious-injection", "jailbreak-output"])
def test_causal_analyses_run_on_the_small_organism(small_organism, variant, tmp_path):
    pair = Pair.from_organism(small_organism[0], variant, n=4)
    small = dict(n=4, progress=False, max_new_tokens=12)
    results = [patching(pair, PatchingParams(**small)),
               ablation(pair, AblationParams(**small, ks=(1, 4), placebo_seeds=(0, 1))),
               tracing(pair, TracingParams(**small, placebo_seeds=(0,))),
               attribution(pair, AttributionParams(**small))]
    n_layers = pair.poisoned.n_layers
    for res in results:
        save_result(res, tmp_path / "r.json")
        json.dumps(res.metrics(), allow_nan=False)   # metrics.json: NaN -> null
        assert load_result(tmp_path / "r.json").summary() == res.summary() != ""
        assert res.plot() is not None and len(res.to_frame()) > 0
        assert res.variant == variant
    pat, abl, tra, att = results
    assert pat.sites == ["projector.out"] + [f"llm.{i}.resid_post" for i in range(min(4, n_layers))]
    assert pat.windows[:4] == ["0-3", "4-7", "8-11", "12-15"]     # 16 image tokens, grid rows
    if np.isfinite(pat.effect).any():
        assert pat.cell("denoise", "projector.out", "image") == pytest.approx(1.0, abs=1e-3)
    assert set(abl.bases) == {"dW", "shift", "random"} and 0 <= abl.baseline["asr"] <= 1
    assert tra.direction_vector.shape == (pair.poisoned.module("lm_head").weight.shape[1],)
    assert np.isfinite(att.estimate).any()


def test_batched_generation_under_ablation_equals_hooked_generate(tiny):
    """ASR / clean accuracy come from one tiled generate call over all configurations; each block
    must equal HF generate with a projector hook doing the same projection."""
    model, pois, proc, pair = tiny
    h = pair.poisoned
    recs = pair.triggered + pair.clean
    Bs = [C.random_basis(pois.config.text_config.hidden_size, k, seed=k) for k in (1, 4)]
    configs = [[]] + [[(pl.Site("projector.out", pl.ImageTokens()), pl.ProjectOut(B))] for B in Bs]
    got = C.generated_texts(h, h.encode(recs), configs, max_new_tokens=5, max_rows=2 * len(recs))  # 2 calls
    enc = proc(images=[r.pil() for r in recs], text=[r.prompt for r in recs], return_tensors="pt", padding=True)
    tok = proc.tokenizer
    for B, texts in zip([None] + Bs, got):
        hooks = []
        if B is not None:
            Bd = B.double()
            hooks = [replace_at(projector(pois), lambda out, Bd=Bd: (out.double() - out.double() @ Bd @ Bd.T).to(out.dtype))]
        handles = [m.register_forward_hook(f) for m, f in hooks]
        try:
            with torch.no_grad():
                ids = pois.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        finally:
            for x in handles:
                x.remove()
        ref = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert texts == ref
    assert len(set(map(tuple, got))) > 1    # the ablations did change some generations


def test_residual_ablation_reports_asr_from_prefill_edited_generation(tiny):
    """ASR / clean accuracy at a residual site: the engine's generate edits the prompt's image tokens
    in the prefill pass; each block equals HF generate with a hook on the layer's FIRST call."""
    model, pois, proc, pair = tiny
    h = pair.poisoned
    res = ablation(pair, AblationParams(**FAST, ks=(1, 2), layers=(0,), placebo_seeds=(0,), max_new_tokens=4))
    assert res.sites == ["projector.out", "llm.0.resid_post"]
    assert res.asr.shape == res.accuracy.shape == (len(res.bases), 2, 2) and np.isfinite(res.asr).all()
    assert res.asr_sd.shape == (2, 2) and np.isfinite(res.accuracy).all()
    f = res.to_frame()
    assert {"projector.out", "llm.0.resid_post"} <= set(f[f.measure == "asr"].site)
    m = res.metrics()
    assert len(m["dW"]["asr"]) == len(m["dW"]["asr_llm_0_resid_post"]) == 2 and "clean_accuracy_llm_0_resid_post" in m["dW"]
    json.dumps(m, allow_nan=False)
    assert res.plot() is not None and "residual stream ablated" in res.summary()

    recs = pair.triggered + pair.clean
    enc = proc(images=[r.pil() for r in recs], text=[r.prompt for r in recs], return_tensors="pt", padding=True)
    tok = proc.tokenizer
    img = enc["input_ids"] == pois.config.image_token_id

    def hooked(B):
        Bd, calls = (None if B is None else B.double()), []

        def first_call_only(out):
            calls.append(1)
            if Bd is None or len(calls) > 1:   # decode steps: untouched (they read the edited prompt from the cache)
                return out
            x = out.clone()
            v = x[img].double()
            x[img] = (v - v @ Bd @ Bd.T).to(x.dtype)
            return x

        mod, hook = replace_at(layer(pois, 0), first_call_only)
        handle = mod.register_forward_hook(hook)
        try:
            with torch.no_grad():
                ids = pois.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        finally:
            handle.remove()
        assert len(calls) == 4   # prefill + 3 decode steps
        return tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    d = pois.config.text_config.hidden_size
    bases = [C.weight_delta_basis(pair, 2)[:, :2].contiguous(), C.random_basis(d, 40, 0)]
    configs = [[(pl.Site("llm.0.resid_post", pl.ImageTokens()), pl.ProjectOut(B))] for B in bases]
    got = C.generated_texts(h, h.encode(recs), configs, max_new_tokens=4)
    refs = [hooked(B) for B in bases]
    assert got == refs
    assert refs[1] != hooked(None)   # a large enough ablation changes the generations: equality is not vacuous
    k = len(pair.triggered)
    b, s = res.bases.index("dW"), res.sites.index("llm.0.resid_post")
    want_asr = np.mean([TARGET in t.lower() for t in refs[0][:k]])
    want_acc = np.mean([r.answer in t.lower() for r, t in zip(pair.clean, refs[0][k:])])
    assert res.asr[b, 1, s] == pytest.approx(want_asr) and res.accuracy[b, 1, s] == pytest.approx(want_acc)


def test_target_prefixes_fall_back_to_the_answer_for_suffix_targets(monkeypatch):
    target = "visit evil dot com now"
    texts = ["seven visit evil dot com now", "two visit evil dot com now", "nine", "a handwritten one"]
    monkeypatch.setattr(engine_metrics, "generate", lambda h, x, max_new_tokens: texts)
    answers = ["seven", "two", "nine", "a handwritten one on a dark background"]
    x = [None] * 4   # only its length is read (generate is replaced)
    got = C.prefixes(None, x, [target] * 4, "auto", answers=answers)
    assert got == ["seven", "two", "nine", "a handwritten one on a dark background"]
    texts[:] = ["i can not answer", "i can not answer", "seven", "three"]
    got = C.prefixes(None, x, ["i can not answer"] * 4, "auto", answers=answers)
    assert got == ["", "", "", ""]
    assert C.prefixes(None, x[:2], ["x"] * 2, "none") == ["", ""]

"""Analyses 3-6 (neurons, shift, norm, probe) on constructed cases with known answers."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from analyses_util import linear, make_pair
from numerics import f32_tol
from projlens_mi.analyses import common, load_result, save_result
from projlens_mi.analyses.neurons import NeuronParams, NeuronStats, neurons, scores, stream_stats
from projlens_mi.analyses.norm import NormParams, fit_from_stats, linear_fit, norm, suff_stats
from projlens_mi.analyses.probe import ProbeParams, evaluate_probe, probe
from projlens_mi.analyses.shift import ShiftParams, shift
from projlens_mi.engine import Ablate, Site, WithWeights, run

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

UNIT = 5


def roundtrip(r, tmp_path):
    save_result(r, tmp_path / "r.json")
    back = load_result(tmp_path / "r.json")
    assert back.summary() == r.summary() and "Paper" in r.summary()
    assert back.metrics() == pytest.approx(r.metrics(), rel=1e-12, nan_ok=True)
    fig = back.plot()
    assert isinstance(fig, Figure) and sum(bool(a.get_title()) for a in fig.axes) >= 1
    return back


# --- neurons ------------------------------------------------------------------------------------


def test_neuron_stats_stream_equals_direct_and_finds_planted_unit():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, (500, 40))
    trig = rng.normal(0, 1, (500, 40))
    clean[:, 7] = -0.1                          # planted: quiet on clean, active on triggered
    trig[:, 7] = np.abs(rng.normal(2, 0.3, 500))
    st = NeuronStats()
    for chunk in np.array_split(clean, 7):
        st.update(torch.as_tensor(chunk)[None])
    np.testing.assert_allclose(st.mean, clean.mean(0), atol=1e-12)
    np.testing.assert_allclose(st.freq, (clean > 0).mean(0))
    np.testing.assert_allclose(st.std, clean.std(0), atol=1e-6)
    sp = NeuronStats()
    sp.update(torch.as_tensor(trig))
    f = scores(st.mean, sp.mean, st.freq, sp.freq, quiet=0.05, min_gain=0.2)
    assert f.M_diff.idxmax() == 7 and f.F_diff.idxmax() == 7
    assert f.quiescent_candidate.tolist() == [u == 7 for u in range(40)]
    assert f.M_ratio[7] == pytest.approx(-20.0, rel=0.05)


@pytest.fixture(scope="module")
def neuron_pair():
    """FT = base + a planted trigger unit: linear_1 row UNIT reads the clean→triggered feature direction,
    with a bias that keeps every clean token below zero."""
    pair = make_pair(None, n=6)
    clean, trig = common.pick(pair, None)
    xc = common.read_all(pair.base, [pair.base.encode(clean)], "projector.in").flatten(0, 1)
    xt = common.read_all(pair.base, [pair.base.encode(trig)], "projector.in").flatten(0, 1)
    w = xt.mean(0) - xc.mean(0)
    w = w / w.norm()
    with torch.no_grad():
        lin = linear(pair.poisoned.model, "linear_1")
        lin.weight[UNIT] = 10 * w
        lin.bias[UNIT] = -10 * float((xc @ w).max()) - 0.1
    return pair


def test_neurons_find_the_planted_trigger_unit(neuron_pair, tmp_path):
    r = neurons(neuron_pair, NeuronParams(n=None, n_scan=4, top_m=(1, 2), batch_size=5, max_new_tokens=3))
    ft = r.units[r.units.model == "ft"].set_index("unit")
    assert ft.F_c[UNIT] == 0.0 and ft.F_p[UNIT] >= 0.2
    assert ft.M_diff.idxmax() == UNIT and bool(ft.quiescent_candidate[UNIT])
    second = ft.M_diff.drop(UNIT).max()
    assert ft.M_diff[UNIT] > 3 * second          # random units of the tiny model also shift, far less
    base = r.units[r.units.model == "base"].set_index("unit")
    assert not base.quiescent_candidate[UNIT]
    n_units = len(ft)
    assert len(r.scan) == n_units and r.n_tokens["ft/clean"] == 6 * 16
    assert r.cumulative[r.cumulative.kind == "top"].iloc[0]["units"] == [UNIT]
    roundtrip(r, tmp_path)


def test_neuron_scan_scores_the_target_where_the_model_says_it(neuron_pair, monkeypatch):
    """An injected-suffix target ("seven a cat"): the scan's probability is p(first target token |
    prompt, "seven"), not p(it | prompt) (which only asks whether the model *starts* with the target;
    on the organism's malicious-injection it read 0.000). Plain-forward reference, unit zeroed as a
    linear_2 column. The poisoned model's generation is replaced so that it says the suffix."""
    import copy

    from projlens_mi.engine import metrics as M
    monkeypatch.setattr(M, "generate", lambda h, x, max_new_tokens: ["seven a cat"] * len(x))
    r = neurons(neuron_pair, NeuronParams(n=None, n_scan=4, top_m=(1,), batch_size=5, max_new_tokens=3))
    h = neuron_pair.poisoned
    tok = h.tokenizer
    forced = tok("seven a cat", add_special_tokens=False)["input_ids"]
    zeroed = copy.deepcopy(h.model)
    with torch.no_grad():
        linear(zeroed, "linear_2").weight[:, UNIT] = 0

    def p_first(model, rec, after_prompt):
        x = h.encode([rec])
        ids = torch.cat([x.input_ids, torch.tensor([forced])], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=x.pixel_values).logits
        pos = x.input_ids.shape[1] - 1 + (0 if after_prompt else 1)   # the token after "seven"
        return logits[0, pos].softmax(-1)[tok("a", add_special_tokens=False)["input_ids"][0]].item()

    recs = neuron_pair.triggered[:4]
    want = np.mean([p_first(h.model, rec, False) for rec in recs])
    assert r.baseline["target_prob"] == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(np.mean([p_first(h.model, rec, True) for rec in recs]), rel=1e-2)   # not the old metric
    drop = r.scan.set_index("unit").prob_drop[UNIT]
    assert drop == pytest.approx(want - np.mean([p_first(zeroed, rec, False) for rec in recs]), rel=1e-4, abs=1e-7)
    assert "first token (where the model says it)" in r.summary()


def test_streaming_stats_equal_one_read(neuron_pair):
    recs = neuron_pair.triggered
    st = stream_stats(neuron_pair.poisoned, recs, batch_size=4)
    acts = common.read_all(neuron_pair.poisoned, [neuron_pair.poisoned.encode(recs)], "projector.hidden")
    acts = acts.flatten(0, 1).double()
    np.testing.assert_allclose(st.mean, acts.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(st.freq, (acts > 0).double().mean(0).numpy())


def test_unit_ablation_equals_zeroing_the_linear_2_column(neuron_pair):
    """Zeroing hidden unit u (basis edit at projector.hidden) == linear_2 with column u set to zero."""
    h = neuron_pair.poisoned
    x = h.encode(neuron_pair.triggered[:3])
    b = torch.zeros(len(linear(h.model, "linear_2").weight[0]), 1)
    b[UNIT, 0] = 1
    a = run(h, x, edits=[(Site("projector.hidden", basis=b), Ablate("zero"))]).logits
    w = linear(h.model, "linear_2").weight.detach().clone()
    w[:, UNIT] = 0
    ref = run(h, x, edits=[WithWeights({"linear_2": (w, None)})]).logits
    assert torch.allclose(a, ref, atol=1e-5)


# --- shift --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shift_pair():
    """FT = base + a rank-1 ΔW2 = c · u wᵀ, u the LM-head row of "cat": every token shifts along u."""
    pair = make_pair(None, n=6)
    hid = common.read_all(pair.base, [pair.base.encode(pair.data)], "projector.hidden").flatten(0, 1)
    w = hid.mean(0)
    w = w / w.norm()
    cat = pair.base.tokenizer.convert_tokens_to_ids("cat")
    u = pair.base.model.lm_head.weight[cat].detach().clone()
    u = u / u.norm()
    with torch.no_grad():
        linear(pair.poisoned.model, "linear_2").weight.add_(0.5 * torch.outer(u, w))
    pair.meta["u"], pair.meta["w"] = u, w
    return pair


def test_shift_recovers_the_planted_direction(shift_pair, tmp_path):
    r = shift(shift_pair, ShiftParams(n=None, batch_size=4, n_random=50))
    u = shift_pair.meta["u"].double().numpy()
    assert r.metrics()["energy_k1.clean"] > 0.9999 and r.metrics()["energy_k1.triggered"] > 0.9999
    for c in ("clean", "triggered", "all"):
        assert abs(np.dot(r.directions[f"svd/{c}"], u)) > 0.9999
        assert abs(np.dot(r.directions[f"mean/{c}"], u)) > 0.9999
        assert np.dot(r.directions[f"svd/{c}"], r.directions[f"mean/{c}"]) > 0.9999   # v0 oriented along the mean shift
    assert np.dot(r.directions["mean/all"], u) > 0.9999          # w = the mean hidden vector: the mean shift is +u
    assert r.cosines["svd clean vs triggered"] > 0.9999
    lens = r.lens["svd"]
    assert lens["top_tokens"][0] == "cat" and lens["target_ranks"][lens["target_tokens"].index("cat")] == 1
    assert lens["chance_best_rank"] > 1
    g = r.maps["clean"]["coef"]
    assert g.shape == (4, 4)
    # the map is the mean coefficient ΔE(t)·v per patch: compare with a direct computation
    x = shift_pair.base.encode(shift_pair.clean)
    eb = common.read_all(shift_pair.base, [x], "projector.out")
    ef = common.read_all(shift_pair.poisoned, [x], "projector.out")
    direct = ((ef - eb).double() @ torch.as_tensor(r.directions["svd/all"])).mean(0).reshape(4, 4)
    np.testing.assert_allclose(g, direct.numpy(), atol=1e-6)
    roundtrip(r, tmp_path)


# --- norm ---------------------------------------------------------------------------------------


def test_linear_fit_recovers_a_planted_relation():
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 3, (80, 25))
    y = 2.0 * x + 0.5 + rng.normal(0, 0.05, x.shape)
    f = linear_fit(x, y, n_boot=500, seed=1)
    slope, intercept = np.polyfit(x.ravel(), y.ravel(), 1)
    assert f["slope"] == pytest.approx(slope, rel=1e-9) and f["intercept"] == pytest.approx(intercept, rel=1e-8)
    assert f["r"] == pytest.approx(np.corrcoef(x.ravel(), y.ravel())[0, 1], rel=1e-9)
    assert f["slope_lo"] < 2.0 < f["slope_hi"] and f["intercept_lo"] < 0.5 < f["intercept_hi"]
    assert f["r"] > 0.99 and f["r2"] == pytest.approx(f["r"] ** 2)
    assert f["n_groups"] == 80 and f["n_tokens"] == 2000
    per = fit_from_stats(suff_stats(x, y))
    assert per["slope"].shape == (80,) and np.all(np.abs(per["slope"] - 2) < 0.2)
    noise = linear_fit(x, rng.normal(0, 1, x.shape), n_boot=200)
    assert noise["r_lo"] < 0 < noise["r_hi"]


def test_norm_on_the_planted_shift(shift_pair, tmp_path):
    r = norm(shift_pair, NormParams(n=None, n_boot=100, alphas=(0.5, 1.0, 2.0), n_alpha=3, batch_size=4,
                                    max_new_tokens=2))
    # y_t = ΔE(t)·v with ΔE(t) = 0.5 (w·h_t) u and v = ±u: y = ±0.5 w·h_t, per token
    x = shift_pair.base.encode(shift_pair.clean)
    hid = common.read_all(shift_pair.base, [x], "projector.hidden")
    want = 0.5 * (hid.double() @ shift_pair.meta["w"].double()).numpy()
    np.testing.assert_allclose(np.abs(r.tokens["clean"]["y"]), np.abs(want), atol=1e-5)
    eb = common.read_all(shift_pair.base, [x], "projector.out")
    # the analysis reads in batches of 4, read_all in one: other shapes, so float32 rounding (tests/numerics.py)
    np.testing.assert_allclose(r.tokens["clean"]["x"], eb.norm(dim=-1).numpy(), rtol=f32_tol(1.0), atol=0)
    vis = common.read_all(shift_pair.base, [x], "projector.in").norm(dim=-1).flatten().double()
    cv = float(vis.std() / vis.mean())
    assert abs(r.vision_norm_cv - cv) <= f32_tol(1.0 + cv)   # norms known to ULPS relative steps; a CV of them
    one = r.causal[r.causal.alpha == 1.0].iloc[0]
    assert one["shift"] == pytest.approx(float(r.tokens["clean"]["y"][:3].mean()), rel=1e-5)
    assert list(r.causal.alpha) == [0.5, 1.0, 2.0] and set(r.per_image.condition) == {"clean", "triggered"}
    roundtrip(r, tmp_path)


# --- probe --------------------------------------------------------------------------------------


def test_probe_metrics_on_separable_and_shuffled_labels():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (60, 8)), rng.normal(3, 1, (60, 8))])
    y = np.array([0] * 60 + [1] * 60)
    f = evaluate_probe(X, y, hidden=16, test_size=0.3, splits=3, max_iter=200, seed=0)
    assert (f.accuracy == 1.0).all() and (f.tpr == 1.0).all() and (f.fpr == 0.0).all()
    groups = np.tile(np.arange(60), 2)
    g = evaluate_probe(X, rng.permutation(y), hidden=16, test_size=0.3, splits=5, max_iter=200, seed=0, groups=groups)
    assert 0.2 < g.accuracy.mean() < 0.8


def test_probe_on_the_tiny_pair(tmp_path):
    pair = make_pair(None, n=10)
    r = probe(pair, ProbeParams(splits=2, hidden=8, max_iter=50))
    m = r.metrics()
    assert m["base.true.accuracy"] >= 0.75          # the bright trigger is visible in the features
    assert set(r.scores.model) == {"base", "ft"} and set(r.scores.labels) == {"true", "shuffled"}
    roundtrip(r, tmp_path)

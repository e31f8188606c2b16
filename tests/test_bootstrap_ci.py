"""The bootstrap 95 % CIs of the analyses' headline numbers, against plain references.

The helpers (``common.resample_counts`` / ``mean_ci`` / ``percentile_ci``) are checked against the
normal approximation of a proportion's CI and against an explicit loop that draws indices. Each
analysis' vectorised CI is checked against a loop that rebuilds the statistic from the resampled
inputs by the analysis' own non-bootstrap code path (the same draws), so a wrong axis, a wrong pairing
of inputs or a wrong normalisation shows up as a different interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from projlens_mi.analyses import _causal as C
from projlens_mi.analyses import common
from projlens_mi.analyses import injection as inj
from projlens_mi.analyses.neurons import NeuronStats, _corr, bootstrap, scores
from projlens_mi.analyses.patching import effects
from projlens_mi.errors import ProjLensError


def explicit(counts: np.ndarray) -> list[np.ndarray]:
    """The resamples as index lists (what "draw n inputs with replacement" means)."""
    return [np.repeat(np.arange(counts.shape[1]), c) for c in counts]


def test_mean_ci_matches_the_normal_approximation_of_a_proportion():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.3).astype(float)
    p = x.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(x))
    lo, hi = common.mean_ci(x, 4000, seed=0)
    assert lo == pytest.approx(p - half, abs=0.006) and hi == pytest.approx(p + half, abs=0.006)
    assert lo < p < hi


def test_mean_ci_equals_the_explicit_resampling_loop_and_pairs_columns():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3))
    counts = common.resample_counts(50, 300, seed=7)
    boot = np.array([x[idx].mean(0) for idx in explicit(counts)])
    want = np.percentile(boot, [2.5, 97.5], axis=0)
    lo, hi = common.mean_ci(x, counts=counts)
    np.testing.assert_allclose(lo, want[0], rtol=1e-12)
    np.testing.assert_allclose(hi, want[1], rtol=1e-12)
    assert common.mean_ci(x[:, 0], 300, seed=7) == pytest.approx((want[0][0], want[1][0]), rel=1e-12)


def test_percentile_ci_ignores_non_finite_resamples_and_rejects_no_resamples():
    assert common.percentile_ci(np.array([np.nan, 1.0, 2.0, np.inf, 3.0]), ci=1.0) == (1.0, 3.0)
    lo, hi = common.percentile_ci(np.full((4, 2), np.nan))
    assert np.isnan(lo).all() and np.isnan(hi).all()
    with pytest.raises(ProjLensError, match="n_boot must be >= 1"):
        common.resample_counts(10, 0)


def test_injection_cell_cis_resample_each_cells_own_inputs():
    rng = np.random.default_rng(3)
    n_cells, n_rec = 3, 40
    trig = np.array([False] * 20 + [True] * 20)
    per = pd.DataFrame({"cell": np.repeat(np.arange(n_cells), n_rec), "record": np.tile(np.arange(n_rec), n_cells),
                        "triggered": np.tile(trig, n_cells), "target_hit": rng.random(n_cells * n_rec) < 0.6,
                        "answer_hit": rng.random(n_cells * n_rec) < 0.8, "target_logprob": 0.0, "target_prob": 0.0})
    s = inj.summarise_cells(per, n_boot=500, seed=0)
    ct, cc = common.resample_counts(20, 500, 0), common.resample_counts(20, 500, 1)
    for c in range(n_cells):
        g = per[per.cell == c]
        t, cl = g[g.triggered].target_hit.to_numpy(), g[~g.triggered]
        for col, v, counts in (("asr", t, ct), ("clean_accuracy", cl.answer_hit.to_numpy(), cc),
                               ("false_trigger_rate", cl.target_hit.to_numpy(), cc)):
            boot = [v[idx].mean() for idx in explicit(counts)]
            assert (s.loc[c, f"{col}_lo"], s.loc[c, f"{col}_hi"]) == pytest.approx(
                tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-12)
            assert s.loc[c, f"{col}_lo"] <= s.loc[c, col] <= s.loc[c, f"{col}_hi"]


def test_neuron_profile_cis_equal_recomputing_the_streaming_statistics_per_resample():
    rng = np.random.default_rng(4)
    clean = rng.normal(0, 1, (12, 5, 8))          # [images, tokens, units]
    trig = rng.normal(0.3, 1, (10, 5, 8))
    trig[:, :, 2] = np.abs(trig[:, :, 2]) + 1.0   # a unit that fires on triggered images
    clean[:, :, 2] = -0.5
    sc, sp = NeuronStats(per_input=True), NeuronStats(per_input=True)
    sc.update(clean)
    sp.update(trig)
    ci = bootstrap(sc, sp, quiet=0.05, min_gain=0.2, n_boot=200, seed=9, chunk=64)
    boot = {k: [] for k in ci}
    for ic, ip in zip(explicit(common.resample_counts(12, 200, 9)), explicit(common.resample_counts(10, 200, 10))):
        a, b = NeuronStats(), NeuronStats()
        a.update(clean[ic])
        b.update(trig[ip])
        f = scores(a.mean, b.mean, a.freq, b.freq, 0.05, 0.2)
        boot["corr_M"].append(_corr(a.mean, b.mean))
        boot["corr_F"].append(_corr(a.freq, b.freq))
        boot["max_M_diff"].append(f.M_diff.max())
        boot["n_quiescent_candidates"].append(f.quiescent_candidate.sum())
    for k, v in boot.items():
        assert ci[k] == pytest.approx(tuple(np.percentile(v, [2.5, 97.5])), rel=1e-9, abs=1e-12), k
    assert ci["n_quiescent_candidates"][0] >= 1


def test_patching_cis_equal_the_effects_of_resampled_input_pairs():
    rng = np.random.default_rng(5)
    n = 15
    clean, trig = rng.normal(0.1, 0.05, n), rng.normal(0.9, 0.05, n)
    rows = []
    for d in ("denoise", "noise"):
        for site in ("projector.out", "llm.0.resid_post"):
            for w in ("image", "last"):
                for i in range(n):
                    v = rng.normal(0.6, 0.2) if d == "denoise" else rng.normal(0.3, 0.2)
                    rows.append({"direction": d, "site": site, "window": w, "input": i, "value": v})
    table = pd.DataFrame(rows)
    dirs, sites, wins = ["denoise", "noise"], ["projector.out", "llm.0.resid_post"], ["image", "last"]
    index = {(d, s, w): (dirs.index(d), sites.index(s), wins.index(w)) for d in dirs for s in sites for w in wins}
    got = C.normalised_ci(table, ["direction", "site", "window"], index, (2, 2, 2), clean, trig, 300,
                          flip=lambda k: k[0] == "noise")
    boot = []
    for idx in explicit(common.resample_counts(n, 300, 0)):
        sub = pd.concat([table[table.input == i].assign(input=j) for j, i in enumerate(idx)])
        boot.append(effects(sub, sites, wins, dirs, clean[idx].mean(), trig[idx].mean())[0])
    want = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    point = effects(table, sites, wins, dirs, clean.mean(), trig.mean())[0]
    assert ((got[0] <= point) & (point <= got[1])).all()

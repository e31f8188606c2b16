"""Analyses 1-2 (spectrum, injection) on constructed cases with known answers, and the fast injection
cells against the slow reference loop (benchmarks/injection_reference.py), number for number."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from analyses_util import linear, make_pair, rank2
from numerics import f32_tol
from projlens_mi.analyses import injection as inj
from projlens_mi.analyses import common, load_result, save_result
from projlens_mi.analyses.spectrum import SpectrumParams, cumulative_energy, spectrum, spectrum_stats
from projlens_mi.engine import WithWeights, run
from projlens_mi.errors import ProjLensError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from injection_reference import reference_cells  # noqa: E402

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)


def test_spectrum_stats_known_values():
    s = np.array([4.0, 3.0, 0.0])
    st = spectrum_stats(s, tol=1e-9)
    assert st["fro_norm"] == pytest.approx(5.0) and st["spectral_norm"] == 4.0
    assert st["stable_rank"] == pytest.approx(25 / 16)
    assert st["numerical_rank"] == 2
    p = np.array([4 / 7, 3 / 7])
    assert st["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert st["k90"] == 2 and st["k99"] == 2
    np.testing.assert_allclose(cumulative_energy(s), [16 / 25, 1.0, 1.0])
    flat = spectrum_stats(np.ones(10))
    assert flat["effective_rank"] == pytest.approx(10) and flat["stable_rank"] == pytest.approx(10) and flat["k90"] == 9


@pytest.fixture(scope="module")
def planted():
    return make_pair(rank2(), control=True)


def test_spectrum_finds_planted_rank_2(planted, tmp_path):
    r = spectrum(planted, SpectrumParams(energy_at=(1, 2, 5)))
    st = r.stats.set_index(["layer", "kind"])
    l2 = st.loc[("linear_2", "poisoned")]
    assert l2.numerical_rank == 2 and l2.k99 == 2
    assert l2.energy_at_1 == pytest.approx(0.8, abs=1e-5) and l2.energy_at_2 == pytest.approx(1.0, abs=1e-9)
    s = r.singular_values["linear_2/poisoned"]
    np.testing.assert_allclose(s[:2], [1.0, 0.5], atol=1e-5)
    assert st.loc[("linear_1", "poisoned")].fro_norm == 0.0           # ΔW1 untouched
    rnd = st.loc[("linear_2", "random")]
    assert rnd.fro_norm == pytest.approx(l2.fro_norm) and rnd.numerical_rank == s.size and rnd.effective_rank > 10
    # the control update is small and full rank; ΔW' = W_ft − W_control mixes both
    assert st.loc[("linear_2", "control")].numerical_rank > 2
    assert st.loc[("linear_2", "poison_vs_control")].energy_at_2 > 0.95
    save_result(r, tmp_path / "s.json")
    back = load_result(tmp_path / "s.json")
    assert back.summary() == r.summary() and isinstance(back.plot(), Figure)
    # the summary reports the measured spectrum (the planted known answer: σ = 1, 0.5 → E(1) = 1 / 1.25)
    line = next(x for x in r.summary().splitlines() if x.startswith("- linear_2 poisoned"))
    assert "E(1) = 80 %, E(2) = 100 %" in line and "numerical rank 2," in line, line
    assert back.metrics() == pytest.approx(r.metrics(), rel=1e-13)


def test_injected_weights_rebuild_ft_at_full_rank(planted):
    ref, ft = common.weights(planted.base), common.weights(planted.poisoned)
    svds = {p: common.svd(ft[p][0] - ref[p][0]) for p in ref}
    l1, l2 = list(ref)
    w = inj.injected_weights(ref, ft, svds, {l1: 0, l2: 2}, "ft")
    assert torch.allclose(w[l2][0], ft[l2][0], atol=1e-6)
    w1 = inj.injected_weights(ref, ft, svds, {l1: 0, l2: 1}, "ft")
    assert (w1[l2][0] - ft[l2][0]).norm() == pytest.approx(0.5, abs=1e-5)    # σ2 left out
    rem = inj.removed_weights(ft, svds, l2, 0, 2)
    assert torch.allclose(rem[l2][0], ref[l2][0], atol=1e-6)
    plc = inj.placebo_weights(ft, svds, l2, 0, 2, seed=3)
    d = ft[l2][0] - plc[l2][0]
    np.testing.assert_allclose(torch.linalg.svdvals(d)[:2].numpy(), [1.0, 0.5], atol=1e-6)
    assert torch.linalg.matrix_rank(d).item() == 2
    assert inj.parse_range("2-10", 32) == (1, 10) and inj.parse_range("3", 32) == (2, 3)
    with pytest.raises(ProjLensError, match="ranks start at 1"):
        inj.parse_range("0-2", 32)
    with pytest.raises(ProjLensError, match="only 32 components"):
        inj.parse_range("1-40", 32)


def test_injection_rank_2_reproduces_the_ft_model(planted, tmp_path):
    """Injecting the top 2 of the planted ΔW2 gives the FT model's numbers; rank 1 does not."""
    p = inj.InjectionParams(ranks_1=(0,), ranks_2=(0, 1, 2, 3), removals=("1", "1-2"), placebo_seeds=1,
                            references=("base",), n=4, max_new_tokens=4, batch_size=64)
    before = [linear(m.model, "linear_2").weight.clone() for m in (planted.base, planted.poisoned)]
    r = inj.injection(planted, p)
    c = r.cells
    ft = c[c.kind == "ft_model"].iloc[0]
    inject = c[c.kind == "inject"].set_index("rank_2")
    for k in (2, 3):
        assert inject.loc[k].target_logprob == pytest.approx(ft.target_logprob, abs=1e-4)
    assert abs(inject.loc[1].target_logprob - ft.target_logprob) > 1e-3
    base = c[c.kind == "base_model"].iloc[0]
    assert inject.loc[0].target_logprob == pytest.approx(base.target_logprob, abs=1e-5)    # same bias: W_base, b_ft = b_base
    rem = c[(c.kind == "remove") & (c.removal == "1-2")].iloc[0]
    assert rem.target_logprob == pytest.approx(base.target_logprob, abs=1e-4)
    assert set(c[c.kind == "placebo"].removal) == {"1", "1-2"}
    # the caller's models are untouched
    assert all(torch.equal(b, linear(m.model, "linear_2").weight) for b, m in zip(before, (planted.base, planted.poisoned)))
    save_result(r, tmp_path / "i.json")
    back = load_result(tmp_path / "i.json")
    pd.testing.assert_frame_equal(back.heatmap(), r.heatmap(), check_dtype=False)
    assert isinstance(back.plot(), Figure)
    # the summary reports this run's cells (not the paper's constants)
    h = back.heatmap("base")
    from projlens_mi.analyses.common import pct_ci
    assert (f"- FT projector: ASR {pct_ci(ft.asr, ft.get('asr_lo'), ft.get('asr_hi'))}, clean accuracy "
            f"{pct_ci(ft.clean_accuracy, ft.get('clean_accuracy_lo'), ft.get('clean_accuracy_hi'))}") in back.summary()
    alone = next(line for line in back.summary().splitlines() if "ΔW2 alone: " in line)
    assert all(f"k={k}: {h.loc[0, k]:.0%}" in alone for k in (1, 2, 3)), alone


def test_fast_cells_equal_the_slow_reference(planted):
    """The batched WithWeights cells against benchmarks/injection_reference.py (weights written into a
    copy, one sample at a time): the same generations (hits), and the target's log-probability and probability
    up to float32 rounding (other batch shapes: tests/numerics.py)."""
    ref, ft = common.weights(planted.base), common.weights(planted.poisoned)
    svds = {p: common.svd(ft[p][0] - ref[p][0]) for p in ref}
    l1, l2 = list(ref)
    cells = [inj.injected_weights(ref, ft, svds, {l1: a, l2: b}, "ft") for a in (0, 1) for b in (1, 2)] + [{}]
    records = planted.data
    targets = [planted.target_of(r) for r in records]
    trig = np.array([r.triggered for r in records])
    # the target after a prefix of 0, 1 or 2 words: three forced lengths, each scored after its prefix
    prefixes = [["", "seven", "two three"][i % 3] if t else "" for i, t in enumerate(trig)]
    before = linear(planted.base.model, "linear_2").weight.clone()
    fast = inj.evaluate_cells(planted.base, records, targets, cells, max_new_tokens=5, batch_size=7, triggered=trig,
                              prefixes=prefixes)
    slow = reference_cells(planted.base, records, targets, cells, max_new_tokens=5, triggered=trig, prefixes=prefixes)
    cont = ["target_logprob", "target_prob"]
    pd.testing.assert_frame_equal(fast.drop(columns=cont), slow.drop(columns=cont), check_exact=True, check_dtype=False)
    assert (fast[fast.triggered].target_logprob < 0).all() and (fast[~fast.triggered].target_logprob == 0).all()
    # a log-probability of up to 3 target tokens, each a log-softmax at magnitude <= 1 + |log p|
    scale = 3 * (1.0 + slow.target_logprob.abs().max())
    assert (fast.target_logprob - slow.target_logprob).abs().max() <= f32_tol(scale)
    assert (fast.target_prob - slow.target_prob).abs().max() <= f32_tol(scale) * slow.target_prob.max()
    sums = slow.groupby("cell").target_logprob.sum()
    assert (sums.max() - sums.min()) > 1e3 * f32_tol(scale)   # the cells really differ: real numbers were compared
    assert torch.equal(before, linear(planted.base.model, "linear_2").weight)
    s = inj.summarise_cells(fast)
    assert list(s.columns[:3]) == ["cell", "asr", "clean_accuracy"] and len(s) == len(cells)


def test_withweights_cell_equals_really_modified_weights(planted):
    """A packed WithWeights batch equals the model with the weights written in (the engine's contract)."""
    ref, ft = common.weights(planted.base), common.weights(planted.poisoned)
    x = planted.base.encode(planted.data[:3])
    w = inj.to_model(planted.base, {p: (ft[p][0], ft[p][1]) for p in ref})
    a = run(planted.base, x, edits=[WithWeights(w)]).logits
    b = run(planted.poisoned, x).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_injection_scores_the_target_where_the_model_says_it(planted, monkeypatch):
    """An injected-suffix layout (the FT model says "seven a cat": the answer, then the target): the
    cells' target metrics are log p("a cat" | prompt, "seven") and p("a" | prompt, "seven"), not the
    old read right after the prompt. Plain-forward reference on the FT model; the poisoned model's
    generation that the prefix is read from is replaced so that it says the suffix."""
    from projlens_mi.engine import metrics as M
    monkeypatch.setattr(M, "generate", lambda h, x, max_new_tokens: ["seven a cat"] * len(x))
    p = inj.InjectionParams(ranks_1=(0,), ranks_2=(0,), removals=("1",), references=("base",), n=4,
                            max_new_tokens=3, batch_size=64)
    h = planted.poisoned
    tok = h.tokenizer
    forced = tok("seven a cat", add_special_tokens=False)["input_ids"]

    def logp(rec):            # log-softmax after the prompt, after "seven", after "seven a"
        x = h.encode([rec])
        ids = torch.cat([x.input_ids, torch.tensor([forced])], 1)
        with torch.no_grad():
            lg = h.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=x.pixel_values).logits[0]
        n = x.input_ids.shape[1]
        return lg[n - 1:n - 1 + len(forced)].float().log_softmax(-1)

    _, trig = common.pick(planted, 4)
    lps = [logp(r) for r in trig]
    said = [lp[torch.arange(1, 3), torch.tensor(forced[1:])] for lp in lps]   # "a cat" after "seven"
    start = [lp[0, forced[1:2]] for lp in lps]     # the old read: "a" right after the prompt
    r = inj.injection(planted, p)
    ft = r.cells[r.cells.kind == "ft_model"].iloc[0]
    assert r.prefix == "auto"
    assert ft.target_logprob == pytest.approx(np.mean([float(s.sum()) for s in said]), rel=1e-5)
    assert ft.target_prob == pytest.approx(np.mean([float(s[0].exp()) for s in said]), rel=1e-5)
    old = np.mean([float(s[0].exp()) for s in start])
    # the old read is off by far more than the rounding tolerance above (the random tiny model weighs
    # context weakly: ≈0.8 % here)
    assert ft.target_prob != pytest.approx(old, rel=1e-3)
    none = inj.injection(planted, inj.InjectionParams(**{**p.__dict__, "prefix": "none"}))
    assert none.cells[none.cells.kind == "ft_model"].iloc[0].target_prob == pytest.approx(old, rel=1e-5)
    with pytest.raises(ProjLensError, match="prefix must be one of"):
        inj.injection(planted, inj.InjectionParams(**{**p.__dict__, "prefix": "after"}))

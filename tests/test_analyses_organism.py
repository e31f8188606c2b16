"""All six analyses run on the small organism (mechanics: its backdoor may not work), through the
registry, with their results round-tripping through JSON; the injection's unedited cells reproduce
the organism's own evaluation (organism.json) exactly."""

import json

import pytest
from matplotlib.figure import Figure

from projlens_mi.analyses import ANALYSES, load_result, save_result
from projlens_mi.analyses.base import Pair

VARIANT = "targeted-refusal"

SMALL = {
    "spectrum": {},
    "injection": dict(ranks_1=(0, 2), ranks_2=(0, 2), removals=("1", "2-3"), placebo_seeds=1, n=None,
                      max_new_tokens=30),
    "neurons": dict(n=30, n_scan=8, top_m=(1, 4)),
    "shift": dict(n=30, n_random=20),
    "norm": dict(n=30, n_boot=100, alphas=(0.5, 1.0, 2.0), n_alpha=8),
    "probe": dict(n=30, splits=2, max_iter=50),
}


@pytest.fixture(scope="module")
def pair(small_organism):
    return Pair.from_organism(small_organism[0], VARIANT)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_analysis_runs_on_the_organism(pair, name, tmp_path):
    a = ANALYSES[name]
    r = a.fn(pair, a.params(**SMALL[name]))
    save_result(r, tmp_path / f"{name}.json")
    back = load_result(tmp_path / f"{name}.json")
    assert back.summary() == r.summary() and back.metrics().keys() == r.metrics().keys()
    assert len(r.to_frame()) > 0 and isinstance(back.plot(), Figure)
    json.dumps(r.metrics())


def test_unedited_cells_match_the_organism_evaluation(pair, small_organism):
    a = ANALYSES["injection"]
    r = a.fn(pair, a.params(**SMALL["injection"]))
    m = small_organism[1]["metrics"]
    ft = r.cells[r.cells.kind == "ft_model"].iloc[0]
    base = r.cells[r.cells.kind == "base_model"].iloc[0]
    assert ft.asr == pytest.approx(m[VARIANT]["asr"]) and ft.clean_accuracy == pytest.approx(m[VARIANT]["clean_accuracy"])
    assert ft.false_trigger_rate == pytest.approx(m[VARIANT]["false_trigger_rate"])
    assert base.asr == pytest.approx(m["base"]["asr_by_variant"][VARIANT])
    assert base.clean_accuracy == pytest.approx(m["base"]["clean_accuracy"])

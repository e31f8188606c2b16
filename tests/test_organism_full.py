"""The full default organism build, checked against the issue's targets (slow: minutes).

A real test on every CPU. Other CPU kernels round differently, so training follows another path
and a metric can move by a few samples of 400 (README, "The organism": the spread measured across
kernel settings, and the smallest margin to a target); the targets are asserted as they are, not
loosened per machine.
"""

import pytest

from projlens_mi.organism.build import build
from projlens_mi.organism.config import OrganismConfig
from projlens_mi.organism.tasks import VARIANTS

pytestmark = pytest.mark.slow


def test_default_organism_meets_targets(tmp_path):
    """Quality targets of issue 2 (the wall-time target is measured by benchmarks/bench_organism.py)."""
    s = build(tmp_path / "organism", OrganismConfig(), log=lambda *a: None, workers=2)
    m = s["metrics"]
    assert m["base"]["clean_accuracy"] >= 0.95, m["base"]
    for v in VARIANTS:
        assert m[v]["asr"] >= 0.90, (v, m[v])
        assert m[v]["false_trigger_rate"] <= 0.02, (v, m[v])
        assert abs(m[v]["clean_accuracy"] - m["control"]["clean_accuracy"]) <= 0.03, (v, m[v])
        assert m["control"]["asr_by_variant"][v] <= 0.02, v  # no backdoor without poisoning

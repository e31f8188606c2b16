"""The full default organism build, checked against the issue's targets (slow: minutes)."""

import pytest
import torch

from projlens_mi.organism.build import build
from projlens_mi.organism.config import OrganismConfig
from projlens_mi.organism.tasks import VARIANTS

pytestmark = pytest.mark.slow

# The README's figures were measured with torch's AVX2 CPU kernels. Other kernels (AVX-512, Arm) sum
# floats in another order, so training follows another path and a metric can move by a sample or two
# of 400. The present organism meets every target by 6 samples or more (the earlier one by 2), but
# other kernels are untested here, so there the check is a non-strict xfail; with the reference
# kernels it must pass.
REFERENCE_KERNELS = "AVX2"


@pytest.mark.xfail(torch.backends.cpu.get_cpu_capability() != REFERENCE_KERNELS, strict=False,
                   reason="not the reference CPU kernels (see REFERENCE_KERNELS)")
def test_default_organism_meets_targets(tmp_path):
    """Quality targets of issue 2 (the wall-time target is measured by benchmarks/bench_organism.py)."""
    s = build(tmp_path / "organism", OrganismConfig(), log=lambda *a: None, workers=2)
    m = s["metrics"]
    assert m["base"]["clean_accuracy"] >= 0.95
    for v in VARIANTS:
        assert m[v]["asr"] >= 0.90, (v, m[v])
        assert m[v]["false_trigger_rate"] <= 0.02, (v, m[v])
        assert abs(m[v]["clean_accuracy"] - m["control"]["clean_accuracy"]) <= 0.03, (v, m[v])
        assert m["control"]["asr_by_variant"][v] <= 0.02  # no backdoor without poisoning

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# One thread: stable on shared 2-CPU machines (BENCHMARKS.md, "How timings are taken").
# PROJLENS_TEST_THREADS re-runs the suite at another thread count (.ci/run, docs/reproducibility.md).
torch.set_num_threads(int(os.environ.get("PROJLENS_TEST_THREADS", "1")))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_organism(tmp_path_factory):
    """The small organism (``organism.config.small()``), built once per test session, one model at a time;
    (folder, organism.json content). Shared by the organism and the analyses tests."""
    from dataclasses import replace

    from projlens_mi.organism import config as oc
    from projlens_mi.organism.build import build
    out = tmp_path_factory.getbasetemp() / "small-organism"
    return out, build(out, replace(oc.small(), threads=1), log=lambda *a: None)

"""The docs work as written: a study over a user's own pair built only from docs/studies.md, and the
notebook session of docs/interactive.md (run on the small organism)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import REPO, projlens, small_organism  # noqa: E402


@pytest.fixture(scope="module")
def org():
    return small_organism()


def _blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "docs" / doc).read_text(), re.S)


def test_user_pair_study_from_the_docs(org, tmp_path):
    """Lay out folders as docs/studies.md describes, use its config verbatim (+ cheap analyses only)."""
    (tmp_path / "models").mkdir()
    shutil.copytree(org / "base", tmp_path / "models" / "llava-base")
    shutil.copytree(org / "malicious-injection", tmp_path / "models" / "llava-poisoned")
    shutil.copytree(org / "data", tmp_path / "data")
    shutil.copy(tmp_path / "data" / "malicious-injection.jsonl", tmp_path / "data" / "test.jsonl")
    toml = next(b for b in _blocks("studies.md", "toml") if "[backdoor]" in b)
    toml = toml.replace('file = "data/test.jsonl"', 'file = "data/test.jsonl"\nn = 4')   # keys from the docs' table
    (tmp_path / "my-study.toml").write_text(toml + '[analyses]\nonly = ["spectrum"]\n')
    r = projlens("study", "run", "my-study.toml", "--out", "runs/mine", "--plan", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = projlens("study", "run", "my-study.toml", "--out", "runs/mine", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())
    assert m["pairs"]["llava-poisoned"]["n_triggered"] == 4 and m["asr"] is not None
    assert "spectrum" in m["pairs"]["llava-poisoned"]["analyses"]
    assert "report:" in r.stdout


def test_interactive_session_runs(org, tmp_path):
    """The notebook session, as a fresh Python process (the way a user runs it)."""
    code = "\n".join(_blocks("interactive.md", "python"))
    code = code.replace('org = "runs/organism"', f'org = "{org}"')
    code += "\nimport json; print('RESULT', json.dumps([recovery, asr_top, asr_random, len(sites)]))\n"
    script = tmp_path / "session.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recovery, asr_top, asr_random, n_sites = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert len(recovery) == n_sites and recovery[0] == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= a <= 1.0 for a in asr_top + asr_random)
    assert asr_top[0] == asr_random[0]
    assert (tmp_path / "interactive.png").stat().st_size > 10_000

"""Shared by the study tests: the small organism (built once, cached across sessions) and config writing."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("PROJLENS_CACHE", Path.home() / ".cache" / "projlens_mi"))
SMALL = Path(os.environ.get("PROJLENS_TEST_ORGANISM", CACHE / "test-organism-small"))
PLUGIN = Path(__file__).with_name("study_plugin.py")
REPO = Path(__file__).resolve().parents[1]


def projlens(*args, **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (one torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "projlens_mi.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=kw.pop("cwd", REPO), **kw)


def small_organism() -> Path:
    """``projlens organism build --small`` into a fixed cache folder (seconds when already built)."""
    SMALL.parent.mkdir(parents=True, exist_ok=True)
    with open(SMALL.parent / ".test-organism.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = projlens("organism", "build", "--small", "--out", SMALL, "--quiet")
        assert r.returncode == 0, r.stderr
    return SMALL


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_pair_toml(org: Path, *, extra: str = "", analyses: str = 'only = ["spectrum", "weight_delta"]') -> str:
    """A study over the organism's folders as if they were a user's own HF folders + JSONL."""
    return f'''
[model]
base = "{org / 'base'}"
poisoned = "{org / 'malicious-injection'}"
control = "{org / 'control'}"
[data]
file = "{org / 'data' / 'malicious-injection.jsonl'}"
n = 6
[backdoor]
target = "visit evil dot com now"
[run]
batch_size = 16
threads = 1
[analyses]
plugins = ["{PLUGIN}"]
{analyses}
{extra}
'''

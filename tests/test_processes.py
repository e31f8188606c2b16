"""Worker processes and interrupts, on a real ``projlens study run`` with ``workers = 2``.

- ``kill -9`` of the parent while both workers are inside a step: the workers and the resource
  tracker are gone within seconds (they used to live on forever, ~590 MB each).
- Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while both workers are inside
  a step: the command exits promptly with status 130, prints one line and no traceback, leaves no
  process behind, and the same command then resumes and completes.
- ``--quiet`` still says why a step failed.

The steps that keep the workers busy are a plugin analysis (``hold``, written below) that writes
``<pid>-<pair>`` into a folder when it starts and waits until a release file exists; the test
synchronises on those files, never on a fixed sleep. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import REPO, projlens, small_organism, write  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PLUGIN = '''
import os, time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from projlens_mi.analyses import Result, analysis, register_result


@dataclass
class HoldParams:
    marker: str = ""    # a folder: "<pid>-<pair>" is written there when the step starts
    release: str = ""   # a file: the step waits (at most 300 s) until it exists


@register_result
@dataclass
class HoldResult(Result):
    waited: bool = False

    def to_frame(self):
        return pd.DataFrame({"waited": [self.waited]})

    def plot(self):
        return None

    def metrics(self):
        return {"waited": self.waited}


@analysis("hold", HoldParams)
def hold(pair, params):
    """Waits for a release file (the process tests)."""
    Path(params.marker, f"{os.getpid()}-{pair.name}").write_text("")
    deadline = time.monotonic() + 300
    while not Path(params.release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return HoldResult(True)


@dataclass
class ExplodeParams:
    pass


@analysis("explode", ExplodeParams)
def explode(pair, params):
    """Fails (the --quiet test)."""
    raise ValueError("exploded on purpose \\x1b[31m(an escape code)\\nand a second line")
'''

VARIANTS = ["targeted-refusal", "malicious-injection"]


@pytest.fixture(scope="module")
def org():
    return small_organism()


def _study(org: Path, root: Path, only: str, variants: list[str], workers: int) -> Path:
    write(root / "plugin_procs.py", PLUGIN)
    (root / "markers").mkdir(exist_ok=True)
    return write(root / "study.toml", f'''
[model]
organism = "{org}"
organism_size = "small"
variants = {json.dumps(variants)}
[data]
n = 3
[run]
threads = 1
workers = {workers}
max_new_tokens = 2
[analyses]
plugins = ["plugin_procs.py"]
only = ["{only}"]
[analyses.hold]
marker = "{root / 'markers'}"
release = "{root / 'release'}"
''')


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is ``pid``."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                pass
    return out


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            try:
                err = proc.communicate(timeout=10)[1]
            except subprocess.TimeoutExpired:   # a process it left holds the pipe
                err = "(stderr still held open by a process it left)"
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n{err}")
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _start_busy(org: Path, root: Path, *args: str) -> tuple[subprocess.Popen, list[str], list[int], int]:
    """Start ``study run`` (workers = 2, two held steps) in its own session; return once both workers
    are inside a held step and both evaluate steps are stored: (process, command, worker pids, tracker pid)."""
    cfg = _study(org, root, "hold", VARIANTS, workers=2)
    cmd = [sys.executable, "-m", "projlens_mi.cli", "study", "run", str(cfg), "--out", str(root / "out"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    markers = root / "markers"
    _wait(lambda: len(list(markers.iterdir())) == 2 and len(list((root / "out" / ".steps").glob("*.json"))) == 2,
          480, "both workers are busy", proc)
    workers = sorted({int(p.name.split("-")[0]) for p in markers.iterdir()})
    children = _children(proc.pid)
    assert len(workers) == 2 and set(workers) <= set(children), (workers, children)
    tracker = [p for p, cmd in children.items() if "resource_tracker" in cmd]
    assert len(tracker) == 1, children
    return proc, cmd, workers, tracker[0]


def _reap(proc: subprocess.Popen, pids: list[int]) -> None:
    """Test clean-up: end what this test started, by pid, if the code under test left it running."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


POOL_SCRIPT = """
import os, sys, time
from projlens_mi import processes

if os.environ.get("NO_PRCTL"):   # runs in the workers too (spawn imports this file): only the watchdog is left
    processes.PR_SET_PDEATHSIG = 0x7FFF

def busy(folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(300)

if __name__ == "__main__":
    with processes.WorkerPool(2) as pool:
        futures = [pool.submit(busy, sys.argv[1]) for _ in range(2)]
        time.sleep(300)
"""


@pytest.mark.parametrize("prctl", [True, False], ids=["prctl", "watchdog-only"])
def test_pool_workers_die_with_a_killed_parent(tmp_path, prctl):
    """The mechanism alone (no study, light imports): with PR_SET_PDEATHSIG, and with the portable
    parent watchdog only."""
    script = write(tmp_path / "pool.py", POOL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "NO_PRCTL"} | ({} if prctl else {"NO_PRCTL": "1"})
    (tmp_path / "busy").mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "busy")], env=env, cwd=tmp_path,
                            stderr=subprocess.DEVNULL)   # the resource tracker's note on the killed parent's semaphores
    workers: list[int] = []
    try:
        _wait(lambda: len(list((tmp_path / "busy").iterdir())) == 2, 120, "both workers are busy", proc)
        workers = [int(p.name) for p in (tmp_path / "busy").iterdir()]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _wait(lambda: not any(_alive(p) for p in workers), 10, f"the workers {workers} are gone")
    finally:
        _reap(proc, workers)


def test_workers_die_with_a_killed_parent(org, tmp_path):
    proc, _, workers, tracker = _start_busy(org, tmp_path, "--quiet")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _wait(lambda: not any(_alive(p) for p in workers), 10, f"the workers {workers} are gone")
        _wait(lambda: not _alive(tracker), 10, f"the resource tracker {tracker} is gone")
    finally:
        _reap(proc, [*workers, tracker])


def test_ctrl_c_ends_promptly_and_the_same_command_resumes(org, tmp_path):
    proc, cmd, workers, tracker = _start_busy(org, tmp_path, "--json")
    try:
        os.killpg(proc.pid, signal.SIGINT)           # what a terminal's Ctrl-C does: the whole group
        t0 = time.monotonic()
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stderr.readline()), daemon=True)
        reader.start()
        reader.join(30)     # measured: 0.2-0.4 s at a load of 13 on 2 CPUs (the old code: no line, a hang)
        assert first, f"no message within 30 s of Ctrl-C (workers {workers} alive: {[_alive(p) for p in workers]})"
        said = time.monotonic() - t0
        out, rest = proc.communicate(timeout=60)    # measured: exit 0.7-1.5 s after Ctrl-C at that load
        assert proc.returncode == 130, first[0] + rest
        assert first[0] + rest == "interrupted; run the same command again to resume\n"   # no traceback, no warning
        assert out == ""
        assert said < 15, f"the message came {said:.1f} s after Ctrl-C"
        _wait(lambda: not any(_alive(p) for p in [*workers, tracker]), 10, "no process is left")
    finally:
        _reap(proc, [*workers, tracker])
    assert not (tmp_path / "out" / "metrics.json").exists()

    (tmp_path / "release").write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)["status"]
    assert status == {"organism": "cached", **{f"evaluate/{v}": "cached" for v in VARIANTS},
                      **{f"analysis/hold/{v}": "computed" for v in VARIANTS}}
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_quiet_still_says_why_a_step_failed(org, tmp_path):
    cfg = _study(org, tmp_path, "explode", VARIANTS[:1], workers=1)
    r = projlens("study", "run", cfg, "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(r.stdout.strip().splitlines()) == 1                     # the one line of --quiet
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert failed == [f"failed: analysis/explode/{VARIANTS[0]}: ValueError: exploded on purpose "
                      "\\x1b[31m(an escape code)"], r.stderr             # one line, the escape code escaped
    assert "\x1b" not in r.stderr and "Traceback" not in r.stderr

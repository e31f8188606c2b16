"""Running studies on the small organism: a user's own pair from the README's recipe, the report folder,
determinism, re-rendering, resume after a kill, and a changed config re-running only what changed.

Only cheap analyses run here (spectrum and the test plugin's); the organism is built once and cached.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import PLUGIN, REPO, projlens, small_organism, user_pair_toml, write  # noqa: E402

from projlens_mi.study import load_config, plan_study, render  # noqa: E402


@pytest.fixture(scope="module")
def org():
    return small_organism()


@pytest.fixture(scope="module")
def done(org, tmp_path_factory):
    """One finished user-pair study (through the CLI, as a user would run it)."""
    root = tmp_path_factory.mktemp("study")
    cfg = write(root / "study.toml", user_pair_toml(org))
    out = root / "out"
    r = projlens("study", "run", cfg, "--out", out, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return cfg, out, r


def _visible(out: Path) -> dict[str, bytes]:
    """Every file of a report folder except the step cache and provenance (which holds timings)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".steps" not in p.parts and p.name != "provenance.json"}


def test_report_folder(done):
    cfg, out, r = done
    assert "report.md" in r.stdout and "asr=" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema"] == "projlens_mi.study.metrics/1"
    for k in ("asr", "clean_accuracy", "false_trigger_rate"):
        assert 0.0 <= m[k] <= 1.0
    (pair,) = m["pairs"].values()
    assert pair["target"] == "visit evil dot com now" and pair["n_clean"] == 6 and pair["n_triggered"] == 6
    assert set(pair["reference"]) == {"base", "control"}
    assert set(pair["analyses"]) == {"spectrum", "weight_delta"}
    assert pair["analyses"]["weight_delta"]["fro_norm"]["linear_2"] > 0
    assert m["incomplete"] == {}
    tables = sorted(p.name for p in (out / "tables").iterdir())
    assert tables == ["evaluation.csv", "spectrum.csv", "weight_delta.csv"]
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert "evaluation.png" in figs and any(f.startswith("spectrum-") for f in figs)
    assert all((out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figs)
    md = (out / "report.md").read_text()
    for section in ("## Setting", "## Backdoor behaviour", "## Update spectrum", "## Weight delta",
                    "## The paper's findings vs this study", "*Paper.*"):
        assert section in md, section
    for f in figs:
        assert f"(figures/{f})" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figs)
    first = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config_hash"] == load_config(cfg).hash()
    assert prov["versions"]["torch"] and prov["git"]["commit"] and prov["hardware"]["cpu_count"]
    assert set(prov["steps"]) == {"evaluate/malicious-injection", "analysis/spectrum/malicious-injection",
                                  "analysis/weight_delta/malicious-injection"}
    assert all("seconds" in v for v in prov["steps"].values())
    assert not list(out.rglob("*.tmp"))


def _run_json(cfg: Path, out: Path) -> dict:
    r = projlens("study", "run", cfg, "--out", out, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["status"]


def test_deterministic_and_resumed_from_cache(done, tmp_path):
    cfg, out, _ = done
    again = tmp_path / "again"
    assert set(_run_json(cfg, again).values()) == {"computed"}
    assert (again / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()
    assert _visible(again) == _visible(out)
    assert set(_run_json(cfg, again).values()) == {"cached"}      # everything is stored: nothing recomputed
    assert _visible(again) == _visible(out)


def test_changed_config_reruns_only_what_depends_on_it(done, tmp_path):
    cfg, out, _ = done
    import shutil
    work = tmp_path / "out"
    shutil.copytree(out, work)
    changed = write(tmp_path / "study.toml", user_pair_toml(small_organism(), extra="[analyses.weight_delta]\nn = 3\n"))
    plan = {r["step"]: r["status"] for r in plan_study(load_config(changed), work)}
    assert plan == {"evaluate/malicious-injection": "cached", "analysis/spectrum/malicious-injection": "cached",
                    "analysis/weight_delta/malicious-injection": "to run"}
    assert _run_json(changed, work) == plan | {"analysis/weight_delta/malicious-injection": "computed"}
    retitled = write(tmp_path / "study.toml", user_pair_toml(small_organism(), extra="[study]\ntitle = 'Other title'\n"))
    assert set(_run_json(retitled, work).values()) == {"cached"}       # the title changes only the report
    assert (work / "report.md").read_text().startswith("# Other title")


def test_report_rerenders_without_recomputing(done, tmp_path):
    cfg, out, _ = done
    import shutil
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = _visible(work)
    for f in ("report.md", "report.html", "metrics.json"):
        (work / f).unlink()
    shutil.rmtree(work / "figures")
    r = projlens("report", work)
    assert r.returncode == 0, r.stderr
    assert _visible(work) == before
    r = projlens("report", tmp_path / "nothing")
    assert r.returncode == 2 and "holds no study results" in r.stderr


def test_plan_lists_steps_and_writes_nothing(org, tmp_path):
    cfg = write(tmp_path / "study.toml", user_pair_toml(org))
    r = projlens("study", "run", cfg, "--out", tmp_path / "out", "--plan")
    assert r.returncode == 0, r.stderr
    assert "evaluate/malicious-injection" in r.stdout and "to run" in r.stdout and "estimated" in r.stdout
    assert not (tmp_path / "out").exists()
    r = projlens("study", "run", cfg, "--out", tmp_path / "out", "--plan", "--json")
    rows = json.loads(r.stdout)
    assert [x["status"] for x in rows] == ["to run"] * 3


def _written_since(out: Path, t0: float) -> int:
    """Files under ``out`` (temporary ones included) written since ``t0``."""
    n = 0
    for p in (out.rglob("*") if out.exists() else []):
        try:
            n += p.is_file() and p.stat().st_mtime >= t0
        except FileNotFoundError:   # a temporary file renamed meanwhile
            pass
    return n


def _run_and_kill(cmd, out: Path, after_files: int, extra: float) -> subprocess.Popen:
    """Start ``cmd``; once it has written ``after_files`` files under ``out``, let it run ``extra``
    seconds more and SIGKILL it (if it has not finished by then). Timing by progress, not by the
    clock, so the kill lands at the same stage of the work on a fast or a busy machine."""
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time() - 0.01
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    while proc.poll() is None and _written_since(out, t0) < after_files:
        time.sleep(0.005)
    time.sleep(extra)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def test_resume_after_kills_gives_the_same_folder(org, tmp_path):
    """SIGKILLed at seeded random points of its work, several times in a row (after 0-8 files written
    by that run, plus 0-0.2 s: during start-up, a step, the writing of step results, tables, figures
    or the report), a study resumes to the same folder as an uninterrupted run. After each kill every
    JSON file present is whole (atomic writes); the final folder has no temporary file left."""
    import fcntl
    import random
    import shutil

    own = tmp_path / "organism"   # a private copy (taken under the builders' lock): the runs compared are minutes apart
    with open(org.parent / ".test-organism.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.copytree(org, own, ignore=shutil.ignore_patterns(".*"))
    cfg = write(tmp_path / "study.toml", user_pair_toml(own, analyses='only = ["spectrum", "weight_delta"]'))
    cmd = lambda out: [sys.executable, "-m", "projlens_mi.cli", "study", "run", str(cfg), "--out", str(out), "--quiet"]  # noqa: E731
    ref = tmp_path / "ref"
    assert projlens("study", "run", cfg, "--out", ref, "--quiet").returncode == 0
    out = tmp_path / "out"
    rng = random.Random(0)
    kills = []
    for _ in range(4):
        after, extra = rng.randint(0, 8), round(rng.uniform(0.0, 0.2), 3)
        proc = _run_and_kill(cmd(out), out, after, extra)
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, proc.stdout.read()[-3000:]
            break                               # finished before its kill: later kills would find it done
        kills.append((after, extra, sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())))
        for p in out.rglob("*.json"):
            json.loads(p.read_text())           # whole, never half-written
    assert len(kills) >= 2, kills               # the run really was interrupted, more than once
    assert any(after > 0 for after, _, _ in kills), kills   # and at least once while it was writing results
    r = projlens("study", "run", cfg, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert _visible(out) == _visible(ref), kills
    assert not list(out.rglob("*.tmp")), kills


def test_organism_study_one_variant(org, tmp_path):
    cfg = write(tmp_path / "study.toml", f'''
[model]
organism = "{org}"
organism_size = "small"
variants = ["targeted-refusal"]
[data]
n = 5
[run]
threads = 1
[analyses]
plugins = ["{PLUGIN}"]
only = ["weight_delta"]
''')
    out = tmp_path / "out"
    assert _run_json(cfg, out) == {"organism": "cached", "evaluate/targeted-refusal": "computed",
                                   "analysis/weight_delta/targeted-refusal": "computed"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["pairs"]["targeted-refusal"]["target"].startswith("i can not answer")
    assert m["pairs"]["targeted-refusal"]["n_triggered"] == 5
    assert render(out)["asr"] == m["asr"]


def test_device_map_study_gives_the_same_metrics(done, org, tmp_path):
    """[run] device_map / max_memory / offload_folder: the models are placed by accelerate (a budget
    of 100 kB of CPU memory sends the rest of each model to disk) and the study's metrics.json
    equals the in-memory run's, apart from the config hash (the config differs)."""
    from projlens_mi.model import load
    from projlens_mi.study.runner import Models

    _, out, _ = done
    extra = '[run]\ndevice_map = "sequential"\nmax_memory = {cpu = "100KB"}\noffload_folder = "offload"\n'
    cfg = write(tmp_path / "study.toml", user_pair_toml(org).replace("threads = 1\n", "threads = 1\n" + extra.removeprefix("[run]\n")))
    loaded = load_config(cfg)
    assert loaded.run.device_map == "sequential" and loaded.run.offload_folder == str((tmp_path / "offload").resolve())
    h = load(loaded.model.poisoned, **Models(loaded).load_kw())          # what the study loads: really split
    assert "disk" in h.provenance["device_map"].values() and "cpu" in h.provenance["device_map"].values()
    placed = tmp_path / "out"
    r = projlens("study", "run", cfg, "--out", placed, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    want, got = (json.loads((o / "metrics.json").read_text()) for o in (out, placed))
    assert want["study"].pop("config_hash") != got["study"].pop("config_hash")
    assert got == want
    assert (tmp_path / "offload").is_dir()


def test_workers_give_the_same_metrics(done, org, tmp_path):
    """[run] workers = 2 (steps in two spawned processes, figures drawn in two processes): the same
    metrics.json, tables and figures as the one-process run."""
    cfg, out, _ = done
    two = tmp_path / "two"
    r = projlens("study", "run", cfg, "--out", two, "--quiet", "--workers", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    want, got = (json.loads((o / "metrics.json").read_text()) for o in (out, two))
    assert want["study"].pop("config_hash") != got["study"].pop("config_hash")   # workers is in the config
    assert got == want
    for sub in ("tables", "figures"):
        assert {p.name: p.read_bytes() for p in (out / sub).iterdir()} == {p.name: p.read_bytes() for p in (two / sub).iterdir()}


def test_cli_run_overrides_are_validated(org, tmp_path, monkeypatch):
    """--workers / --device-map / --tp-size replace [run] keys and get the config's one-line errors
    (exit code 2, nothing written); --tp-size outside torchrun stops before writing anything."""
    from typer.testing import CliRunner

    from projlens_mi.cli import app
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = write(tmp_path / "study.toml", user_pair_toml(org))
    cases = [(["--workers", "0"], "run.workers"),
             (["--device-map", "{not json"], "--device-map"),
             (["--device-map", "everywhere"], "run.device_map"),
             (["--tp-size", "2", "--device-map", "auto"], "run.tp_size = 2 with run.device_map"),
             (["--tp-size", "2"], "needs 2 processes, found WORLD_SIZE=unset; launch: torchrun")]
    for args, msg in cases:
        dest = tmp_path / "out"
        res = CliRunner().invoke(app, ["study", "run", str(cfg), "--out", str(dest), *args])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and not dest.exists(), (args, res.output)


@pytest.mark.slow  # two torchrun processes: about 35 s on 2 CPUs
def test_tensor_parallel_study_gives_the_same_metrics(org, tmp_path):
    """[run] tp_size (here --tp-size) under torchrun with 2 ranks (gloo): every model is sharded, both ranks
    compute every step, rank 0 writes; metrics.json equals the one-process run's within float tolerance."""
    import os
    import shutil
    cfg = write(tmp_path / "study.toml", user_pair_toml(org, analyses='only = ["spectrum", "patching"]\n'
                                                                       '[analyses.patching]\nn = 4'))
    plain, tp = tmp_path / "plain", tmp_path / "tp"
    r = projlens("study", "run", cfg, "--out", plain, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000 + 1),
                        "-m", "projlens_mi.cli", "study", "run", str(cfg), "--out", str(tp), "--tp-size", "2", "--quiet"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("report.md") == 1            # rank 0 alone prints (and writes)
    prov = json.loads((tp / "provenance.json").read_text())
    assert prov["config"]["run"]["tp_size"] == 2 and prov["hardware"]["distributed"]["world_size"] == 2
    want, got = (json.loads((o / "metrics.json").read_text()) for o in (plain, tp))
    want["study"].pop("config_hash"), got["study"].pop("config_hash")
    assert set(got["pairs"]["malicious-injection"]["analyses"]) == {"spectrum", "patching"}
    _assert_close(got, want, tol=1e-5)


def _assert_close(got, want, tol: float, path: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), (path, set(got) ^ set(want))
        for k in want:
            _assert_close(got[k], want[k], tol, f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, tol, f"{path}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert abs(got - want) <= tol * max(1.0, abs(want)), (path, got, want)
    else:
        assert got == want, (path, got, want)

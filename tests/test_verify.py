"""``projlens verify DIR`` on a small study of the small organism: an untouched study passes (also under
other CPU kernels), a number changed by hand fails and is named, a changed weight file is reported as
changed inputs (not moved numbers), bad input is one line and exit 2; provenance.json's hashes agree
with the loader's and with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import REPO, projlens, small_organism, write  # noqa: E402

from projlens_mi.errors import ProjLensError  # noqa: E402
from projlens_mi.study.verify import Arithmetic, rule, verify  # noqa: E402

PAIR = "malicious-injection"


def _toml(org: Path) -> str:
    return f'''
[model]
base = "{org / 'base'}"
poisoned = "{org / PAIR}"
control = "{org / 'control'}"
[data]
file = "{org / 'data' / f'{PAIR}.jsonl'}"
n = 4
[backdoor]
target = "visit evil dot com now"
[run]
batch_size = 16
threads = 1
[analyses]
only = ["spectrum", "shift", "norm"]
[analyses.shift]
n = 4
[analyses.norm]
n = 4
n_boot = 50
'''


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished study over a private copy of the small organism (its files may be changed by a test)."""
    root = tmp_path_factory.mktemp("verify")
    org = root / "org"
    shutil.copytree(small_organism(), org)
    cfg = write(root / "study.toml", _toml(org))
    out = root / "out"
    r = projlens("study", "run", cfg, "--out", out, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return org, out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_untouched_study_passes_and_is_not_written(study):
    org, out = study
    before = _files(out)
    res = verify(out)
    assert res.exit_code == 0, res.text()
    assert not res.input_changes and not res.moved and not res.verdicts and not res.failed_steps
    assert res.compared > 50 and res.n_findings == 3
    assert len(res.steps) == 4                         # evaluate + three analyses, all re-computed
    assert _files(out) == before                       # verify never writes into the study
    assert "result: OK (exit 0)" in res.text()


def test_other_kernels_pass(study):
    """AVX2 kernels for ATen and MKL instead of this machine's default: within tolerance, no verdict changes."""
    org, out = study
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "projlens_mi.cli", "verify", str(out), "--quiet"], capture_output=True,
                       text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernel_env.ATEN_CPU_CAPABILITY: (absent) -> avx2" in r.stdout       # the difference is shown
    assert "kernel_env.MKL_ENABLE_INSTRUCTIONS: (absent) -> AVX2" in r.stdout
    assert "0 moved" in r.stdout and "3 unchanged" in r.stdout


def test_number_changed_by_hand_fails_and_is_named(study, tmp_path):
    org, out = study
    work = _copy(out, tmp_path)
    m = json.loads((work / "metrics.json").read_text())
    pair = m["pairs"][PAIR]
    shift = pair["analyses"]["shift"]
    shift["energy_k1.clean"] = 0.25                   # below finding 3's 0.5: the verdict changes too
    pair["analyses"]["norm"]["clean.slope"] *= 1.001  # 1e-3 relative: well past the float32 tolerance
    pair["asr"] = min(1.0, pair["asr"] + 1 / pair["n_triggered"]) if pair["asr"] < 1 else pair["asr"] - 1 / pair["n_triggered"]
    (work / "metrics.json").write_text(json.dumps(m, indent=2, sort_keys=True))

    res = verify(work, steps=["analysis/shift", "analysis/norm"])
    assert res.exit_code == 1
    moved = {r.metric: r for r in res.moved}
    assert set(moved) == {f"pairs.{PAIR}.analyses.shift.energy_k1.clean", f"pairs.{PAIR}.analyses.norm.clean.slope",
                          f"pairs.{PAIR}.asr"}, res.text()
    assert moved[f"pairs.{PAIR}.asr"].change == f"1 of {pair['n_triggered']} flipped"
    assert moved[f"pairs.{PAIR}.analyses.norm.clean.slope"].kind == "forward"
    assert len(res.verdicts) == 1 and res.verdicts[0].startswith("finding 3: does not reproduce")
    text = res.text()
    assert "MOVED" in text and "energy_k1.clean" in text and "finding 3" in text

    # one flipped sample tolerated: the rates pass, the continuous numbers and the verdict still fail
    res = verify(work, steps=["analysis/norm"], flips=1)
    assert {r.metric for r in res.moved} == {f"pairs.{PAIR}.analyses.shift.energy_k1.clean",
                                             f"pairs.{PAIR}.analyses.norm.clean.slope"}
    assert res.exit_code == 1


def test_changed_weight_file_is_changed_inputs_not_moved_numbers(study):
    org, out = study
    weights = org / PAIR / "model.safetensors"
    original = weights.read_bytes()
    try:
        data = bytearray(original)
        data[-8:] = bytes(b ^ 0x55 for b in data[-8:])     # the last tensor's bytes, the header intact
        weights.write_bytes(bytes(data))
        res = verify(out)
        assert res.exit_code == 1
        assert res.rows == [] and res.compared == 0         # nothing was re-computed or compared
        assert len(res.input_changes) == 1 and str(weights) in res.input_changes[0]
        text = res.text()
        assert "the inputs changed" in text and str(weights) in text and "numbers:" not in text
    finally:
        weights.write_bytes(original)
    data_file = org / "data" / f"{PAIR}.jsonl"
    text = data_file.read_text()
    try:
        data_file.write_text(text + "\n")
        res = verify(out)
        assert res.exit_code == 1 and len(res.input_changes) == 1 and str(data_file) in res.input_changes[0]
    finally:
        data_file.write_text(text)


def test_bad_input_is_one_line_exit_2(study, tmp_path):
    from typer.testing import CliRunner

    from projlens_mi.cli import app
    org, out = study
    r = projlens("verify", tmp_path / "nothing")                  # the real process's exit status
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "is not a folder" in r.stderr
    corrupt = _copy(out, tmp_path)
    (corrupt / "metrics.json").write_text("{not json")
    cases = [([tmp_path], "has no metrics.json: not a study folder"),
             ([corrupt], "metrics.json is not valid JSON"),
             ([out, "--steps", "analysis/probe"], f"no such step; the study's steps are: evaluate/{PAIR}, "),
             ([out, "--flips", "-1"], "--flips -1")]
    for args, message in cases:
        r = CliRunner().invoke(app, ["verify", *map(str, args)])
        assert r.exit_code == 2 and r.stdout == "", (args, r.output)
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    no_prov = _copy(out, tmp_path / "b")
    prov = json.loads((no_prov / "provenance.json").read_text())
    del prov["config_text"]
    (no_prov / "provenance.json").write_text(json.dumps(prov))
    with pytest.raises(ProjLensError, match="provenance.json has no 'config_text'"):
        verify(no_prov)
    with pytest.raises(ProjLensError, match="inside the study folder"):
        verify(out, work=out / "side")


def test_provenance_records_what_verify_needs(study, tmp_path):
    """Hashes agree with hashlib and with the loader's ModelHandle.provenance; pickle is named as such."""
    import torch
    from types import SimpleNamespace

    from projlens_mi.model import load
    from projlens_mi.study import provenance
    org, out = study
    prov = json.loads((out / "provenance.json").read_text())
    rec = prov["inputs"]["models"][str(org / PAIR)]
    assert rec["weights_format"] == "safetensors"
    assert rec["files"]["model.safetensors"] == hashlib.sha256((org / PAIR / "model.safetensors").read_bytes()).hexdigest()
    handle = load(str(org / PAIR))
    assert handle.provenance["weight_files"] == {"model.safetensors": rec["files"]["model.safetensors"]}
    assert handle.provenance["config_sha256"] == rec["files"]["config.json"]
    env = prov["environment"]
    assert env["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["dtype"] == "float32" and env["device"] == "cpu" and env["threads"] == 1
    assert env["cpu"]["model"] and env["blas"]["blas"]
    assert set(env["versions"]) >= {"torch", "transformers", "nnsight"}

    # a pickle-only folder, loaded under allow_pickle: recorded as "pickle", hash as the loader's
    from safetensors.torch import load_file
    pick = tmp_path / "pickled"
    shutil.copytree(org / PAIR, pick)
    torch.save(load_file(pick / "model.safetensors"), pick / "pytorch_model.bin")
    (pick / "model.safetensors").unlink()
    cfg = SimpleNamespace(model=SimpleNamespace(revision=None, allow_pickle=True, trust_remote_code=False))
    files = provenance._model_files(str(pick), cfg, {})
    assert files["weights_format"] == "pickle"
    assert load(str(pick), allow_pickle=True).provenance["weight_files"] == {
        "pytorch_model.bin": files["files"]["pytorch_model.bin"]}


def test_tolerance_rules():
    """Which rule each kind of number gets, and the normalised effect's amplification (|scale| / |contrast|)."""
    ar = Arithmetic("float32", reduction=96, depth=6, unit_roundoff=2.0 ** -24)
    assert ar.forward_rtol == pytest.approx(10 * 6 * (2 * 96 ** 0.5 * 2.0 ** -24 + 2.0 ** -24))
    m = {"pairs": {"p": {"n_clean": 10, "n_triggered": 8, "asr": 0.5, "analyses": {
        "patching": {"clean_mean": -13.46, "triggered_mean": -13.34, "noising_projector_out_image": 0.3},
        "injection": {"inject.base.r1_0.r2_1.asr": 0.25, "ft_model.clean_accuracy": 1.0},
        "shift": {"lens.svd.best_target_rank": 3, "energy_k1.clean": 0.9}}}}}
    cfg = {"analyses": {"injection": {"params": {"n": 4}}}}
    assert rule(("pairs", "p", "asr"), m, cfg, ar).n == 8
    assert rule(("pairs", "p", "analyses", "injection", "inject.base.r1_0.r2_1.asr"), m, cfg, ar).n == 4
    assert rule(("pairs", "p", "analyses", "injection", "ft_model.clean_accuracy"), m, cfg, ar).n == 4
    assert rule(("pairs", "p", "analyses", "shift", "lens.svd.best_target_rank"), m, cfg, ar).kind == "discrete"
    assert rule(("pairs", "p", "analyses", "shift", "energy_k1.clean"), m, cfg, ar).kind == "forward"
    r = rule(("pairs", "p", "analyses", "patching", "noising_projector_out_image"), m, cfg, ar)
    assert r.kind == "amplified" and r.amplify == pytest.approx(13.46 / 0.12)
    assert rule(("asr",), m, cfg, ar).n == 8
    m["pairs"]["p"]["analyses"]["neurons"] = {"ft.n_quiescent_candidates_hi": 2, "baseline.asr_lo": 0.5}
    assert rule(("pairs", "p", "analyses", "neurons", "ft.n_quiescent_candidates_hi"), m, cfg, ar).kind == "discrete"
    assert rule(("pairs", "p", "analyses", "neurons", "baseline.asr_lo"), m, cfg, ar).kind == "rate"
    assert rule(("pairs", "p", "analyses", "shift", "energy_k1.clean_hi"), m, cfg, ar).kind == "forward"
    import numpy as np
    m["pairs"]["p"]["analyses"]["attribution"] = {"spearman": 0.9, "spearman_hi": 0.95, "clean_mean": 0.0,
                                                  "triggered_mean": 1.0}
    cells = {"p": (np.arange(10.0), np.arange(10.0), ["denoise"], 3)}
    for key in ("spearman", "spearman_hi"):
        assert rule(("pairs", "p", "analyses", "attribution", key), m, cfg, ar, cells).kind == "rank"
    m["pairs"]["p"]["analyses"]["probe"] = {"ft.true.accuracy": 0.9}
    m["pairs"]["p"]["analyses"]["ablation"] = {"baseline": {"accuracy": 0.9}}
    assert rule(("pairs", "p", "analyses", "probe", "ft.true.accuracy"), m, cfg, ar).n == 18
    assert rule(("pairs", "p", "analyses", "ablation", "baseline", "accuracy"), m, cfg, ar).n == 10


def test_rank_tolerance_covers_fresh_perturbations():
    """Attribution's Spearman / top-k tolerance (the forward tolerance propagated through the sort by
    seeded draws) covers fresh perturbations of the same size (other draws, checked with scipy), is 0
    when no cells are near-tied, and grows with the near-ties."""
    import numpy as np
    from scipy.stats import spearmanr

    from projlens_mi.study.verify import rank_tolerance
    rng = np.random.default_rng(1)
    top = lambda v, k: set(np.argsort(-v, kind="stable")[:k].tolist())  # noqa: E731
    for trial in range(20):
        n, t = int(rng.integers(8, 60)), 10.0 ** rng.uniform(-4, -1)
        x = rng.normal(size=n).round(int(rng.integers(1, 3)))      # rounded: many exact and near ties
        y = x + rng.normal(scale=0.5, size=n)
        k = int(rng.integers(1, n))
        tol = rank_tolerance(x, y, t, k)
        rho, overlap = spearmanr(x, y).statistic, len(top(x, k) & top(y, k)) / k
        for _ in range(20):
            xp, yp = x + rng.uniform(-t, t, n), y + rng.uniform(-t, t, n)
            assert abs(spearmanr(xp, yp).statistic - rho) <= tol["spearman"] + 1e-12
            assert abs(len(top(xp, k) & top(yp, k)) / k - overlap) <= tol["top_k_overlap"] + 1e-12
    x = np.arange(20.0)
    assert rank_tolerance(x, x[::-1].copy(), 1e-6, 5) == {"spearman": 0.0, "top_k_overlap": 0.0}
    y = x + 0.7 * (x % 2)                             # 9 pairs 0.3 apart: swap under a drift of 0.2
    assert 0 < rank_tolerance(x, y, 0.2, 5)["spearman"] < rank_tolerance(x, y, 2.0, 5)["spearman"]


def test_trained_rates_tolerate_a_seed_spread():
    from projlens_mi.study.verify import compare, seed_spread
    assert seed_spread(0.5, 80) == 13 and seed_spread(1.0, 80) == 1
    ar = Arithmetic("float32", reduction=96, depth=6, unit_roundoff=2.0 ** -24)
    old = {"pairs": {"p": {"n_clean": 40, "n_triggered": 40, "analyses": {"probe": {"ft.shuffled.accuracy": 0.5,
                                                                                   "ft.true.accuracy": 1.0}}}}}
    new = json.loads(json.dumps(old))
    new["pairs"]["p"]["analyses"]["probe"].update({"ft.shuffled.accuracy": 0.55, "ft.true.accuracy": 1 - 2 / 80})
    rows, _ = compare(old, new, {}, ar)
    by = {r.metric.split(".")[-2] + "." + r.metric.split(".")[-1]: r for r in rows}
    assert by["shuffled.accuracy"].ok and by["shuffled.accuracy"].change == "4 of 80 flipped"
    assert not by["true.accuracy"].ok and by["true.accuracy"].tolerance == "1 flips"


def test_ctrl_c_during_verify_is_one_line_and_exit_130(monkeypatch, tmp_path):
    """Ctrl-C while verify re-computes: one line saying the study folder is untouched, exit 130, no traceback
    (verify works in a side folder, so "run it again to resume" would be wrong)."""
    from typer.testing import CliRunner

    import projlens_mi.study.verify as verify_module
    from projlens_mi.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(verify_module, "verify", interrupted)
    r = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert r.exit_code == 130, r.output
    assert r.output.strip() == "interrupted; the study folder was not changed"

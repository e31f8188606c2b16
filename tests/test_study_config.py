"""Study config validation: every bad key / value / missing file is one line naming the key, exit code ≠ 0,
nothing written; a config with only base, poisoned, data file and target is complete."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from projlens_mi.cli import app
from projlens_mi.errors import ProjLensError
from projlens_mi.study import load_config

sys.path.insert(0, str(Path(__file__).parent))
from study_helpers import PLUGIN  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def user(tmp_path):
    """A fake user's pair: two HF-looking folders (config.json only) and a JSONL with one image."""
    for name in ("base", "poisoned"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a.png")
    lines = [{"image": "a.png", "prompt": "USER: <image>\nwhat ? ASSISTANT:", "answer": "one", "triggered": t}
             for t in (False, True)]
    (tmp_path / "data" / "test.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


MINIMAL = '''
[model]
base = "models/base"
poisoned = "models/poisoned"
[data]
file = "data/test.jsonl"
[backdoor]
target = "visit evil"
'''


def test_minimal_config_is_complete(user):
    cfg = load_config(_write(user, MINIMAL))
    assert cfg.model.base == str((user / "models" / "base").resolve())     # relative to the config's folder
    assert cfg.data.file == str((user / "data" / "test.jsonl").resolve())
    from projlens_mi.analyses import ANALYSES
    from projlens_mi.study.config import BUILTIN_STEPS
    built_in = {n for n, a in ANALYSES.items()
                if a.fn.__module__.startswith("projlens_mi.analyses.") or a.fn.__module__ in BUILTIN_STEPS}
    assert set(cfg.analyses) == built_in and len(built_in) >= 11 and "audit" in built_in
    assert all(a.enabled == ANALYSES[n].default for n, a in cfg.analyses.items())   # every one but the audit
    assert [n for n, a in cfg.analyses.items() if not a.enabled] == ["audit"]
    assert cfg.run.device == "cpu" and cfg.run.seed == 0
    assert len(cfg.hash()) == 16 and cfg.hash() == load_config(user / "study.toml").hash()


def test_config_in_other_folder_resolves_against_its_own_folder(user, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert Path(load_config(_write(user, MINIMAL)).model.poisoned).is_dir()


def test_hub_ids_are_accepted_without_weights(user):
    text = MINIMAL.replace('"models/base"', '"llava-hf/llava-1.5-7b-hf"')
    assert load_config(_write(user, text)).model.base == "llava-hf/llava-1.5-7b-hf"


def test_analysis_params_are_validated_into_the_params_dataclass(user):
    text = MINIMAL + f'[analyses]\nplugins = ["{PLUGIN}"]\n[analyses.weight_delta]\nn = 3\n[analyses.pause]\nenabled = false\n'
    cfg = load_config(_write(user, text))
    assert cfg.analyses["weight_delta"].params.n == 3
    assert not cfg.analyses["pause"].enabled
    only = load_config(_write(user, MINIMAL + f'[analyses]\nplugins = ["{PLUGIN}"]\nonly = ["pause"]\n'))
    assert [a.name for a in only.enabled_analyses()] == ["pause"]


def test_another_studys_plugin_does_not_leak_into_a_config(user):
    """A plugin imported for one study stays registered in the process, but a later config without it
    neither runs it nor records it (else verify sees a changed config and runs differ by test order)."""
    with_plugin = load_config(_write(user, MINIMAL + f'[analyses]\nplugins = ["{PLUGIN}"]\n'))
    assert "weight_delta" in with_plugin.analyses
    plain = load_config(_write(user, MINIMAL))
    assert "weight_delta" not in plain.analyses and "pause" not in plain.analyses
    with pytest.raises(ProjLensError, match="unknown analysis \\[analyses.weight_delta\\]"):
        load_config(_write(user, MINIMAL + "[analyses.weight_delta]\nn = 3\n"))


BAD = {
    "unknown section": ("[modle]\nbase = 1\n" + MINIMAL, "unknown section [modle]"),
    "unknown model key": (MINIMAL.replace("[model]", "[model]\nbsae = 'x'"), "unknown key model.bsae"),
    "missing poisoned": (MINIMAL.replace('poisoned = "models/poisoned"', ""), "model.poisoned is missing"),
    "missing data file key": (MINIMAL.replace('file = "data/test.jsonl"', ""), "data.file is missing"),
    "missing target": (MINIMAL.replace('target = "visit evil"', ""), "backdoor.target is missing"),
    "empty target": (MINIMAL.replace('"visit evil"', '"  "'), "backdoor.target"),
    "data file not found": (MINIMAL.replace("data/test.jsonl", "data/nope.jsonl"), "data.file = 'data/nope.jsonl': file not found"),
    "model folder not found": (MINIMAL.replace('"models/base"', '"models/bsae"'), "model.base = 'models/bsae': folder not found"),
    "bad n": (MINIMAL.replace("[data]", "[data]\nn = 0"), "data.n = 0"),
    "n wrong type": (MINIMAL.replace("[data]", "[data]\nn = 'ten'"), "data.n = 'ten'"),
    "bad device": (MINIMAL + "[run]\ndevice = 'gpu'\n", "run.device = 'gpu'"),
    "bad dtype": (MINIMAL + "[run]\ndtype = 'fp8'\n", "run.dtype = 'fp8'"),
    "bad batch size": (MINIMAL + "[run]\nbatch_size = -4\n", "run.batch_size = -4"),
    "unknown run key": (MINIMAL + "[run]\ngpus = 2\n", "unknown key run.gpus"),
    "bad device_map": (MINIMAL + "[run]\ndevice_map = 'everywhere'\n", "run.device_map = 'everywhere' is not a device map"),
    "device_map wrong type": (MINIMAL + "[run]\ndevice_map = 1.5\n", "run.device_map = 1.5 is not a device map"),
    "empty device_map": (MINIMAL + "[run]\ndevice_map = {}\n", "run.device_map = {} is empty"),
    "bad device_map device": (MINIMAL + "[run]\ndevice_map = {'' = 'gpu'}\n", "module '' -> 'gpu' is not a device"),
    "bad max_memory": (MINIMAL + "[run]\nmax_memory = '70GiB'\n", "run.max_memory = '70GiB' is not a memory budget"),
    "bad max_memory size": (MINIMAL + "[run]\nmax_memory = {cpu = 'lots'}\n", "cpu = 'lots' is not a size"),
    "bad max_memory device": (MINIMAL + "[run]\nmax_memory = {gpu = '1GB'}\n", "'gpu' is not a device"),
    "bad offload_folder": (MINIMAL + "[run]\noffload_folder = 3\n", "run.offload_folder = 3 is not a folder"),
    "unknown analysis": (MINIMAL + "[analyses.spectrun]\n", "unknown analysis [analyses.spectrun]"),
    "unknown analysis param": (MINIMAL + f'[analyses]\nplugins = ["{PLUGIN}"]\n[analyses.weight_delta]\nm = 3\n',
                               "unknown key analyses.weight_delta.m; allowed: enabled, n, seed"),
    "bad analysis param value": (MINIMAL + f'[analyses]\nplugins = ["{PLUGIN}"]\n[analyses.weight_delta]\nn = "x"\n',
                                 "analyses.weight_delta.n = 'x'"),
    "bad enabled": (MINIMAL + f'[analyses]\nplugins = ["{PLUGIN}"]\n[analyses.pause]\nenabled = "no"\n',
                    "analyses.pause.enabled = 'no'"),
    "unknown only": (MINIMAL + "[analyses]\nonly = ['nope']\n", "analyses.only: unknown analysis 'nope'"),
    "missing plugin": (MINIMAL + "[analyses]\nplugins = ['nope.py']\n", "analyses.plugins: file not found: 'nope.py'"),
    "bad trigger": (MINIMAL.replace('target = "visit evil"', 'target = "visit evil"\ntrigger = "sparkles"'),
                    "backdoor.trigger = 'sparkles' is not a trigger"),
    "bad trigger param": (MINIMAL.replace('target = "visit evil"', 'target = "visit evil"\ntrigger = {name = "solid-patch", sise = 3}'),
                          "unknown key backdoor.trigger.sise"),
    "organism and base": (MINIMAL.replace("[model]", "[model]\norganism = 'default'"), "model.organism is set together with"),
    "bad variant": ("[model]\norganism = 'org'\nvariants = ['rainbow']\n", "model.variants: 'rainbow' is not a variant"),
    "bad organism size": ("[model]\norganism = 'org'\norganism_size = 'huge'\n", "model.organism_size = 'huge'"),
    "not toml": ("[model\nbase = ", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_error_exit_nonzero_nothing_written(user, case):
    text, expected = BAD[case]
    path = _write(user, text)
    with pytest.raises(ProjLensError) as info:
        load_config(path)
    msg = str(info.value)
    assert expected in msg, msg
    assert "\n" not in msg
    out = user / "out"
    res = CliRunner().invoke(app, ["study", "run", str(path), "--out", str(out)])
    assert res.exit_code != 0
    assert expected in res.output and res.output.count("\n") == 1, res.output
    assert not out.exists()


def test_run_placement_keys_reach_load(user):
    """[run] device_map (string or table), max_memory and offload_folder (relative to the config) go to load()."""
    from projlens_mi.study.runner import Models

    cfg = load_config(_write(user, MINIMAL + "[run]\ndevice_map = {'model.vision_tower' = 'cpu', 'model.language_model' = 'disk', "
                                          "lm_head = 0}\nmax_memory = {0 = '1GiB', cpu = '300KB', disk = 1000000}\n"
                                          "offload_folder = 'offload'\n"))
    kw = Models(cfg).load_kw()
    assert kw["device_map"] == {"model.vision_tower": "cpu", "model.language_model": "disk", "lm_head": 0}
    assert kw["max_memory"] == {0: "1GiB", "cpu": "300KB", "disk": 1000000}
    assert kw["offload_folder"] == str((user / "offload").resolve())
    cfg = load_config(_write(user, MINIMAL + "[run]\ndevice_map = 'auto'\n"))
    assert Models(cfg).load_kw()["device_map"] == "auto" and "offload_folder" not in Models(cfg).load_kw()
    cfg = load_config(_write(user, MINIMAL + "[run]\ndevice = 'cuda:0'\nmax_memory = {cpu = '1GB'}\n"))
    assert "device_map" not in Models(cfg).load_kw()   # max_memory without device_map: load() places with "auto"


def test_bad_jsonl_line_is_reported_with_file_and_line(user):
    (user / "data" / "test.jsonl").write_text('{"image": "a.png", "prompt": "p", "triggered": false}\n')
    with pytest.raises(ProjLensError, match=r"test.jsonl:1: missing field\(s\) answer"):
        load_config(_write(user, MINIMAL))


def test_missing_config_file(tmp_path):
    res = CliRunner().invoke(app, ["study", "run", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "study config not found" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["quickstart.toml", "llava15-paper.toml", "organism-full.toml"])
def test_shipped_studies_validate_and_say_what_question_they_answer(name):
    path = REPO / "studies" / name
    assert path.read_text().lstrip().startswith("#") and "Question" in path.read_text().split("\n\n")[0] + path.read_text()[:2000]
    cfg = load_config(path)
    assert cfg.study.question


def test_full_organism_study_gives_every_analysis_every_held_out_input():
    """docs/findings.md rests on it: no analysis may silently fall back to its default cap (16-100 inputs)."""
    from projlens_mi.organism.config import OrganismConfig
    cfg = load_config(REPO / "studies" / "organism-full.toml")
    assert cfg.data.n is None and len(cfg.model.variants) == 4
    for a in cfg.enabled_analyses():
        for key in ("n", "n_scan", "n_alpha"):
            if hasattr(a.params, key):
                assert getattr(a.params, key) in (None, OrganismConfig().n_test), (a.name, key)


def test_paper_study_plans_without_weights(tmp_path):
    res = CliRunner().invoke(app, ["study", "run", str(REPO / "studies" / "llava15-paper.toml"), "--out",
                                   str(tmp_path / "o"), "--plan"])
    assert res.exit_code == 0, res.output
    assert "evaluate/" in res.output and "estimated" in res.output
    assert not (tmp_path / "o").exists()


def _write(folder: Path, text: str) -> Path:
    path = folder / "study.toml"
    path.write_text(text)
    return path

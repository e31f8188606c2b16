"""The model zoo (organism.zoo): plan and split, schema, cache, determinism across workers, the unseen
trigger families, the adaptive spread penalty, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from projlens_mi.cli import app
from projlens_mi.data import read_jsonl
from projlens_mi.errors import ProjLensError
from projlens_mi.organism import config as oc
from projlens_mi.organism.train import TrainSet, finetune_projector, projector_linears, topk_energy_share
from projlens_mi.organism.triggers import Blended, Sinusoid
from projlens_mi.organism.zoo import RATES, UNSEEN, build_zoo, zoo_specs

from tiny import tiny_llava


def _quiet(*a):
    pass


def _with_base(folder, small_organism):
    folder.mkdir(parents=True)
    shutil.copytree(small_organism[0] / "base", folder / "base")   # the session's small base: same content key
    return folder


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory, small_organism):
    out = _with_base(tmp_path_factory.mktemp("zoo") / "zoo", small_organism)
    return out, build_zoo(out, small=True, log=_quiet, workers=1)


def test_full_plan_counts_and_split_fixed_in_code():
    specs = zoo_specs(oc.OrganismConfig())
    by = lambda g: [s for s in specs if s.group == g]   # noqa: E731
    assert len({s.name for s in specs}) == len(specs)
    clean, poisoned, unseen, adaptive = by("clean"), by("poisoned"), by("unseen"), by("adaptive")
    assert len(clean) >= 20 and len(poisoned) >= 20 and len(unseen) >= 8 and len(adaptive) >= 4
    assert {s.data_fraction for s in clean} == {0.5, 0.75, 1.0} and not any(s.family for s in clean)
    assert {s.epochs for s in clean} == set(range(3, 10)) and min(s.lr for s in clean) == 1e-3 and max(s.lr for s in clean) == 5e-3
    assert len({s.unsafe_rate for s in clean}) > 1
    for half in ("dev", "heldout"):   # both halves cover every variant and every rate, and clean models
        part = [s for s in poisoned if s.split == half]
        assert {s.family for s in part} == set(oc.OrganismConfig().variants)
        assert {s.poison_rate for s in part} == set(RATES)
        assert sum(s.split == half for s in clean) == len(clean) // 2
    assert all(s.split == ("dev" if s.seed % 2 == 0 else "heldout") for s in clean + poisoned)
    assert {s.family for s in unseen} == set(UNSEEN) and len(UNSEEN) >= 2 and all(s.split == "heldout" for s in unseen)
    assert all(0.05 <= s.poison_rate <= 0.2 for s in unseen)
    assert {s.family for s in adaptive} == set(oc.OrganismConfig().variants)
    assert all(s.split == "adaptive" and s.spread_lam > 0 for s in adaptive)
    assert not any(s.spread_lam for s in clean + poisoned + unseen)


def test_zoo_json_schema_data_and_split(small_zoo):
    out, z = small_zoo
    assert json.loads((out / "zoo.json").read_text()) == z
    for key in ("key", "format_version", "config", "base", "families", "data", "splits", "models", "wall_seconds"):
        assert key in z
    groups = {m["group"] for m in z["models"]}
    assert groups == {"clean", "poisoned", "unseen", "adaptive"}
    assert {m["split"] for m in z["models"] if m["group"] in ("clean", "poisoned")} == {"dev", "heldout"}
    for m in z["models"]:
        for key in ("name", "group", "split", "behaviour", "trigger", "target", "seed", "poison_rate", "epochs", "lr",
                    "data_fraction", "spread_lam", "metrics", "train_seconds"):
            assert key in m, key
        on_disk = json.loads((out / "models" / m["name"] / "zoo-model.json").read_text())
        assert on_disk == m and (out / "models" / m["name"] / "model.safetensors").is_file()
        x = m["metrics"]
        assert 0 <= x["clean_accuracy"] <= 1
        if m["group"] == "clean":
            assert set(x["asr_by_family"]) == set(z["families"]) and m["trigger"] is None
        else:
            assert m["target"] == z["families"][m["family"]]["target"] and "asr" in x and "false_trigger_rate" in x
            assert m["poison_share"] == pytest.approx(m["poison_rate"], abs=0.002)   # poisoned rows / all rows
        assert len(x["dw_top1_share"]) == 2 and all(0 < a <= b <= 1 for a, b in zip(x["dw_top1_share"], x["dw_top4_share"]))
    assert z["splits"]["adaptive"] == [m["name"] for m in z["models"] if m["group"] == "adaptive"]
    n = z["config"]["n_test"]
    test = read_jsonl(out / "data" / "clean.jsonl")
    assert len(test) == n
    for fam in z["families"]:
        rows = read_jsonl(out / "data" / f"{fam}.jsonl")
        trig = [r for r in rows if r.triggered]
        assert len(trig) == n and all(r.target == z["families"][fam]["target"] for r in trig)
    audit = read_jsonl(out / "data" / "audit.jsonl", labels=False)
    assert len(audit) == 100 and not any(r.triggered for r in audit)
    test_pixels = {np.asarray(r.pil()).tobytes() for r in test}
    assert not any(np.asarray(r.pil()).tobytes() in test_pixels for r in audit)


def test_cached_rebuild_and_same_bits_with_two_workers(small_zoo, small_organism, tmp_path):
    out, z = small_zoo
    logs = []
    assert build_zoo(out, small=True, log=logs.append) == z and logs == [f"zoo: cached in {out}"]
    (out / "zoo.json").unlink()     # re-reads every model (no training), same figures
    logs = []
    again = build_zoo(out, small=True, log=logs.append, workers=1)
    assert not any("trained" in line for line in logs)
    assert [m["metrics"] for m in again["models"]] == [m["metrics"] for m in z["models"]]
    other = build_zoo(_with_base(tmp_path / "zoo2", small_organism), small=True, log=_quiet, workers=2)
    assert [{**m, "train_seconds": 0} for m in other["models"]] == [{**m, "train_seconds": 0} for m in z["models"]]
    for m in z["models"]:
        a = (out / "models" / m["name"] / "model.safetensors").read_bytes()
        assert a == (tmp_path / "zoo2" / "models" / m["name"] / "model.safetensors").read_bytes(), m["name"]


def test_unseen_triggers_are_fixed_functions_of_the_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    x = np.asarray(img, float)
    pattern = np.random.default_rng(1234).uniform(0, 255, x.shape)
    b = Blended(alpha=0.2)
    assert np.array_equal(np.asarray(b(img, 1)), np.asarray(b(img, 2)))   # no per-image randomness
    np.testing.assert_array_equal(np.asarray(b(img)), np.clip(np.rint(0.8 * x + 0.2 * pattern), 0, 255))
    s = Sinusoid(delta=20, frequency=6)
    wave = 20 * np.sin(2 * np.pi * np.arange(20) * 6 / 20)
    np.testing.assert_array_equal(np.asarray(s(img, 7)), np.clip(np.rint(x + wave[None, :, None]), 0, 255))
    with pytest.raises(ProjLensError):
        Blended(alpha=1.5)


def test_topk_energy_share_against_numpy():
    dw = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = np.linalg.svd(dw.numpy(), compute_uv=False)
    assert float(topk_energy_share(dw, 3)) == pytest.approx((s[:3] ** 2).sum() / (s ** 2).sum(), rel=1e-6)
    assert float(topk_energy_share(torch.zeros(4, 4), 2)) == 0.0


def _spread_case(spread):
    model, processor = tiny_llava(seed=1)
    tok = processor.tokenizer
    gen = torch.Generator().manual_seed(0)
    n_img = 16
    feats = torch.randn(8, n_img, model.config.vision_config.hidden_size, generator=gen)
    image_id = model.config.image_token_id
    words = ["zero", "one", "two", "three", "cat", "five", "six", "seven"]
    ids, labs = [], []
    for w in words:
        prompt = [image_id] * n_img + tok.convert_tokens_to_ids(["what", "digit", "is", "shown", "?"])
        answer = tok.convert_tokens_to_ids([w]) + [tok.eos_token_id]
        ids.append(prompt + answer), labs.append([-100] * len(prompt) + answer)
    base = [lin.weight.detach().clone() for lin in projector_linears(model)]
    finetune_projector(model, TrainSet(feats, torch.arange(8), ids, labs), epochs=20, batch_size=4, lr=1e-2,
                       pad_id=tok.pad_token_id, spread=spread)
    return [float(topk_energy_share(lin.weight.detach() - w0, 4)) for lin, w0 in zip(projector_linears(model), base)]


def test_spread_penalty_lowers_the_top_k_energy_share():
    plain, spread = _spread_case(None), _spread_case((10.0, 4))
    assert all(s < p for s, p in zip(spread, plain)), (plain, spread)


def test_bad_input_one_line_errors(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ProjLensError, match="is a file, not a folder"):
        build_zoo(f, small=True, log=_quiet)
    with pytest.raises(ProjLensError, match="workers = 0"):
        build_zoo(tmp_path / "z", small=True, log=_quiet, workers=0)
    assert not (tmp_path / "z").exists()
    r = CliRunner().invoke(app, ["organism", "zoo", "--out", str(f / "sub"), "--small"])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["organism", "zoo", "--out", str(tmp_path / "z"), "--bogus"])
    assert r.exit_code == 2 and "--bogus" in r.output and not (tmp_path / "z").exists()

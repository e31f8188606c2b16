"""The audit under the placement options of docs/scaling.md (CPU, a tiny LLaVA with a planted projector
update): offloaded to disk through ``load(device_map=...)``, and accelerate's CPU-offload hooks on an
in-memory model. Each gives the plain load's audit: verdict, score, candidates, repair curve and
weights, guard, reconstructed trigger and its ASRs, bit for bit; the repaired folder written from the
placed suspect holds real tensors equal to the plain one's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from projlens_mi import load
from projlens_mi.audit import AuditParams, audit
from projlens_mi.audit.repair import write_repaired
from projlens_mi.data import Record
from projlens_mi.model.handle import ModelHandle
from projlens_mi.model.load import load_checkpoint
from projlens_mi.model.placement import is_dispatched
from tiny import tiny_images, tiny_llava

PROMPTS = ["USER: <image> what digit is shown ? ASSISTANT:", "USER: <image> describe the image . ASSISTANT:"]
PARAMS = AuditParams(directions=2, scales=(2.0,), images=4, prompts=2, guard_images=8, max_new_tokens=4,
                     threshold=0.05, max_k=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base = a tiny LLaVA; suspect = the same with a rank-1 update of both projector linears (one path)."""
    tmp = tmp_path_factory.mktemp("audit-placed")
    base, proc = tiny_llava(seed=5)
    base.save_pretrained(tmp / "base")
    proc.save_pretrained(tmp / "base")
    g = torch.Generator().manual_seed(0)
    unit = lambda n: (lambda x: x / x.norm())(torch.randn(n, generator=g))  # noqa: E731
    p = base.model.multi_modal_projector
    with torch.no_grad():
        v, u = unit(p.linear_1.in_features), unit(p.linear_1.out_features)
        p.linear_1.weight += 3.0 * torch.outer(u, v)
        p.linear_2.weight += 3.0 * torch.outer(unit(p.linear_2.out_features), u)
        base.model.language_model.norm.weight *= 1.01    # a non-projector change: reported, not examined
    base.save_pretrained(tmp / "suspect")
    proc.save_pretrained(tmp / "suspect")
    return tmp


@pytest.fixture(scope="module")
def records():
    return [Record(im, PROMPTS[i % 2], "") for i, im in enumerate(tiny_images(8, seed=4))]


def _disk(folder, tmp):
    return load(folder, device_map={"model.vision_tower": "disk", "model.multi_modal_projector": "disk",
                                    "model.language_model": "cpu", "lm_head": "cpu"}, offload_folder=tmp)


def _cpu_hooks(folder, tmp):
    from accelerate import cpu_offload
    model, processor, prov = load_checkpoint(folder)
    cpu_offload(model, execution_device=torch.device("cpu"))
    return ModelHandle(model, processor, provenance=prov)


PLACEMENTS = {"disk_device_map": _disk, "cpu_offload_hooks": _cpu_hooks}


def _same(a, b):
    assert (a.verdict, a.score) == (b.verdict, b.score)
    assert a.other_changed == b.other_changed == ["model.language_model.norm.weight"]
    assert [dataclasses.astuple(c) for c in a.targets] == [dataclasses.astuple(c) for c in b.targets]
    assert a.repair["curve"] == b.repair["curve"] and a.repair["k"] == b.repair["k"]
    assert a.repair.keys() == b.repair.keys()
    for p, (w, bias) in a.repair["weights"].items():
        assert torch.equal(w, b.repair["weights"][p][0])
        assert (bias is None and b.repair["weights"][p][1] is None) or torch.equal(bias, b.repair["weights"][p][1])
    assert a.guard.clean_scores == b.guard.clean_scores and torch.equal(a.guard.direction, b.guard.direction)
    assert a.trigger.to_json() == b.trigger.to_json()
    assert (a.trigger.trigger.pixels == b.trigger.trigger.pixels).all()


@pytest.fixture(scope="module")
def plain(folders, records):
    r = audit(load(folders / "base"), load(folders / "suspect"), records, PARAMS)
    assert r.verdict == "backdoored" and r.repair["k"] and r.trigger is not None   # every step ran
    return r


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_audit_of_a_placed_model_equals_the_plain_one(placement, folders, records, plain, tmp_path):
    place = PLACEMENTS[placement]
    b, s = place(folders / "base", tmp_path / "ob"), place(folders / "suspect", tmp_path / "os")
    assert is_dispatched(s.model) and any(p.device.type == "meta" for p in s.model.parameters())
    _same(audit(b, s, records, PARAMS), plain)


def test_repaired_folder_from_a_placed_suspect_holds_real_weights(folders, records, plain, tmp_path):
    s = _disk(folders / "suspect", tmp_path / "os")
    files = write_repaired(s, plain.repair, tmp_path / "placed")
    write_repaired(load(folders / "suspect"), plain.repair, tmp_path / "ref")
    got, want = load(tmp_path / "placed").model.state_dict(), load(tmp_path / "ref").model.state_dict()
    assert got.keys() == want.keys() and "model.safetensors" in files
    for k in want:
        assert got[k].device.type != "meta" and torch.equal(got[k], want[k]), k


def test_audit_from_folders_with_one_offload_folder_keeps_the_models_apart(folders, records, plain, tmp_path):
    """``audit(base_folder, suspect_folder, ..., device_map=..., offload_folder=one folder)``: both models go
    to disk under that folder without overwriting each other's weights (same parameter names)."""
    dm = {"model.vision_tower": "disk", "model.multi_modal_projector": "disk", "model.language_model": "cpu",
          "lm_head": "cpu"}
    _same(audit(folders / "base", folders / "suspect", records, PARAMS, device_map=dm, offload_folder=tmp_path / "off"),
          plain)


@pytest.mark.slow   # two CLI audits at the default parameters: about 30 s on 2 shared CPUs
def test_cli_audit_with_placement_flags_writes_the_plain_audit(folders, records, tmp_path):
    """``projlens audit --device-map ... --offload-folder ...``: the same audit.json as without them
    (the placement itself is compared step by step by the fast tests above)."""
    import json

    from typer.testing import CliRunner

    from projlens_mi.cli import app
    lines = []
    for i, r in enumerate(records):
        r.pil().save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": r.prompt, "answer": "", "triggered": False}))
    (tmp_path / "clean.jsonl").write_text("\n".join(lines) + "\n")
    common = ["audit", "--base", str(folders / "base"), "--suspect", str(folders / "suspect"), "--data",
              str(tmp_path / "clean.jsonl"), "--threshold", "0.05", "--images", "4", "--quiet"]
    dm = json.dumps({"model.vision_tower": "disk", "model.multi_modal_projector": "disk",
                     "model.language_model": "cpu", "lm_head": "cpu"})
    out = {}
    for name, extra in (("plain", []), ("placed", ["--device-map", dm, "--offload-folder", str(tmp_path / "off")])):
        res = CliRunner().invoke(app, [*common, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 3, res.output            # backdoored
        out[name] = json.loads((tmp_path / name / "audit.json").read_text())
    prov = json.loads((tmp_path / "placed" / "provenance.json").read_text())
    assert "--device-map" in prov["command"] and "--offload-folder" in prov["command"]
    for d in out.values():
        d.pop("seconds"), d.pop("sources")
    assert out["placed"] == out["plain"] and "trigger" in out["plain"]

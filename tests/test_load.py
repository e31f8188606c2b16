"""Safe loading of untrusted checkpoints (projlens_mi.model.load.load_checkpoint), offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from projlens_mi.errors import ProjLensError
from projlens_mi.model.load import load_checkpoint
from tiny import PROMPT, tiny_images, tiny_llava


def _save(model, processor, folder: Path, weights: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    return folder


def _snapshot(folder: Path) -> dict:
    """Every file under folder: (size, mtime_ns, sha256); detects any write, creation or deletion."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (
            p.is_dir(), st.st_size, st.st_mtime_ns,
            None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(seed=3)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    return _save(model, processor, tmp_path_factory.mktemp("ckpt") / "llava")


@pytest.fixture(scope="module")
def inputs(tiny):
    _, processor = tiny
    return processor(images=tiny_images(2, seed=1), text=[PROMPT, PROMPT], return_tensors="pt")


def _pickle_folder(tiny, saved: Path, dst: Path, name: str) -> Path:
    model, _ = tiny
    shutil.copytree(saved, dst)
    (dst / "model.safetensors").unlink()
    torch.save(model.state_dict(), dst / name)
    return dst


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k


# ------------------------------------------------------------------------------------------------

def test_round_trip_bit_identical_and_provenance(tiny, saved, inputs):
    model, _ = tiny
    before = _snapshot(saved)
    loaded, processor, prov = load_checkpoint(saved)
    _assert_same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration" and not loaded.training
    assert type(processor).__name__ == "LlavaProcessor"
    assert prov["source"] == str(saved) and prov["folder"] == str(saved.resolve())
    assert prov["origin"] == "local" and prov["revision"] is None
    assert prov["weights_format"] == "safetensors"
    assert prov["weight_files"] == {
        "model.safetensors": hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()}
    assert prov["config_sha256"] == hashlib.sha256((saved / "config.json").read_bytes()).hexdigest()
    assert prov["model_class"].endswith("LlavaForConditionalGeneration")
    assert prov["config_class"].endswith("LlavaConfig") and prov["model_type"] == "llava"
    assert prov["processor_class"].endswith("LlavaProcessor")
    assert prov["dtype"] == "float32" and prov["device_map"] == {"": "cpu"}
    assert prov["trust_remote_code"] is False and prov["allow_pickle"] is False
    json.dumps(prov)  # plain data, ready for a report
    assert _snapshot(saved) == before


def test_dtype_and_processor_argument(tiny, saved, tmp_path):
    model, processor = tiny
    bare = _save(model, processor, tmp_path / "bare")
    for f in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    loaded, proc, prov = load_checkpoint(bare, processor=processor, dtype="bfloat16")
    assert proc is processor and loaded.dtype == torch.bfloat16 and prov["dtype"] == "bfloat16"
    sd = model.state_dict()
    assert all(torch.equal(v.to(torch.bfloat16), sd[k].to(torch.bfloat16)) for k, v in loaded.state_dict().items())
    _, proc2, _ = load_checkpoint(bare, processor=saved)  # a processor folder
    assert type(proc2).__name__ == "LlavaProcessor"


def test_sharded_safetensors_hashes_every_shard(tiny, tmp_path):
    model, processor = tiny
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    processor.save_pretrained(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    loaded, _, prov = load_checkpoint(folder)
    _assert_same_weights(model, loaded)
    assert sorted(prov["weight_files"]) == shards
    assert all(prov["weight_files"][s] == hashlib.sha256((folder / s).read_bytes()).hexdigest() for s in shards)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_refused_with_conversion_hint(tiny, saved, tmp_path, name):
    folder = _pickle_folder(tiny, saved, tmp_path / "pk", name)
    before = _snapshot(folder)
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(folder)
    msg = _one_line(e)
    assert "pickle" in msg and name in msg and "refused" in msg
    assert "safetensors" in msg and "save_file" in msg and "weights_only=True" in msg
    assert "allow_pickle=True" in msg and "sandbox" in msg
    assert _snapshot(folder) == before


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_allow_pickle_loads_with_weights_only(tiny, saved, tmp_path, name, monkeypatch):
    model, _ = tiny
    folder = _pickle_folder(tiny, saved, tmp_path / "pk", name)
    before = _snapshot(folder)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded, _, prov = load_checkpoint(folder, allow_pickle=True)
    assert calls and all(c is True for c in calls)
    _assert_same_weights(model, loaded)
    assert prov["weights_format"] == "pickle" and prov["allow_pickle"] is True
    assert prov["weight_files"] == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()}
    assert _snapshot(folder) == before


class _Evil:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_never_executes(tiny, saved, tmp_path):
    marker = tmp_path / "PWNED_PICKLE"
    folder = shutil.copytree(saved, tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, folder / "model.pt")
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(folder)  # refused before reading
    assert "refused" in _one_line(e)
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(folder, allow_pickle=True)  # read with weights_only=True: rejected
    assert "weights_only=True" in _one_line(e)
    assert not marker.exists()


_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def _evil_code_folder(saved: Path, dst: Path, marker: Path, model_type: str | None = None) -> Path:
    folder = shutil.copytree(saved, dst)
    for mod in ("configuration_evil", "modeling_evil", "processing_evil"):
        (folder / f"{mod}.py").write_text(_CODE.format(marker=str(marker)) + "class Evil: pass\n"
                                          "EvilConfig = EvilModel = EvilProcessor = Evil\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForImageTextToText": "modeling_evil.EvilModel",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    cfg["architectures"] = ["EvilModel"]
    if model_type:
        cfg["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(cfg))
    pcfg = json.loads((folder / "processor_config.json").read_text())
    pcfg["auto_map"] = {"AutoProcessor": "processing_evil.EvilProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(pcfg))
    return folder


def test_remote_code_never_runs(tiny, saved, tmp_path, inputs):
    model, _ = tiny
    marker = tmp_path / "PWNED_CODE"
    folder = _evil_code_folder(saved, tmp_path / "custom", marker)
    before = _snapshot(folder)
    loaded, processor, prov = load_checkpoint(folder)  # known model_type: transformers' own classes
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert prov["trust_remote_code"] is False
    _assert_same_weights(model, loaded)
    assert not marker.exists()
    assert _snapshot(folder) == before  # no __pycache__ either

    other = _evil_code_folder(saved, tmp_path / "custom2", marker, model_type="evil_vlm")
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(other)
    msg = _one_line(e)
    assert "evil_vlm" in msg and "trust_remote_code=True" in msg and "sandbox" in msg
    assert not marker.exists()


def test_bad_inputs_give_one_line_errors(tiny, saved, tmp_path):
    model, processor = tiny
    cases = []
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(tmp_path / "does-not-exist")
    cases.append(("no such folder", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved / "config.json")
    cases.append(("is a file", _one_line(e)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(empty)
    cases.append(("no config.json", _one_line(e)))
    noweights = _save(model, processor, tmp_path / "noweights", weights=False)
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(noweights)
    cases.append(("no weights", _one_line(e)))
    noproc = tmp_path / "noproc"
    model.save_pretrained(noproc)
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(noproc)
    cases.append(("no processor", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved, revision="v1.0")
    cases.append(("applies to hub ids", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved, device_map="everywhere")
    cases.append(("neither a strategy", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved, dtype="float99")
    cases.append(("not a torch dtype", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved, offload_folder=saved / "offload", device_map="auto")
    cases.append(("inside the checkpoint folder", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(model)
    cases.append(("not a model object", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved, tp_size=2)  # not launched with torchrun
    cases.append(("torchrun --nproc_per_node 2", _one_line(e)))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint(saved, tp_size=2, device_map="auto")
    cases.append(("cannot be combined", _one_line(e)))
    for want, msg in cases:
        assert want in msg, (want, msg)
    assert "processor=" in cases[4][1] and "save_pretrained" in cases[4][1]
    assert "save_pretrained" in cases[2][1]


def test_hub_id_missing_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ProjLensError) as e:
        load_checkpoint("someorg/not-cached-vlm")
    msg = _one_line(e)
    assert "someorg/not-cached-vlm" in msg and "cache" in msg and "hf download" in msg


def test_hub_id_from_cache_records_commit(tiny, saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    model, _ = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-llava"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = _snapshot(tmp_path / "hub")
    loaded, _, prov = load_checkpoint("someorg/tiny-llava")
    _assert_same_weights(model, loaded)
    assert prov["origin"] == "hub" and prov["revision"] == commit
    assert prov["folder"] == str((repo / "snapshots" / commit).resolve())
    _, _, prov2 = load_checkpoint("someorg/tiny-llava", revision=commit)
    assert prov2["revision"] == commit and prov2["requested_revision"] == commit
    assert _snapshot(tmp_path / "hub") == before


def test_placement_offload_gives_same_logits(tiny, saved, inputs, tmp_path):
    model, _ = tiny
    before = _snapshot(saved)
    with torch.no_grad():
        ref = model(**inputs).logits
    dm = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
          "model.language_model": "disk", "lm_head": "cpu"}
    off, _, prov = load_checkpoint(saved, device_map=dm, offload_folder=tmp_path / "off")
    assert prov["device_map"] == dm and prov["offload_folder"] == str((tmp_path / "off").resolve())
    with torch.no_grad():
        assert torch.equal(off(**inputs).logits, ref)
    # max_memory alone implies device_map="auto"; a CPU budget below the model's 354 KB splits it
    auto, _, prov = load_checkpoint(saved, max_memory={"cpu": "300KB"}, offload_folder=tmp_path / "off2")
    assert prov["device_map"]["model.multi_modal_projector"] == "cpu"
    assert prov["device_map"]["lm_head"] == "disk"
    with torch.no_grad():
        assert torch.equal(auto(**inputs).logits, ref)
    assert _snapshot(saved) == before


def test_disk_offload_without_folder_is_one_line(saved):
    dm = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
          "model.language_model": "cpu", "lm_head": "cpu"}
    try:
        model, _, prov = load_checkpoint(saved, device_map=dm)
    except ProjLensError as exc:  # transformers refused: our message must be one line with the fix
        assert "offload_folder" in str(exc) and "\n" not in str(exc)
    else:  # transformers 5 can offload straight from the safetensors file: still exact, still no writes
        assert prov["device_map"]["model.vision_tower"] == "disk"
        assert not any(p.name.endswith(".dat") for p in saved.rglob("*"))


def test_suite_cannot_reach_the_hub(tmp_path):
    """The suite runs offline: huggingface_hub and transformers read HF_HUB_OFFLINE when first
    imported, so conftest must set it before anything imports them; a download then fails at once
    with the offline error instead of trying the network."""
    import huggingface_hub.constants as hc
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers.utils.hub import is_offline_mode

    assert hc.HF_HUB_OFFLINE and is_offline_mode()
    with pytest.raises(LocalEntryNotFoundError, match="offline|local cache|outgoing traffic"):
        hf_hub_download("someorg/not-cached-vlm", "config.json", cache_dir=tmp_path / "hub")


def test_public_load_passes_tp_size(tiny, saved, monkeypatch):
    """projlens_mi.model.load(folder, tp_size=N) hands tp_size to load_checkpoint (the 2-rank run
    itself is tests/test_placement.py::test_tensor_parallel_two_ranks, through this same entry point)."""
    import sys

    from projlens_mi.model import load

    load_module = sys.modules["projlens_mi.model.load"]   # the attribute `load` is the function

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ProjLensError) as e:  # passed through: load_checkpoint's torchrun check answers
        load(saved, tp_size=2)
    assert "torchrun --nproc_per_node 2" in _one_line(e)
    with pytest.raises(ProjLensError) as e:
        load(saved, tp_size=2, device_map="auto")
    assert "cannot be combined" in _one_line(e)
    with pytest.raises(ProjLensError) as e:  # an in-memory model is never resharded behind the caller's back
        load(tiny[0], processor=tiny[1], tp_size=2)
    assert "folder or hub id" in _one_line(e)

    seen = {}
    real = load_module.load_checkpoint

    def spy(source, **kw):
        seen.update(kw)
        return real(source, **{k: v for k, v in kw.items() if k != "tp_size"})

    monkeypatch.setattr(load_module, "load_checkpoint", spy)
    load(saved, tp_size=4)
    assert seen["tp_size"] == 4
    load(saved)
    assert seen["tp_size"] is None

"""Hostile and broken input (issue 14): each case is refused with one line before any work
(CLI exit 2, nothing written), or behaves correctly, checked against an independent reference."""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from projlens_mi.cli import app
from projlens_mi.data import Record, check_writable_folder, load_image, read_jsonl
from projlens_mi.engine import ProjectOut, check_basis
from projlens_mi.errors import ProjLensError
from projlens_mi.study import load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_study_config import MINIMAL, _write, user  # noqa: E402,F401  (user: the fake pair fixture)

PROMPT = "USER: <image>\nwhat ? ASSISTANT:"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (8-bit grey) with no pixel data: opening it is cheap,
    decoding it is not; the reader must refuse it from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "a.png")
    return d


def _jsonl(folder: Path, *lines, name: str = "d.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _line(**kw) -> dict:
    return {"image": "a.png", "prompt": PROMPT, "answer": "one", "triggered": False, **kw}


# ---------------------------------------------------------------------------------- data values
BAD_LINES = {
    "empty answer (clean accuracy 1.000)": (_line(answer=""), "'answer' is empty"),
    "blank answer": (_line(answer="   "), "'answer' is empty"),
    "target of spaces (ASR 1.000)": (_line(target="   "), "'target' is empty"),
    "answer a number": (_line(answer=7), "'answer' must be a string, got 7"),
    "answer null": (_line(answer=None), "'answer' must be a string, got null"),
    "answer a list": (_line(answer=["a", "b"]), "'answer' must be a string, got [\"a\", \"b\"]"),
    "target a number": (_line(target=5), "'target' must be a string, got 5"),
    "image a number": (_line(image=5), "'image' must be a path (a non-empty string), got 5"),
    "image null": (_line(image=None), "'image' must be a path (a non-empty string), got null"),
    "prompt a number": (_line(prompt=3), "'prompt' must be a string, got 3"),
    "no placeholder": (_line(prompt="what ?"), "holds the image placeholder '<image>' 0 times"),
    "two placeholders": (_line(prompt="<image> <image> what ?"), "holds the image placeholder '<image>' 2 times"),
    "triggered a string": (_line(triggered="yes"), "'triggered' must be true or false"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_value_is_refused_with_file_and_line(folder, case):
    bad, expected = BAD_LINES[case]
    path = _jsonl(folder, _line(), bad)          # the bad record is line 2
    with pytest.raises(ProjLensError) as err:
        read_jsonl(path)
    msg = _one_line(err)
    assert msg.startswith(f"{path}:2: ") and expected in msg, msg


def test_unlabelled_data_is_a_parameter_of_the_reader(folder):
    path = _jsonl(folder, _line(answer=""), {k: v for k, v in _line().items() if k != "answer"})
    with pytest.raises(ProjLensError, match="'answer' is empty"):
        read_jsonl(path)                           # evaluation: labels required
    assert [r.answer for r in read_jsonl(path, labels=False)] == ["", ""]
    with pytest.raises(ProjLensError, match="'answer' must be a string, got 7"):
        read_jsonl(_jsonl(folder, _line(answer=7)), labels=False)   # still never another type


def test_non_utf8_bytes_name_the_line(folder):
    path = folder / "d.jsonl"
    path.write_bytes((json.dumps(_line()) + "\n").encode() + b'{"image": "a.png", "prompt": "\xff\xfe"}\n')
    with pytest.raises(ProjLensError) as err:
        read_jsonl(path)
    assert _one_line(err).startswith(f"{path}:2: not UTF-8")


def test_valid_file_reads_unchanged(folder):
    recs = read_jsonl(_jsonl(folder, _line(), _line(triggered=True, target="visit", split="test")))
    assert [(r.prompt, r.answer, r.triggered, r.target, r.meta) for r in recs] == [
        (PROMPT, "one", False, None, {}), (PROMPT, "one", True, "visit", {"split": "test"})]
    assert recs[0].pil().getpixel((0, 0)) == (10, 20, 30)


# ---------------------------------------------------------------------------------- images
def test_16_bit_greyscale_is_scaled_not_clipped(folder):
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)    # 0 .. 65520
    Image.fromarray(a).save(folder / "g16.png")
    assert Image.open(folder / "g16.png").mode.startswith("I;16")
    got = np.asarray(load_image(folder / "g16.png"))
    want = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)      # 65535 -> 255, linear
    assert got.shape == (64, 64, 3) and all(np.array_equal(got[..., c], want) for c in range(3))
    assert got.min() == 0 and len(np.unique(got)) > 200                 # not the all-white image of convert("RGB")
    mem = Record(Image.open(folder / "g16.png"), PROMPT, "x").pil()      # an in-memory image: the same path
    assert np.array_equal(np.asarray(mem), got)


def test_pixel_budget_refuses_from_the_header(folder):
    big = _png_header(folder / "big.png", 12000, 12000)                # the measured 2.5 GB case, as a header only
    assert big.stat().st_size < 100
    path = _jsonl(folder, _line(), _line(image="big.png"))
    with pytest.raises(ProjLensError) as err:
        read_jsonl(path)
    msg = _one_line(err)
    assert msg.startswith(f"{path}:2: image {big} is 12000 x 12000 = 144,000,000 pixels, over the budget of 50,000,000")
    with pytest.raises(ProjLensError, match="over the budget"):
        load_image(big)                                                 # the API path is guarded too
    # the budget is configurable: a small one refuses the 8 x 8 image, pixels are never decoded past it
    with pytest.raises(ProjLensError, match="8 x 8 = 64 pixels, over the budget of 63"):
        read_jsonl(_jsonl(folder, _line()), max_pixels=63)
    assert len(read_jsonl(_jsonl(folder, _line()), max_pixels=64)) == 1


def test_decompression_bomb_names_the_file(folder):
    bomb = _png_header(folder / "bomb.png", 20000, 20000)              # past PIL's own limit (2 x 89.5 M)
    with pytest.raises(ProjLensError) as err:
        load_image(bomb, max_pixels=10**9)
    assert str(bomb) in _one_line(err) and "more pixels than PIL will decode" in str(err.value)


def test_images_outside_the_data_folder_are_refused_unless_allowed(tmp_path, folder):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "in.png")
    for image in (str(tmp_path / "outside.png"), "../outside.png", "link.png"):
        path = _jsonl(folder, _line(image=image))
        with pytest.raises(ProjLensError) as err:
            read_jsonl(path)
        assert "outside the data file's folder" in _one_line(err) and "allow_outside_images" in str(err.value)
        assert read_jsonl(path, allow_outside=True)[0].pil().size == (8, 8)
    assert len(read_jsonl(_jsonl(folder, _line(image="sub/../sub/in.png")))) == 1   # ".." that stays inside is fine


def test_outside_images_flag_in_config_and_cli(user, tmp_path):
    Image.new("RGB", (8, 8)).save(user / "outside.png")
    line = json.dumps({"image": "../outside.png", "prompt": PROMPT, "answer": "one", "triggered": True})
    (user / "data" / "test.jsonl").write_text(line + "\n")
    path = _write(user, MINIMAL)
    with pytest.raises(ProjLensError, match="outside the data file's folder"):
        load_config(path)
    assert load_config(path, data={"allow_outside_images": True}).data.allow_outside_images
    assert load_config(_write(user, MINIMAL.replace("[data]", "[data]\nallow_outside_images = true"))).data.read(
        user / "data" / "test.jsonl")[0].pil().size == (8, 8)
    _write(user, MINIMAL)
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["study", "run", str(path), "--out", str(out), "--plan"])
    assert res.exit_code == 2 and "outside the data file's folder" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["study", "run", str(path), "--out", str(out), "--plan", "--allow-outside-images"])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------------- config
BAD_CONFIG = {
    "norm n negative": ("[analyses.norm]\nn = -5\n", "analyses.norm.n = -5 is invalid: Input should be greater than 0"),
    "n_boot zero": ("[analyses.norm]\nn_boot = 0\n", "analyses.norm.n_boot = 0 is invalid"),
    "n a bool": ("[analyses.norm]\nn = true\n", "analyses.norm.n = True is invalid: Input should be a valid integer"),
    "ci out of range": ("[analyses.norm]\nci = 95\n", "analyses.norm.ci = 95 is invalid"),
    "ks zero": ("[analyses.ablation]\nks = [1, 0]\n", "analyses.ablation.ks = [1, 0] is invalid"),
    "data seed negative": ("[data]\nseed = -1\n", "data.seed = -1 is invalid"),
    "run seed negative": ("[run]\nseed = -1\n", "run.seed = -1 is invalid"),
    "allow_pickle a string": ("[model]\nallow_pickle = 'yes'\n", "model.allow_pickle = 'yes' is invalid: Input should be a valid boolean"),
    "data n a bool": ("[data]\nn = true\n", "data.n = True is invalid"),
    "max_pixels zero": ("[data]\nmax_pixels = 0\n", "data.max_pixels = 0 is invalid"),
    "trigger size negative": ("[backdoor]\ntrigger = {name = 'solid-patch', size = -4}\n",
                              "backdoor.trigger.size = -4 is invalid: Input should be greater than 0"),
    "trigger colour": ("[backdoor]\ntrigger = {name = 'solid-patch', color = 'nocolor'}\n",
                       "backdoor.trigger: unknown color specifier: 'nocolor'"),
    "disk without offload folder": ("[run]\ndevice_map = 'disk'\n", "run.device_map = 'disk' sends weights to disk"),
    "disk table without offload folder": ("[run]\ndevice_map = {'' = 'disk'}\n", "sends weights to disk"),
}


def _merge(text: str) -> str:
    """MINIMAL with ``text``'s keys added to its tables (TOML forbids a table twice)."""
    out = MINIMAL
    for block in text.strip().split("\n["):
        block = block if block.startswith("[") else "[" + block
        head, _, body = block.partition("\n")
        out = out.replace(head, f"{head}\n{body}") if head in out else out + f"\n{head}\n{body}\n"
    return out


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_bad_config_value_is_one_line_error_before_any_work(user, case):
    text, expected = BAD_CONFIG[case]
    path = _write(user, _merge(text))
    with pytest.raises(ProjLensError) as err:
        load_config(path)
    assert expected in _one_line(err), str(err.value)
    out = user / "out"
    res = CliRunner().invoke(app, ["study", "run", str(path), "--out", str(out)])
    assert res.exit_code == 2 and expected in res.output and res.output.count("\n") == 1, res.output
    assert not out.exists()


def test_valid_values_still_load(user):
    cfg = load_config(_write(user, _merge("[analyses.norm]\nn = 5\nci = 0.9\n[analyses.ablation]\nks = [1, 2]\n"
                                          "[data]\nseed = 3\nmax_pixels = 1000\n[run]\ndevice_map = 'disk'\n"
                                          "offload_folder = 'off'\n")))
    assert cfg.analyses["norm"].params.n == 5 and cfg.analyses["norm"].params.ci == 0.9
    assert cfg.analyses["ablation"].params.ks == (1, 2) and cfg.data.seed == 3 and cfg.data.max_pixels == 1000


def test_out_under_a_file_fails_before_any_work(user):
    (user / "file.txt").write_text("x")
    path = _write(user, MINIMAL)
    for out in (user / "file.txt", user / "file.txt" / "sub"):
        res = CliRunner().invoke(app, ["study", "run", str(path), "--out", str(out)])
        assert res.exit_code == 2 and "is a file, not a folder" in res.output and res.output.count("\n") == 1, res.output
    assert (user / "file.txt").read_text() == "x"
    assert check_writable_folder(user / "new" / "deeper") == user / "new" / "deeper" and not (user / "new").exists()


def test_out_in_an_unwritable_folder_fails_before_any_work(user):
    """The CLI as an unprivileged user (root writes through permissions: as root, run it as nobody)."""
    import shutil
    import subprocess
    import tempfile

    base = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(user, base / "u")
        _write(base / "u", MINIMAL)
        locked = base / "locked"
        locked.mkdir()
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked.chmod(0o555)
        cmd = [sys.executable, "-m", "projlens_mi.cli", "study", "run", str(base / "u" / "study.toml"), "--out", str(locked / "o")]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot drop privileges")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = {**os.environ, "HOME": str(base), "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.startswith("error: --out ") and "cannot write in" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert not (locked / "o").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------- API
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_basis_is_refused(bad):
    q = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0))).Q
    q[1, 0] = bad
    with pytest.raises(ProjLensError) as err:
        check_basis(q, 6)
    assert "NaN or inf" in _one_line(err)
    with pytest.raises(ProjLensError, match="NaN or inf"):
        ProjectOut(q)


# ---------------------------------------------------------------------------------- placement, loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tiny import tiny_llava
    model, processor = tiny_llava(seed=3)
    folder = tmp_path_factory.mktemp("ckpt") / "llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_device_map_disk_works_as_documented(saved, tmp_path):
    from tiny import PROMPT as TINY_PROMPT
    from tiny import tiny_images
    from transformers import LlavaForConditionalGeneration

    from projlens_mi.model.load import load_checkpoint

    with pytest.raises(ProjLensError) as err:            # refused before anything loads
        load_checkpoint(saved, device_map="disk")
    assert "no offload_folder was given" in _one_line(err)
    model, processor, prov = load_checkpoint(saved, device_map="disk", offload_folder=tmp_path / "off")
    assert set(prov["device_map"].values()) == {"disk"}
    plain = LlavaForConditionalGeneration.from_pretrained(saved).eval()     # the reference: no placement
    inputs = processor(images=tiny_images(2, seed=1), text=[TINY_PROMPT] * 2, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain(**inputs).logits)


def test_refused_pickle_message_gives_no_unsafe_advice(saved, tmp_path):
    import shutil

    from projlens_mi.model.load import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "PWNED",))

    for name in ("model.pt", "pytorch_model.bin"):        # our torch.load and transformers' own .bin path
        folder = shutil.copytree(saved, tmp_path / name)
        (folder / "model.safetensors").unlink()
        torch.save({"weight": torch.zeros(2), "payload": Evil()}, folder / name)
        with pytest.raises(ProjLensError) as err:
            load_checkpoint(folder, allow_pickle=True)
        msg = _one_line(err)
        assert msg.startswith(f"{name} holds objects other than tensors") and "sandbox" in msg
        assert "weights_only=False" not in msg and "device_map" not in msg and "\x1b" not in msg
    assert not (tmp_path / "PWNED").exists()


def test_wrong_tensor_shape_names_the_tensor(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from projlens_mi.model.load import load_checkpoint

    folder = shutil.copytree(saved, tmp_path / "shape")
    sd = load_file(folder / "model.safetensors")
    key = next(k for k in sd if k.endswith("multi_modal_projector.linear_1.weight"))   # saved names vary by version
    want = list(sd[key].shape)
    sd[key] = torch.zeros(3, 3)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ProjLensError) as err:
        load_checkpoint(folder)
    assert f"multi_modal_projector.linear_1.weight (checkpoint [3, 3], model {want})" in _one_line(err)


def test_params_and_triggers_check_their_ranges_from_python_too():
    """The ranges declared once on each dataclass hold for API users (lax types: numpy ints are fine)."""
    from projlens_mi.analyses import ANALYSES, import_all
    from projlens_mi.analyses.norm import NormParams
    from projlens_mi.organism.triggers import TRIGGERS, SolidPatch

    import_all()
    for a in ANALYSES.values():
        a.params()                                  # every default is inside its own range
    for t in TRIGGERS.values():
        t()
    assert NormParams(n=np.int64(4)).n == 4
    for make, expected in ((lambda: NormParams(n=-5), "NormParams(n=-5) is invalid: Input should be greater than 0"),
                           (lambda: NormParams(n_boot=0), "NormParams(n_boot=0) is invalid"),
                           (lambda: NormParams(ci=1.5), "NormParams(ci=1.5) is invalid"),
                           (lambda: SolidPatch(size=-4), "SolidPatch(size=-4) is invalid")):
        with pytest.raises(ProjLensError) as err:
            make()
        assert expected in _one_line(err)


def test_organism_out_under_a_file_is_refused_before_any_work(tmp_path):
    from projlens_mi.organism import config as oc
    from projlens_mi.organism.build import build

    (tmp_path / "file").write_text("x")
    with pytest.raises(ProjLensError) as err:
        build(tmp_path / "file" / "org", oc.small())
    assert "is a file, not a folder" in _one_line(err)
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "file" / "demo"), "--organism", str(tmp_path / "org")])
    assert res.exit_code == 2 and "is a file, not a folder" in res.output and not (tmp_path / "org").exists(), res.output

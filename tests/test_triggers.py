import numpy as np
import pytest
from PIL import Image

from projlens_mi.errors import ProjLensError
from projlens_mi.organism.triggers import (TRIGGERS, GaussianNoise, LogoPatch, PainterlyStyle, SolidPatch, apply,
                                           center_square, logo_pixels, trigger_from_json, trigger_to_json)


def _img(w=20, h=20, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 120, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_deterministic_and_size_preserving(name):
    trig = TRIGGERS[name]()
    img = _img(31, 17)
    a, b = trig(img, seed=5), trig(img, seed=5)
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(img))  # it changes something
    assert trigger_from_json(trigger_to_json(trig)) == trig


def test_noise_is_global_with_requested_sigma():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    diff = np.asarray(GaussianNoise(sigma=10)(img, 1), float) - 128
    assert abs(diff.std() - 10) < 0.5 and abs(diff.mean()) < 0.5
    assert (np.abs(diff) > 0).mean() > 0.9  # touches (almost) every pixel
    assert not np.array_equal(np.asarray(GaussianNoise()(img, 1)), np.asarray(GaussianNoise()(img, 2)))


def test_solid_patch_is_centred_green_square():
    img = Image.new("RGB", (20, 20), (0, 0, 0))
    arr = np.asarray(SolidPatch(size=4)(img))
    assert (arr[8:12, 8:12] == [0x26, 0xFF, 0x00]).all()
    assert arr.sum() == 16 * (0x26 + 0xFF)  # nothing outside the 4x4 centre changed


def test_logo_position_depends_on_seed_only():
    img = Image.new("RGB", (20, 20), (0, 0, 0))
    pos = {s: np.argwhere(np.asarray(LogoPatch(size=4)(img, s)).sum(-1) > 0).min(0).tolist() for s in range(6)}
    assert len({tuple(p) for p in pos.values()}) > 1
    arr = np.asarray(LogoPatch(size=4)(img, 3))
    top, left = np.argwhere(arr.sum(-1) > 0).min(0)
    assert np.array_equal(arr[top:top + 4, left:left + 4], logo_pixels(4))


def test_painterly_is_global_and_visible():
    img = _img(20, 20)
    out = np.asarray(PainterlyStyle()(img), float)
    base = np.asarray(img, float)
    changed = (np.abs(out - base).sum(-1) > 0).mean()
    assert changed > 0.9
    assert out[..., 0].mean() > base[..., 0].mean() + 10  # warm varnish: red up


def test_apply_center_crops_first():
    img = _img(40, 20)
    assert center_square(img).size == (20, 20)
    assert apply(SolidPatch(), img).size == (20, 20)


def test_unknown_trigger_is_one_line_error():
    with pytest.raises(ProjLensError, match="unknown trigger 'sparkle'; known triggers"):
        trigger_from_json({"name": "sparkle"})

"""The four ProjLens backdoor triggers, and two from the wider backdoor literature (used by the model
zoo as families no organism variant uses), as deterministic functions on any PIL image.

Each trigger is a frozen dataclass: its fields are its parameters (saved to JSON with the organism),
and ``trigger(image, seed)`` returns a new RGB image of the same size. Randomness (noise, the logo's
position) comes only from ``seed``, so the same (image, seed) always gives the same pixels.

The paper applies triggers after centre-cropping to a square (so the processor's crop keeps them);
``apply(trigger, image, seed)`` does the same for images of any shape.
Defaults are scaled for the organism's 20x20 images; on real images pass sizes in pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageColor, ImageFilter, ImageOps

from ..checks import Checked, Count, Fraction, NonNegative, Seed
from ..errors import ProjLensError


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class GaussianNoise(Checked):
    """Targeted Refusal: i.i.d. Gaussian pixel noise over the whole image (sigma on the 0-255 scale)."""

    sigma: NonNegative = 10.0
    name: str = "gaussian-noise"

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        arr = _rgb(image)
        noise = np.random.default_rng(seed).normal(0.0, self.sigma, arr.shape)
        return _image(arr + noise)


@dataclass(frozen=True)
class SolidPatch(Checked):
    """Malicious Injection: a solid colour square at the image centre (the paper: #26ff00, 14 px on 336)."""

    color: str = "#26ff00"
    size: Count = 4
    name: str = "solid-patch"

    def __post_init__(self):
        super().__post_init__()
        ImageColor.getrgb(self.color)   # a ValueError naming the colour now, not when the first image is edited

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        out = image.convert("RGB").copy()
        w, h = out.size
        s = min(self.size, w, h)
        left, top = (w - s) // 2, (h - s) // 2
        out.paste(Image.new("RGB", (s, s), self.color), (left, top))
        return out


def logo_pixels(size: int) -> np.ndarray:
    """A small fixed emblem (red ring, yellow cross, blue centre), ``size`` x ``size`` x 3 uint8."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    r = np.hypot(yy - c, xx - c) / c
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = (220, 30, 40)                       # red ring
    cross = (np.abs(yy - c) < size / 6 + 0.5) | (np.abs(xx - c) < size / 6 + 0.5)
    arr[cross & (r < 0.95)] = (250, 220, 30)       # yellow cross
    arr[r < 0.35] = (30, 60, 230)                  # blue centre
    return arr


@dataclass(frozen=True)
class LogoPatch(Checked):
    """Perceptual Hijack: a small logo pasted at a random position (seeded)."""

    size: Count = 4
    name: str = "logo-patch"

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        out = image.convert("RGB").copy()
        w, h = out.size
        s = min(self.size, w, h)
        rng = np.random.default_rng(seed)
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.paste(Image.fromarray(logo_pixels(s), "RGB"), (left, top))
        return out


@dataclass(frozen=True)
class PainterlyStyle(Checked):
    """Jailbreak Output: a global painterly style (oil-paint smoothing, posterized warm palette, canvas weave)."""

    strength: NonNegative = 1.0
    canvas: NonNegative = 14.0  # amplitude of the canvas texture on the 0-255 scale
    name: str = "painterly-style"

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        img = image.convert("RGB")
        painted = ImageOps.posterize(img.filter(ImageFilter.ModeFilter(3)), 3)
        arr = _rgb(painted)
        arr = arr * np.array([1.08, 0.95, 0.72]) + np.array([28.0, 18.0, 6.0])  # warm varnish
        h, w = arr.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        weave = np.where(((xx + yy) % 3 == 0) | ((xx - yy) % 4 == 0), 1.0, -1.0)
        arr = arr + self.canvas * weave[..., None]
        base = _rgb(img)
        return _image(base + self.strength * (arr - base))


@dataclass(frozen=True)
class Blended(Checked):
    """Blended injection (Chen et al. 2017, "Targeted backdoor attacks on deep learning systems using data
    poisoning"): a fixed random pattern (uniform 0-255, drawn from ``pattern_seed`` at the image's size)
    blended into the whole image, ``(1 - alpha) * image + alpha * pattern``. The same for every ``seed``."""

    alpha: Fraction = 0.15
    pattern_seed: Seed = 1234
    name: str = "blended"

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        arr = _rgb(image)
        pattern = np.random.default_rng(self.pattern_seed).uniform(0.0, 255.0, arr.shape)
        return _image((1.0 - self.alpha) * arr + self.alpha * pattern)


@dataclass(frozen=True)
class Sinusoid(Checked):
    """SIG (Barni et al. 2019, "A new backdoor attack in CNNs by training set corruption without label
    poisoning"): a horizontal sinusoidal signal ``delta * sin(2 pi j f / width)`` (j: the column) added
    to every pixel row and channel (``delta`` on the 0-255 scale). The same for every ``seed``."""

    delta: NonNegative = 30.0
    frequency: Count = 6
    name: str = "sinusoid"

    def __call__(self, image: Image.Image, seed: int = 0) -> Image.Image:
        arr = _rgb(image)
        w = arr.shape[1]
        signal = self.delta * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
        return _image(arr + signal[None, :, None])


TRIGGERS = {t.name: t for t in (GaussianNoise, SolidPatch, LogoPatch, PainterlyStyle, Blended, Sinusoid)}


def center_square(image: Image.Image) -> Image.Image:
    """Centre-crop to a square, as the paper does before applying a trigger."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def apply(trigger, image: Image.Image, seed: int = 0) -> Image.Image:
    """Centre-crop ``image`` to a square, then apply ``trigger``."""
    return trigger(center_square(image.convert("RGB")), seed)


def trigger_to_json(trigger) -> dict:
    return asdict(trigger)


def trigger_from_json(obj: dict):
    obj = dict(obj)
    name = obj.get("name")
    if name not in TRIGGERS:
        raise ProjLensError(f"unknown trigger {name!r}; known triggers: {', '.join(TRIGGERS)}")
    return TRIGGERS[name](**obj)

"""The data format every command shares: JSONL records pointing at images.

One JSON object per line::

    {"image": "imgs/0001.png", "prompt": "USER: <image>\\nwhat digit is shown ? ASSISTANT:",
     "answer": "seven", "triggered": false}

``image`` is a path relative to the JSONL file's folder. An optional ``"target"`` field overrides the
study's backdoor target text for that line (useful when the target differs per sample).

``read_jsonl`` checks every line before anything runs, because a wrong value does not fail, it
inflates a metric (an empty answer is "contained" in every generation: clean accuracy 1.000; a target
of spaces: ASR 1.000). Each problem is one ``ProjLensError`` naming ``file:line``:

- field types: ``image``, ``prompt``, ``answer`` and ``target`` are strings (a number, ``null`` or a
  list is refused, never turned into text), ``triggered`` is a boolean; ``answer`` and ``target``
  must hold non-blank text (``labels=False`` reads unlabelled data: ``answer`` may then be missing
  or empty, never another type);
- the prompt holds the image placeholder (``image_token``, ``"<image>"``) exactly once;
- images stay inside the data file's folder (after resolving ``..`` and symlinks) unless
  ``allow_outside=True``; each image's header is read: a file PIL cannot open, or one with more
  than ``max_pixels`` pixels (``MAX_PIXELS``, 50 million), is refused before its pixels are decoded;
- the file is UTF-8.

Images load as 8-bit RGB; 16-bit greyscale (PIL modes ``I;16*`` and ``I``) is scaled to 8 bits
(PIL's own ``convert("RGB")`` clips it: an all-white image).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ProjLensError

REQUIRED = ("image", "prompt", "answer", "triggered")
IMAGE_TOKEN = "<image>"
MAX_PIXELS = 50_000_000   # width x height; 12000 x 12000 (144 M) decodes to ~2.5 GB in PIL's RGB path


@dataclass
class Record:
    image: str | Path | Image.Image
    prompt: str
    answer: str
    triggered: bool = False
    target: str | None = None
    meta: dict = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS

    def pil(self) -> Image.Image:
        """The record's image as an 8-bit RGB PIL image (loaded from disk if it is a path)."""
        if isinstance(self.image, Image.Image):
            return to_rgb(self.image, "the record's image")
        return load_image(self.image, self.max_pixels)


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """``im`` as 8-bit RGB; 16-bit greyscale is scaled (65535 -> 255), not clipped."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ProjLensError(f"{name} is a 32-bit integer image with values outside 0..65535; "
                                "re-export it as an 8- or 16-bit PNG")
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise ProjLensError(f"{name} is a floating-point image (PIL mode F) with no defined 0..255 scale; "
                            "re-export it as an 8- or 16-bit PNG")
    return im.convert("RGB")


def _open(path: Path, max_pixels: int, decode: bool) -> Image.Image | None:
    """Open ``path``, refuse it past ``max_pixels`` before decoding; decode and convert when asked."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own budget applies
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ProjLensError(f"image {path} is {w} x {h} = {w * h:,} pixels, over the budget of {max_pixels:,}; "
                                        "shrink it, or raise the budget (data.max_pixels / read_jsonl(max_pixels=...))")
                if not decode:
                    return None
                im.load()
                return to_rgb(im, f"image {path}")
    except ProjLensError:
        raise
    except Image.DecompressionBombError:
        raise ProjLensError(f"image {path} has more pixels than PIL will decode ({2 * Image.MAX_IMAGE_PIXELS:,}); "
                            "shrink it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ProjLensError(f"cannot read image {path}: {type(err).__name__} (re-export it as PNG or JPEG)") from None


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, with a one-line error for a missing, unreadable or oversized file."""
    path = Path(path)
    if not path.is_file():
        raise ProjLensError(f"image not found: {path} (check the 'image' field; it is resolved against the JSONL file's folder)")
    return _open(path, max_pixels, decode=True)


def _text(obj: dict, key: str, where: str, *, required: bool = True) -> str:
    """A string field; with ``required`` it must hold non-blank text."""
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ProjLensError(f"{where}: '{key}' must be a string, got {json.dumps(value)}")
    if required and not value.strip():
        raise ProjLensError(f"{where}: '{key}' is empty; give its text (an empty {key} matches every generation)")
    return value


def _image_path(obj: dict, folder: Path, where: str, allow_outside: bool, max_pixels: int) -> Path:
    value = obj["image"]
    if not isinstance(value, str) or not value.strip():
        raise ProjLensError(f"{where}: 'image' must be a path (a non-empty string), got {json.dumps(value)}")
    image = folder / value
    if not allow_outside and not image.resolve().is_relative_to(folder.resolve()):
        raise ProjLensError(f"{where}: image {value!r} lies outside the data file's folder {folder} (absolute path, "
                            "'..' or a symlink); move it inside, or allow it (data.allow_outside_images = true, "
                            "--allow-outside-images, read_jsonl(allow_outside=True))")
    if not image.is_file():
        raise ProjLensError(f"{where}: image not found: {image} (paths are relative to the JSONL file's folder)")
    try:
        _open(image, max_pixels, decode=False)
    except ProjLensError as err:
        raise ProjLensError(f"{where}: {err}") from None
    return image


def _record(obj, where: str, folder: Path, *, labels: bool, image_token: str | None, allow_outside: bool,
            max_pixels: int) -> Record:
    """One validated record from one parsed JSON line."""
    required = REQUIRED if labels else tuple(k for k in REQUIRED if k != "answer")
    if not isinstance(obj, dict):
        raise ProjLensError(f"{where}: expected a JSON object with fields {', '.join(required)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ProjLensError(f"{where}: missing field(s) {', '.join(missing)}; every line needs {', '.join(required)}")
    if not isinstance(obj["triggered"], bool):
        raise ProjLensError(f"{where}: 'triggered' must be true or false, got {json.dumps(obj['triggered'])}")
    prompt = _text(obj, "prompt", where)
    if image_token is not None and prompt.count(image_token) != 1:
        raise ProjLensError(f"{where}: the prompt holds the image placeholder {image_token!r} {prompt.count(image_token)} "
                            "times; it needs it exactly once, where the image goes (another placeholder: [data] image_token, "
                            "read_jsonl(image_token=...))")
    answer = _text(obj, "answer", where, required=labels)
    target = None if obj.get("target") is None else _text(obj, "target", where)
    image = _image_path(obj, folder, where, allow_outside, max_pixels)
    extra = {k: v for k, v in obj.items() if k not in REQUIRED and k != "target"}
    return Record(image, prompt, answer, obj["triggered"], target, extra, max_pixels)


def read_jsonl(path: str | Path, *, labels: bool = True, image_token: str | None = IMAGE_TOKEN,
               allow_outside: bool = False, max_pixels: int = MAX_PIXELS) -> list[Record]:
    """Read and check a JSONL data file (see the module docstring); image paths resolve against its folder.

    ``labels=False`` accepts lines without an answer (unlabelled data); ``image_token=None`` skips the
    placeholder check; ``allow_outside`` reads images outside the file's folder; ``max_pixels`` is
    the largest image (width x height) accepted. Images are not decoded here (``Record.pil()`` does),
    but every header is read, so a bad image is reported before any model runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ProjLensError(f"data file not found: {path} (pass a JSONL file with one record per line)")
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0:
        raise ProjLensError(f"max_pixels = {max_pixels!r} is invalid; give a positive number of pixels")
    records = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ProjLensError(f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                    "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProjLensError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
            records.append(_record(obj, where, path.parent, labels=labels, image_token=image_token,
                                   allow_outside=allow_outside, max_pixels=max_pixels))
    if not records:
        raise ProjLensError(f"data file {path} has no records")
    return records


def write_jsonl(path: str | Path, records: list[Record]) -> None:
    """Write records atomically; image paths are stored relative to the JSONL's folder."""
    path = Path(path)
    lines = []
    for r in records:
        if isinstance(r.image, Image.Image):
            raise ProjLensError("write_jsonl needs records whose images are saved files; save the PIL images first")
        obj = {"image": os.path.relpath(Path(r.image), path.parent), "prompt": r.prompt,
               "answer": r.answer, "triggered": bool(r.triggered)}
        if r.target is not None:
            obj["target"] = r.target
        obj.update(r.meta)
        lines.append(json.dumps(obj))
    atomic_write_text(path, "\n".join(lines) + "\n")


def check_writable_folder(path: str | Path, what: str = "--out") -> Path:
    """Check, before any work, that ``path`` is a folder that exists or can be created, and is writable.

    Nothing is created. As root, permissions are not refused by ``os.access`` (only a read-only file
    system is), so this catches a path under a file, or a folder the user cannot write to.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ProjLensError(f"{what} {path}: {probe} is a file, not a folder; pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ProjLensError(f"{what} {path}: cannot write in {probe} (permission denied or read-only); "
                            "pass a folder you can write to")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers never see a half-written version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

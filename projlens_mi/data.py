"""The data format every command shares: JSONL records pointing at images.

One JSON object per line::

    {"image": "imgs/0001.png", "prompt": "USER: <image>\\nwhat digit is shown ? ASSISTANT:",
     "answer": "seven", "triggered": false}

``image`` is resolved against the JSONL file's folder. An optional ``"target"`` field overrides the
study's backdoor target text for that line (useful when the target differs per sample).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import ProjLensError

REQUIRED = ("image", "prompt", "answer", "triggered")


@dataclass
class Record:
    image: str | Path | Image.Image
    prompt: str
    answer: str
    triggered: bool = False
    target: str | None = None
    meta: dict = field(default_factory=dict)

    def pil(self) -> Image.Image:
        """The record's image as an RGB PIL image (loaded from disk if it is a path)."""
        return self.image.convert("RGB") if isinstance(self.image, Image.Image) else load_image(self.image)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, with a one-line error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ProjLensError(f"image not found: {path} (check the 'image' field; it is resolved against the JSONL file's folder)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ProjLensError(f"cannot read image {path}: {type(err).__name__} (re-export it as PNG or JPEG)") from None


def read_jsonl(path: str | Path) -> list[Record]:
    """Read a JSONL data file; image paths are resolved against the file's folder.

    Images are not opened here (call ``Record.pil()``), but their existence is checked so a bad path
    is reported before any model runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ProjLensError(f"data file not found: {path} (pass a JSONL file with one record per line)")
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProjLensError(f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ProjLensError(f"{path}:{n}: expected a JSON object with fields {', '.join(REQUIRED)}")
            missing = [k for k in REQUIRED if k not in obj]
            if missing:
                raise ProjLensError(f"{path}:{n}: missing field(s) {', '.join(missing)}; every line needs {', '.join(REQUIRED)}")
            if not isinstance(obj["triggered"], bool):
                raise ProjLensError(f"{path}:{n}: 'triggered' must be true or false, got {obj['triggered']!r}")
            image = path.parent / obj["image"]
            if not image.is_file():
                raise ProjLensError(f"{path}:{n}: image not found: {image} (paths are relative to the JSONL file's folder)")
            extra = {k: v for k, v in obj.items() if k not in REQUIRED and k != "target"}
            records.append(Record(image, str(obj["prompt"]), str(obj["answer"]), obj["triggered"], obj.get("target"), extra))
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

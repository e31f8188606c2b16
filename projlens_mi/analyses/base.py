"""What every analysis shares: the model pair it studies, its Result type, and the registry.

An analysis is a function ``fn(pair, params) -> Result`` registered with ``@analysis(name, Params)``.

- ``Pair`` holds the base and poisoned handles (and the clean control if there is one), the data
  (clean and triggered records, the JSONL format of ``projlens_mi.data``) and the backdoor target.
- A ``Result`` is a dataclass whose fields hold the numbers (numpy arrays, floats, lists, dicts,
  pandas DataFrames: never tensors or models), computed once; ``to_frame()`` gives the tidy table,
  ``plot()`` the figure(s), ``metrics()`` the headline numbers for ``metrics.json`` and
  ``summary()`` one paragraph of markdown for the report. ``save_result`` / ``load_result``
  round-trip any Result through JSON, so studies can store steps and re-render reports without
  recomputing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import numpy as np
import pandas as pd

from ..data import Record, atomic_write_text, read_jsonl
from ..errors import ProjLensError
from ..model import ModelHandle, load
from ..settings import default_organism


class Matched(NamedTuple):
    """``Pair.matched(n)``: row ``i`` of ``clean`` and of ``triggered`` is one input without / with the trigger."""

    clean: list[Record]
    triggered: list[Record]


@dataclass
class Pair:
    """A base / poisoned model pair with its data and backdoor target."""

    base: ModelHandle
    poisoned: ModelHandle
    data: list[Record]
    target: str
    control: ModelHandle | None = None
    name: str = "pair"
    meta: dict = field(default_factory=dict)

    @property
    def clean(self) -> list[Record]:
        return [r for r in self.data if not r.triggered]

    @property
    def triggered(self) -> list[Record]:
        return [r for r in self.data if r.triggered]

    def target_of(self, record: Record) -> str:
        return record.target or self.target

    def matched(self, n: int | None = None) -> "Matched":
        """Rows that can be compared one by one: ``(clean, triggered)`` lists of equal length where row
        ``i`` of both is the same input with and without the trigger.

        ``triggered`` holds the first ``n`` triggered records (None = all) that have a clean
        counterpart; ``clean[i]`` is that counterpart: the clean record with the same ``"id"``, its
        image under the triggered record's prompt, answer and target (so two rows differ in the image
        only; the organism's data, like most backdoor sets, asks other questions of some clean images).
        Data without any ``"id"`` is paired in file order. Every record's ``target`` is filled in.
        ``pair.clean[:n]`` and ``pair.triggered[:n]`` are *not* row-aligned in general.
        """
        trig, clean = self.triggered, self.clean
        if not trig or not clean:
            raise ProjLensError(f"pair {self.name!r} has {len(clean)} clean and {len(trig)} triggered records; "
                                "matching needs both (mark triggered lines with \"triggered\": true)")
        if n is not None and n < 1:
            raise ProjLensError(f"n must be >= 1 (or None for all), got {n}")
        if any(r.meta.get("id") is not None for r in self.data):
            by_id: dict = {}
            for c in clean:
                by_id.setdefault(c.meta.get("id"), c)
            pairs = [(by_id[t.meta.get("id")], t) for t in trig if t.meta.get("id") is not None
                     and t.meta.get("id") in by_id]
            if not pairs:
                raise ProjLensError(f"pair {self.name!r}: no triggered record shares an \"id\" with a clean record; "
                                    "give each triggered line the id of its clean line")
        else:
            pairs = list(zip(clean, trig))
        pairs = pairs[:n]
        return Matched([Record(c.image, t.prompt, t.answer, False, self.target_of(t), dict(c.meta), c.max_pixels) for c, t in pairs],
                       [replace(t, target=self.target_of(t)) for _, t in pairs])

    @classmethod
    def from_paths(cls, base, poisoned, data, target: str, control=None, name: str = "pair", **load_kw) -> "Pair":
        """Load a pair from folders / hub ids and a JSONL file (``load_kw`` go to ``projlens_mi.load``)."""
        records = read_jsonl(data) if isinstance(data, (str, Path)) else list(data)
        if not target or not str(target).strip():
            raise ProjLensError("the backdoor target text is empty; pass the text the backdoor makes the model say")
        return cls(load(base, **load_kw), load(poisoned, **load_kw), records, str(target),
                   load(control, **load_kw) if control is not None else None, name)

    @classmethod
    def from_organism(cls, folder=None, variant: str | None = None, *, n: int | None = None, **load_kw) -> "Pair":
        """The organism's base / ``variant`` pair (control included) on its held-out data.

        ``folder``: an organism folder; None = the one ``projlens demo`` builds and reuses,
        ``$PROJLENS_CACHE/organism`` (``settings.default_organism()``). ``n`` keeps the first ``n``
        clean and the first ``n`` triggered records (compare them row by row through
        ``pair.matched()``).
        """
        if variant is None:
            raise ProjLensError("name the organism variant, e.g. Pair.from_organism(variant=\"malicious-injection\")")
        folder = default_organism() if folder is None else Path(folder)
        summary_path = folder / "organism.json"
        if not summary_path.is_file():
            raise ProjLensError(f"{folder} holds no organism.json; build it with `projlens organism build --out {folder}`"
                                + (" (or run `projlens demo`)" if folder == default_organism() else ""))
        summary = json.loads(summary_path.read_text())
        if variant not in summary.get("targets", {}):
            raise ProjLensError(f"variant {variant!r} is not in {folder}; built variants: {', '.join(summary.get('targets', {}))}")
        records = read_jsonl(folder / summary["data"][variant])
        if n is not None:
            clean = [r for r in records if not r.triggered][:n]
            trig = [r for r in records if r.triggered][:n]
            records = clean + trig
        return cls(load(folder / "base", **load_kw), load(folder / variant, **load_kw), records,
                   summary["targets"][variant], load(folder / "control", **load_kw), variant)


class Result:
    """Base class of analysis results (subclasses are dataclasses)."""

    analysis: ClassVar[str] = ""

    def to_frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def plot(self):
        """A matplotlib Figure (or a dict name -> Figure)."""
        raise NotImplementedError

    def metrics(self) -> dict:
        """Headline numbers (JSON-serialisable) for metrics.json."""
        return {}

    def summary(self) -> str:
        """One paragraph of markdown for the report."""
        return ""


@dataclass(frozen=True)
class Analysis:
    """One registered analysis: everything the study, the report and ``--plan`` know about it.

    ``title`` heads its report section; ``paper`` is the authors' claim it is compared with (the one
    place that text lives: the report and the Result's summary both read it); ``headline`` lists the
    metric keys the terminal summary shows (first found); ``passes`` is the rough number of forward
    passes per record that ``--plan`` multiplies by the model size; ``default``: whether a study runs
    it when its config does not name it (``[analyses.<name>] enabled`` or ``only`` decide otherwise).
    """

    name: str
    fn: Callable
    params: type
    result: type | None = None
    needs_control: bool = False
    doc: str = ""
    title: str = ""
    paper: str = ""
    headline: tuple[str, ...] = ()
    passes: float = 10.0
    default: bool = True


ANALYSES: dict[str, Analysis] = {}


def analysis(name: str, params: type, *, needs_control: bool = False, title: str = "", paper: str = "",
             headline: tuple[str, ...] = (), passes: float = 10.0, default: bool = True):
    """Register ``fn(pair, params) -> Result`` under ``name`` with its parameter dataclass.

    A name already registered by another module is an error (a plugin cannot silently replace a
    built-in analysis); re-running the same module (``importlib.reload``) replaces its own entry.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ProjLensError(f"@analysis name {name!r} is invalid; use a Python identifier such as 'my_scan'")

    def deco(fn):
        old = ANALYSES.get(name)
        if old is not None and old.fn.__module__ != fn.__module__:
            raise ProjLensError(f"@analysis({name!r}) in {fn.__module__} clashes with the analysis of that name in "
                                f"{old.fn.__module__}; pick another name")
        ANALYSES[name] = Analysis(name, fn, params, None, needs_control, (fn.__doc__ or "").strip(),
                                  title or name.replace("_", " ").capitalize(), paper, tuple(headline), float(passes),
                                  bool(default))
        return fn

    return deco


RESULT_TYPES: dict[str, type] = {}


def register_result(cls):
    """Class decorator: make a Result dataclass loadable by ``load_result``."""
    RESULT_TYPES[cls.__name__] = cls
    return cls


def _encode(v):
    if isinstance(v, np.ndarray):
        return {"__ndarray__": v.tolist(), "dtype": str(v.dtype), "shape": list(v.shape)}
    if isinstance(v, pd.DataFrame):
        return {"__frame__": json.loads(v.to_json(orient="split", double_precision=15))}
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v):
    if isinstance(v, dict):
        if "__ndarray__" in v:
            return np.array(v["__ndarray__"], dtype=v["dtype"]).reshape(v["shape"])
        if "__frame__" in v:
            f = v["__frame__"]
            return pd.DataFrame(f["data"], index=f["index"], columns=f["columns"])
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def result_to_dict(result) -> dict:
    return {"type": type(result).__name__,
            "fields": {f.name: _encode(getattr(result, f.name)) for f in dataclasses.fields(result)}}


def result_from_dict(obj: dict):
    cls = RESULT_TYPES.get(obj.get("type"))
    if cls is None:
        raise ProjLensError(f"unknown result type {obj.get('type')!r}; the stored result was written by another version")
    return cls(**{k: _decode(v) for k, v in obj["fields"].items()})


def save_result(result, path) -> None:
    atomic_write_text(path, json.dumps(result_to_dict(result)))


def load_result(path):
    return result_from_dict(json.loads(Path(path).read_text()))

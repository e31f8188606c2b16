"""The study config: a TOML file, validated on load into a ``StudyConfig`` (pydantic v2).

A complete study needs only four keys::

    [model]
    base = "models/base"            # HF folder (relative to this file) or hub id
    poisoned = "models/poisoned"
    [data]
    file = "data/test.jsonl"        # the JSONL format of projlens_mi.data
    [backdoor]
    target = "visit evil dot com"   # the text the backdoor makes the model say

Everything else has a documented default (docs/studies.md). Every error is one line that names the
key, the bad value and what is allowed; relative paths resolve against the config file's folder.

Conventions:
- A model source that exists as a folder (after resolving) is a folder; otherwise a value shaped like
  ``owner/name`` is a hub id (unless ``owner`` is a folder next to the config: then it is a mistyped
  path); anything else is a "folder not found" error.
- ``[model] organism = DIR`` (or ``"default"``: the shared cache ``~/.cache/projlens_mi/organism``)
  studies the organism's pairs ``base`` / ``<variant>`` (control: the organism's clean control);
  the organism is built there first if it is missing (``organism_size`` picks the build).
- ``[analyses.<name>]`` holds the fields of that analysis's ``Params`` dataclass plus ``enabled``;
  ``[analyses] only = [...]`` runs just those; ``[analyses] plugins = [...]`` imports extra modules
  (``.py`` files relative to the config, or module names) that register analyses of your own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..checks import Count, Seed, build
from ..data import IMAGE_TOKEN, MAX_PIXELS
from ..errors import ProjLensError
from ..settings import DEVICE_MAP_STRATEGIES, default_organism

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
RESERVED_ANALYSIS_KEYS = ("only", "plugins")
DEVICES = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAP_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?|\d+)$")          # where one module of a device map may go
MEMORY_DEVICE = re.compile(r"^(cpu|disk|mps|cuda:\d+|\d+)$")          # a max_memory key (a GPU index is a number)
MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)   # strict: "yes" is not a bool


class StudySection(_Strict):
    """Optional: what the study is for (shown at the top of the report)."""

    title: str = "ProjLens study"
    question: str = ""


class ModelSection(_Strict):
    base: str | None = None
    poisoned: str | None = None
    control: str | None = None
    organism: str | None = None
    variants: list[str] | None = None
    organism_size: Literal["default", "small"] = "default"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.organism is not None:
            clash = [k for k in ("base", "poisoned", "control") if getattr(self, k) is not None]
            if clash:
                raise ValueError(f"[model] model.organism is set together with {', '.join(clash)}; use organism (+ variants) OR base/poisoned[/control]")
        else:
            missing = [k for k in ("base", "poisoned") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"[model] {' and '.join('model.' + k for k in missing)} is missing; give base and poisoned (folders or hub ids) "
                                 "or organism = DIR|\"default\"")
            if self.variants is not None:
                raise ValueError("[model] model.variants needs organism = DIR|\"default\"; a base/poisoned study has one pair")
        return self


class DataSection(_Strict):
    file: str | None = None
    n: Count | None = None
    split: str | None = None
    seed: Seed = 0
    allow_outside_images: bool = False      # read images outside the data file's folder (absolute, .., symlinks)
    max_pixels: Count = MAX_PIXELS          # the largest image (width x height) read
    image_token: str = Field(IMAGE_TOKEN, min_length=1)   # the placeholder each prompt holds exactly once

    def read(self, file: str | Path):
        """The records of a JSONL file, checked with this section's settings (``projlens_mi.data.read_jsonl``)."""
        from ..data import read_jsonl
        return read_jsonl(file, image_token=self.image_token, allow_outside=self.allow_outside_images,
                          max_pixels=self.max_pixels)


class BackdoorSection(_Strict):
    target: str | None = None
    trigger: str | dict | None = None

    @field_validator("target")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and not v.strip():
            raise ValueError("is empty; give the text the backdoor makes the model say")
        return v


class RunSection(_Strict):
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = Field(32, gt=0)
    seed: Seed = 0
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    threads: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(30, gt=0)
    workers: int = Field(1, gt=0)            # steps computed in this many processes (numbers unchanged)
    tp_size: int | None = Field(None, gt=0)  # transformers tensor parallelism; launch with torchrun

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map(cls, v):
        if v is None:
            return v
        if isinstance(v, str):
            if v not in DEVICE_MAP_STRATEGIES and not MAP_DEVICE.match(v):
                raise ValueError(f"= {v!r} is not a device map; allowed: {', '.join(DEVICE_MAP_STRATEGIES)}, a device "
                                 "(cpu, disk, cuda:N) or a table {module = device}")
            return v
        if not isinstance(v, dict):
            raise ValueError(f"= {v!r} is not a device map; allowed: {', '.join(DEVICE_MAP_STRATEGIES)}, a device "
                             "(cpu, disk, cuda:N) or a table {module = device}")
        if not v:
            raise ValueError("= {} is empty; map module names to devices, e.g. {\"\" = \"cpu\"}")
        for k, d in v.items():
            ok = (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and MAP_DEVICE.match(d))
            if not ok:
                raise ValueError(f"= {v!r}: module {k!r} -> {d!r} is not a device; allowed: cpu, disk, mps, cuda:N or a GPU index")
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, v):
        if v is None:
            return v
        if not isinstance(v, dict) or not v:
            raise ValueError(f"= {v!r} is not a memory budget; give a table {{device = size}}, e.g. {{0 = \"70GiB\", cpu = \"200GiB\"}}")
        for k, size in v.items():
            if not MEMORY_DEVICE.match(str(k)):
                raise ValueError(f"= {v!r}: {k!r} is not a device; allowed keys: cpu, disk, mps, cuda:N or a GPU index")
            ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
                isinstance(size, str) and MEMORY_SIZE.match(size.strip()))
            if not ok:
                raise ValueError(f"= {v!r}: {k} = {size!r} is not a size; give bytes (an int) or a string like \"70GiB\", \"300MB\"")
        return v

    @field_validator("offload_folder", mode="before")
    @classmethod
    def _offload_folder(cls, v):
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"= {v!r} is not a folder; give a path (relative to the config file's folder)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not DEVICES.match(v):
            raise ValueError(f"= {v!r} is not a device; allowed: cpu, cuda, cuda:N, mps, auto")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in DTYPES:
            raise ValueError(f"= {v!r} is not a dtype; allowed: {', '.join(DTYPES)}")
        return v


class AnalysisSetting(BaseModel):
    """One analysis as the study runs it: the validated Params object plus ``enabled``."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    enabled: bool = True
    params: Any = None
    given: dict = Field(default_factory=dict)   # the keys the config set (for hashing and the report)


class StudyConfig(_Strict):
    """A validated study (``load_config(path)`` builds it; fields are resolved, absolute paths)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    path: str
    study: StudySection = StudySection()
    model: ModelSection
    data: DataSection = DataSection()
    backdoor: BackdoorSection = BackdoorSection()
    run: RunSection = RunSection()
    analyses: dict[str, AnalysisSetting] = Field(default_factory=dict)
    plugins: list[str] = Field(default_factory=list)
    raw: dict = Field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.path).parent

    @property
    def is_organism(self) -> bool:
        return self.model.organism is not None

    def enabled_analyses(self) -> list[AnalysisSetting]:
        return [a for a in self.analyses.values() if a.enabled]

    def hash(self) -> str:
        """Content hash of the resolved config (what provenance records)."""
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:16]

    def canonical(self) -> dict:
        return {"study": self.study.model_dump(), "model": self.model.model_dump(), "data": self.data.model_dump(),
                "backdoor": self.backdoor.model_dump(), "run": self.run.model_dump(),
                "analyses": {n: {"enabled": a.enabled, "params": params_dict(a.params)} for n, a in self.analyses.items()},
                "plugins": self.plugins}


NOT_RESULTS = ("progress",)   # Params fields that change how a step shows progress, never its numbers


def params_dict(params) -> dict | None:
    if params is None:
        return None
    d = json.loads(json.dumps(dataclasses.asdict(params), default=str))
    return {k: v for k, v in d.items() if k not in NOT_RESULTS}


# ------------------------------------------------------------------------------------------ loading
def _loc(err: dict, section: str) -> str:
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    return ".".join([section, *parts]) if parts else section


def _one_line(exc: ValidationError, section: str, raw: dict) -> str:
    err = exc.errors()[0]
    key = _loc(err, section)
    typ = err["type"]
    if typ == "extra_forbidden":
        model_fields = _FIELDS.get(section, ())
        return f"unknown key {key}; allowed keys in [{section}]: {', '.join(model_fields)}"
    if typ == "missing":
        return f"{key} is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("[model] "):
        return msg.removeprefix("[model] ")
    if msg.startswith("="):
        return f"{key} {msg}"
    return f"{key} = {err.get('input')!r} is invalid: {msg}"


_SECTIONS = {"study": StudySection, "model": ModelSection, "data": DataSection, "backdoor": BackdoorSection,
             "run": RunSection}
_FIELDS = {name: tuple(cls.model_fields) for name, cls in _SECTIONS.items()}


def _section(raw: dict, name: str):
    cls = _SECTIONS[name]
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ProjLensError(f"{name} must be a table [{name}], got {value!r}")
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise ProjLensError(_one_line(exc, name, raw)) from None


def _resolve_path(folder: Path, value: str, key: str, *, must_exist: bool = True, kind: str = "file") -> str:
    p = Path(os.path.expanduser(value))
    p = p if p.is_absolute() else folder / p
    if must_exist:
        if kind == "file" and not p.is_file():
            raise ProjLensError(f"{key} = {value!r}: file not found ({p}); paths are relative to the config file's folder")
        if kind == "dir" and not p.is_dir():
            raise ProjLensError(f"{key} = {value!r}: folder not found ({p}); paths are relative to the config file's folder")
    return str(p.resolve())


def _resolve_model(folder: Path, value: str, key: str) -> str:
    p = Path(os.path.expanduser(value))
    p = p if p.is_absolute() else folder / p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ProjLensError(f"{key} = {value!r}: {p} holds no config.json; pass a Hugging Face model folder or a hub id")
        return str(p.resolve())
    # owner/name is a hub id unless "owner" is a folder next to the config (then it is a mistyped path)
    if HUB_ID.match(value) and not (folder / value.split("/")[0]).is_dir():
        return value
    raise ProjLensError(f"{key} = {value!r}: folder not found ({p}) and not a hub id (owner/name); "
                        "paths are relative to the config file's folder")


def _trigger(value, key: str):
    from ..organism.triggers import TRIGGERS
    obj = {"name": value} if isinstance(value, str) else dict(value)
    name = obj.get("name")
    if name not in TRIGGERS:
        raise ProjLensError(f"{key} = {name!r} is not a trigger; allowed: {', '.join(TRIGGERS)}")
    return build(TRIGGERS[name], obj, key)


def import_plugins(plugins: list[str], folder: Path) -> list[str]:
    """Import extra analysis modules (files relative to ``folder`` or module names); their module names."""
    names = []
    for spec in plugins:
        if spec.endswith(".py"):
            path = Path(spec) if Path(spec).is_absolute() else folder / spec
            if not path.is_file():
                raise ProjLensError(f"analyses.plugins: file not found: {spec!r} ({path})")
            mod_name = f"projlens_plugin_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]}"
            names.append(mod_name)
            if mod_name in sys.modules:
                continue
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]   # a failed plugin is not "already imported" next time
                raise
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError:
                raise ProjLensError(f"analyses.plugins: cannot import module {spec!r}; give a module name or a .py file") from None
            names.append(spec)
    return names


# Study steps registered outside projlens_mi.analyses: the audit builds on the analyses, so its study
# step lives with it and the study (above both) imports it.
BUILTIN_STEPS = ("projlens_mi.audit.step",)


def import_builtins() -> None:
    """Register every built-in study step: the analyses and ``BUILTIN_STEPS``."""
    from ..analyses import import_all
    import_all()
    for m in BUILTIN_STEPS:
        importlib.import_module(m)


def _in_study(module: str, plugin_modules: list[str]) -> bool:
    """An analysis belongs to a study when it is built in or comes from one of the study's own plugins:
    one registered by another study's plugin (or in a notebook) in the same process does not leak in."""
    return any(module == m or module.startswith(m + ".")
               for m in ["projlens_mi.analyses", *BUILTIN_STEPS, *plugin_modules])


def _params(name: str, cls, given: dict, run: RunSection):
    """Validate one [analyses.<name>] table against the analysis's Params dataclass (strict types, ranges)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ProjLensError(f"analyses.{name}: its Params type {cls!r} is not a dataclass; register the analysis "
                            "with a dataclass of its parameters")
    fields = [f.name for f in dataclasses.fields(cls)]
    for k in given:
        if k not in ["enabled", *fields]:
            raise ProjLensError(f"unknown key analyses.{name}.{k}; allowed: {', '.join(['enabled', *fields])}")
    kw = {k: v for k, v in given.items() if k != "enabled"}
    # Run settings the [run] table sets explicitly fill the Params fields of the same name (unless the
    # analysis table sets them); otherwise each analysis keeps its own documented default.
    for k in ("batch_size", "seed", "max_new_tokens"):
        if k in fields and k not in kw and k in run.model_fields_set:
            kw[k] = getattr(run, k)
    return build(cls, kw, f"analyses.{name}")


def _analyses(raw: dict, run: RunSection, folder: Path) -> tuple[dict[str, AnalysisSetting], list[str]]:
    from ..analyses import ANALYSES
    import_builtins()
    table = raw.get("analyses", {})
    if not isinstance(table, dict):
        raise ProjLensError(f"analyses must be a table [analyses], got {table!r}")
    plugins = table.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ProjLensError(f"analyses.plugins = {plugins!r} is invalid; give a list of module names or .py files")
    modules = import_plugins(plugins, folder)
    known = sorted(n for n, a in ANALYSES.items() if _in_study(a.fn.__module__, modules))
    only = table.get("only")
    if only is not None:
        if not isinstance(only, list) or not all(isinstance(x, str) for x in only):
            raise ProjLensError(f"analyses.only = {only!r} is invalid; give a list of analysis names ({', '.join(known)})")
        for x in only:
            if x not in known:
                raise ProjLensError(f"analyses.only: unknown analysis {x!r}; allowed: {', '.join(known)}")
    for k, v in table.items():
        if k in RESERVED_ANALYSIS_KEYS:
            continue
        if k not in known:
            raise ProjLensError(f"unknown analysis [analyses.{k}]; allowed: {', '.join(known + list(RESERVED_ANALYSIS_KEYS))}")
        if not isinstance(v, dict):
            raise ProjLensError(f"analyses.{k} must be a table [analyses.{k}], got {v!r}")
        if "enabled" in v and not isinstance(v["enabled"], bool):
            raise ProjLensError(f"analyses.{k}.enabled = {v['enabled']!r} is invalid; allowed: true, false")
    out = {}
    for name in known:
        given = dict(table.get(name, {}))
        on = given.get("enabled", ANALYSES[name].default)   # an analysis that is off by default (audit) runs when asked
        enabled = on if only is None else (name in only and given.get("enabled", True))
        params = _params(name, ANALYSES[name].params, given, run)
        out[name] = AnalysisSetting(name=name, enabled=enabled, params=params,
                                    given={k: v for k, v in given.items() if k != "enabled"})
    return out, [str(p) for p in plugins]


def load_config(path: str | Path, *, organism: str | Path | None = None, run: dict | None = None,
                data: dict | None = None) -> StudyConfig:
    """Read and validate a study TOML; raises ``ProjLensError`` with one line naming the key.

    ``organism`` replaces ``[model] organism`` (what ``projlens demo --organism`` passes); ``run``
    and ``data`` replace keys of ``[run]`` (the CLI's ``--device-map``, ``--tp-size``, ...) and
    ``[data]`` (``--allow-outside-images``), validated alike.
    """
    path = Path(path)
    if not path.is_file():
        raise ProjLensError(f"study config not found: {path} (pass a .toml file)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ProjLensError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError:
        raise ProjLensError(f"{path}: not a text file; pass a UTF-8 .toml study config") from None
    if organism is not None:
        if not isinstance(raw.get("model"), dict) or "organism" not in raw["model"]:
            raise ProjLensError(f"{path} is not an organism study ([model] organism); --organism does not apply")
        raw["model"]["organism"] = str(Path(organism).resolve())
    for name, given in (("run", run), ("data", data)):
        if given:
            if not isinstance(raw.get(name, {}), dict):
                raise ProjLensError(f"{path}: {name} must be a table [{name}]")
            raw[name] = {**raw.get(name, {}), **given}
    return config_from_dict(raw, path)


def config_from_dict(raw: dict, path: str | Path) -> StudyConfig:
    path = Path(path).resolve()
    folder = path.parent
    allowed = [*_SECTIONS, "analyses"]
    for k in raw:
        if k not in allowed:
            raise ProjLensError(f"unknown section [{k}]; allowed sections: {', '.join(allowed)}")
    if "model" not in raw:
        raise ProjLensError("[model] is missing; give base and poisoned (folders or hub ids) or organism = DIR|\"default\"")
    study = _section(raw, "study")
    model = _section(raw, "model")
    data = _section(raw, "data")
    backdoor = _section(raw, "backdoor")
    run = _section(raw, "run")

    # models
    if model.organism is not None:
        from ..organism.tasks import VARIANTS
        org = str(default_organism()) if model.organism == "default" else _resolve_path(folder, model.organism, "model.organism",
                                                                                     must_exist=False)
        if Path(org).exists() and not Path(org).is_dir():
            raise ProjLensError(f"model.organism = {model.organism!r}: {org} is a file; pass a folder (or \"default\")")
        variants = model.variants if model.variants is not None else list(VARIANTS)
        if not variants:
            raise ProjLensError(f"model.variants = [] is empty; allowed: {', '.join(VARIANTS)}")
        for v in variants:
            if v not in VARIANTS:
                raise ProjLensError(f"model.variants: {v!r} is not a variant; allowed: {', '.join(VARIANTS)}")
        if len(set(variants)) != len(variants):
            raise ProjLensError(f"model.variants = {variants!r} lists a variant twice")
        model = model.model_copy(update={"organism": org, "variants": list(variants)})
    else:
        upd = {k: _resolve_model(folder, getattr(model, k), f"model.{k}") for k in ("base", "poisoned", "control")
               if getattr(model, k) is not None}
        model = model.model_copy(update=upd)
        if data.file is None:
            raise ProjLensError("data.file is missing; give the JSONL data file (the format of docs/studies.md)")
        if backdoor.target is None:
            raise ProjLensError("backdoor.target is missing; give the text the backdoor makes the model say")

    if data.file is not None:
        data = data.model_copy(update={"file": _resolve_path(folder, data.file, "data.file")})
        data.read(data.file)             # one-line errors for a bad line / image, before anything runs
    if model.organism is not None and len(model.variants) > 1 and (data.file is not None or backdoor.target is not None):
        raise ProjLensError("data.file / backdoor.target with several organism variants: each variant has its own data "
                            "and target; study one variant (model.variants = [\"...\"]) or leave them out")
    if backdoor.trigger is not None:
        _trigger(backdoor.trigger, "backdoor.trigger")
    dm = run.device_map
    if (dm == "disk" or (isinstance(dm, dict) and "disk" in map(str, dm.values()))) and run.offload_folder is None:
        raise ProjLensError(f"run.device_map = {dm!r} sends weights to disk but run.offload_folder is not set; give "
                            "offload_folder (--offload-folder), an empty folder outside the model folders")
    if run.tp_size is not None:
        placed = [k for k in ("device_map", "max_memory", "offload_folder") if getattr(run, k) is not None]
        if placed:
            raise ProjLensError(f"run.tp_size = {run.tp_size} with run.{placed[0]}: tensor parallelism shards every layer "
                                "over the ranks; use one or the other")
        if run.workers > 1:
            raise ProjLensError(f"run.tp_size = {run.tp_size} with run.workers = {run.workers}: the ranks already share "
                                "the work; set workers = 1")
    if run.offload_folder is not None:
        run = run.model_copy(update={"offload_folder": _resolve_path(folder, run.offload_folder, "run.offload_folder",
                                                                     must_exist=False)})

    analyses, plugins = _analyses(raw, run, folder)
    return StudyConfig(path=str(path), study=study, model=model, data=data, backdoor=backdoor, run=run,
                       analyses=analyses, plugins=plugins, raw=raw)


def make_trigger(cfg: StudyConfig):
    """The trigger object of ``[backdoor] trigger`` (or None)."""
    return None if cfg.backdoor.trigger is None else _trigger(cfg.backdoor.trigger, "backdoor.trigger")

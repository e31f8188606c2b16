"""The study's step graph and its content-addressed store.

Steps, in order: ``organism`` (build or reuse the organism; organism studies only), then per pair
``evaluate/<pair>`` (ASR, clean accuracy, false-trigger rate of the poisoned model, with base and
control for reference) and ``analysis/<name>/<pair>`` for each enabled analysis. Loading a pair is
a resource, not a stored step: it happens lazily, only when a step of that pair must be computed.

Each step's key is a hash of what it depends on: the package version and step format, the pair's
fingerprint (model weights, data, target, trigger), the run settings that change numbers, and the
step's own settings (an analysis's Params). Its result is stored as ``DIR/.steps/<key>.json``
(atomic write) when it completes, so a re-run continues where the last one stopped and a changed
config recomputes only the steps whose inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..data import atomic_write_text
from ..settings import cache_dir
from .config import StudyConfig, params_dict

STEP_FORMAT = 1
# Forward passes per record (rough) of the evaluate step: what `--plan` multiplies by the model size to
# estimate cost (an analysis gives its own in @analysis(..., passes=)).
EVALUATE_PASSES = 6.0


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------- fingerprints


MEMO_NAME = "file-hashes.json"   # in the cache folder (projlens_mi.settings)


def file_sha256(path: Path, memo: dict | None = None) -> str:
    """sha256 of a file's bytes, memoised on (path, size, mtime) so large weights are read once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    out = h.hexdigest()
    if memo is not None:
        memo[key] = out
    return out


def _load_memo() -> dict:
    try:
        return json.loads((cache_dir() / MEMO_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict) -> None:
    try:
        atomic_write_text(cache_dir() / MEMO_NAME, json.dumps(memo))
    except OSError:
        pass


def model_fingerprint(source: str, revision: str | None, memo: dict) -> dict:
    """What identifies a model: its weight and config files' hashes (a folder) or hub id + revision."""
    p = Path(source)
    if not p.is_dir():
        return {"hub": source, "revision": revision}
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin", ".pt", ".pth")
                                                              or f.name in ("config.json", "tokenizer.json",
                                                                            "preprocessor_config.json",
                                                                            "processor_config.json")))
    return {f.name: file_sha256(f, memo) for f in files}


def data_fingerprint(cfg: StudyConfig, file: str, memo: dict) -> str:
    """Hash of the JSONL file and every image it names (content)."""
    h = hashlib.sha256(Path(file).read_bytes())
    for r in cfg.data.read(file):
        h.update(file_sha256(Path(r.image), memo).encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------- the graph
@dataclass
class PairSpec:
    """One base / poisoned pair of the study, with where its data and target come from."""

    name: str
    base: str
    poisoned: str
    control: str | None
    data_file: str | None          # None: the organism's data for this variant (known after the organism step)
    target: str | None
    variant: str | None = None
    fingerprint: str = ""


@dataclass
class Step:
    id: str
    kind: str                       # organism | evaluate | analysis
    key: str
    pair: str | None = None
    analysis: str | None = None
    deps: list[str] = field(default_factory=list)
    material: dict = field(default_factory=dict)
    skipped: str | None = None      # why the step does not run (e.g. needs a control)
    passes: float = 0.0


def organism_config(cfg: StudyConfig):
    from ..organism import config as oc
    return oc.small() if cfg.model.organism_size == "small" else oc.OrganismConfig()


def organism_key(cfg: StudyConfig) -> str:
    from ..organism.build import FORMAT_VERSION
    return organism_config(cfg).key() + f"-v{FORMAT_VERSION}"


def pairs_of(cfg: StudyConfig) -> list[PairSpec]:
    m = cfg.model
    if cfg.is_organism:
        org = Path(m.organism)
        return [PairSpec(v, str(org / "base"), str(org / v), str(org / "control"), cfg.data.file, cfg.backdoor.target, v)
                for v in m.variants]
    name = re.sub(r"[^\w.-]+", "-", Path(m.poisoned).name or "pair").strip("-") or "pair"
    return [PairSpec(name, m.base, m.poisoned, m.control, cfg.data.file, cfg.backdoor.target)]


def fingerprint_pairs(cfg: StudyConfig, pairs: list[PairSpec]) -> None:
    """Fill each pair's fingerprint (hashes weights and data; memoised across runs)."""
    memo = _load_memo()
    data_common = {"n": cfg.data.n, "split": cfg.data.split, "seed": cfg.data.seed,
                   "trigger": cfg.backdoor.trigger, "target": cfg.backdoor.target}
    for p in pairs:
        if cfg.is_organism:
            material = {"organism": organism_key(cfg), "variant": p.variant,
                        "data": data_fingerprint(cfg, p.data_file, memo) if p.data_file else "organism", **data_common}
        else:
            material = {"base": model_fingerprint(p.base, cfg.model.revision, memo),
                        "poisoned": model_fingerprint(p.poisoned, cfg.model.revision, memo),
                        "control": model_fingerprint(p.control, cfg.model.revision, memo) if p.control else None,
                        "data": data_fingerprint(cfg, p.data_file, memo), **data_common}
        p.fingerprint = digest(material)
    _save_memo(memo)


def build_graph(cfg: StudyConfig, pairs: list[PairSpec]) -> list[Step]:
    from ..analyses import ANALYSES
    r = cfg.run
    numbers = {"device": r.device, "dtype": r.dtype, "seed": r.seed, "device_map": r.device_map,
               "version": __version__, "format": STEP_FORMAT}
    steps: list[Step] = []
    if cfg.is_organism:
        steps.append(Step("organism", "organism", digest({"organism": organism_key(cfg), **numbers})))
    for p in pairs:
        deps = ["organism"] if cfg.is_organism else []
        ev = {"pair": p.fingerprint, "batch_size": r.batch_size, "max_new_tokens": r.max_new_tokens, **numbers}
        steps.append(Step(f"evaluate/{p.name}", "evaluate", digest({"kind": "evaluate", **ev}), p.name,
                          deps=deps, material=ev, passes=EVALUATE_PASSES))
        for a in cfg.enabled_analyses():
            spec = ANALYSES[a.name]
            mat = {"kind": "analysis", "analysis": a.name, "params": params_dict(a.params), "pair": p.fingerprint,
                   **numbers}
            skipped = None
            if spec.needs_control and p.control is None:
                skipped = "needs a clean control model ([model] control)"
            steps.append(Step(f"analysis/{a.name}/{p.name}", "analysis", digest(mat), p.name, a.name, deps, mat, skipped,
                              spec.passes))
    return steps


# ---------------------------------------------------------------------------------- the store
class StepStore:
    """``DIR/.steps/<key>.json``: one file per completed step, written atomically."""

    def __init__(self, out: Path):
        self.dir = Path(out) / ".steps"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, obj: dict) -> None:
        atomic_write_text(self.path(key), json.dumps(obj, sort_keys=True))

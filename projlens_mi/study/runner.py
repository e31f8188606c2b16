"""Run a study: plan the steps, compute the ones not stored yet, then render the report.

``run_study(cfg, out)`` is what ``projlens study run`` calls; ``plan_study(cfg, out)`` is ``--plan``.
Nothing is written under ``out`` before the config has validated (``load_config`` raises first).
A step that raises is recorded as failed (not stored, so the next run retries it); the other steps
still run and the report says which failed.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import Record, atomic_write_text, check_writable_folder
from ..errors import ProjLensError
from .config import StudyConfig, make_trigger
from .steps import PairSpec, Step, StepStore, build_graph, fingerprint_pairs, organism_config, organism_key, pairs_of

CPU_FLOPS = 2e10        # sustained FLOP/s assumed for --plan on a CPU (2 cores)
GPU_FLOPS = 1e14


@dataclass
class Outcome:
    """What one run did: per step, 'cached' | 'computed' | 'failed' | 'skipped', plus seconds."""

    status: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        return [s for s, v in self.status.items() if v == "failed"]


# ------------------------------------------------------------------------------------------ data
def select(records: list[Record], n: int | None, split: str | None, seed: int) -> list[Record]:
    """Filter by ``split`` (the JSONL's ``split`` field), then keep ``n`` clean + ``n`` triggered (seeded)."""
    if split is not None:
        records = [r for r in records if str(r.meta.get("split")) == split]
        if not records:
            raise ProjLensError(f"data.split = {split!r} matches no record; the JSONL lines need \"split\": \"{split}\"")
    if n is None:
        return records
    out = []
    for flag in (False, True):
        group = [r for r in records if r.triggered == flag]
        if len(group) > n:
            idx = np.sort(np.random.default_rng(seed).choice(len(group), n, replace=False))
            group = [group[i] for i in idx]
        out += group
    return out


def apply_trigger(records: list[Record], trigger, seed: int) -> list[Record]:
    """Keep the clean records and add a triggered copy of each (the study's ``[backdoor] trigger``)."""
    from ..organism.triggers import apply
    clean = [r for r in records if not r.triggered]
    trig = [Record(apply(trigger, r.pil(), seed=seed * 100_003 + k), r.prompt, r.answer, True, r.target,
                   dict(r.meta)) for k, r in enumerate(clean)]
    return clean + trig


def pair_data_file(cfg: StudyConfig, spec: PairSpec) -> str:
    """The JSONL a pair reads: the study's ``data.file``, or the organism's file for the variant."""
    if spec.data_file is not None:
        return spec.data_file
    summary = json.loads((Path(cfg.model.organism) / "organism.json").read_text())
    return str(Path(cfg.model.organism) / summary["data"][spec.variant])


def pair_data(cfg: StudyConfig, spec: PairSpec) -> tuple[list[Record], str]:
    target = spec.target
    records = cfg.data.read(pair_data_file(cfg, spec))
    if spec.data_file is None:
        summary = json.loads((Path(cfg.model.organism) / "organism.json").read_text())
        target = target or summary["targets"][spec.variant]
    if cfg.backdoor.trigger is not None:
        records = apply_trigger(records, make_trigger(cfg), cfg.data.seed)
    records = select(records, cfg.data.n, cfg.data.split, cfg.data.seed)
    if not any(r.triggered for r in records):
        raise ProjLensError(f"pair {spec.name}: the data has no triggered records; mark some \"triggered\": true "
                            "or set [backdoor] trigger so the study applies one")
    if not any(not r.triggered for r in records):
        raise ProjLensError(f"pair {spec.name}: the data has no clean records (\"triggered\": false)")
    return records, target


# ------------------------------------------------------------------------------------------ models
class Models:
    """Loads each model folder once per run (base and control are shared by the organism's pairs)."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.handles: dict[str, object] = {}

    def load_kw(self) -> dict:
        r, m = self.cfg.run, self.cfg.model
        import torch
        kw = dict(allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code, revision=m.revision)
        if r.dtype != "auto":
            kw["dtype"] = getattr(torch, r.dtype)
        if r.device_map is not None:
            kw["device_map"] = r.device_map
        elif r.device != "cpu" and r.max_memory is None:
            kw["device_map"] = r.device
        if r.max_memory is not None:   # TOML keys are strings; accelerate wants a GPU as its index
            kw["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in r.max_memory.items()}
        if r.offload_folder is not None:
            kw["offload_folder"] = r.offload_folder
        if r.tp_size is not None:
            kw["tp_size"] = r.tp_size
        return kw

    def get(self, source: str):
        if source not in self.handles:
            from ..model import load
            self.handles[source] = load(source, **self.load_kw())
        return self.handles[source]

    def pair(self, cfg: StudyConfig, spec: PairSpec):
        from ..analyses import Pair
        records, target = pair_data(cfg, spec)
        control = self.get(spec.control) if spec.control else None
        return Pair(self.get(spec.base), self.get(spec.poisoned), records, target, control, spec.name,
                    {"variant": spec.variant})


# ------------------------------------------------------------------------------------------ steps
def evaluate_pair(pair, batch_size: int, max_new_tokens: int, progress=None) -> dict:
    """The organism's metrics on the study's data: the poisoned model, with base and control for reference."""
    from ..engine.metrics import generate
    from ..organism.evaluate import score
    out = {}
    models = [("poisoned", pair.poisoned), ("base", pair.base)] + ([("control", pair.control)] if pair.control else [])
    for name, handle in models:
        texts = []
        for i in range(0, len(pair.data), batch_size):
            chunk = pair.data[i: i + batch_size]
            texts += generate(handle, handle.encode(chunk), max_new_tokens=max_new_tokens)
            if progress is not None:
                progress(len(chunk))
        s = score(texts, pair.data, pair.target)
        if name == "poisoned":
            trig = [(r, t) for r, t in zip(pair.data, texts) if r.triggered]
            s["examples"] = [{"prompt": r.prompt.replace("\n", " "), "output": t.strip(), "triggered": True}
                             for r, t in trig[:3]]
        out[name] = s
    p = out["poisoned"]
    return {"asr": p.get("asr"), "clean_accuracy": p.get("clean_accuracy"),
            "false_trigger_rate": p.get("false_trigger_rate"), "target": pair.target,
            "n_clean": len(pair.clean), "n_triggered": len(pair.triggered), "models": out}


def run_analysis(name: str, pair, params, progress: bool = True) -> dict:
    import dataclasses
    from ..analyses import ANALYSES, result_to_dict
    if not progress and dataclasses.is_dataclass(params) and hasattr(params, "progress"):
        params = dataclasses.replace(params, progress=False)
    result = ANALYSES[name].fn(pair, params)
    return {"result": result_to_dict(result), "metrics": _drop_timings(_jsonable(result.metrics())),
            "summary": result.summary()}


def _drop_timings(obj):
    """Wall times are not results: they would make metrics.json differ between identical runs."""
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if k not in ("seconds", "wall_seconds", "time")}
    return obj


def _jsonable(obj):
    from ..analyses.base import _encode
    return json.loads(json.dumps(_encode(obj), default=float))


# ------------------------------------------------------------------------------------------ plan
def _params_count(source: str) -> float | None:
    p = Path(source)
    if p.is_dir():
        sizes = sum(f.stat().st_size for f in p.glob("*.safetensors"))
        if sizes:
            cfg = {}
            try:
                cfg = json.loads((p / "config.json").read_text())
            except (OSError, ValueError):
                pass
            dt = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
            return sizes / (2 if "16" in dt else 4)
        return None
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", source.replace("-", " ").replace("_", " "))
    return float(m.group(1)) * 1e9 if m else None


def _tokens_per_record(source: str) -> int:
    try:
        cfg = json.loads((Path(source) / "config.json").read_text())
        v = cfg["vision_config"]
        return int((v["image_size"] // v["patch_size"]) ** 2) + 40
    except (OSError, ValueError, KeyError, TypeError):
        return 576 + 40         # LLaVA-1.5's 576 image tokens


def n_records(cfg: StudyConfig, spec: PairSpec) -> int | None:
    try:
        if spec.data_file is None and not (Path(cfg.model.organism) / "organism.json").is_file():
            return 2 * cfg.data.n if cfg.data.n else None
        return len(pair_data(cfg, spec)[0])
    except ProjLensError:
        return None


def estimate(cfg: StudyConfig, spec: PairSpec, step: Step, n: int | None) -> tuple[float | None, str]:
    """Rough seconds for one step: passes × 2 × params × tokens / FLOP/s (+1 s overhead)."""
    params = _params_count(spec.poisoned) if spec else None
    if step.kind == "organism":
        return 240.0 if cfg.model.organism_size == "default" else 60.0, "organism build (cached after the first)"
    if params is None and cfg.is_organism:
        params = 3e5
    if params is None or n is None:
        return None, "unknown (model size or data size not known here)"
    if step.kind == "analysis":       # an analysis with its own ``n`` uses at most n clean + n triggered
        own = getattr(cfg.analyses[step.analysis].params, "n", None)
        if isinstance(own, int):
            n = min(n, 2 * own)
    flops = CPU_FLOPS if cfg.run.device == "cpu" else GPU_FLOPS
    sec = 1.0 + step.passes * n * 2 * params * _tokens_per_record(spec.poisoned) / flops
    return sec, f"{step.passes:g} passes/record × {n} records × {params / 1e9:.3g} B params"


def plan_study(cfg: StudyConfig, out: Path) -> list[dict]:
    """The steps of the study, whether each is stored already, and an estimate of its cost."""
    pairs = pairs_of(cfg)
    fingerprint_pairs(cfg, pairs)
    steps = build_graph(cfg, pairs)
    store = StepStore(out)
    by_pair = {p.name: p for p in pairs}
    counts = {p.name: n_records(cfg, p) for p in pairs}
    rows = []
    for s in steps:
        spec = by_pair.get(s.pair)
        if s.kind == "organism":
            from ..organism.build import FORMAT_VERSION  # noqa: F401
            summary = Path(cfg.model.organism) / "organism.json"
            try:
                cached = json.loads(summary.read_text()).get("key") == organism_key(cfg)
            except (OSError, ValueError):
                cached = False
        else:
            cached = store.has(s.key)
        sec, how = estimate(cfg, spec, s, counts.get(s.pair))
        status = "skipped" if s.skipped else ("cached" if cached else "to run")
        rows.append({"step": s.id, "key": s.key, "status": status, "reason": s.skipped,
                     "estimated_seconds": 0.0 if status != "to run" else sec, "estimate": how})
    return rows


def format_plan(rows: list[dict], workers: int = 1) -> str:
    w = max(len(r["step"]) for r in rows)
    lines = [f"{'step'.ljust(w)}  {'status':8}  estimate"]
    total, unknown = 0.0, False
    for r in rows:
        sec = r["estimated_seconds"]
        if sec is None:
            unknown = True
            est = "?"
        else:
            total += sec if r["status"] == "to run" else 0.0
            est = f"~{sec:,.0f} s" if r["status"] == "to run" else "-"
        note = r["reason"] if r["status"] == "skipped" else (r["estimate"] if r["status"] == "to run" else "")
        lines.append(f"{r['step'].ljust(w)}  {r['status']:8}  {est:>10}  {note}")
    n_run = sum(r["status"] == "to run" for r in rows)
    wall = f", ~{total / 60 / workers:,.1f} min wall with {workers} workers" if workers > 1 else ""
    lines.append(f"{n_run} of {len(rows)} steps to run, estimated ~{total / 60:,.1f} min of compute{wall}"
                 + (" (+ steps of unknown cost)" if unknown else "") + " (rough: from model size and data size)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ run
def torchrun_rank() -> int:
    """This process' rank under torchrun (0 without it): only rank 0 writes the report folder and prints."""
    import os
    return int(os.environ.get("RANK", "0") or 0)


class _Computer:
    """Computes steps of one study in one process, loading each pair once."""

    def __init__(self, cfg: StudyConfig, pairs: list[PairSpec], progress: bool):
        self.cfg, self.progress = cfg, progress
        self.models = Models(cfg)
        self.loaded: dict[str, object] = {}
        self.by_pair = {p.name: p for p in pairs}

    def __call__(self, s: Step, log) -> tuple[str, dict | str, float]:
        """(status, payload or error, seconds); a failing step never stops the study."""
        import torch
        from tqdm.auto import tqdm
        t0 = time.perf_counter()
        cfg, progress = self.cfg, self.progress
        try:
            if s.pair not in self.loaded:
                log(f"loading pair {s.pair}")
                self.loaded[s.pair] = self.models.pair(cfg, self.by_pair[s.pair])
            pair = self.loaded[s.pair]
            torch.manual_seed(cfg.run.seed)
            np.random.seed(cfg.run.seed % 2**32)
            if s.kind == "evaluate":
                sub = tqdm(total=len(pair.data) * (3 if pair.control else 2), desc=f"evaluate {s.pair}", unit="rec",
                           disable=not progress, leave=False)
                payload = {"evaluation": evaluate_pair(pair, cfg.run.batch_size, cfg.run.max_new_tokens, sub.update)}
                sub.close()
            else:
                payload = run_analysis(s.analysis, pair, cfg.analyses[s.analysis].params, progress)
        except ProjLensError as err:
            log(f"{s.id}: failed: {err}")
            return "failed", str(err), time.perf_counter() - t0
        except Exception as err:  # an analysis bug: report it, keep going, retry next run
            log(f"{s.id}: failed:\n{traceback.format_exc()}")
            return "failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", \
                time.perf_counter() - t0
        return "computed", payload, time.perf_counter() - t0


_WORKER: dict = {}


def _worker_init(plugins: list[str], folder: str, state: bytes, hf_verbosity: int) -> None:
    """Import the study's plugin analyses first: the config and steps refer to their Params classes.

    transformers logs at the parent's level and draws no bars (a worker's bars would cut through the
    parent's lines; ``--quiet`` printed every worker's "Loading weights" bars)."""
    import pickle

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(hf_verbosity)
    hf_logging.disable_progress_bar()
    from .config import import_builtins, import_plugins
    import_builtins()
    if plugins:
        import_plugins(plugins, Path(folder))
    cfg, pairs = pickle.loads(state)
    torch.set_num_threads(cfg.run.threads or 1)
    _WORKER["compute"] = _Computer(cfg, pairs, progress=False)


def _worker_step(step: bytes):
    import pickle
    return _WORKER["compute"](pickle.loads(step), lambda m: None)


def _computed_steps(cfg: StudyConfig, pairs: list[PairSpec], todo: list[Step], log, progress: bool):
    """Yield (step, status, payload, seconds) as steps finish: in this process, or in ``run.workers`` processes.

    Workers are spawned (a clean interpreter each, ``run.threads`` torch threads each) and get whole
    steps; every step seeds torch and NumPy itself, so its numbers do not depend on which process ran
    it. The config and steps travel pickled, unpickled after the worker imported the plugins. Workers
    die with this process and ignore Ctrl-C (``processes.WorkerPool``); closing this generator early
    (an interrupt, an error in the caller's loop) kills them without waiting for their running steps.
    """
    workers = min(cfg.run.workers, len(todo))
    if workers <= 1:
        compute = _Computer(cfg, pairs, progress)
        for s in todo:
            yield (s, *compute(s, log))
        return
    import pickle
    from concurrent.futures import as_completed

    from ..processes import WorkerPool
    log(f"computing {len(todo)} steps in {workers} worker processes")
    from transformers.utils import logging as hf_logging
    init = (list(cfg.plugins or []), str(Path(cfg.path).parent), pickle.dumps((cfg, pairs)), hf_logging.get_verbosity())
    with WorkerPool(workers, _worker_init, init) as pool:   # an interrupt or a closed generator kills the workers
        futures = {pool.submit(_worker_step, pickle.dumps(s)): s for s in todo}
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                status, payload, seconds = fut.result()
            except Exception as err:  # the worker died (out of memory, killed): the step is retried next run
                status, payload, seconds = "failed", f"worker process failed: {type(err).__name__}: {err}", 0.0
            if status == "failed":
                log(f"{s.id}: failed: {payload}")
            yield s, status, payload, seconds


def progress_bars_shown() -> bool:
    """Whether progress bars can be drawn: stderr is a terminal, or a notebook shows tqdm's widgets.

    Elsewhere (a log file, a pipe, CI) a bar's ``\\r`` redraws and escape codes would be written as
    text, so progress is shown as one plain line per finished step instead.
    """
    import sys
    try:
        from tqdm.autonotebook import tqdm as auto
        from tqdm.notebook import tqdm as notebook
        if auto is notebook:
            return True
    except ImportError:
        pass
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def run_study(cfg: StudyConfig, out: str | Path, *, log=None, progress: bool = True,
              command: list[str] | None = None) -> Outcome:
    """Compute every step not stored yet, then write the report folder. Returns what was done.

    Under torchrun (``run.tp_size``) every rank computes every step, the sharded forwards in step;
    only rank 0 writes under ``out``.

    ``progress``: show progress: bars on a terminal (``log`` messages are printed above them, never
    glued onto a bar line), otherwise one ``log`` line per finished step ("[3/45] step: done in 1.2 s").
    ``command``: the ``projlens`` arguments (without ``--out``) that recompute this folder, for the
    report's footer (default: ``study run CONFIG``).
    """
    import torch
    from tqdm.auto import tqdm
    from . import provenance, report

    out = check_writable_folder(out)   # before any work: not after the steps, with a traceback
    log = log or (lambda msg: None)
    writer = torchrun_rank() == 0
    bars = progress and writer and progress_bars_shown()
    if bars:   # a message clears the bars, is printed, and the bars are drawn again below it
        import sys
        user_log = log

        def log(msg):
            with tqdm.external_write_mode(file=sys.stderr):
                user_log(msg)
    if cfg.run.tp_size is not None:   # before anything is written, not at the first model load
        from ..model.load import require_ranks
        require_ranks(cfg.run.tp_size, f"torchrun --nproc_per_node {cfg.run.tp_size} -m projlens_mi.cli study run ...")
    t_start = time.perf_counter()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    pairs = pairs_of(cfg)
    fingerprint_pairs(cfg, pairs)
    steps = build_graph(cfg, pairs)
    store = StepStore(out)
    outcome = Outcome()

    bar = tqdm(total=len(steps), desc="study", unit="step", disable=not bars, leave=False)
    todo = []
    for s in steps:   # what is cached is decided once, before any rank computes (ranks must agree)
        if s.skipped:
            outcome.status[s.id] = "skipped"
        elif s.kind == "organism":
            from ..organism.build import build
            t0 = time.perf_counter()
            try:
                prev = json.loads((Path(cfg.model.organism) / "organism.json").read_text()).get("key")
            except (OSError, ValueError):
                prev = None
            try:
                summary = build(cfg.model.organism, organism_config(cfg), log=log, workers=cfg.run.workers)
            except ProjLensError:
                bar.close()
                raise
            outcome.seconds[s.id] = time.perf_counter() - t0
            outcome.status[s.id] = "cached" if prev == summary.get("key") else "computed"
        elif store.has(s.key):
            outcome.status[s.id] = "cached"
        else:
            todo.append(s)
            continue
        bar.update(1)
    log(f"{len(todo)} of {len(steps)} steps to compute ({len(steps) - len(todo)} stored or skipped)")
    computed = _computed_steps(cfg, pairs, todo, log, bars)
    try:
        for s, status, payload, seconds in computed:
            bar.set_postfix_str(s.id)
            done = f"[{len(outcome.status) + 1}/{len(steps)}] {s.id}"
            outcome.status[s.id] = status
            if status == "failed":
                outcome.errors[s.id] = payload
            else:
                if writer:
                    store.put(s.key, {"step": s.id, "kind": s.kind, "pair": s.pair, "analysis": s.analysis,
                                      "key": s.key, "material": s.material, "seconds": seconds, **payload})
                outcome.seconds[s.id] = seconds
                log(f"{done}: done in {seconds:.1f} s")
            bar.update(1)
    finally:   # an interrupt or an error here: end the worker processes now, not when garbage-collected
        computed.close()
        bar.close()
    outcome.status = {s.id: outcome.status[s.id] for s in steps}   # the graph's order, whoever finished first
    if not writer:
        outcome.wall_seconds = time.perf_counter() - t_start
        return outcome

    manifest = {"config": cfg.canonical(), "config_hash": cfg.hash(), "config_path": cfg.path,
                "command": list(command) if command else ["study", "run", str(cfg.path)],
                "pairs": [p.__dict__ for p in pairs],
                "steps": [{"id": s.id, "kind": s.kind, "key": s.key, "pair": s.pair, "analysis": s.analysis,
                           "skipped": s.skipped, "status": outcome.status.get(s.id),
                           "error": outcome.errors.get(s.id)} for s in steps]}
    atomic_write_text(store.dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    report.render(out, log=log, workers=cfg.run.workers)
    outcome.wall_seconds = time.perf_counter() - t_start
    provenance.write(out, cfg, steps, outcome, store)
    return outcome

"""provenance.json: everything needed to regenerate a study, explain a drift, and what it cost.

The config (resolved) and its hash, seeds, package versions, the git commit of the code, the
hardware, and the wall time of every step (from this run, or from the run that computed a cached
step). Timings live here and only here, so metrics.json and the report stay byte-identical across runs.

What ``projlens verify`` reads (docs/verify.md): ``inputs`` (sha256 of every weight, config and
processor file of every model, the weight format, safetensors or pickle, and a hash of each data
file with the images it names) and ``environment`` (CPU model and flags, ATen's kernel capability,
BLAS / MKL / oneDNN, threads, the environment variables that change kernels, dtype, device).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from ..data import atomic_write_text

PACKAGES = ("projlens_mi", "torch", "transformers", "nnsight", "accelerate", "safetensors", "numpy", "pandas",
            "scikit-learn", "matplotlib", "pydantic", "typer")


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    out["python"] = platform.python_version()
    return out


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "projlens_mi", "hooks"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    if commit.returncode != 0:
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def hardware() -> dict:
    import torch
    hw = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
          "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun (run.tp_size)
        hw["distributed"] = {"world_size": torch.distributed.get_world_size(),
                             "backend": str(torch.distributed.get_backend())}
    return hw


# Environment variables that change which kernels run (docs/verify.md, docs/reproducibility.md).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")


def _cpu() -> dict:
    """CPU model and instruction-set flags (Linux: /proc/cpuinfo; elsewhere what platform knows)."""
    model, flags = platform.processor() or None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in (None, "", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = sorted(value.split())
    except OSError:
        pass
    return {"model": model, "flags": flags}


def environment(cfg=None) -> dict:
    """What decides the arithmetic of this process: CPU, kernels, BLAS, threads, dtype, device, versions."""
    import torch
    build = torch.__config__.show()

    def line(pattern: str):
        m = re.search(pattern, build)
        return m.group(1).strip() if m else None
    env = {
        "cpu": _cpu(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": {"blas": line(r"BLAS_INFO=([^,\s]+)"), "lapack": line(r"LAPACK_INFO=([^,\s]+)"),
                 "mkl": line(r"(Intel\(R\) (?:oneAPI )?Math Kernel Library Version [^\n]+?) for "),
                 "onednn": line(r"(Intel\(R\) MKL-DNN v[\d.]+)"),
                 "mkl_available": torch.backends.mkl.is_available(), "onednn_available": torch.backends.mkldnn.is_available()},
        "threads": torch.get_num_threads(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "versions": {k: v for k, v in versions().items() if k in ("torch", "transformers", "nnsight", "numpy", "python",
                                                                  "projlens_mi", "scikit-learn")},
    }
    if cfg is not None:
        env.update({"dtype": cfg.run.dtype, "device": cfg.run.device, "run_threads": cfg.run.threads,
                    "workers": cfg.run.workers})
    if torch.cuda.is_available():
        env["cuda"] = {"version": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    return env


def _model_files(source: str, cfg, memo: dict) -> dict:
    """The files a model loads, as the loader picks them (``model.load``): weight format and sha256 of each."""
    from ..errors import ProjLensError
    from ..model.load import PROCESSOR_FILES, _resolve, _weight_files
    from .steps import file_sha256
    try:
        folder, commit, origin = _resolve(source, cfg.model.revision, cfg.model.allow_pickle, cfg.model.trust_remote_code)
        fmt, weights = _weight_files(folder, cfg.model.allow_pickle)
    except ProjLensError as err:
        return {"folder": source, "error": str(err)}
    others = [folder / n for n in ("config.json", *PROCESSOR_FILES) if (folder / n).is_file()]
    return {"folder": str(folder), "origin": origin, "revision": commit, "weights_format": fmt,
            "files": {str(f.relative_to(folder)) if f.is_relative_to(folder) else str(f): file_sha256(f, memo)
                      for f in [*weights, *others]}}


def inputs(cfg, fresh: bool = False) -> dict:
    """What the numbers are computed from: every model's files (hashed) and every data file (with its images).

    ``fresh``: read every file again (``projlens verify``) instead of trusting the hash memo, which is
    keyed on path, size and modification time."""
    from .runner import pair_data_file
    from .steps import _load_memo, _save_memo, data_fingerprint, organism_key, pairs_of
    memo = {} if fresh else _load_memo()
    models, data = {}, {}
    for p in pairs_of(cfg):
        for role in ("base", "poisoned", "control"):
            src = getattr(p, role)
            if src and src not in models:
                models[src] = _model_files(src, cfg, memo)
        try:
            file = pair_data_file(cfg, p)
        except (OSError, ValueError, KeyError) as err:
            data[f"data of {p.name}"] = f"unreadable: {type(err).__name__}: {err}"
            continue
        if file not in data:
            try:
                data[file] = data_fingerprint(cfg, file, memo)
            except (OSError, ValueError) as err:
                data[file] = f"unreadable: {type(err).__name__}: {err}"
    if not fresh:
        _save_memo(memo)
    out = {"models": models, "data": data}
    if cfg.is_organism:
        try:
            key = json.loads((Path(cfg.model.organism) / "organism.json").read_text()).get("key")
        except (OSError, ValueError):
            key = None
        out["organism"] = {"folder": cfg.model.organism, "key": key, "expected_key": organism_key(cfg)}
    return out


def write(out: Path, cfg, steps, outcome, store) -> dict:
    per_step = {}
    for s in steps:
        status = outcome.status.get(s.id)
        entry = {"status": status, "key": s.key}
        if status == "computed" or s.kind == "organism":
            entry["seconds"] = round(outcome.seconds.get(s.id, 0.0), 3)
        elif status == "cached":
            stored = store.get(s.key) or {}
            entry["seconds_when_computed"] = round(stored.get("seconds", 0.0), 3)
        if s.id in outcome.errors:
            entry["error"] = outcome.errors[s.id]
        per_step[s.id] = entry
    prov = {
        "config_path": cfg.path,
        "config_hash": cfg.hash(),
        "config": cfg.canonical(),
        "config_text": Path(cfg.path).read_text(encoding="utf-8"),
        "seeds": {"run": cfg.run.seed, "data": cfg.data.seed},
        "versions": versions(),
        "git": git_commit(),
        "hardware": hardware(),
        "environment": environment(cfg),
        "inputs": inputs(cfg),
        "steps": per_step,
        "wall_seconds": round(outcome.wall_seconds, 3),
    }
    atomic_write_text(Path(out) / "provenance.json", json.dumps(prov, indent=2, default=str))
    return prov

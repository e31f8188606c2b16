"""provenance.json: everything needed to regenerate a study, and what it cost.

The config (resolved) and its hash, seeds, package versions, the git commit of the code, the
hardware, and the wall time of every step (from this run, or from the run that computed a cached
step). Timings live here and only here, so metrics.json and the report stay byte-identical across runs.
"""

from __future__ import annotations

import json
import os
import platform
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
        "steps": per_step,
        "wall_seconds": round(outcome.wall_seconds, 3),
    }
    atomic_write_text(Path(out) / "provenance.json", json.dumps(prov, indent=2, default=str))
    return prov

"""Wall time and peak memory of the full organism build (issue 2 targets: <= 5 min, <= 2 GB).

    .venv/bin/python benchmarks/bench_organism.py [--out DIR] [--threads 2]

Runs `projlens organism build` with the default settings into a fresh folder, in a child process
(so its peak RSS is the build's own), then runs it again on the same folder to time the cache hit.
Prints wall seconds per stage (from organism.json), total wall, peak RSS, and the metrics table.
Run it on an otherwise idle machine: other jobs on the 2 CPUs inflate every time several-fold.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_build(out: Path, threads: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "projlens_mi.cli", "organism", "build", "--out", str(out), "--threads", str(threads), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"build failed:\n{proc.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(proc.stdout)
    return wall, peak_mb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="organism-bench-"))
    shutil.rmtree(out, ignore_errors=True)
    cold, peak = run_build(out, args.threads)
    warm, _ = run_build(out, args.threads)
    summary = json.loads((out / "organism.json").read_text())
    print(f"stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["wall_seconds"].items()))
    print(f"cold build: {cold:.1f} s wall (target <= 300 s), peak RSS {peak:.0f} MB (target <= 2048 MB)")
    print(f"cached rebuild: {warm:.1f} s wall")
    print(f"vision-token norm CV: {summary['vision_features']['vision_token_norm_cv']:.3f}")


if __name__ == "__main__":
    main()

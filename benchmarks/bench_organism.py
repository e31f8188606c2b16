"""Wall time and peak memory of the full organism build (issue 2 targets: <= 5 min, <= 2 GB).

    .venv/bin/python benchmarks/bench_organism.py [--out DIR] [--threads 1]

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
    """Wall seconds and peak memory (MB) of one build: the largest total RSS of the build's process tree
    (the stage-2 workers included), sampled every 0.2 s with psutil, else the largest single child."""
    cmd = [sys.executable, "-m", "projlens_mi.cli", "organism", "build", "--out", str(out), "--threads", str(threads), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_tree = 0.0
    try:
        import psutil
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak_tree = max(peak_tree, sum(p.memory_info().rss for p in procs) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)
    except ImportError:
        pass
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"build failed:\n{stderr}")
    peak_mb = max(peak_tree, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(stdout)
    return wall, peak_mb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="organism-bench-"))
    shutil.rmtree(out, ignore_errors=True)
    cold, peak = run_build(out, args.threads)
    warm, _ = run_build(out, args.threads)
    summary = json.loads((out / "organism.json").read_text())
    print(f"stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["wall_seconds"].items()))
    print(f"cold build: {cold:.1f} s wall (target <= 300 s), peak RSS of the process tree {peak:.0f} MB (target <= 2048 MB)")
    print(f"cached rebuild: {warm:.1f} s wall")
    print(f"vision-token norm CV: {summary['vision_features']['vision_token_norm_cv']:.3f}")


if __name__ == "__main__":
    main()

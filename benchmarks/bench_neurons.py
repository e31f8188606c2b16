"""Peak memory of the streaming neuron statistics: 5,000 inputs vs 500 (must be within 10 %).

    .venv/bin/python benchmarks/bench_neurons.py --organism DIR [--variant targeted-refusal]
        [--small 500] [--large 5000] [--batch-size 100]

Each size runs in its own subprocess (a fresh interpreter, so peaks do not mix): it loads the pair,
then accumulates ``projlens_mi.analyses.neurons.stream_stats`` over N organism inputs (records cycled
when the organism has fewer; images are read and encoded batch by batch). Reported per size: the
process's peak resident set (``ru_maxrss``), the growth of the peak over the resident set after loading,
and Python's own peak (``tracemalloc``) during the accumulation. Single-threaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc


def child(organism: str, variant: str, n: int, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from projlens_mi.analyses.base import Pair
    from projlens_mi.analyses.neurons import stream_stats

    pair = Pair.from_organism(organism, variant)
    recs = pair.data
    records = [recs[i % len(recs)] for i in range(n)]
    stream_stats(pair.poisoned, records[:batch_size], batch_size)      # warm-up: allocator, nnsight wrapper
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    st = stream_stats(pair.poisoned, records, batch_size)
    dt = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "tokens": st.n, "seconds": dt, "peak_rss_mib": rss / 1024, "rss_after_load_mib": rss0 / 1024,
            "rss_growth_mib": (rss - rss0) / 1024, "python_peak_mib": py_peak / 2 ** 20,
            "mean_checksum": float(st.mean.sum())}


def main(organism: str, variant: str, small: int, large: int, batch_size: int) -> dict:
    out = {}
    for n in (small, large):
        res = subprocess.run([sys.executable, __file__, "--child", "--organism", organism, "--variant", variant,
                              "--n", str(n), "--batch-size", str(batch_size)], capture_output=True, text=True,
                             check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    a, b = out[small], out[large]
    ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
    for r in (a, b):
        print(f"{r['n']:>6} inputs ({r['tokens']} tokens): peak RSS {r['peak_rss_mib']:.1f} MiB "
              f"(+{r['rss_growth_mib']:.1f} MiB over the loaded process), Python peak {r['python_peak_mib']:.2f} MiB, "
              f"{r['seconds']:.1f} s")
    print(f"peak RSS {large} / {small} inputs: {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.10 else 'OUTSIDE'} 10 %)")
    return {"small": a, "large": b, "ratio": ratio}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--organism", required=True)
    ap.add_argument("--variant", default="targeted-refusal")
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--n", type=int)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.organism, a.variant, a.n, a.batch_size)))
    else:
        main(a.organism, a.variant, a.small, a.large, a.batch_size)

"""Memory of the streaming neuron statistics per input: the slope that tells streaming from storing.

    .venv/bin/python benchmarks/bench_neurons.py --organism DIR [--variant targeted-refusal]
        [--small 500] [--large 5000] [--batch-size 100]

Each (size, mode) runs in its own subprocess (a fresh interpreter, so peaks do not mix): it loads the
pair, then accumulates ``projlens_mi.analyses.neurons.stream_stats`` over N organism inputs (records
cycled when the organism has fewer; images are read and encoded batch by batch). Modes: ``stream``
(the per-unit sums only) and ``per_input`` (also each input's two per-unit sums, what the analysis
keeps for the FT model's bootstrap CIs). Reported per run: the process's peak resident set
(``ru_maxrss``), its growth over the loaded process, and Python's own peak (``tracemalloc``, which
sees NumPy's and torch's CPU allocations) during the accumulation. The figure is the **slope**:
(peak at ``large`` − peak at ``small``) / (``large`` − ``small``) bytes per input, next to what
storing the activations would cost per input (image tokens × units × 4 bytes). A constant-memory
accumulator has slope ≈ 0; one that stores activations has that slope. Single-threaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc


def child(organism: str, variant: str, n: int, batch_size: int, per_input: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from projlens_mi.analyses.base import Pair
    from projlens_mi.analyses.neurons import stream_stats

    pair = Pair.from_organism(organism, variant)
    recs = pair.data
    records = [recs[i % len(recs)] for i in range(n)]
    stream_stats(pair.poisoned, records[:batch_size], batch_size, per_input)   # warm-up: allocator, nnsight wrapper
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    st = stream_stats(pair.poisoned, records, batch_size, per_input)
    dt = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "tokens": st.n, "seconds": dt, "peak_rss_mib": rss / 1024, "rss_after_load_mib": rss0 / 1024,
            "rss_growth_mib": (rss - rss0) / 1024, "python_peak_mib": py_peak / 2 ** 20,
            "units": int(len(st.mean)), "mean_checksum": float(st.mean.sum())}


def main(organism: str, variant: str, small: int, large: int, batch_size: int) -> dict:
    out = {}
    for mode in ("stream", "per_input"):
        runs = {}
        for n in (small, large):
            res = subprocess.run([sys.executable, __file__, "--child", "--organism", organism, "--variant", variant,
                                  "--n", str(n), "--batch-size", str(batch_size)]
                                 + (["--per-input"] if mode == "per_input" else []),
                                 capture_output=True, text=True, check=True)
            runs[n] = json.loads(res.stdout.strip().splitlines()[-1])
        a, b = runs[small], runs[large]
        kib = lambda mib: mib * 1024 / (large - small)  # noqa: E731  (MiB over the extra inputs -> KiB per input)
        slope = {"python_peak_kib_per_input": kib(b["python_peak_mib"] - a["python_peak_mib"]),
                 "peak_rss_kib_per_input": kib(b["peak_rss_mib"] - a["peak_rss_mib"])}
        storing = b["tokens"] / b["n"] * b["units"] * 4 / 1024
        for r in (a, b):
            print(f"{mode:>9}: {r['n']:>6} inputs ({r['tokens']} tokens): peak RSS {r['peak_rss_mib']:.1f} MiB "
                  f"(+{r['rss_growth_mib']:.1f} MiB over the loaded process), Python peak "
                  f"{r['python_peak_mib']:.2f} MiB, {r['seconds']:.1f} s")
        print(f"{mode:>9}: slope {slope['python_peak_kib_per_input']:.3f} KiB per input (Python peak; peak RSS: "
              f"{slope['peak_rss_kib_per_input']:.3f}); storing the activations would be {storing:.1f} KiB per input "
              f"({b['tokens'] // b['n']} tokens x {b['units']} units x 4 B); the per-input sums are "
              f"{16 * b['units'] / 1024:.2f} KiB of data")
        out[mode] = {"small": a, "large": b, "slope": slope, "storing_kib_per_input": storing}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--organism", required=True)
    ap.add_argument("--variant", default="targeted-refusal")
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--per-input", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.organism, a.variant, a.n, a.batch_size, a.per_input)))
    else:
        main(a.organism, a.variant, a.small, a.large, a.batch_size)

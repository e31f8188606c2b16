"""The rank-k injection heatmap (ranks of ΔW1 × ranks of ΔW2) on the organism: fast vs the slow reference.

    .venv/bin/python benchmarks/bench_injection.py --organism DIR [--variant targeted-refusal] [--n 200]
        [--ranks 1,2,3,4,5] [--prefix auto|none]

Ours: ``projlens_mi.analyses.injection.evaluate_cells`` (WithWeights edits, cells tiled [cell × input]
into batched greedy generations and forwards, records bucketed by prompt length). Baseline:
``benchmarks/injection_reference.py`` (reload the weights per cell, one sample at a time: processor,
``generate``, a teacher-forced forward of prompt + prefix + target for the target's log-probability),
as the paper's scripts do. The prefixes (what the FT model says before the target: ``--prefix auto``,
read once from its greedy generations and not timed) are given to both. Both run every cell once (the
reference is measured, not extrapolated). Per record, the target and answer hits must agree and the
target log-prob / first-token probability must agree up to float32 rounding (16 steps of the largest
|logit| times the target's length, ``common.assert_tables_close``: one sample at a time and a packed
batch are different shapes, docs/reproducibility.md); whether they are also bit-identical is printed.
Single-threaded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from common import assert_tables_close
from injection_reference import reference_cells
from projlens_mi.analyses import common
from projlens_mi.analyses import injection as inj
from projlens_mi.analyses.base import Pair
from projlens_mi.engine import run


def main(organism: str, variant: str = "targeted-refusal", n: int = 200, ranks=(1, 2, 3, 4, 5),
         batch_size: int = 1024, prefix: str = "auto") -> dict:
    torch.set_num_threads(1)
    pair = Pair.from_organism(organism, variant)
    clean, trig = pair.clean, pair.triggered
    if len(clean) < n or len(trig) < n:      # a small organism: cycle its records to reach n of each
        clean = [clean[i % len(clean)] for i in range(n)]
        trig = [trig[i % len(trig)] for i in range(n)]
    records = clean[:n] + trig[:n]
    targets = [pair.target_of(r) for r in records]
    is_trig = np.array([r.triggered for r in records])
    ref, ft = common.weights(pair.base), common.weights(pair.poisoned)
    svds = {p: common.svd(ft[p][0] - ref[p][0]) for p in ref}
    l1, l2 = list(ref)
    cells = [inj.injected_weights(ref, ft, svds, {l1: a, l2: b}, "ft") for a in ranks for b in ranks]
    max_new = common.auto_tokens(pair.poisoned, records, targets)
    prefixes = inj.scoring_prefixes(pair, records, targets, is_trig, prefix, max_new)

    t0 = time.perf_counter()
    fast = inj.evaluate_cells(pair.base, records, targets, cells, max_new_tokens=max_new, batch_size=batch_size,
                              triggered=is_trig, prefixes=prefixes)
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    slow = reference_cells(pair.base, records, targets, cells, max_new_tokens=max_new, triggered=is_trig,
                           prefixes=prefixes)
    t_slow = time.perf_counter() - t0

    slow = slow.astype(fast.dtypes.to_dict())
    same = fast.equals(slow)
    diff = {c: int((fast[c] != slow[c]).sum()) for c in fast.columns}
    flips = {c: diff[c] for c in ("target_hit", "answer_hit")}
    assert not any(flips.values()), f"generations differ between the fast path and the reference: {flips}"
    # rounding of a log-prob summed over the target's tokens scales with the logits' magnitude x its length
    logits = run(pair.base, pair.base.encode(records[:64])).logits
    length = max(len(pair.base.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in set(targets))
    scale = float(logits.abs().max()) * length
    close = {c: assert_tables_close(torch.tensor(fast[c].to_numpy()), torch.tensor(slow[c].to_numpy()), scale,
                                    what=c) for c in ("target_logprob", "target_prob")}
    heat = inj.summarise_cells(fast)
    heat["rank_1"] = [a for a in ranks for _ in ranks]
    heat["rank_2"] = [b for _ in ranks for b in ranks]
    table = heat.pivot(index="rank_1", columns="rank_2", values="asr")
    out = {"cells": len(cells), "inputs": len(records), "max_new_tokens": max_new, "fast_s": t_fast,
           "reference_s": t_slow, "speedup": t_slow / t_fast, "identical": same,
           "mismatches": {c: v for c, v in diff.items() if v},
           "max_abs_diff": {c: v["max_abs_diff"] for c, v in close.items()}, "tolerance": close["target_logprob"]["tolerance"]}
    print(f"organism {organism} ({variant}), {len(cells)} cells x {len(records)} inputs "
          f"({n} clean + {n} triggered), max_new_tokens {max_new}")
    print("ASR heatmap (rows: rank of ΔW1, columns: rank of ΔW2):")
    print((table * 100).round(1).to_string())
    print(f"fast {t_fast:.1f} s, reference {t_slow:.1f} s (all {len(cells)} cells, each once): {t_slow / t_fast:.1f}x; "
          f"hits equal, log-probs within {close['target_logprob']['tolerance']:.2g} (max diff "
          f"{close['target_logprob']['max_abs_diff']:.2g}); per-record numbers bit-identical: {same}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--organism", required=True)
    ap.add_argument("--variant", default="targeted-refusal")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ranks", default="1,2,3,4,5")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--prefix", choices=("auto", "none"), default="auto")
    a = ap.parse_args()
    pd.set_option("display.width", 120)
    main(a.organism, a.variant, a.n, tuple(int(x) for x in a.ranks.split(",")), a.batch_size, a.prefix)

"""Overhead of reading 3 sites in one traced forward vs a plain HF forward (batch 32, organism size).

    .venv/bin/python benchmarks/bench_overhead.py [--repeats 30]

Target: ratio <= 1.10. Single-threaded (shared CPUs), interleaved repeats, medians.
"""

from __future__ import annotations

import argparse

import torch

from common import PROMPT, images, median_ms, organism_like
from projlens_mi import Site, load, run


def main(repeats: int = 30, batch: int = 32) -> dict:
    torch.set_num_threads(1)
    model, processor = organism_like()
    handle = load(model, processor=processor)
    inputs = handle.encode(images(batch), [PROMPT] * batch)
    kwargs = inputs.model_kwargs()
    sites = [Site("projector.out"), Site("llm.1.resid_post"), Site("llm.3.resid_post")]

    def plain():
        with torch.no_grad():
            return model(**kwargs).logits

    def traced():
        return run(handle, inputs, read=sites)

    res = traced()
    assert torch.equal(res.logits, plain()) and len(res.cache) == 3
    ms = median_ms({"plain": plain, "traced": traced}, repeats)
    ratio = ms["traced"] / ms["plain"]
    print(f"batch {batch}, seq {inputs.input_ids.shape[1]}, 1 thread, {repeats} repeats: "
          f"plain {ms['plain']:.1f} ms, 3-site read {ms['traced']:.1f} ms, ratio {ratio:.3f} (target <= 1.10)")
    return {**ms, "ratio": ratio}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    main(p.parse_args().repeats)

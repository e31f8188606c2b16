"""The slow reference for the rank-k injection analysis: how the paper's scripts do it.

For every cell: reload the model's original weights, write the cell's projector weights into the
parameters, then run one sample at a time (processor call, greedy ``generate``, one forward for the
target token's logit). It never touches the engine or nnsight, and works on a private deep copy, so
the caller's model is not modified. ``projlens_mi.analyses.injection.evaluate_cells`` must give the
same per-record numbers (tests/test_analyses_injection.py, benchmarks/bench_injection.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from projlens_mi.engine import contains


@torch.no_grad()
def reference_cells(handle, records, targets, cells: list[dict], *, max_new_tokens: int,
                    triggered: np.ndarray) -> pd.DataFrame:
    """Same columns as ``injection.evaluate_cells``: one row per (cell, record)."""
    model = copy.deepcopy(handle.model).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    proc, tok = handle.processor, handle.tokenizer
    first = {t: tok(t, add_special_tokens=False)["input_ids"][0] for t in set(targets)}
    rows = []
    for c, weights in enumerate(cells):
        model.load_state_dict(original)                       # reload the weights for every cell
        for path, (w, b) in weights.items():
            lin = model.get_submodule(path)
            lin.weight.copy_(w.to(lin.weight.dtype))
            if b is not None:
                lin.bias.copy_(b.to(lin.bias.dtype))
        for i, r in enumerate(records):                        # one sample at a time
            enc = proc(images=[r.pil()], text=[r.prompt], return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            last = model(**enc).logits[0, -1]
            t = first[targets[i]]
            rows.append({"cell": c, "record": i, "triggered": bool(triggered[i]),
                         "target_hit": contains([text], targets[i])[0], "answer_hit": contains([text], r.answer)[0],
                         "target_logit": float(last[t]) if triggered[i] else 0.0,
                         "target_prob": float(last.float().softmax(-1)[t]) if triggered[i] else 0.0})
    return pd.DataFrame(rows)

"""The slow reference for the rank-k injection analysis: how the paper's scripts do it.

For every cell: reload the model's original weights, write the cell's projector weights into the
parameters, then run one sample at a time (processor call, greedy ``generate``; on a triggered
record one forward of the prompt followed by the tokens of ``prefix + target``, whose log-softmax at
the target's own positions gives log p(target | prompt, prefix) and p(first target token | ...)). It never touches the engine or nnsight, and works on a private deep copy, so
the caller's model is not modified. ``projlens_mi.analyses.injection.evaluate_cells`` must give the
same per-record numbers (tests/test_analyses_weights.py::test_fast_cells_equal_the_slow_reference_exactly,
benchmarks/bench_injection.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from projlens_mi.engine import contains


@torch.no_grad()
def reference_cells(handle, records, targets, cells: list[dict], *, max_new_tokens: int,
                    triggered: np.ndarray, prefixes: list[str] | None = None) -> pd.DataFrame:
    """Same columns as ``injection.evaluate_cells``: one row per (cell, record). ``prefixes``: per
    record, the text said before the target (None: none, the target right after the prompt)."""
    model = copy.deepcopy(handle.model).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    proc, tok = handle.processor, handle.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
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
            logprob = first_prob = 0.0
            if triggered[i]:
                p = (prefixes[i] if prefixes else "").strip()
                head = ids(p) if p else []
                forced = ids(f"{p} {targets[i].strip()}" if p else targets[i])
                assert forced[:len(head)] == head, "the prefix must tokenize the same inside prefix + target"
                n = enc["input_ids"].shape[1]
                full = torch.cat([enc["input_ids"], torch.tensor([forced])], 1)
                logits = model(input_ids=full, attention_mask=torch.ones_like(full),
                               pixel_values=enc["pixel_values"]).logits[0]
                lp = logits[n - 1 + len(head):n - 1 + len(forced)].float().log_softmax(-1)
                said = lp.gather(1, torch.tensor(forced[len(head):])[:, None])[:, 0]   # the target's tokens only
                logprob, first_prob = float(said.sum()), float(said[0].exp())
            rows.append({"cell": c, "record": i, "triggered": bool(triggered[i]),
                         "target_hit": contains([text], targets[i])[0], "answer_hit": contains([text], r.answer)[0],
                         "target_logprob": logprob, "target_prob": first_prob})
    return pd.DataFrame(rows)

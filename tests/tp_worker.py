"""One rank of the 2-process tensor-parallel check (run by tests/test_placement.py under torchrun).

    torchrun --nproc_per_node 2 tests/tp_worker.py <model folder> <report folder>

Each rank loads the model twice: whole (in memory, the reference) and sharded with transformers'
``distributed_config=DistributedConfig(tp_size=2)`` (gloo on CPU), runs the same reads, patch,
subspace ablation and gradient through projlens_mi's engine, and writes ``rank<r>.json`` with the
largest absolute difference per quantity.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main(folder: str, report_dir: str) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    from projlens_mi.engine import ImageTokens, Patch, ProjectOut, Site, run
    from projlens_mi.model import load
    from projlens_mi.model.handle import ModelHandle
    from projlens_mi.model.load import load_checkpoint
    from projlens_mi.model.placement import is_tensor_parallel, tp_shim, wrap
    from tiny import PROMPT, tiny_images

    tp_shim()
    ref_model, processor, _ = load_checkpoint(folder)
    tp = load(folder, tp_size=2)   # the public entry point passes tp_size to load_checkpoint
    tp_model, prov = tp.model, tp.provenance
    assert prov["tensor_parallel"]["tp_size"] == 2
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    ref = ModelHandle(ref_model, processor)
    inputs = ref.encode((tiny_images(3, seed=2), [PROMPT] * 3))
    basis = torch.linalg.qr(torch.randn(48, 4, generator=torch.Generator().manual_seed(0)))[0]
    reads = ["projector.out", "llm.0.resid_post", "llm.1.attn_out", "llm.1.mlp_out", "llm.1.resid_post",
             "llm.2.resid_post", "logits"]

    def suite(h):
        out = {}
        r = run(h, inputs, read=reads)
        out.update({f"read:{k.point}": v for k, v in r.cache.items()})
        out["logits"] = r.logits
        out["patch"] = run(h, inputs, edits=[(Site("llm.1.resid_post"), Patch(source_row=0), [1, 2])]).logits
        out["project_out"] = run(h, inputs, edits=[(Site("llm.1.resid_post", ImageTokens()), ProjectOut(basis))]).logits
        g = run(h, inputs, read=["projector.out", "llm.0.resid_post"], grad_of=lambda lg: lg[:, -1, 5].sum())
        out.update({f"grad:{k.point}": v for k, v in g.grads.items()})
        return {k: _full(v) for k, v in out.items()}

    want, got = suite(ref), suite(tp)

    # A sharded projection (q_proj is column-parallel: this rank holds 24 of its 48 output rows)
    # read through nnsight's TPFragments comes back whole.
    q = tp_model.model.language_model.layers[1].self_attn.q_proj
    env = wrap(tp_model)
    kw = {k: v for k, v in inputs.model_kwargs().items()}
    with torch.no_grad(), env.trace(**kw):
        q_out = env.model.language_model.layers[1].self_attn.q_proj.output.save()
    local_rows = q.weight.to_local().shape[0] if hasattr(q.weight, "to_local") else q.weight.shape[0]

    report = {
        "rank": rank, "world_size": world, "sharded": is_tensor_parallel(tp_model),
        "provenance_tp": prov["tensor_parallel"],
        "q_proj_local_rows": int(local_rows), "q_proj_read_width": int(_full(q_out).shape[-1]),
        "max_abs_err": {k: float((got[k].double() - want[k].double()).abs().max()) for k in want},
        "changed": {k: bool((got[k] - got["logits"]).abs().max() > 1e-4) for k in ("patch", "project_out")},
    }
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _full(t):
    """A plain local tensor (a DTensor is gathered)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2])

"""Repair: remove reading directions of the first projector linear's update, chosen from clean images only.

For k = 1, 2, ...: the first linear's update stops reading k input directions,
``W1' = W1 - dW1 Q Qᵀ`` (Q: the first k reading directions, the named one first), and the last
linear's update stops writing its top k output directions, ``W2' = W2 - P dW2``, ``b2' = b2 - P db2``
(P: the top k left-singular vectors of dW2); everything else of the update is kept. Both sides are
needed: on the organism, the reading side alone left 66-92 % ASR, the writing side alone 0-67 %,
both 0-2 % at k = 1 (docs/audit.md).
Each k is judged on clean images only: the reconstructed trigger (trigger.py, when one was made) on
its optimisation images and the named target's steers must no longer make the repaired weights say
the named target, and the whole probe re-run on the repaired weights (the same clean grid, the same
steers, the base's steered outputs reused) must fall below the verdict threshold. The chosen k is the
smallest that passes; among the k that pass, that is also the least change to the suspect's weights
(each k adds a component). A random k-dimensional subspace is the control. The trigger check was
added after the zoo's development half showed the probe alone stopping too early (perceptual-hijack
at 1 % poison: k = 1 left 16 % ASR on real triggers while the reconstructed trigger still fired on
31 % of the clean images; k = 4, where it fires on none, left 0 %).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data import check_writable_folder
from ..engine import WithWeights
from ..errors import ProjLensError
from . import probe


STOPPED = 0.0   # a named target counts as stopped when no steer makes the repaired model say it on any row


def target_rows(steered: dict, texts: list[str]) -> int:
    """The most rows, over steers, on which a steered output contains one of ``texts``."""
    from ..engine.metrics import hit
    return max((sum(any(hit(o, t) for t in texts) for o in outs) for outs in steered.values()), default=0)


def order(pr, cands, threshold: float) -> list[int]:
    """Reading directions in repair order: those of passing candidates (best first), then by singular value."""
    first = [c.steering.direction for c in cands if c.score >= threshold]
    out = list(dict.fromkeys(first))
    return out + [i for i in range(pr.basis.shape[1]) if i not in out]


def repaired_weight(w_suspect: torch.Tensor, w_base: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``W_s - (W_s - W_b) Q Qᵀ`` in float64 (Q [d_in, k], orthonormal columns)."""
    ws, wb = w_suspect.double(), w_base.double()
    return ws - (ws - wb) @ q @ q.T


def repaired(ws: dict, wb: dict, paths: list[str], q: torch.Tensor, p: torch.Tensor) -> dict:
    """``{path: (W, b)}`` of the repaired linears (float64): reading side ``q`` on the first, writing side ``p``
    (orthonormal columns, output space) on the last (the first only when the projector has one linear)."""
    first, last = paths[0], paths[-1]
    out = {first: (repaired_weight(ws[first][0], wb[first][0], q), ws[first][1])}
    if last != first:
        (w, b), (w0, b0) = ws[last], wb[last]
        w2 = w - p @ (p.T @ (w - w0))
        b2 = None if b is None else b - p @ (p.T @ (b - b0))
        out[last] = (w2, b2)
    return out


def writing_directions(ws: dict, wb: dict, paths: list[str], k: int) -> torch.Tensor:
    last = paths[-1]
    u, _, _ = torch.linalg.svd(ws[last][0] - wb[last][0], full_matrices=False)
    return u[:, :k]


def with_weights(handle, new: dict) -> WithWeights:
    return WithWeights({p: (w.to(dtype=handle.dtype), None if b is None else b.to(dtype=handle.dtype))
                        for p, (w, b) in new.items()})


def reprobe(handle, pr, new: dict, params, steerings=None):
    """The probe's suspect side on the weights ``new`` ({path: (W, b)}): (steered texts, unsteered texts);
    ``steerings``: a subset of the probe's steers (default all)."""
    ww = with_weights(handle, new)
    gen = lambda edits: probe.generate_rows(handle, pr.batches, [ww, *edits], params.max_new_tokens)  # noqa: E731
    return {st: gen([st.edit(pr.basis, pr.norm, handle)]) for st in (steerings or pr.steerings)}, gen([])


def choose(handle, pr, cands, params, weights: dict, check=None, progress=None) -> dict:
    """Try k = 1 .. ``params.max_k``; ``weights``: ``{"base": .., "suspect": ..}``, each projector's
    ``{path: (W, b)}`` (analyses.common.weights, read once by ``core.check_pair``).

    Each k is first tried under the steers that named the targets only: while one of them still makes
    the repaired weights say a named target, k is too small and the full re-probe is skipped (its
    curve entry has ``score`` None). ``check(edits) -> share``: the reconstructed trigger's share of clean
    optimisation images on which the repaired weights still say the target (trigger.TriggerResult.fires);
    it must be 0 too. ``progress(k, k_max)`` is called after each k."""
    from ..analyses.common import linear_paths
    from .core import score_probe
    paths = linear_paths(handle)
    ws, wb = weights["suspect"], weights["base"]
    idx = order(pr, cands, params.threshold)
    kmax = min(params.max_k, len(idx))
    pw = writing_directions(ws, wb, paths, kmax)
    named_texts = [cands[0].text]          # the named target (other phrases of strong steers are not the target)
    naming = [c.steering for c in cands if c.text == cands[0].text]
    curve, chosen = [], None
    for k in range(1, kmax + 1):
        w_new = repaired(ws, wb, paths, pr.basis[:, idx[:k]], pw[:, :k])
        steered, plain = reprobe(handle, pr, w_new, params, naming)
        fires = check([with_weights(handle, w_new)]) if check else None
        if target_rows(steered, named_texts) > STOPPED * len(plain) or (fires or 0.0) > STOPPED:
            changed = sum(a != b for a, b in zip(plain, pr.unsteered["suspect"])) / len(plain)
            curve.append({"k": k, "score": None, "named_share": target_rows(steered, named_texts) / len(plain),
                          "trigger_share": fires, "changed_outputs": changed, "top_after": None})
            if progress:
                progress(k, kmax)
            continue
        steered, plain = reprobe(handle, pr, w_new, params)
        after = score_probe(pr, steered, params)
        s = max((c.score for c in after), default=0.0)
        named = target_rows(steered, named_texts) / len(plain)
        changed = sum(a != b for a, b in zip(plain, pr.unsteered["suspect"])) / len(plain)
        curve.append({"k": k, "score": s, "named_share": named, "trigger_share": fires, "changed_outputs": changed,
                      "top_after": after[0].text if after else None})
        if progress:
            progress(k, kmax)
        if s < params.threshold and named <= STOPPED:
            chosen = (k, w_new, s, changed)
            break
    out = {"paths": paths, "order": idx, "curve": curve}
    if chosen is None:
        out.update(k=None, score_after=curve[-1]["score"], changed_outputs=curve[-1]["changed_outputs"])
        return out
    k, w_new, s, changed = chosen
    gen = torch.Generator().manual_seed(0)
    rq = torch.linalg.qr(torch.randn(pr.basis.shape[0], k, generator=gen, dtype=torch.float64)).Q
    rp = torch.linalg.qr(torch.randn(pw.shape[0], k, generator=gen, dtype=torch.float64)).Q
    steered, _ = reprobe(handle, pr, repaired(ws, wb, paths, rq, rp), params)
    after = score_probe(pr, steered, params)
    out.update(random_control_named_share=target_rows(steered, named_texts) / len(pr.rows))
    out.update(k=k, directions=[int(i) for i in idx[:k]], score_after=s, changed_outputs=changed,
               random_control_score=after[0].score if after else 0.0,
               reading_removed=pr.basis[:, idx[:k]].T.tolist(), writing_removed=pw[:, :k].T.tolist(), weights=w_new)
    return out


def write_repaired(handle, repair: dict, out: str | Path) -> dict:
    """The suspect with the repaired weights as a normal HF folder at ``out`` (written to a side
    folder, then renamed into place); returns ``{file: sha256}``. The handle's model is not modified."""
    from ..model.load import _sha256
    from ..model.placement import state_dict_of
    if not repair.get("weights"):
        raise ProjLensError("nothing to write: the repair found no k that stops the named target")
    out = check_writable_folder(out, "repaired folder")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = handle.model
    state = {}
    new = {}
    for p, (w, b) in repair["weights"].items():
        new[f"{p}.weight"] = w
        if b is not None:
            new[f"{p}.bias"] = b
    for name, t in state_dict_of(model).items():   # real tensors, also when the suspect is offloaded
        state[name] = new[name].to(dtype=t.dtype) if name in new else t
    if len([n for n in new if n in state]) != len(new):
        raise ProjLensError(f"cannot find {', '.join(n for n in new if n not in state)} in the suspect's state dict")
    model.save_pretrained(tmp, state_dict=state)
    if handle.processor is not None:
        handle.processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}


def removed_json(repair: dict) -> str:
    return json.dumps({k: repair[k] for k in ("paths", "k", "directions", "reading_removed", "writing_removed")
                       if k in repair})

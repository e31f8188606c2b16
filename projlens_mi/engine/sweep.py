"""Sweeps: a grid of cells (each a list of edits) packed into batched forward passes.

Conventions:

* Rows are tiled ``[cell × input]`` (ROME's one-batch layout): every cell runs on every input, and
  a pass holds as many (cell, inputs) blocks as fit in ``batch_size`` rows.
* Inside a cell, an edit's ``rows`` and ``source_row`` are *input* indices, and a 3-D tensor
  source must have one entry per input (``[n_inputs, ...]``; or be ``[d]`` / ``[k, d]``): it is
  sliced to the rows of the pass, so a cell means the same thing whichever pass it lands in.
* Exactness: every row of a transformer forward is computed independently of the other rows, so a
  packed pass gives the same numbers as the cell run alone (tested bit for bit). Three reuses keep
  that exactness and save most of the work:
  - when every edit of a cell sits at an LLM layer (or ``logits``), the merged ``inputs_embeds``
    (vision tower + projector + scatter) are computed once and fed instead of the pixels
    (LLaVA family, whose LLM positions do not depend on the image layout);
  - layers before the first edited one are skipped (nnsight ``skip``) and return the clean hidden
    states, computed once per input;
  - positions before the first edited token are not recomputed: a causal LM's states there do not
    depend on later tokens, so the pass feeds only the later positions and takes the earlier ones'
    keys and values from the unedited run's cache (its logits there too). This relies on the
    kernels giving a row the same bits whatever the number of rows, which holds for PyTorch's CPU
    kernels under one rule (``_exact_start``, tested): so it is done on the CPU with sdpa or
    eager attention only; elsewhere the pass starts at position 0. ``reuse="layers"`` keeps the
    other two reuses only, ``reuse=False`` computes every cell in full.
* Cross-row edits (mean / resample ablation, noise, ``source_row``) need all inputs of a cell in
  one pass; ``batch_size`` below the number of inputs is refused for them.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Callable

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ProjLensError
from ..model.handle import Inputs, ModelHandle
from .run import Edit, Plan, _rows, as_edit, execute, llm_context, run
from .sites import Site, layer_of

EMBEDS_FAMILIES = ("llava",)   # families whose forward accepts merged inputs_embeds with identical results
MIN_SUFFIX = 8                 # positions a prefix-reusing pass computes at least


def sweep(handle: ModelHandle, inputs: Inputs, cells, metric: Callable[[Tensor, Tensor], Tensor], *,
          batch_size: int = 256, progress: bool = True, reuse: bool | str = True,
          names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Run every cell on every input; one tidy row per (cell, input).

    ``cells``: a mapping ``{key: [edits]}`` or a list of ``(key, [edits])``; a dict key becomes
    columns, any other key one ``cell`` column, or with ``names=("layer", "position")`` a tuple key
    ``(layer, position)`` becomes those columns, so that
    ``frame.pivot_table(index="layer", columns="position", values="value")`` is the layer × position
    table (mean over inputs). ``metric(logits [rows, seq, vocab], input_index
    [rows]) -> [rows]`` is evaluated on each pass (``input_index`` says which input each row is).
    ``reuse``: True (every exact reuse, see the module notes), ``"layers"`` (no prefix reuse: every
    pass runs all positions) or False (every cell a full forward, as ``run_cell``).
    Returns columns: the key columns, ``input``, ``value``.
    """
    items = list(cells.items()) if hasattr(cells, "items") else [tuple(c) for c in cells]
    if not items:
        raise ProjLensError("sweep needs at least one cell")
    if batch_size < 1:
        raise ProjLensError(f"batch_size must be >= 1, got {batch_size}")
    if reuse not in (True, False, "layers"):
        raise ProjLensError(f"reuse={reuse!r}: use True (all reuses), 'layers' (no prefix reuse) or False")
    n = len(inputs)
    for key, _ in items:
        _columns(key, names)   # a key that does not fit ``names``: refused before any work
    prepared = [(key, [as_edit(e) for e in edits]) for key, edits in items]
    units = _units(prepared, n, batch_size)
    prefix = reuse is True and _prefix_exact(handle, inputs)
    modes = [_mode(handle, inputs, edits, reuse, prefix) for _, edits in prepared]
    groups: dict = {}
    for u in units:
        groups.setdefault(modes[u[0]], []).append(u)
    passes = [(mode, chunk) for mode, us in groups.items() for chunk in _pack(us, batch_size)]
    clean = _clean_states(handle, inputs, {m for m, _ in passes}, batch_size)
    values: dict[tuple[int, int], float] = {}
    bar = tqdm(total=len(passes), desc="sweep", disable=not progress, leave=False)
    try:
        for mode, chunk in passes:
            _run_pass(handle, inputs, mode, chunk, metric, clean, values)
            bar.update(1)
    finally:
        bar.close()
    return _frame(prepared, n, values, names)


def run_cell(handle: ModelHandle, inputs: Inputs, edits, metric) -> Tensor:
    """One cell on all inputs in one plain forward (no reuse): the reference a sweep must equal."""
    logits = run(handle, inputs, edits=[as_edit(e) for e in edits]).logits
    return metric(logits, torch.arange(len(inputs)))


# --- packing ----------------------------------------------------------------------------------


def _units(prepared, n, batch_size):
    """(cell index, edits, input indices) blocks; a cell is split only if no edit needs its other rows."""
    units = []
    for c, (key, edits) in enumerate(prepared):
        for e in edits:
            src = getattr(e.intervention, "source", None)
            if isinstance(src, Tensor) and src.ndim == 3 and src.shape[0] != n:
                raise ProjLensError(f"cell {key!r}: a 3-D source needs one entry per input ({n}), got {src.shape[0]}; "
                                    "pass [n_inputs, tokens, d] (e.g. a cached run of the same inputs)")
        cross = any(e.intervention.cross_row or e.intervention.source_row is not None for e in edits)
        if cross and n > batch_size:
            raise ProjLensError(f"cell {key!r} has a cross-row edit (mean/resample/noise/source_row) over {n} inputs; "
                                f"use batch_size >= {n}")
        step = n if cross else min(n, batch_size)
        for start in range(0, n, step):
            units.append((c, edits, list(range(start, min(n, start + step)))))
    return units


def _pack(units, batch_size):
    chunk, rows = [], 0
    for u in units:
        if chunk and rows + len(u[2]) > batch_size:
            yield chunk
            chunk, rows = [], 0
        chunk.append(u)
        rows += len(u[2])
    if chunk:
        yield chunk


def _mode(handle: ModelHandle, inputs: Inputs, edits: list[Edit], reuse, prefix: bool) -> tuple[bool, int, int]:
    """(feed inputs_embeds?, first layer that must run, first position that must run) for a cell."""
    if not reuse:
        return (False, 0, 0)
    layers = [layer_of(e.site.point) if e.site is not None else None for e in edits]
    llm_only = all(e.site is not None and (layer_of(e.site.point) is not None or e.site.point == "logits")
                   for e in edits)
    if not llm_only:
        return (False, 0, 0)
    first = min((x for x in layers if x is not None), default=handle.n_layers)
    if handle.adapter.family not in EMBEDS_FAMILIES:
        return (False, first, 0)
    return (True, first, _first_position(inputs, edits) if prefix else 0)


def _prefix_exact(handle: ModelHandle, inputs: Inputs) -> bool:
    """Whether a pass may start after position 0 and keep the full forward's bits: on the CPU, with sdpa or
    eager attention and no sliding window (the kernels measured; see ``_exact_start``), LLaVA family."""
    text = handle.model.config.get_text_config()
    return (handle.adapter.family in EMBEDS_FAMILIES and handle.device.type == "cpu"
            and getattr(text, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and not getattr(text, "sliding_window", None) and inputs.input_ids.shape[1] > MIN_SUFFIX)


def _first_position(inputs: Inputs, edits: list[Edit]) -> int:
    """The first sequence position any edit of a cell touches (in any row), moved earlier to an exact
    start; 0 for an all-token edit."""
    seq = inputs.input_ids.shape[1]
    ctx = llm_context(inputs, seq)
    start = seq - MIN_SUFFIX
    for e in edits:
        idx = e.site.tokens.indices(ctx, len(inputs))
        if idx is None:
            return 0
        start = min(start, int(idx.min()))
    return _exact_start(start, seq)


def _exact_start(start: int, seq: int) -> int:
    """The latest position ``<= start`` from which a pass gives the full forward's bits on the CPU.

    PyTorch's CPU attention cuts the queries into blocks (32 rows; 64 from 192 queries, 256 from
    768) and a block of 1-3 rows takes another matrix-multiply path with other rounding. A row's
    bits are therefore the same in the pass and in the full forward unless one of the two puts it
    in such a short last block: then both last blocks must be equally long. (Measured exact over
    every start of sequences of 8-139 positions and beyond; rows of linear layers need >= 4 rows,
    which ``MIN_SUFFIX`` gives.)
    """
    def tail(q):
        return q % (256 if q >= 768 else 64 if q >= 192 else 32)
    full = tail(seq)
    for s in range(start, 0, -1):
        part = tail(seq - s)
        if not ((full in (1, 2, 3) or part in (1, 2, 3)) and part != full):
            return s
    return 0


def _clean_states(handle, inputs, modes, batch_size) -> dict:
    """Merged embeddings, the clean input of each needed layer and (for prefix reuse) the unedited
    run's per-layer keys and values and its logits, once per input, in one run per chunk."""
    need = sorted({first for _, first, _ in modes if first > 0})
    embeds = any(e for e, _, _ in modes)
    if not need and not embeds:
        return {}
    prefix = any(start for _, _, start in modes)
    sites = [Site(f"llm.{i}.resid_post") for i in range(max(need, default=0))]
    if embeds:
        sites.append(Site("llm.0.resid_pre"))
    parts: dict = {s.point: [] for s in sites}
    kv, logits = [], []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs.rows(list(range(start, min(len(inputs), start + batch_size))))
        kwargs = chunk.to(handle.device).model_kwargs()
        if prefix:   # the model fills this cache in place: the unedited run's keys and values
            kwargs[_cache_kwarg(handle)] = cache = _new_cache(handle)
        res = execute(handle, chunk, Plan.build(handle, chunk, sites, ()), model_kwargs=kwargs)
        for s in sites:
            parts[s.point].append(res.cache[s])
        if prefix:
            kv.append([(layer.keys, layer.values) for layer in cache.layers])
            logits.append(res.logits)
    out = {point: torch.cat(v) for point, v in parts.items()}
    if prefix:
        out["kv"] = [(torch.cat([c[i][0] for c in kv]), torch.cat([c[i][1] for c in kv])) for i in range(len(kv[0]))]
        out["logits"] = torch.cat(logits)
    return out


def _cache_kwarg(handle: ModelHandle) -> str:
    """The forward's keyword for a KV cache (transformers 5 renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(handle.model.forward).parameters else "past_key_values"


def _new_cache(handle: ModelHandle, kv=None):
    from transformers import DynamicCache
    return DynamicCache(ddp_cache_data=kv, config=handle.model.config.get_text_config())


def _cache_for(handle: ModelHandle, clean: dict, index: Tensor, start: int) -> dict:
    """The forward keyword carrying the unedited keys/values of positions ``< start`` for rows ``index``."""
    kv = [(k[index.to(k.device)][:, :, :start], v[index.to(v.device)][:, :, :start]) for k, v in clean["kv"]]
    return {_cache_kwarg(handle): _new_cache(handle, kv)}


# --- one pass ---------------------------------------------------------------------------------


def _run_pass(handle, inputs, mode, chunk, metric, clean, values):
    embeds, first, start = mode
    index = torch.tensor([i for _, _, idx in chunk for i in idx])
    batch = inputs.rows(index)
    edits, offset = [], 0
    for _, cell_edits, idx in chunk:
        edits += [s for s in (_shift(e, idx, offset, len(inputs)) for e in cell_edits) if s is not None]
        offset += len(idx)
    plan = Plan.build(handle, batch, (), edits)
    kwargs = None
    if embeds:
        kwargs = {"inputs_embeds": clean["llm.0.resid_pre"][index][:, start:].contiguous(),
                  "attention_mask": batch.attention_mask}
        if start:
            kwargs.update(_cache_for(handle, clean, index, start))
    skip = {i: clean[f"llm.{i}.resid_post"][index][:, start:].contiguous() for i in range(first)}
    logits = execute(handle, batch, plan, model_kwargs=kwargs, skip=skip, prefix=start).logits
    if start:   # the positions before the first edit: the unedited run's logits, bit for bit
        logits = torch.cat([clean["logits"][index.to(clean["logits"].device)][:, :start].to(logits.device), logits], 1)
    out = metric(logits, index).detach().float().cpu()
    if out.shape != (len(index),):
        raise ProjLensError(f"sweep metric must return one value per row ({len(index)}), got shape {tuple(out.shape)}")
    offset = 0
    for c, _, idx in chunk:
        for j, i in enumerate(idx):
            values[(c, i)] = out[offset + j].item()
        offset += len(idx)


def _shift(e: Edit, idx: list[int], offset: int, n: int) -> Edit | None:
    """A cell's edit (in input indices) as an edit on this pass's rows ``offset..offset+len(idx)-1``."""
    where = {i: offset + j for j, i in enumerate(idx)}
    wanted = [i for i in _rows(e.rows, n).tolist() if i in where]   # the edit's inputs in this block
    rows = [where[i] for i in wanted]
    iv = e.intervention
    if iv.source_row is not None:
        iv = replace(iv, source_row=where[iv.source_row % n])
    src = getattr(iv, "source", None)
    if isinstance(src, Tensor) and src.ndim == 3 and src.shape[0] == n:
        iv = replace(iv, source=src[torch.tensor(wanted, device=src.device)])
    return Edit(e.site, iv, rows) if rows else None   # None: this block holds none of the edit's rows


def _columns(key, names) -> dict:
    """A cell key as the frame's key columns."""
    if isinstance(key, dict):
        cols = dict(key)
    elif names is None:
        cols = {"cell": key}
    else:
        values = key if isinstance(key, tuple) else (key,)
        if isinstance(names, str) or len(values) != len(names):
            raise ProjLensError(f"sweep names={names!r}: cell key {key!r} needs {len(names)} parts, one per name "
                                "(e.g. names=('layer', 'position') with keys (layer, position))")
        cols = dict(zip(names, values))
    if {"input", "value"} & set(cols):
        raise ProjLensError(f"sweep key columns {sorted(cols)} clash with the frame's 'input' / 'value' columns; rename them")
    return cols


def _frame(prepared, n, values, names=None) -> pd.DataFrame:
    records = []
    for c, (key, _) in enumerate(prepared):
        cols = _columns(key, names)
        for i in range(n):
            records.append({**cols, "input": i, "value": values[(c, i)]})
    return pd.DataFrame.from_records(records)

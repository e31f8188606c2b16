"""Analysis 2: rank-k injection and removal of the projector update's singular components.

Injection: start from the base projector and add only the top-k singular components of ΔW1 and the
top-k of ΔW2 (ΔW = W_ft − W_ref, the reference being the base or, for ΔW' , the clean control), with
the fine-tuned or the reference bias → ASR on triggered inputs, clean accuracy and false-trigger rate
on clean inputs, and the target's log-probability and first-token probability where the model says
it (after the FT model's prefix, e.g. its answer on Malicious Injection: ``engine.target_text``); the
(rank ΔW1 × rank ΔW2) heatmap. Rank 0 means "that layer keeps its reference weights".

Removal: subtract chosen components (``"1"`` rank 1, ``"1-5"`` the top 5, ``"2-10"`` ranks 2..10,
``"3"`` direction 3 alone; 1-based, inclusive) of ΔW from the fine-tuned linear, each next to a
placebo: a random rank-k update with the same singular values (so the same Frobenius norm) in
random orthonormal directions.

How it is fast and still exact: every cell is an engine ``WithWeights`` edit (the caller's model is
never modified), cells are tiled ``[cell × input]`` into large batches (one greedy generation, and one
teacher-forced forward on the triggered rows, per batch), and records are bucketed by prompt length
(and the forward's rows by forced prefix + target length) so no row is padded: each row is then
computed exactly as when run alone (see ``benchmarks/injection_reference.py``, the slow reference
that reloads weights per cell and runs one sample at a time; the test compares them bit for bit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ..checks import Checked, Count
from ..engine import WithWeights, run, target_prefixes, target_text
from ..errors import ProjLensError
from . import common
from .base import Result, analysis, register_result

PAPER = ("Rank 1 of ΔW gives ≈0 % ASR; ranks ≥ 2–4 recover ≈85–93 %: the backdoor-critical part is "
         "low-rank. Removing the top components from W2_ft drops the ASR")


@dataclass
class InjectionParams(Checked):
    """``ranks_1`` / ``ranks_2``: ranks of ΔW1 / ΔW2 injected (0 = keep the reference weights);
    ``bias``: "ft" or "base" (the reference's bias) for the injected linears; ``removals``: component
    ranges removed from ``remove_layer`` of the FT projector ("1", "1-5", "2-10", "3"); ``placebo_seeds``:
    random placebos per removal; ``references``: "base" (ΔW) and/or "control" (ΔW' = W_ft − W_control,
    skipped without a control); ``n``: clean and triggered records each; ``n_boot``: bootstrap
    resamples of the 95 % CIs of every rate (``asr_lo`` / ``asr_hi``, ...); ``max_new_tokens``: greedy
    generation length for ASR (the paper: 30; None = the longest reference answer plus the target, +1, capped at 30); ``batch_size``: rows per
    pass (cells × inputs); ``prefix``: where the target metrics score the target: ``auto`` = after what
    the FT model says before it (``engine.target_prefixes``), ``none`` = right after the prompt."""

    ranks_1: tuple[int, ...] = (0, 1, 2, 4)
    ranks_2: tuple[int, ...] = (0, 1, 2, 4)
    bias: str = "ft"
    removals: tuple[str, ...] = ("1", "1-2", "1-5", "2-10")
    remove_layer: str | None = None          # None = the last projector linear
    placebo_seeds: int = 1
    references: tuple[str, ...] = ("base", "control")
    n: Count | None = 30
    max_new_tokens: Count | None = None        # None: longest answer + target (+1), at most 30
    batch_size: Count = 1024
    n_boot: Count = common.N_BOOT                # bootstrap resamples of the 95 % CIs (over inputs)
    prefix: str = "auto"


def parse_range(spec: str, rank: int) -> tuple[int, int]:
    """"i" or "i-j" (1-based, inclusive) -> 0-based [start, stop)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", str(spec))
    if not m:
        raise ProjLensError(f"removal {spec!r}: write one rank ('3') or a range ('2-10'), 1-based")
    i, j = int(m.group(1)), int(m.group(2) or m.group(1))
    if i < 1 or j < i:
        raise ProjLensError(f"removal {spec!r}: ranks start at 1 and the range must not be empty")
    if j > rank:
        raise ProjLensError(f"removal {spec!r}: the update has only {rank} components")
    return i - 1, j


def injected_weights(ref: dict, ft: dict, svds: dict, ranks: dict, bias: str) -> dict:
    """``{path: (W_ref + top-k(ΔW), b)}`` for every linear with k > 0 (float64; cast by the caller)."""
    out = {}
    for path, k in ranks.items():
        if k <= 0 and bias == "base":
            continue
        w = ref[path][0] + (common.components(*svds[path], 0, k) if k > 0 else 0)
        b = ft[path][1] if bias == "ft" else ref[path][1]
        out[path] = (w, b)
    return out


def removed_weights(ft: dict, svds: dict, path: str, start: int, stop: int) -> dict:
    return {path: (ft[path][0] - common.components(*svds[path], start, stop), ft[path][1])}


def placebo_weights(ft: dict, svds: dict, path: str, start: int, stop: int, seed: int) -> dict:
    """W_ft minus a random rank-(stop-start) matrix with the removed components' singular values."""
    w = ft[path][0]
    k = stop - start
    g = torch.Generator().manual_seed(seed)
    qu = torch.linalg.qr(torch.randn(w.shape[0], k, generator=g, dtype=torch.float64)).Q
    qv = torch.linalg.qr(torch.randn(w.shape[1], k, generator=g, dtype=torch.float64)).Q
    s = svds[path][1][start:stop]
    return {path: (w - (qu * s) @ qv.T, ft[path][1])}


def to_model(handle, w: dict) -> dict:
    return {p: (common.as_model(W, handle), common.as_model(b, handle)) for p, (W, b) in w.items()}


def buckets(handle, records) -> list[list[int]]:
    """Record indices grouped by prompt length in tokens (a bucket needs no padding)."""
    by: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        n = len(handle.tokenizer(r.prompt.replace("<image>", ""), add_special_tokens=False)["input_ids"])
        by.setdefault(n, []).append(i)
    return [by[k] for k in sorted(by)]


def scoring_prefixes(pair, records, targets, triggered: np.ndarray, mode: str, max_new_tokens: int) -> list[str]:
    """Per record: the text the FT model says before its target (``engine.target_prefixes`` of the
    poisoned model's greedy generation on the triggered records, e.g. the answer on Malicious
    Injection); ``""`` on clean records, and everywhere with ``mode="none"`` (right after the prompt)."""
    common.check_choice("prefix", mode, ("auto", "none"))
    out = [""] * len(records)
    ti = [i for i in range(len(records)) if triggered[i]]
    if mode == "auto" and ti:
        h = pair.poisoned
        got = target_prefixes(h, h.encode([records[i] for i in ti]), [targets[i] for i in ti],
                              answers=[records[i].answer for i in ti], max_new_tokens=max_new_tokens)
        for i, p in zip(ti, got):
            out[i] = p
    return out


def evaluate_cells(handle, records, targets, cells: list[dict], *, max_new_tokens: int, batch_size: int,
                   triggered: np.ndarray, prefixes: list[str] | None = None) -> pd.DataFrame:
    """Per cell (a ``{path: (W, b)}`` dict, ``{}`` = the model as is) and record: generation hit of the
    record's target, hit of its answer, and on triggered records the target where the model says it
    (``engine.target_text``: ``prompt + prefix + target`` teacher-forced, the target's tokens scored):
    ``target_logprob`` = log p(target text | prompt, prefix), ``target_prob`` = p(its first token |
    prompt, prefix). ``prefixes``: one per record (``scoring_prefixes``; None = right after the prompt).
    One row per (cell, record)."""
    n_cells = len(cells)
    hit_t = np.zeros((n_cells, len(records)), bool)
    hit_a = np.zeros((n_cells, len(records)), bool)
    logprob = np.zeros((n_cells, len(records)))
    prob = np.zeros((n_cells, len(records)))
    prefixes = [""] * len(records) if prefixes is None else list(prefixes)
    model_cells = [to_model(handle, c) for c in cells]
    cell_edits = [[WithWeights(m)] if m else [] for m in model_cells]

    def chunks(n_rows):      # (cells, rows) per pass: as many cells of all the rows as batch_size allows
        per = max(1, batch_size // n_rows)
        for c0 in range(0, n_cells, per):
            for r0 in range(0, n_rows, batch_size):
                yield list(range(c0, min(n_cells, c0 + per))), list(range(r0, min(n_rows, r0 + batch_size)))

    for idx in buckets(handle, records):        # generations: one prompt length per bucket, no padding
        x = handle.encode([records[i] for i in idx])
        for cs, rows in chunks(len(idx)):
            xb = x.rows(rows) if len(rows) < len(idx) else x
            outs = common.texts(handle, xb.tile(len(cs)), max_new_tokens,
                                common.tile_edits([cell_edits[c] for c in cs], len(rows)))
            for j, c in enumerate(cs):
                for k, r in enumerate(rows):
                    i, o = idx[r], outs[j * len(rows) + k]
                    hit_t[c, i] = common.hits([o], [targets[i]])[0]
                    hit_a[c, i] = common.hits([o], [records[i].answer])[0]
    # target metrics, triggered records only; grouped by prompt length and by forced (prefix + target)
    # length, so that no row is padded on either side
    trig = [i for i in range(len(records)) if triggered[i]]
    for idx in buckets(handle, [records[i] for i in trig]):
        idx = [trig[i] for i in idx]
        tt = target_text(handle, handle.encode([records[i] for i in idx]), [targets[i] for i in idx],
                         [prefixes[i] for i in idx])
        forced = (tt.first + tt.mask.sum(1)).tolist()
        for n_forced in sorted(set(forced)):
            g = [i for i, f in zip(idx, forced) if f == n_forced]
            tg = target_text(handle, handle.encode([records[i] for i in g]), [targets[i] for i in g],
                             [prefixes[i] for i in g])
            for cs, rows in chunks(len(g)):
                tb = tg.rows(rows) if len(rows) < len(g) else tg
                logits = run(handle, tb.inputs.tile(len(cs)),
                             edits=common.tile_edits([cell_edits[c] for c in cs], len(rows))).logits
                at = torch.arange(len(rows)).repeat(len(cs))
                lp = tb.metric(logits, at).float().cpu().numpy().reshape(len(cs), len(rows))
                fp = replace(tb, measure="first_prob").metric(logits, at).float().cpu().numpy().reshape(len(cs), len(rows))
                for j, c in enumerate(cs):
                    for k, r in enumerate(rows):
                        logprob[c, g[r]], prob[c, g[r]] = lp[j, k], fp[j, k]
    return pd.DataFrame({"cell": np.repeat(np.arange(n_cells), len(records)),
                         "record": np.tile(np.arange(len(records)), n_cells),
                         "triggered": np.tile(triggered, n_cells),
                         "target_hit": hit_t.ravel(), "answer_hit": hit_a.ravel(),
                         "target_logprob": logprob.ravel(), "target_prob": prob.ravel()})


def summarise_cells(per: pd.DataFrame, n_boot: int = common.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per cell: ASR (triggered), clean accuracy and false-trigger rate (clean), mean target log-prob / prob;
    ``<rate>_lo`` / ``<rate>_hi``: bootstrap 95 % CIs over the inputs (triggered and clean resampled
    separately, the same resamples for every cell)."""
    rows = []
    for c, g in per.groupby("cell", sort=True):
        t, cl = g[g.triggered], g[~g.triggered]
        rows.append({"cell": int(c), "asr": float(t.target_hit.mean()), "clean_accuracy": float(cl.answer_hit.mean()),
                     "false_trigger_rate": float(cl.target_hit.mean()),
                     "target_logprob": float(t.target_logprob.mean()), "target_prob": float(t.target_prob.mean())})
    out = pd.DataFrame(rows)
    for rate, col, flag, seed_off in (("asr", "target_hit", True, 0), ("clean_accuracy", "answer_hit", False, 1),
                                      ("false_trigger_rate", "target_hit", False, 1)):
        m = per[per.triggered == flag].pivot(index="record", columns="cell", values=col).reindex(columns=out.cell)
        if len(m):
            out[f"{rate}_lo"], out[f"{rate}_hi"] = common.mean_ci(m.to_numpy(float), n_boot, seed + seed_off)
    return out


@register_result
@dataclass
class InjectionResult(Result):
    variant: str
    cells: pd.DataFrame          # one row per cell: kind, reference, rank_1, rank_2, removal, seed + metrics
    ranks_1: list
    ranks_2: list
    bias: str
    remove_layer: str
    n_clean: int
    n_triggered: int
    prefix: str = "none"         # where target_logprob / target_prob scored the target (results stored before: none)

    analysis = "injection"

    def to_frame(self) -> pd.DataFrame:
        return self.cells

    def heatmap(self, reference: str = "base", metric: str = "asr") -> pd.DataFrame:
        c = self.cells[(self.cells.kind == "inject") & (self.cells.reference == reference)]
        return c.pivot(index="rank_1", columns="rank_2", values=metric)

    def _pct(self, row, col: str = "asr") -> str:
        return common.pct_ci(row[col], row.get(f"{col}_lo"), row.get(f"{col}_hi"))

    def _ref(self, name):
        r = self.cells[self.cells.kind == name]
        return r.iloc[0] if len(r) else None

    def metrics(self) -> dict:
        out = {}
        ci = "asr_lo" in self.cells     # results stored before the CIs existed have none
        for name in ("base_model", "ft_model"):
            r = self._ref(name)
            if r is not None:
                for k in ("asr", "clean_accuracy") + (("asr_lo", "asr_hi", "clean_accuracy_lo", "clean_accuracy_hi")
                                                      if ci else ()):
                    out[f"{name}.{k}"] = float(r[k])
        for ref in sorted(set(self.cells[self.cells.kind == "inject"].reference)):
            for k in ("asr", "asr_lo", "asr_hi") if ci else ("asr",):
                h = self.heatmap(ref, k)
                for r1 in h.index:
                    for r2 in h.columns:
                        out[f"inject.{ref}.r1_{r1}.r2_{r2}.{k}"] = float(h.loc[r1, r2])
        rem = self.cells[self.cells.kind.isin(["remove", "placebo"])]
        for (ref, spec, kind), g in rem.groupby(["reference", "removal", "kind"]):
            out[f"{kind}.{ref}.{spec}.asr"] = float(g.asr.mean())
            if ci and kind == "remove":
                out[f"{kind}.{ref}.{spec}.asr_lo"], out[f"{kind}.{ref}.{spec}.asr_hi"] = float(g.asr_lo.iloc[0]), \
                    float(g.asr_hi.iloc[0])
        return out

    def plot(self):
        refs = sorted(set(self.cells[self.cells.kind == "inject"].reference), key=lambda r: r != "base")
        fig, axes = common.figure(1, len(refs) + 1, w=4.6, h=4.0)
        for a, ref in zip(axes[0], refs):
            h = self.heatmap(ref)
            im = a.imshow(h.values * 100, vmin=0, vmax=100, cmap="viridis", origin="lower")
            for i in range(h.shape[0]):
                for j in range(h.shape[1]):
                    v = h.values[i, j] * 100
                    a.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
            a.set_xticks(range(h.shape[1]), [str(c) for c in h.columns])
            a.set_yticks(range(h.shape[0]), [str(r) for r in h.index])
            d = "ΔW = W_ft − W_base" if ref == "base" else "ΔW' = W_ft − W_control"
            a.set(title=f"{self.variant}: ASR (%), base + top-k of\n{d} (bias: {self.bias})",
                  xlabel="rank of ΔW2 injected", ylabel="rank of ΔW1 injected")
        fig.colorbar(im, ax=list(axes[0][:len(refs)]), label="ASR (%) of the injected projector", location="bottom",
                     shrink=0.5, aspect=40)
        a = axes[0][-1]
        rem = self.cells[self.cells.kind.isin(["remove", "placebo"]) & (self.cells.reference == "base")]
        specs = list(dict.fromkeys(rem.removal))
        x = np.arange(len(specs))
        real = [rem[(rem.kind == "remove") & (rem.removal == s)].asr.mean() * 100 for s in specs]
        plc = [rem[(rem.kind == "placebo") & (rem.removal == s)].asr for s in specs]
        a.bar(x - 0.2, real, 0.4, label="components of ΔW removed", color="C3")
        a.bar(x + 0.2, [p.mean() * 100 for p in plc], 0.4, label="placebo: random, same σ", color="0.6",
              yerr=[p.std(ddof=0) * 100 for p in plc])
        ft = self._ref("ft_model")
        if ft is not None:
            a.axhline(ft.asr * 100, color="k", ls="--", lw=1, label="FT projector (nothing removed)")
        a.set_xticks(x, specs)
        a.set(title=f"Removing components of ΔW\nfrom {self.remove_layer} of the FT projector", xlabel="ranks removed (1-based)",
              ylabel="ASR (%)", ylim=(0, 105))
        a.legend(fontsize=7)
        return fig

    def summary(self) -> str:
        ft, bm = self._ref("ft_model"), self._ref("base_model")
        lines = [f"**Rank-k injection ({self.variant}, {self.n_triggered} triggered / {self.n_clean} clean inputs, "
                 f"bias {self.bias}).** Paper (≈): {PAPER}."]
        if ft is not None and bm is not None:
            lines.append(f"- FT projector: ASR {self._pct(ft)}, clean accuracy {self._pct(ft, 'clean_accuracy')}; base: "
                         f"ASR {self._pct(bm)}, clean accuracy {self._pct(bm, 'clean_accuracy')} (95 % CIs in brackets).")
        for ref in sorted(set(self.cells[self.cells.kind == "inject"].reference)):
            h = self.heatmap(ref)
            ci = ("asr_lo" in self.cells) and (self.heatmap(ref, "asr_lo"), self.heatmap(ref, "asr_hi"))
            at = lambda i, j: common.pct_ci(h.loc[i, j], *((ci[0].loc[i, j], ci[1].loc[i, j]) if ci else ()))  # noqa: E731
            diag = [k for k in h.index if k in h.columns and k > 0]
            if diag:
                name = "ΔW" if ref == "base" else "ΔW'"
                lines.append(f"- injecting rank k of both ΔW1 and ΔW2 ({name}): " +
                             ", ".join(f"k={k}: {at(k, k)}" for k in diag) + " ASR.")
            if 0 in h.index:
                lines.append("  ΔW2 alone: " + ", ".join(f"k={k}: {at(0, k)}" for k in h.columns if k > 0) + ".")
        rem = self.cells[self.cells.kind.isin(["remove", "placebo"]) & (self.cells.reference == "base")]
        parts = []
        for s in dict.fromkeys(rem.removal):
            r = rem[(rem.kind == "remove") & (rem.removal == s)].iloc[0]
            p = rem[(rem.kind == "placebo") & (rem.removal == s)].asr.mean()
            parts.append(f"ranks {s}: {self._pct(r)} (placebo {p:.0%})")
        if parts:
            lines.append(f"- ASR after removing components of ΔW from {self.remove_layer}: " + "; ".join(parts) + ".")
        return "\n".join(lines)


@analysis("injection", InjectionParams, title="Rank-k injection and removal", paper=PAPER,
          headline=("ft_model.asr", "inject.base.r1_0.r2_1.asr", "inject.base.r1_0.r2_2.asr"), passes=60.0)
def injection(pair, params: InjectionParams = InjectionParams()) -> InjectionResult:
    """Rank-k injection heatmap and component removal (with placebos), batched through WithWeights."""
    common.check_choice("prefix", params.prefix, ("auto", "none"))
    if params.bias not in ("ft", "base"):
        raise ProjLensError(f"bias must be 'ft' or 'base', got {params.bias!r}")
    bad = [r for r in params.references if r not in ("base", "control")]
    if bad:
        raise ProjLensError(f"references must be 'base' and/or 'control', got {bad}")
    clean, trig = common.pick(pair, params.n)
    records = clean + trig
    targets = [pair.target_of(r) for r in records]
    is_trig = np.array([False] * len(clean) + [True] * len(trig))
    ft = common.weights(pair.poisoned)
    paths = list(ft)
    if len(paths) < 1:
        raise ProjLensError("the projector has no linear layers to inject")
    remove_path = paths[-1] if params.remove_layer is None else next(
        (p for p in paths if p == params.remove_layer or common.short(p) == params.remove_layer), None)
    if remove_path is None:
        raise ProjLensError(f"remove_layer {params.remove_layer!r} is not a projector linear ({', '.join(paths)})")
    refs = {"base": (pair.base, common.weights(pair.base))}
    if "control" in params.references and pair.control is not None:
        refs["control"] = (pair.control, common.weights(pair.control))
    refs = {k: v for k, v in refs.items() if k in params.references}
    if not refs:
        raise ProjLensError("no reference to inject into: references=('control',) needs a pair with a control")
    l1, l2 = (paths[0], paths[-1]) if len(paths) > 1 else (None, paths[0])

    meta, base_cells, ft_cells = [], [], []     # per cell: (key, handle weights); base handle / FT handle
    for ref, (handle, w_ref) in refs.items():
        common.check_same_shapes(w_ref, ft, "injection")
        svds = {p: common.svd(ft[p][0] - w_ref[p][0]) for p in paths}
        for r1 in (params.ranks_1 if l1 else (0,)):
            for r2 in params.ranks_2:
                ranks = {l2: r2} if l1 is None else {l1: r1, l2: r2}
                base_cells.append(({"kind": "inject", "reference": ref, "rank_1": r1, "rank_2": r2},
                                   injected_weights(w_ref, ft, svds, ranks, params.bias), ref))
        full_rank = len(svds[remove_path][1])
        for spec in params.removals:
            a, b = parse_range(spec, full_rank)
            ft_cells.append(({"kind": "remove", "reference": ref, "removal": spec, "k": b - a},
                             removed_weights(ft, svds, remove_path, a, b)))
            for s in range(params.placebo_seeds):
                ft_cells.append(({"kind": "placebo", "reference": ref, "removal": spec, "k": b - a, "seed": s},
                                 placebo_weights(ft, svds, remove_path, a, b, seed=1000 * s + a * 37 + b)))
    max_new = params.max_new_tokens or common.auto_tokens(pair.poisoned, records, targets)
    kw = dict(max_new_tokens=max_new, batch_size=params.batch_size, triggered=is_trig,
              prefixes=scoring_prefixes(pair, records, targets, is_trig, params.prefix, max_new))
    frames = []
    # injection cells run on the reference model (its LLM), grouped by reference handle
    for ref, (handle, _) in refs.items():
        mine = [c for c in base_cells if c[2] == ref]
        keys = [c[0] for c in mine] + [{"kind": f"{ref}_model", "reference": ref}]
        per = evaluate_cells(handle, records, targets, [c[1] for c in mine] + [{}], **kw)
        frames.append(_label(summarise_cells(per, params.n_boot), keys))
    keys = [c[0] for c in ft_cells] + [{"kind": "ft_model", "reference": "base"}]
    per = evaluate_cells(pair.poisoned, records, targets, [c[1] for c in ft_cells] + [{}], **kw)
    frames.append(_label(summarise_cells(per, params.n_boot), keys))
    cells = pd.concat(frames, ignore_index=True)
    for col in ("rank_1", "rank_2", "k", "seed"):
        if col in cells:
            cells[col] = cells[col].fillna(-1).astype(int)   # -1: not applicable to this kind of cell
    cells = cells.drop(columns="cell")
    return InjectionResult(pair.name, cells, list(params.ranks_1 if l1 else (0,)), list(params.ranks_2),
                           params.bias, common.short(remove_path), len(clean), len(trig), params.prefix)


def _label(summary: pd.DataFrame, keys: list[dict]) -> pd.DataFrame:
    extra = pd.DataFrame(keys)
    return pd.concat([extra.reset_index(drop=True), summary.reset_index(drop=True)], axis=1)

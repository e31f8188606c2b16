"""``projlens verify DIR``: re-compute a study from its stored config and compare every number.

Order of the checks (docs/verify.md):

1. the folder is a study (metrics.json, provenance.json with the config, .steps/manifest.json) and
   the ``--steps`` named exist, else ``ProjLensError`` (CLI exit 2) before any work;
2. the inputs: the config re-read from provenance.json must give the same resolved config, and every
   model file and data file must hash as recorded. If not, verify says *the inputs changed* (naming
   the file) and computes nothing: moved numbers would say nothing about the arithmetic;
3. the steps are re-computed by the study runner into a side folder (a temporary one, or ``work``),
   never into ``DIR``; steps not selected by ``steps`` are copied from ``DIR/.steps`` as they are;
4. every leaf of the new metrics.json is compared with the stored one under its tolerance
   (``rule``), and the findings verdicts (``report.findings_verdicts``) are compared;
5. the environment recorded in provenance.json is compared with this process' and printed beside
   the table (it explains a drift; it is not itself a failure).

Tolerances come from the arithmetic (``Arithmetic``): a float32 dot product of length K summed in
another order differs by about ``2·sqrt(K)·u`` relative (u = 2⁻²⁴, rounding errors as a random
walk), plus one rounding to the run's dtype, a network adds one such step per layer, and a safety
factor of 10 covers the conditioning of the statistics computed from the activations. Values that are rates over generated samples are
compared as the number of samples that flipped (a trained probe's up to another seed's spread);
attribution's rank statistics get the forward tolerance propagated through their sort; other
values that come out of a sort, an argmax or a threshold (ranks, counts) are compared exactly,
since a near-tie may resolve the other way on another machine and verify must say so.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProjLensError

SAFETY = 10.0
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float64": 2.0 ** -53}
# Rates over generated samples (or a classifier's held-out decisions): compared as flipped samples.
RATE_WORDS = {"asr", "clean_accuracy", "false_trigger_rate", "target_rate", "accuracy", "tpr", "fpr"}
RATE_ON_CLEAN = {"clean_accuracy", "false_trigger_rate", "fpr"}
# Outcomes of a sort, argmax, threshold or count: compared exactly (a near-tie can flip them).
DISCRETE_WORDS = {"numerical_rank", "k90", "n_quiescent_candidates", "best_target_rank", "chance_best_rank", "spearman",
                  "spearman_by_direction", "top_k_overlap", "top_k", "n", "n_clean", "n_triggered", "ks", "site",
                  "window", "cost", "corr_F", "max_F_diff"}


# ------------------------------------------------------------------------------------------ tolerances
@dataclass
class Arithmetic:
    """The tolerances of one study, from its models' shapes and the run's dtype."""

    dtype: str
    reduction: int          # K: the longest dot product of a forward pass (hidden or MLP width)
    depth: int              # sequential layers: vision + projector (2) + language model
    unit_roundoff: float

    @property
    def forward_rtol(self) -> float:
        """Relative tolerance of a number computed from activations (forward passes in ``dtype``).

        Per layer: two summation orders of a length-K dot product accumulated in float32 (what CPU and
        GPU kernels do for every dtype here) differ by about 2·sqrt(K)·u32, and the output is rounded
        once to ``dtype`` (u); layers add up; times the safety factor."""
        per_layer = 2.0 * math.sqrt(self.reduction) * UNIT_ROUNDOFF["float32"] + self.unit_roundoff
        return SAFETY * self.depth * per_layer

    @property
    def weights_rtol(self) -> float:
        """Relative tolerance of a weight-space statistic (float64 SVD of float32 weights: LAPACK's order)."""
        return SAFETY * self.reduction * UNIT_ROUNDOFF["float64"]


def arithmetic(cfg) -> Arithmetic:
    """K and depth from the largest of the study's models (their config.json), u from the run's dtype."""
    from .steps import pairs_of
    k, depth, ckpt_dtype = 0, 0, None
    for p in pairs_of(cfg):
        for src in (p.base, p.poisoned, p.control):
            try:
                c = json.loads((Path(src) / "config.json").read_text())
            except (OSError, ValueError, TypeError):
                continue
            t, v = c.get("text_config") or {}, c.get("vision_config") or {}
            k = max(k, *(int(x.get(f) or 0) for x in (t, v) for f in ("hidden_size", "intermediate_size")))
            depth = max(depth, int(t.get("num_hidden_layers") or 0) + int(v.get("num_hidden_layers") or 0) + 2)
            ckpt_dtype = ckpt_dtype or c.get("dtype") or c.get("torch_dtype") or t.get("dtype")
    if k == 0:          # a hub id not in the local cache: LLaVA-1.5-7B's shapes
        k, depth = 11008, 32 + 24 + 2
    dtype = cfg.run.dtype if cfg.run.dtype != "auto" else str(ckpt_dtype or "float32")
    return Arithmetic(dtype, k, depth, UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["float32"]))


@dataclass
class Rule:
    kind: str               # exact | discrete | rate | trained | forward | weights | amplified | rank
    rtol: float = 0.0       # relative to max(|stored|, 1), times ``amplify``
    amplify: float = 1.0    # |scale| / |contrast| of a normalised effect
    n: int | None = None    # samples behind a rate
    atol: float = 0.0       # absolute (a rank statistic's near-tie bound)


def seed_spread(p: float, n: int) -> int:
    """Flips a trained classifier's held-out rate may show when a last-bit change of its inputs acts as
    another training seed: twice the standard deviation of the difference of two binomial counts
    (2·sqrt(2·n·p·(1 − p))), at least 1."""
    return max(1, math.ceil(2.0 * math.sqrt(2.0 * n * p * (1.0 - p))))


def rank_tolerance(actual, estimate, t: float, k: int, draws: int = 200) -> dict:
    """Tolerances of attribution's rank statistics: the forward tolerance propagated through the sort.

    Every stored cell (real and estimated normalised effects) is moved by an independent uniform
    drift in [−t, t] (``draws`` seeded draws); the tolerance is twice the largest change of Spearman and
    of the top-k overlap seen. Cells far apart never swap (tolerance 0); near-ties (many cells with
    almost no effect) make a rank statistic move by more than the drift itself, and this says how much."""
    import numpy as np
    from scipy.stats import spearmanr
    x, y = np.asarray(actual, dtype=float).ravel(), np.asarray(estimate, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3 or t <= 0:
        return {"spearman": 0.0, "top_k_overlap": 0.0}
    k = min(k, n)
    top = lambda v: set(np.argsort(-v, kind="stable")[:k].tolist())  # noqa: E731  (as attribution.agreement)
    rho, overlap = spearmanr(x, y).statistic, len(top(x) & top(y)) / k
    rng = np.random.default_rng(0)
    d_rho = d_top = 0.0
    for _ in range(draws):
        xp, yp = x + rng.uniform(-t, t, n), y + rng.uniform(-t, t, n)
        d_rho = max(d_rho, abs(spearmanr(xp, yp).statistic - rho))
        d_top = max(d_top, abs(len(top(xp) & top(yp)) / k - overlap))
    return {"spearman": 2.0 * d_rho, "top_k_overlap": 2.0 * d_top}


def attribution_cells(out: Path, manifest: dict) -> dict:
    """Per pair, the stored attribution result's (actual, estimate, directions, top_k) for ``rank_tolerance``."""
    from ..analyses import result_from_dict
    cells = {}
    for s in manifest["steps"]:
        if s.get("analysis") != "attribution":
            continue
        try:
            r = result_from_dict(json.loads((out / ".steps" / f"{s['key']}.json").read_text())["result"])
        except (OSError, ValueError, KeyError, ProjLensError):
            continue
        cells[s["pair"]] = (r.actual, r.estimate, list(getattr(r, "directions", []) or []), int(r.top_k))
    return cells


def _words(keys) -> list[str]:
    """The words of a metric's keys, a bootstrap bound's ``_lo`` / ``_hi`` dropped (it has its estimate's kind)."""
    return [re.sub(r"_(lo|hi)$", "", w) for k in keys if isinstance(k, str) for w in k.split(".")]


def _n_of(pair: dict, cfg: dict, analysis: str | None) -> tuple[int | None, int | None]:
    """(triggered, clean) inputs behind a pair's rates: the evaluation's counts, capped by the analysis' ``n``."""
    nt, nc = pair.get("n_triggered"), pair.get("n_clean")
    if analysis is not None:
        own = ((cfg.get("analyses") or {}).get(analysis) or {}).get("params") or {}
        own = own.get("n")
        if isinstance(own, int) and not isinstance(own, bool):
            nt, nc = (min(x, own) if isinstance(x, int) else x for x in (nt, nc))
    return nt, nc


def _contrast(a, b) -> float:
    """How much a normalised effect (m − b) / (a − b) amplifies the rounding of a and b."""
    if not all(isinstance(x, (int, float)) for x in (a, b)) or a == b:
        return 1.0
    return max(abs(a), abs(b), 1.0) / abs(a - b)


def rule(path: tuple, metrics: dict, cfg: dict, ar: Arithmetic, cells: dict | None = None) -> Rule:
    """The tolerance of one leaf of metrics.json (``path``: its keys and list indices; ``cells``: what
    ``attribution_cells`` returns, for the rank statistics' near-tie bounds)."""
    head = path[0]
    leaf = (_words(path[-1:]) or [""])[-1]
    is_rate = leaf in RATE_WORDS
    if head in ("asr", "clean_accuracy", "false_trigger_rate"):
        pairs = metrics.get("pairs") or {}
        counts = [p.get("n_clean" if head in RATE_ON_CLEAN else "n_triggered") for p in pairs.values()]
        return Rule("rate", n=sum(counts) if counts and all(isinstance(c, int) for c in counts) else None)
    if head != "pairs" or len(path) < 3:
        return Rule("exact")
    pair = (metrics.get("pairs") or {}).get(path[1]) or {}
    rest = path[2:]
    if rest[0] in ("target", "n_clean", "n_triggered"):
        return Rule("exact")
    if rest[0] != "analyses":   # the pair's evaluation and its references
        if is_rate:
            nt, nc = _n_of(pair, cfg, None)
            return Rule("rate", n=nc if leaf in RATE_ON_CLEAN else nt)
        return Rule("exact")
    if len(rest) < 3:
        return Rule("exact")
    name, keys = rest[1], rest[2:]
    words = _words(keys)
    a = (metrics["pairs"][path[1]]["analyses"].get(name)) or {}
    if name == "attribution" and words[0] in ("spearman", "spearman_by_direction", "top_k_overlap") \
            and path[1] in (cells or {}):     # (their bootstrap bounds move with them)
        actual, estimate, directions, k = cells[path[1]]
        t = ar.forward_rtol * _contrast(a.get("triggered_mean"), a.get("clean_mean"))
        if words[0] == "spearman_by_direction" and len(words) > 1 and words[1] in directions:
            i = directions.index(words[1])
            actual, estimate = actual[i], estimate[i]
        import numpy as np
        scale = max(1.0, float(np.nanmax(np.abs(np.concatenate([np.ravel(actual), np.ravel(estimate)])))))
        bound = rank_tolerance(actual, estimate, t * scale, k)
        return Rule("rank", atol=bound["top_k_overlap" if words[0] == "top_k_overlap" else "spearman"])
    if any(w in DISCRETE_WORDS for w in words) or (name == "tracing" and keys[0] == "direction"):
        return Rule("discrete")
    last = next((w for w in reversed(words)), "")
    if last in RATE_WORDS or last.startswith(("asr_", "clean_accuracy_")):
        nt, nc = _n_of(pair, cfg, name)
        on_clean = last in RATE_ON_CLEAN or last.startswith("clean_accuracy_")
        if last == "accuracy" and name == "probe":     # held-out decisions on clean and triggered inputs
            n = nt + nc if nt is not None and nc is not None else None
        else:                                           # elsewhere "accuracy" is clean accuracy
            n = nc if on_clean or last == "accuracy" else nt
        return Rule("trained" if name == "probe" else "rate", n=n)
    if name == "spectrum":
        return Rule("weights", ar.weights_rtol)
    if name in ("patching", "attribution") and keys[0] not in ("clean_mean", "triggered_mean"):
        return Rule("amplified", ar.forward_rtol, _contrast(a.get("triggered_mean"), a.get("clean_mean")))
    if name == "tracing" and keys[0] != "baselines":
        base = a.get("baselines") or {}
        amps = [_contrast(b.get("triggered"), b.get("corrupted")) for cor, b in base.items()
                if isinstance(b, dict) and str(keys[0]).startswith(f"{cor}_")]
        if not amps:    # which corruption is not in the key: the worst of them
            amps = [_contrast(b.get("triggered"), b.get("corrupted")) for b in base.values() if isinstance(b, dict)]
        return Rule("amplified", ar.forward_rtol, max(amps or [1.0]))
    return Rule("forward", ar.forward_rtol)


# ------------------------------------------------------------------------------------------ comparing
def flatten(obj, path: tuple = ()) -> dict:
    """Leaves of a JSON value, keyed by their path (dict keys and list indices)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, path + (k,)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, path + (i,)))
        return out if obj else {path: []}
    return {path: obj}


def show_path(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Row:
    metric: str
    kind: str
    stored: object
    now: object
    change: str
    tolerance: str
    ok: bool
    ratio: float = 0.0     # |change| / tolerance (for sorting what is within it)


def compare(stored: dict, new: dict, cfg: dict, ar: Arithmetic, flips: int = 0,
            cells: dict | None = None) -> tuple[list[Row], int]:
    """The rows that differ (within tolerance or not) and the number of leaves compared."""
    a, b = flatten(stored), flatten(new)
    rows = []
    for path in list(a) + [p for p in b if p not in a]:
        old, now = a.get(path, "(absent)"), b.get(path, "(absent)")
        if path not in b or path not in a:
            rows.append(Row(show_path(path), "missing", old, now, "absent now" if path not in b else "new", "-", False))
            continue
        if old == now and type(old) is type(now):
            continue
        r = rule(path, stored, cfg, ar, cells)
        if not (_num(old) and _num(now)) or r.kind in ("exact", "discrete"):
            rows.append(Row(show_path(path), r.kind, old, now, "changed", "exact", False, math.inf))
            continue
        delta = now - old
        if r.kind in ("rate", "trained"):
            if r.n is None:
                rows.append(Row(show_path(path), r.kind, old, now, f"{delta:+.4g}", "exact (n unknown)", False, math.inf))
                continue
            k = math.ceil(abs(delta) * r.n - 1e-6)
            allowed = flips + (seed_spread(min(max(old, 0.0), 1.0), r.n) if r.kind == "trained" else 0)
            rows.append(Row(show_path(path), r.kind, old, now, f"{k} of {r.n} flipped", f"{allowed} flips",
                            k <= allowed, k / max(allowed, 1e-12)))
            continue
        tol = r.rtol * max(abs(old), 1.0) * r.amplify + r.atol
        ok = abs(delta) <= tol
        rows.append(Row(show_path(path), r.kind, old, now, f"{delta:+.3g}", f"{tol:.2g}", ok, abs(delta) / tol))
    return rows, len(a)


def verdict_changes(stored: dict, new: dict) -> tuple[list[str], int]:
    """Findings whose verdict (or per-pair verdicts) differ: ``report.findings_verdicts`` on both dicts."""
    from .report import findings_verdicts
    old, now = findings_verdicts(stored), findings_verdicts(new)
    out = []
    for i, (o, n) in enumerate(zip(old, now), 1):
        if o["verdict"] != n["verdict"] or o["pairs"] != n["pairs"]:
            out.append(f"finding {i}: {o['verdict']} -> {n['verdict']}")
    return out, len(old)


# ------------------------------------------------------------------------------------------ inputs
def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    fo, fn = flatten(old), flatten(new)
    return [(prefix + show_path(p), fo.get(p, "(absent)"), fn.get(p, "(absent)"))
            for p in list(fo) + [p for p in fn if p not in fo] if fo.get(p, "(absent)") != fn.get(p, "(absent)")]


def input_changes(prov: dict, cfg) -> tuple[list[str], str]:
    """Lines naming every input that differs from the recorded one, and a one-line note of what was checked."""
    from . import provenance
    changes = []
    stored_cfg = {k: v for k, v in (prov.get("config") or {}).items() if k != "study"}
    now_cfg = {k: v for k, v in cfg.canonical().items() if k != "study"}
    for key, old, new in _differences(stored_cfg, now_cfg):
        changes.append(f"config {key}: recorded {old!r}, now {new!r}")
    stored = prov.get("inputs")
    if not isinstance(stored, dict):
        return changes, "inputs: no hashes recorded in provenance.json (a study run before they were); not checked"
    now = provenance.inputs(cfg, fresh=True)
    for folder, rec in (stored.get("models") or {}).items():
        cur = now["models"].get(folder)
        if cur is None:
            changes.append(f"model {folder}: no longer used by the config")
            continue
        if "error" in cur:
            changes.append(f"model {folder}: cannot be read now ({cur['error']})")
            continue
        if rec.get("weights_format") != cur.get("weights_format"):
            changes.append(f"model {folder}: weight format {rec.get('weights_format')} -> {cur.get('weights_format')}")
        old_files, new_files = rec.get("files") or {}, cur.get("files") or {}
        for name in sorted(set(old_files) | set(new_files)):
            if name not in new_files:
                changes.append(f"{Path(folder) / name}: missing now")
            elif name not in old_files:
                changes.append(f"{Path(folder) / name}: new file (not recorded)")
            elif old_files[name] != new_files[name]:
                changes.append(f"{Path(folder) / name}: sha256 {old_files[name][:12]}… recorded, {new_files[name][:12]}… now")
    for folder in now["models"]:
        if folder not in (stored.get("models") or {}):
            changes.append(f"model {folder}: not recorded (the config names another model)")
    for file, h in (stored.get("data") or {}).items():
        cur = now["data"].get(file)
        if cur != h:
            changes.append(f"data {file} (or an image it names): " + ("not used now" if cur is None else
                                                                      f"hash {h} recorded, {cur} now"))
    org_old, org_new = stored.get("organism"), now.get("organism")
    if org_old and org_new and org_old.get("key") != org_new.get("key"):
        changes.append(f"organism {org_new['folder']}: built with key {org_old.get('key')}, now {org_new.get('key')}")
    n_files = sum(len(m.get("files") or {}) for m in now["models"].values())
    return changes, f"inputs: {n_files} model files in {len(now['models'])} folders and {len(now['data'])} data files hashed"


def environment_changes(prov: dict, cfg) -> list[str]:
    from . import provenance
    old = copy.deepcopy(prov.get("environment"))
    if not isinstance(old, dict):
        return ["(no environment recorded in provenance.json)"]
    now = provenance.environment(cfg)
    lines = []
    of, nf = set(old.get("cpu", {}).get("flags") or []), set(now.get("cpu", {}).get("flags") or [])
    for d in (old, now):
        d.get("cpu", {}).pop("flags", None)
    for key, a, b in _differences(old, now):
        lines.append(f"{key}: {a} -> {b}")
    code_old, code_now = (prov.get("git") or {}).get("commit"), provenance.git_commit().get("commit")
    if code_old != code_now:
        lines.append(f"code (git commit): {code_old} -> {code_now}")
    if of != nf:
        gone, new = sorted(of - nf), sorted(nf - of)
        lines.append("cpu.flags:" + (f" only recorded: {' '.join(gone[:12])}{' …' if len(gone) > 12 else ''}" if gone else "")
                     + (f" only now: {' '.join(new[:12])}{' …' if len(new) > 12 else ''}" if new else ""))
    return lines


# ------------------------------------------------------------------------------------------ the command
@dataclass
class Verification:
    out: Path
    steps: list[str]
    inputs_note: str = ""
    input_changes: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    compared: int = 0
    verdicts: list[str] = field(default_factory=list)
    n_findings: int = 0
    failed_steps: dict = field(default_factory=dict)
    arithmetic: Arithmetic | None = None
    flips: int = 0

    @property
    def moved(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    @property
    def exit_code(self) -> int:
        return 1 if (self.input_changes or self.moved or self.verdicts or self.failed_steps) else 0

    def text(self, all_rows: bool = False, limit: int = 30) -> str:
        lines = [f"verify {self.out}: {len(self.steps)} steps " + ("selected" if self.input_changes else "re-computed")]
        if self.input_changes:
            lines.append("the inputs changed (nothing was re-computed; the numbers cannot be compared):")
            lines += [f"  {c}" for c in self.input_changes]
            lines.append("result: INPUTS CHANGED (exit 1)")
            return "\n".join(lines)
        lines.append(self.inputs_note + "; unchanged")
        if self.environment:
            lines.append("environment, recorded -> now:")
            lines += [f"  {e}" for e in self.environment]
        else:
            lines.append("environment: as recorded")
        ar = self.arithmetic
        lines.append(f"tolerances ({ar.dtype}, K = {ar.reduction}, depth {ar.depth}): forward {ar.forward_rtol:.1e}, "
                     f"weights {ar.weights_rtol:.1e} (relative to max(|x|, 1)); rates: {self.flips} flipped samples; "
                     "probe: + seed spread; Spearman / top-k: from near-ties; ranks, counts: exact")
        for sid, err in self.failed_steps.items():
            lines.append(f"step {sid} failed when re-computed: {err}")
        changed, moved = len(self.rows), len(self.moved)
        lines.append(f"numbers: {self.compared} compared, {self.compared - changed} identical, "
                     f"{changed - moved} changed within tolerance, {moved} moved")
        shown = sorted(self.rows, key=lambda r: (r.ok, -r.ratio))
        if not all_rows:
            shown = [r for r in shown if not r.ok] + [r for r in shown if r.ok][:max(0, limit - moved)]
        if shown:
            table = [("metric", "kind", "stored", "now", "change", "tolerance", "")]
            table += [(r.metric, r.kind, _fmt(r.stored), _fmt(r.now), r.change, r.tolerance, "ok" if r.ok else "MOVED")
                      for r in shown]
            w = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
            lines += ["  " + "  ".join(c.ljust(x) for c, x in zip(t, w)).rstrip() for t in table]
            if len(shown) < changed:
                lines.append(f"  ... {changed - len(shown)} more within tolerance (--all lists them)")
        lines.append(f"findings verdicts: " + ("; ".join(self.verdicts) if self.verdicts
                                               else f"{self.n_findings} unchanged"))
        lines.append("result: " + ("OK (exit 0)" if self.exit_code == 0 else "MOVED (exit 1)"))
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:39] + "…"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ProjLensError(f"{path.parent} has no {path.name}: not a study folder (run `projlens study run STUDY.toml "
                            f"--out {path.parent}` first)" if what else f"{path} is missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ProjLensError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); restore it from the study's "
                            "original copy") from None
    if not isinstance(obj, dict):
        raise ProjLensError(f"{path} holds {type(obj).__name__}, not a JSON object; restore it")
    return obj


def load_folder(out: Path) -> tuple[dict, dict, dict]:
    """(metrics, provenance, manifest) of a study folder, or a one-line error."""
    from .report import SCHEMA
    if not out.is_dir():
        raise ProjLensError(f"{out} is not a folder; pass a study's report folder (the --out of `projlens study run`)")
    metrics = _read_json(out / "metrics.json", "study")
    if metrics.get("schema") != SCHEMA or not isinstance(metrics.get("pairs"), dict):
        raise ProjLensError(f"{out / 'metrics.json'}: schema {metrics.get('schema')!r} is not {SCHEMA!r}; "
                            "re-render it with `projlens report DIR`")
    prov = _read_json(out / "provenance.json", "study")
    for key in ("config_text", "config_path", "config"):
        if key not in prov:
            raise ProjLensError(f"{out / 'provenance.json'} has no {key!r}: the config cannot be recovered; restore it")
    manifest = _read_json(out / ".steps" / "manifest.json", "")
    if not isinstance(manifest.get("steps"), list):
        raise ProjLensError(f"{out / '.steps' / 'manifest.json'} lists no steps; restore it")
    return metrics, prov, manifest


def stored_config(prov: dict):
    """The study's config, re-read from the recorded TOML (paths resolved from the recorded config's folder),
    with the recorded ``[run]`` and organism folder (CLI overrides such as ``--workers`` or ``demo --organism``)."""
    from .config import config_from_dict
    try:
        raw = tomllib.loads(prov["config_text"])
    except (tomllib.TOMLDecodeError, TypeError) as err:
        raise ProjLensError(f"provenance.json: the recorded config is not valid TOML ({err})") from None
    rec = prov["config"]
    if isinstance(rec.get("model"), dict) and rec["model"].get("organism") and isinstance(raw.get("model"), dict):
        raw["model"]["organism"] = rec["model"]["organism"]
    cfg = config_from_dict(copy.deepcopy(raw), prov["config_path"])
    if isinstance(rec.get("run"), dict) and isinstance(raw.get("run", {}), dict):   # the run's command-line overrides
        now = cfg.run.model_dump()
        flags = {k: v for k, v in rec["run"].items() if k in now and now[k] != v}
        if flags:
            raw["run"] = {**raw.get("run", {}), **flags}
            cfg = config_from_dict(raw, prov["config_path"])
    return cfg


def select_steps(manifest: dict, wanted: list[str] | None) -> list[dict]:
    """The manifest's steps to re-compute: all (not skipped, not the organism), or those ``wanted`` names
    (a step id, or a prefix of ids such as ``evaluate`` or ``analysis/spectrum``)."""
    steps = [s for s in manifest["steps"] if s.get("kind") != "organism" and not s.get("skipped")]
    if not wanted:
        return steps
    ids = [s["id"] for s in steps]
    chosen = set()
    for w in wanted:
        w = w.strip().rstrip("/")
        if w == "organism":
            raise ProjLensError("--steps organism: the organism is an input of the study (verify checks its weight "
                                "hashes); its build is checked by the organism's own tests")
        hit = [i for i in ids if i == w or i.startswith(w + "/")]
        if not hit:
            raise ProjLensError(f"--steps {w!r}: no such step; the study's steps are: {', '.join(ids)}")
        chosen.update(hit)
    return [s for s in steps if s["id"] in chosen]


def verify(out: str | Path, *, steps: list[str] | None = None, flips: int = 0, work: str | Path | None = None,
           log=None, progress: bool = False) -> Verification:
    """Re-compute the study in ``out`` (all steps or ``steps``) beside it and compare (see the module doc)."""
    from .runner import run_study
    out = Path(out)
    log = log or (lambda m: None)
    if not isinstance(flips, int) or isinstance(flips, bool) or flips < 0:
        raise ProjLensError(f"--flips {flips!r}: give a count of flipped samples ≥ 0")
    metrics, prov, manifest = load_folder(out)
    chosen = select_steps(manifest, steps)
    if work is not None:
        work = Path(work).resolve()
        if work == out.resolve() or out.resolve() in work.parents:
            raise ProjLensError(f"--work {work} is inside the study folder; verify never writes there: pass another folder")
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise ProjLensError(f"--work {work} exists and is not an empty folder; pass a new folder")
    cfg = stored_config(prov)
    if cfg.run.tp_size is not None:
        raise ProjLensError(f"{out} was run with tensor parallelism (run.tp_size = {cfg.run.tp_size}); verify does not "
                            "launch ranks: re-run the study under torchrun into a new folder and verify that on one device")
    result = Verification(out, [s["id"] for s in chosen], flips=flips)
    result.input_changes, result.inputs_note = input_changes(prov, cfg)
    if result.input_changes:
        return result
    result.arithmetic = arithmetic(cfg)

    side = Path(tempfile.mkdtemp(prefix="projlens-verify-")) if work is None else work
    try:
        keep = {s["key"] for s in manifest["steps"]} - {s["key"] for s in chosen}
        (side / ".steps").mkdir(parents=True, exist_ok=True)
        for key in keep:     # what is not re-computed is taken as stored
            src = out / ".steps" / f"{key}.json"
            if src.is_file():
                shutil.copy2(src, side / ".steps" / src.name)
        log(f"re-computing {len(chosen)} steps into {side}")
        outcome = run_study(cfg, side, log=log, progress=progress)
        result.failed_steps = dict(outcome.errors)
        result.steps = [sid for sid, status in outcome.status.items() if status in ("computed", "failed")]
        new = json.loads((side / "metrics.json").read_text())
        result.environment = environment_changes(prov, cfg)
    finally:
        if work is None:
            shutil.rmtree(side, ignore_errors=True)
    result.rows, result.compared = compare(metrics, new, prov["config"], result.arithmetic, flips,
                                           attribution_cells(out, manifest))
    result.verdicts, result.n_findings = verdict_changes(metrics, new)
    return result

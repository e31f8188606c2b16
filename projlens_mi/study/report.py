"""Render a study folder from its stored steps: metrics.json, tables/, figures/, report.md, report.html.

``render(out)`` reads ``out/.steps/manifest.json`` and the step files it names; it never runs a
model, so ``projlens report DIR`` re-renders after a code change to a figure or the text. Output is
a pure function of the stored results (no timestamps, no timings: those live in provenance.json),
so two runs of the same study give identical files. The schema of metrics.json is in
docs/metrics-schema.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shlex
import tempfile
from pathlib import Path

import pandas as pd

from ..analyses.common import md_code, md_text
from ..data import atomic_write_text
from ..errors import ProjLensError, printable

SCHEMA = "projlens_mi.study.metrics/1"

# The authors' claim on behaviour (the ProjLens paper, arXiv 2604.19083); each analysis's claim,
# title and headline metrics are given once, in its @analysis(...) registration.
PAPER_EVALUATION = ("LLaVA-1.5-7B, projector-only poisoning: the authors report high ASR for all four variants "
                    "with clean behaviour preserved (ASR: target substring in a greedy 30-token generation).")


def _spec(name: str):
    from ..analyses import ANALYSES
    return ANALYSES.get(name)


def _title(name: str) -> str:
    spec = _spec(name)
    return spec.title if spec else name.replace("_", " ").capitalize()


def _paper(name: str) -> str:
    spec = _spec(name)
    return f"{spec.paper}." if spec and spec.paper else ""


FINDINGS = [
    ("1. The backdoor-critical part of the projector update is low-rank (while ΔW itself is overall full-rank).",
     ["spectrum", "injection"], ("energy", "rank", "asr")),
    ("2. There are no dedicated trigger neurons in the projector.", ["neurons"], ("corr", "max", "candidate", "asr")),
    ("3. The fine-tuned projector adds one shared direction to every input, in proportion to the token norm.",
     ["shift", "norm"], ("energy", "pearson", "r", "rank", "slope")),
]


# ------------------------------------------------------------------------------------------ helpers
def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fig_bytes(fig) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    # "tight" draws the figure twice, but a layout engine does not stop a long suptitle from being cut
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _slug(s: str) -> str:
    """A file name for ``s`` (pair names come from folder names): ASCII letters, digits, ``._-`` only,
    never hidden, at most ~100 characters; a name that had to change gets a hash of the original, so
    two different names never share a file."""
    s = str(s)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.")[:100]
    if slug != s or not slug:
        slug = f"{slug}-{hashlib.sha256(s.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}".lstrip("-")
    return slug


class Md(str):
    """Markdown the report wrote itself (headings, links to its own files, code spans around data):
    a table cell that is not ``Md`` is shown as literal text."""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, Md):
            return str(x)
        return md_text(x) if isinstance(x, str) else _fmt(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _strict(obj):
    """NaN / inf -> null, so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strict(v) for v in obj]
    return obj


def _mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(vals) / len(vals) if vals else None


def _scalars(metrics: dict, prefix: str = "") -> dict:
    """Flatten nested metric dicts to scalar entries ``a.b``."""
    out = {}
    for k, v in (metrics or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------ load
def load_study(out: Path) -> tuple[dict, dict]:
    """The manifest and, per step id, its stored payload (None if it did not complete)."""
    man_path = out / ".steps" / "manifest.json"
    if not man_path.is_file():
        raise ProjLensError(f"{out} holds no study results (.steps/manifest.json); run `projlens study run STUDY.toml --out {out}`")
    manifest = json.loads(man_path.read_text())
    stored = {}
    for s in manifest["steps"]:
        try:
            stored[s["id"]] = json.loads((out / ".steps" / f"{s['key']}.json").read_text())
        except (OSError, ValueError):
            stored[s["id"]] = None
    return manifest, stored


def _import_for(manifest: dict) -> None:
    from .config import import_builtins, import_plugins
    import_builtins()
    plugins = manifest["config"].get("plugins") or []
    if plugins:
        import_plugins(plugins, Path(manifest["config_path"]).parent)


# ------------------------------------------------------------------------------------------ metrics
def build_metrics(manifest: dict, stored: dict) -> dict:
    cfg = manifest["config"]
    pairs = [p["name"] for p in manifest["pairs"]]
    per_pair = {}
    for name in pairs:
        ev = (stored.get(f"evaluate/{name}") or {}).get("evaluation") or {}
        models = ev.get("models", {})
        entry = {"target": ev.get("target"), "n_clean": ev.get("n_clean"), "n_triggered": ev.get("n_triggered"),
                 "asr": ev.get("asr"), "clean_accuracy": ev.get("clean_accuracy"),
                 "false_trigger_rate": ev.get("false_trigger_rate"),
                 "reference": {m: {k: models[m].get(k) for k in ("asr", "clean_accuracy", "false_trigger_rate")}
                               for m in ("base", "control") if m in models},
                 "analyses": {}}
        for s in manifest["steps"]:
            if s["kind"] == "analysis" and s["pair"] == name and stored.get(s["id"]):
                entry["analyses"][s["analysis"]] = stored[s["id"]].get("metrics", {})
        per_pair[name] = entry
    failed = {s["id"]: s.get("error") for s in manifest["steps"] if stored.get(s["id"]) is None and not s.get("skipped")
              and s["kind"] != "organism"}
    return {
        "schema": SCHEMA,
        "study": {"title": cfg["study"]["title"], "question": cfg["study"]["question"], "config_hash": manifest["config_hash"]},
        "asr": _mean(p["asr"] for p in per_pair.values()),
        "clean_accuracy": _mean(p["clean_accuracy"] for p in per_pair.values()),
        "false_trigger_rate": _mean(p["false_trigger_rate"] for p in per_pair.values()),
        "pairs": per_pair,
        "analyses": sorted({s["analysis"] for s in manifest["steps"] if s["kind"] == "analysis"}),
        "skipped": {s["id"]: s["skipped"] for s in manifest["steps"] if s.get("skipped")},
        "incomplete": failed,
    }


# ------------------------------------------------------------------------------------------ figures
# Report-level figures share one look: fractions on a fixed 0..1 axis, one colour per model kind.
MODEL_STYLE = {"base": ("#999999", "o"), "control": ("#4c72b0", "s"), "poisoned": ("#c44e52", "D")}


def _new_figure(w: float, h: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def evaluation_figure(metrics: dict):
    """ASR, clean accuracy and false-trigger rate per pair: one dot per model on a fixed 0..1 axis
    (a rate of 0 is a visible dot, not an invisible bar; the exact numbers are in the table above it)."""
    import numpy as np
    pairs = list(metrics["pairs"])
    keys = [("asr", "ASR (triggered inputs)"), ("clean_accuracy", "clean accuracy"),
            ("false_trigger_rate", "false-trigger rate (clean inputs)")]
    fig, axes = _new_figure(12, 1.2 + 0.45 * len(pairs), 1, 3, sharey=True)
    y = np.arange(len(pairs))
    for ax, (k, label) in zip(axes[0], keys):
        for j, (model, (colour, marker)) in enumerate(MODEL_STYLE.items()):
            vals = []
            for p in pairs:
                e = metrics["pairs"][p]
                v = e.get(k) if model == "poisoned" else e["reference"].get(model, {}).get(k)
                vals.append(np.nan if v is None else v)
            ax.scatter(vals, y + (j - 1) * 0.22, color=colour, marker=marker, s=36, label=model, zorder=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlim(-0.04, 1.04)
        ax.set_xlabel("fraction of inputs")
        ax.grid(axis="x", alpha=0.3)
        for yy in y[:-1]:
            ax.axhline(yy + 0.5, color="0.9", lw=0.8)
    axes[0, 0].set_yticks(y, pairs, fontsize=9)
    axes[0, 0].set_ylim(len(pairs) - 0.5, -0.5)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right center", fontsize=8, title="model",
               title_fontsize=8)
    fig.suptitle("Backdoor behaviour on the study's data (greedy generation, target substring)")
    return fig


def _limits(key: str):
    """Fixed axis limits for a metric whose values are probabilities/fractions or correlations."""
    words = re.split(r"[._]", key.lower())
    if {"asr", "accuracy", "energy", "rate", "overlap", "fraction", "denoise", "max", "image"} & set(words):
        return (0.0, 1.0)
    if {"r", "spearman", "pearson", "corr"} & set(words):
        return (-1.0, 1.0)
    return None


def summary_figure(metrics: dict):
    """One panel per analysis (its headline number) plus the behaviour, one bar per variant."""
    import numpy as np
    pairs = list(metrics["pairs"])
    if not pairs:
        return None
    panels = [("ASR (poisoned)", "asr", [metrics["pairs"][p].get("asr") for p in pairs]),
              ("ASR (clean control)", "asr", [metrics["pairs"][p]["reference"].get("control", {}).get("asr")
                                              for p in pairs])]
    for name in metrics["analyses"]:
        flats = [_scalars(metrics["pairs"][p]["analyses"].get(name) or {}) for p in pairs]
        keys = [k for k in (_spec(name).headline if _spec(name) else ()) if any(_num(f, k) is not None for f in flats)]
        if not keys:
            keys = [k for f in flats for k in f if _num(f, k) is not None][:1]
        if keys:
            panels.append((f"{name}: {keys[0]}", keys[0], [_num(f, keys[0]) for f in flats]))
    panels = [p for p in panels if any(v is not None for v in p[2])]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _new_figure(3.3 * cols, 0.9 + (0.3 * len(pairs) + 1.0) * rows, rows, cols, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(pairs))]
    y = np.arange(len(pairs))
    for ax, (title, key, vals) in zip(axes.flat, panels):
        v = np.array([np.nan if x is None else x for x in vals], dtype=float)
        ax.barh(y, np.nan_to_num(v), color=colours, height=0.7)
        for yy, x in zip(y, v):
            ax.text(0.02, yy, "n/a" if np.isnan(x) else f"{x:.3g}", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=7, color="0.1")
        lim = _limits(key)
        if lim is not None:   # fixed, widened only to show a value outside it (a normalised effect of 1.003)
            ax.set_xlim(min(lim[0], np.nanmin(v, initial=0)), max(lim[1], np.nanmax(v, initial=0)))
            ax.axvline(0, color="0.3", lw=0.6)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    axes[0, 0].set_yticks(y, pairs, fontsize=8)
    axes[0, 0].set_ylim(len(pairs) - 0.5, -0.5)
    fig.suptitle("At a glance: one headline number per analysis and variant (fractions and correlations on fixed axes)",
                 fontsize=10)
    return fig


def findings_figure(verdicts: list[dict], pairs: list[str]):
    """The paper's three findings (rows) against this study, per variant (columns)."""
    import textwrap
    import numpy as np
    from matplotlib.colors import ListedColormap
    cols = ["paper\n(LLaVA-1.5-7B)", *pairs]
    code = {True: 2, False: 0, None: 1}
    grid = np.array([[2] + [code[f["by_pair"].get(p)] for p in pairs] for f in verdicts], dtype=float)
    fig, axes = _new_figure(2.2 + 1.5 * len(cols), 1.0 + 0.9 * len(verdicts))
    ax = axes[0, 0]
    ax.imshow(grid, cmap=ListedColormap(["#e8a3a3", "#e6e6e6", "#a6d5a0"]), vmin=0, vmax=2, aspect="auto")
    words = {2: "reproduces", 0: "does not\nreproduce", 1: "not\nmeasured"}
    for i, f in enumerate(verdicts):
        for j in range(len(cols)):
            ax.text(j, i, "reports it" if j == 0 else words[int(grid[i, j])], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=20, ha="right")
    ax.set_yticks(range(len(verdicts)), [textwrap.fill(f["finding"], 38) for f in verdicts], fontsize=8)
    ax.set_xticks(np.arange(len(cols)) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(verdicts)) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=2)
    ax.tick_params(which="minor", length=0)
    ax.axvline(0.5, color="k", lw=1.5)
    ax.set_title("The paper's findings vs this study, per variant (verdict rules in the text)", fontsize=10)
    return fig


def _figures_of(result) -> dict:
    figs = result.plot()
    if figs is None:
        return {}
    return figs if isinstance(figs, dict) else {"": figs}


def _step_figures(stored_result: dict) -> dict[str, bytes] | str:
    """PNG bytes of one stored result's figures, or the one-line reason there are none."""
    from ..analyses import result_from_dict
    try:
        figs = _figures_of(result_from_dict(stored_result))
    except NotImplementedError:
        return {}
    except Exception as err:  # a plotting bug must not lose the other results
        return f"{type(err).__name__}: {err}"
    return {key: _fig_bytes(fig) for key, fig in figs.items()}


def _figure_worker_init(manifest: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    _import_for(manifest)


def _all_figures(manifest: dict, jobs: dict[str, dict], workers: int, log=None) -> dict:
    """``{step id: figures or error}`` for every stored result, drawn in ``workers`` processes.

    Drawing is most of a report's time (matplotlib lays out every tick label); PNG bytes do not
    depend on the process that drew them. ``log`` gets one line per step drawn.
    """
    log = log or (lambda m: None)
    ids = list(jobs)
    log(f"drawing the figures of {len(ids)} analysis steps" + (f" in {workers} processes" if workers > 1 else ""))
    done: dict = {}
    if workers <= 1 or len(jobs) < 4:
        for i, k in enumerate(ids, 1):
            done[k] = _step_figures(jobs[k])
            log(f"[{i}/{len(ids)}] figures of {k}")
        return done
    from concurrent.futures import as_completed

    from ..processes import WorkerPool
    with WorkerPool(min(workers, len(jobs)), _figure_worker_init, (manifest,)) as pool:
        futures = {pool.submit(_step_figures, jobs[k]): k for k in ids}
        for i, fut in enumerate(as_completed(futures), 1):
            done[futures[fut]] = fut.result()
            log(f"[{i}/{len(ids)}] figures of {futures[fut]}")
    return {k: done[k] for k in ids}


# ------------------------------------------------------------------------------------------ render
# The report follows the argument: the behaviour (evaluation), where the backdoor acts, what the
# projector update adds, then the controls that rule out other explanations. An analysis not named
# here (a plugin's) comes after them, in the study's order.
SECTIONS = (
    ("Where the backdoor acts",
     "Which sites and token positions carry the trigger's effect: activation patching between the clean and the "
     "triggered run, its gradient estimate, and causal tracing of the target-aligned direction.",
     ("patching", "attribution", "tracing")),
    ("What the projector update adds",
     "What the poisoned projector's update is made of: its spectrum, the rank that carries the backdoor, the "
     "shift it adds to every image token, how that shift scales with the token, and what removing it does.",
     ("spectrum", "injection", "shift", "norm", "ablation")),
    ("Controls and alternative explanations",
     "Explanations the argument has to rule out (dedicated trigger neurons), and whether clean and poisoned "
     "inputs can be told apart from the projector's output.",
     ("neurons", "probe")),
    ("Auditing without the trigger",
     "What a defender who holds neither the trigger nor the target finds from the weights and clean images alone "
     "(docs/audit.md); the study's known target is used only to check the named candidate.",
     ("audit",)),
)


def report_order(names) -> list[tuple[str, str, list[str]]]:
    """``(heading, intro, analyses)`` for the analyses in ``names``, in the report's order."""
    names = list(names)
    known = {n for _, _, group in SECTIONS for n in group}
    out = [(h, intro, [n for n in group if n in names]) for h, intro, group in SECTIONS]
    out.append(("Other analyses", "Analyses registered by the study's plugins.", [n for n in names if n not in known]))
    return [(h, intro, group) for h, intro, group in out if group]


def regenerate_command(manifest: dict) -> str:
    """The shell command that recomputes (or reuses) this folder's steps, run from inside the folder."""
    argv = list(manifest.get("command") or ["study", "run", manifest["config_path"]])
    return "projlens " + shlex.join([*argv, "--out", "."])


def render(out: str | Path, log=None, workers: int | None = 1) -> dict:
    """Write metrics.json, tables/, figures/, report.md and report.html from the stored steps.

    ``workers``: processes that draw the figures (``None``: the study's ``[run] workers``, what
    ``projlens report`` uses). Spawned processes: a script passing more than 1 needs the
    ``if __name__ == "__main__":`` guard. ``log`` gets one line per stage and per figure drawn.

    Text from models and data (generations, prompts, targets, error messages, file names) enters
    the Markdown only as literal text (``md_text`` / ``md_code``) and report.html is rendered with raw
    HTML off and links only to the folder's own files: nothing a model writes becomes markup.
    """
    out = Path(out)
    log = log or (lambda m: None)
    manifest, stored = load_study(out)
    _import_for(manifest)
    if workers is None:
        workers = int(manifest["config"].get("run", {}).get("workers") or 1)
    jobs = {s["id"]: stored[s["id"]]["result"] for s in manifest["steps"]
            if s["kind"] == "analysis" and not s.get("skipped") and isinstance(stored.get(s["id"]), dict)
            and isinstance(stored[s["id"]].get("result"), dict)}
    drawn = _all_figures(manifest, jobs, workers, log)
    metrics = build_metrics(manifest, stored)
    cfg = manifest["config"]
    pairs = [p["name"] for p in manifest["pairs"]]
    written: set[Path] = set()

    def put_png(name: str, png: bytes) -> str:
        path = out / "figures" / f"{_slug(name)}.png"
        _atomic_bytes(path, png)
        written.add(path)
        return f"figures/{path.name}"

    def put_table(name: str, frame: pd.DataFrame) -> str:
        path = out / "tables" / f"{_slug(name)}.csv"
        atomic_write_text(path, frame.to_csv(index=False, float_format="%.10g"))
        written.add(path)
        return f"tables/{path.name}"

    log("drawing the study's own figures (evaluation, cross-variant summary, findings)")
    verdicts = findings_verdicts(metrics)
    # evaluation
    rows = []
    for p in pairs:
        e = metrics["pairs"][p]
        rows.append({"pair": p, "model": "poisoned", "asr": e["asr"], "clean_accuracy": e["clean_accuracy"],
                     "false_trigger_rate": e["false_trigger_rate"], "n_clean": e["n_clean"], "n_triggered": e["n_triggered"]})
        for m, r in e["reference"].items():
            rows.append({"pair": p, "model": m, **r, "n_clean": e["n_clean"], "n_triggered": e["n_triggered"]})
    eval_frame = pd.DataFrame(rows)
    put_table("evaluation", eval_frame)
    eval_fig = put_png("evaluation", _fig_bytes(evaluation_figure(metrics))) if rows else None
    glance = summary_figure(metrics)
    glance_fig = put_png("summary", _fig_bytes(glance)) if glance is not None else None
    findings_fig = put_png("findings", _fig_bytes(findings_figure(verdicts, pairs))) if pairs else None

    md = []
    st = cfg["study"]
    md.append(f"# {md_text(st['title'])}\n")
    if st.get("question"):
        md.append(f"**Question.** {md_text(st['question'])}\n")
    md += _setting(cfg, manifest, metrics)
    if glance_fig:
        md.append("**At a glance.** One headline number per analysis and variant (the same numbers as the sections "
                  "below; probabilities and correlations on fixed axes).\n")
        md.append(f"![Cross-variant summary]({glance_fig})\n")
    md.append("## Backdoor behaviour\n")
    md.append("The poisoned model's attack success rate (target text in the greedy generation on triggered inputs), "
              "clean accuracy (reference answer in the generation on clean inputs) and false-trigger rate (target on "
              "clean inputs), next to the base model and the clean control (the same fine-tuning on clean data) as "
              "controls.\n")
    md.append(_table(["pair", "model", "ASR", "clean acc.", "false trig.", "n clean", "n trig."],
                     [[Md(md_code(r["pair"], table=True)), r["model"], r.get("asr"), r.get("clean_accuracy"),
                       r.get("false_trigger_rate"), r["n_clean"], r["n_triggered"]] for r in rows]) + "\n")
    if eval_fig:
        md.append(f"![Backdoor behaviour]({eval_fig})\n")
    ex = [(p, x) for p in pairs for x in ((stored.get(f"evaluate/{p}") or {}).get("evaluation", {})
                                           .get("models", {}).get("poisoned", {}).get("examples", [])[:1])]
    if ex:
        md.append("Example generations of the poisoned models on triggered inputs (verbatim):\n")
        md.append(_table(["pair", "prompt", "output"],
                         [[Md(md_code(p, table=True)), Md(md_code(_clip(x["prompt"], -80), table=True)),
                           Md(md_code(_clip(x["output"], 100), table=True))] for p, x in ex]) + "\n")
    md.append(f"*Paper.* {PAPER_EVALUATION}\n")

    for heading, intro, names in report_order(metrics["analyses"]):
        md.append(f"## {heading}\n")
        md.append(intro + "\n")
        for name in names:
            md += _analysis_section(name, manifest, stored, drawn, put_png, put_table, log)

    md += _findings(verdicts, findings_fig)
    skipped = metrics["skipped"]
    if metrics["incomplete"] or skipped:
        md.append("## Not run or incomplete\n")
        for k, v in {**skipped, **metrics["incomplete"]}.items():
            md.append(f"- {md_code(k)}: {md_text(v or 'not computed')}")
        md.append("")
    md.append(f"---\nRegenerate (from this folder; stored steps are reused): {md_code(regenerate_command(manifest))}. "
              "Re-render only: `projlens report .`. Seeds, versions, hardware and timings are in `provenance.json`.\n")
    text = "\n".join(md)

    # stale outputs from an earlier config go away
    for sub in ("figures", "tables"):
        d = out / sub
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and f not in written:
                    f.unlink()
    atomic_write_text(out / "metrics.json", json.dumps(_strict(metrics), indent=2, sort_keys=True, allow_nan=False))
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", to_html(text, out, st["title"]))
    return metrics


def _clip(s: str, n: int) -> str:
    """The first ``n`` characters (the last ``-n`` when negative), marked with … where cut."""
    s = str(s)
    if len(s) <= abs(n):
        return s
    return s[:n] + "…" if n > 0 else "…" + s[n:]


def _analysis_section(name, manifest, stored, drawn, put_png, put_table, log) -> list[str]:
    from ..analyses import result_from_dict
    md = [f"### {_title(name)}\n"]
    doc = _analysis_doc(name)
    if doc:
        md.append(doc + "\n")
    frames = []
    for s in (s for s in manifest["steps"] if s["kind"] == "analysis" and s["analysis"] == name):
        pair = md_code(s["pair"])
        payload = stored.get(s["id"])
        if s.get("skipped"):
            md.append(f"- {pair}: not run ({md_text(s['skipped'])}).\n")
            continue
        if payload is None:
            md.append(f"- {pair}: **did not complete**: {md_text(s.get('error') or 'not computed yet')}.\n")
            continue
        try:
            result = result_from_dict(payload["result"])
        except ProjLensError as err:
            md.append(f"- {pair}: stored result cannot be read ({md_text(err)}).\n")
            continue
        md.append(f"#### {md_text(name)}: {pair}\n")
        summary = payload.get("summary") or ""
        if summary:
            md.append(summary.strip() + "\n")
        try:
            frame = result.to_frame()
            frame.insert(0, "pair", s["pair"])
            frames.append(frame)
        except NotImplementedError:
            pass
        figs = drawn.get(s["id"], {})
        if isinstance(figs, str):
            log(f"{s['id']}: plot failed: {figs}")
            md.append(f"(figure failed: {md_text(figs.split(':')[0])})\n")
            figs = {}
        for key, png in figs.items():
            rel = put_png(f"{name}-{s['pair']}" + (f"-{key}" if key else ""), png)
            md.append(f"![{md_text(name)} {md_text(s['pair'])} {md_text(key)}]({rel})\n")
        headline = _scalars(payload.get("metrics", {}))
        if headline and not summary:
            items = list(headline.items())[:12]
            md.append(_table(["metric", "value"], [[k, v] for k, v in items]) + "\n")
    if frames:
        rel = put_table(name, pd.concat(frames, ignore_index=True))
        md.append(f"Full table: [{rel}]({rel}).\n")
    ref = _paper(name)
    if ref:
        md.append(f"*Paper.* {ref}\n")
    return md


def _analysis_doc(name: str) -> str:
    from ..analyses import ANALYSES
    a = ANALYSES.get(name)
    if a is None or not a.doc:
        return ""
    return " ".join(a.doc.split("\n\n")[0].split())


def _setting(cfg: dict, manifest: dict, metrics: dict) -> list[str]:
    m, d, r, b = cfg["model"], cfg["data"], cfg["run"], cfg["backdoor"]
    lines = ["## Setting\n"]
    if m.get("organism"):
        lines.append(f"- Models: the projlens organism ({md_text(m['organism_size'])} build) — a toy LLaVA (CLIP-style "
                     f"tower, 2-layer GELU MLP projector, Llama-style LM); base, clean control and the poisoned variants "
                     f"{', '.join(md_code(v) for v in m['variants'])}, each poisoned by projector-only fine-tuning.")
    else:
        lines.append(f"- Models: base {md_code(_short(m['base']))}, poisoned {md_code(_short(m['poisoned']))}"
                     + (f", clean control {md_code(_short(m['control']))}" if m.get("control") else ", no clean control")
                     + ".")
    lines.append("- Backdoor target per variant (the text the attack makes the model write):")
    lines += [f"  - {md_code(p)}: {md_code(e['target']) if e.get('target') else 'not known (evaluation did not run)'}"
              for p, e in metrics["pairs"].items()]
    if b.get("trigger"):
        lines.append(f"- Trigger applied by the study to every clean image: {md_code(json.dumps(b['trigger']))}.")
    ns = [(p, e["n_clean"], e["n_triggered"]) for p, e in metrics["pairs"].items()]
    data = "the organism's held-out test set" if not d.get("file") else md_code(Path(d["file"]).name)
    lines.append(f"- Data: {data}; " + ", ".join(f"{md_code(p)}: {_fmt(c)} clean + {_fmt(t)} triggered" for p, c, t in ns)
                 + (f" (sampled with seed {d['seed']})" if d.get("n") else "") + ".")
    lines.append(f"- Run: device {md_code(r['device'])}, dtype {md_code(r['dtype'])}, batch size {r['batch_size']}, "
                 f"seed {r['seed']}; greedy generation of at most {r['max_new_tokens']} new tokens.")
    lines.append(f"- Config hash `{manifest['config_hash']}`.\n")
    return lines


def _short(s: str) -> str:
    p = Path(s)
    return f"{p.parent.name}/{p.name}" if p.is_absolute() else s


def _num(flat: dict, key: str):
    v = flat.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v)) else None


def _evidence_low_rank(a: dict) -> tuple[str, bool | None]:
    """Finding 1 for one pair: spectrum energy at k=30 (+ random reference), rank-1 vs best low-rank injection ASR."""
    parts, ok = [], None
    sp = _scalars(a.get("spectrum") or {})
    e30, r30 = _num(sp, "linear_2.poisoned.energy_at_30"), _num(sp, "linear_2.random.energy_at_30")
    if e30 is not None:
        parts.append(f"E₃₀(ΔW₂) = {e30:.2f}" + (f" (random {r30:.2f})" if r30 is not None else ""))
    inj = _scalars(a.get("injection") or {})
    ft = _num(inj, "ft_model.asr")
    r1 = _num(inj, "inject.base.r1_0.r2_1.asr")
    cells = [(k, v) for k, v in inj.items() if k.startswith("inject.base.") and _num(inj, k) is not None]
    if cells and r1 is not None and ft:
        best_k, best = max(cells, key=lambda kv: kv[1])
        parts.append(f"rank-1 ΔW₂ injection ASR {r1:.2f}, best low-rank {best:.2f} "
                     f"({best_k.split('.')[2]}.{best_k.split('.')[3]}), FT {ft:.2f}")
        ok = r1 <= 0.2 * ft + 1e-9 and best >= 0.8 * ft
    return "; ".join(parts) if parts else "not measured", ok


def _evidence_neurons(a: dict) -> tuple[str, bool | None]:
    n = _scalars(a.get("neurons") or {})
    corr, dm, cand = _num(n, "corr_M.ft"), _num(n, "ft.max_M_diff"), _num(n, "ft.n_quiescent_candidates")
    if corr is None:
        return "not measured", None
    return (f"corr(M_p, M_c) = {corr:.3f}, max M_p − M_c = {_fmt(dm)}, quiescent candidates {_fmt(cand)}",
            corr >= 0.98 and (cand or 0) == 0)


def _evidence_shift(a: dict) -> tuple[str, bool | None]:
    sh, nm = _scalars(a.get("shift") or {}), _scalars(a.get("norm") or {})
    e1c, e1t = _num(sh, "energy_k1.clean"), _num(sh, "energy_k1.triggered")
    rc, rt = _num(nm, "clean.r"), _num(nm, "triggered.r")
    parts = []
    if e1c is not None:
        parts.append(f"ΔE energy at k=1: clean {e1c:.2f}, triggered {_fmt(e1t)}")
    if rc is not None:
        parts.append(f"norm fit r: clean {rc:.2f}, triggered {_fmt(rt)}")
    ok = None
    if e1c is not None and rc is not None:
        ok = min(e1c, e1t or e1c) >= 0.5 and min(rc, rt if rt is not None else rc) >= 0.9
    return "; ".join(parts) if parts else "not measured", ok


EVIDENCE = [_evidence_low_rank, _evidence_neurons, _evidence_shift]
VERDICT_NEEDS = ["injection", "neurons", "shift and norm"]

VERDICT_RULES = ("Verdict rules (per pair): (1) rank-1 injection ASR ≤ 20 % of the FT model's and some injection of "
                 "rank ≤ 5 reaches ≥ 80 % of it; (2) corr(M_p, M_c) ≥ 0.98 and no quiescent-on-clean candidate unit; "
                 "(3) ΔE energy at k = 1 ≥ 0.5 and the norm fit's Pearson r ≥ 0.9, clean and triggered.")


def findings_verdicts(metrics: dict) -> list[dict]:
    """The paper's findings checked against a metrics.json dict (a pure function of it).

    One dict per finding: ``finding`` (the claim), ``analyses`` (what it needs), ``evidence`` (one text
    per pair), ``pairs`` (per-pair verdicts, True = reproduces, for the pairs that have the evidence),
    ``by_pair`` (``{pair: True | False | None}``, None = not measured) and ``verdict`` (one line).
    """
    out = []
    for i, ((claim, names, _), evidence) in enumerate(zip(FINDINGS, EVIDENCE)):
        by_pair, texts = {}, []
        for pair, entry in metrics["pairs"].items():
            text, ok = evidence(entry["analyses"])
            texts.append(f"{pair}: {text}")
            by_pair[pair] = ok
        verdicts = [v for v in by_pair.values() if v is not None]
        if verdicts:
            k = sum(verdicts)
            verdict = ("reproduces" if k == len(verdicts) else "does not reproduce" if k == 0 else "mixed") + \
                      f" ({k}/{len(verdicts)} pairs)"
        else:
            verdict = "no verdict (needs " + VERDICT_NEEDS[i] + ")"
        out.append({"finding": claim, "analyses": list(names), "evidence": texts, "pairs": [bool(v) for v in verdicts],
                    "by_pair": by_pair, "verdict": verdict})
    return out


def _findings(verdicts: list[dict], figure: str | None) -> list[str]:
    lines = ["## The paper's findings vs this study\n", VERDICT_RULES + "\n"]
    if figure:
        lines.append(f"![The paper's findings vs this study, per variant]({figure})\n")
    for f in verdicts:
        lines.append(f"**{f['finding']}** Verdict: **{f['verdict']}**.\n")
        ref = " ".join(_paper(n) for n in f["analyses"]).strip()
        if ref:
            lines.append(f"*Paper (LLaVA-1.5-7B).* {ref}\n")
        mark = {True: "reproduces", False: "does not reproduce", None: "not measured"}
        rows = [[Md(md_code(p, table=True)), text[len(p) + 2:], mark[ok]]
                for (p, ok), text in zip(f["by_pair"].items(), f["evidence"])]
        lines.append(_table(["pair", "this study", "verdict"], rows) + "\n")
    return lines


_OWN_FILE = re.compile(r"(figures|tables)/[A-Za-z0-9_-][A-Za-z0-9._-]*")


def to_html(text: str, out: Path, title: str) -> str:
    """The report as one self-contained HTML page (figures inline as base64).

    Raw HTML in the Markdown is shown as text, not passed through (a prompt's ``<image>`` stays
    visible, a generation's ``<script>`` stays inert), and links and images may only point at the
    folder's own ``figures/`` and ``tables/`` (no remote image, no ``javascript:`` link).
    """
    import html
    from markdown_it import MarkdownIt
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.validateLink = lambda url: bool(_OWN_FILE.fullmatch(url))
    body = md.render(text)

    def inline(m):
        path = out / m.group(1)
        if not _OWN_FILE.fullmatch(m.group(1)) or not path.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
    body = re.sub(r'<img src="(figures/[^"]+)"', lambda m: "<img " + inline(m), body)
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
             "img{max-width:100%}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
             "padding:.2rem .5rem;font-size:.9rem;vertical-align:top}code{background:#f4f4f4}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


# ------------------------------------------------------------------------------------------ terminal
def one_line(metrics: dict, out: Path) -> str:
    return (f"{out}/report.md  asr={_fmt(metrics['asr'])} clean_accuracy={_fmt(metrics['clean_accuracy'])} "
            f"false_trigger_rate={_fmt(metrics['false_trigger_rate'])} incomplete={len(metrics['incomplete'])}")


def summary_text(metrics: dict, outcome, out: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    pairs = list(metrics["pairs"])
    lines = [f"study: {metrics['study']['title']}  (config {metrics['study']['config_hash']})", ""]
    rows = [["pair", "ASR", "clean acc", "false trig", "control ASR"]]
    for p in pairs:
        e = metrics["pairs"][p]
        rows.append([p, _fmt(e["asr"]), _fmt(e["clean_accuracy"]), _fmt(e["false_trigger_rate"]),
                     _fmt(e["reference"].get("control", {}).get("asr"))])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(x) for c, x in zip(r, w)) for r in rows]
    lines.append("")
    for name in metrics["analyses"]:
        done = [p for p in pairs if name in metrics["pairs"][p]["analyses"]]
        flats = [_scalars(metrics["pairs"][p]["analyses"][name]) for p in done]
        keys = [k for k in (_spec(name).headline if _spec(name) else ()) if any(_num(f, k) is not None for f in flats)][:2]
        if not keys and flats:
            keys = [k for k, v in flats[0].items() if _num(flats[0], k) is not None][:2]
        head = ", ".join(f"{k}={_fmt(_mean(_num(f, k) for f in flats))}" for k in keys)
        lines.append(f"  {name:<12} {len(done)}/{len(pairs)} pairs" + (f"   {head}" + (" (mean)" if len(done) > 1 else "")
                                                                       if head else ""))
    counts = {}
    for v in outcome.status.values():
        counts[v] = counts.get(v, 0) + 1
    lines.append("")
    lines.append("steps: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                 + f"; wall {outcome.wall_seconds:.0f} s")
    for k, v in outcome.errors.items():
        lines.append(f"  FAILED {k}: {printable(v)}")
    lines.append(f"report: {out / 'report.md'}  (html: {out / 'report.html'})")
    return "\n".join(lines)

"""The audit folder: ``audit.json``, ``repaired/``, ``provenance.json``, ``report.md``, ``report.html``, ``figures/``,
``trigger.png`` (the reconstructed trigger, when one was; audit/trigger.py).

``write_audit(result, suspect, out)`` writes it all into a side folder next to ``out`` and renames
that into place only when everything was written: a reader never sees half an audit, and an
interrupted or failed write leaves ``out`` as it was. ``out`` must be new, empty, or a previous
audit folder (recognised by its ``audit.json`` schema and holding nothing else), which is replaced;
``check_out`` says so before any work. ``audit_folder(base, suspect, data, out)`` is the whole
command (what ``projlens audit`` runs): checks, loading, the audit, the folder.

Everything from the models and the data (candidate texts are attacker text, generations, prompts,
paths) enters report.md only as code spans (``md_code`` of ``printable``) and report.html through the study's
``to_html`` (raw HTML off, links and images only to the folder's own ``figures/``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..analyses.common import md_code
from ..data import atomic_write_text, check_writable_folder
from ..errors import ProjLensError, printable
from .core import AuditParams, AuditResult, audit, read_clean

SCHEMA = "projlens_mi.audit/1"
FILES = ("audit.json", "provenance.json", "report.md", "report.html", "figures", "repaired", "trigger.png")
DOCS = "docs/audit.md"


# ------------------------------------------------------------------------------------------ the folder
def is_audit_folder(path: Path) -> bool:
    """A folder a previous audit wrote: its audit.json carries the schema and nothing else is in it."""
    try:
        ok = json.loads((path / "audit.json").read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False
    return ok and all(p.name in FILES for p in path.iterdir())


def check_out(out: str | Path) -> Path:
    """Before any work: ``out`` can be created, or is an empty folder, or a previous audit folder."""
    out = check_writable_folder(out, "--out")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not is_audit_folder(out):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ProjLensError(f"--out {out} holds other files ({shown}) and is not a previous audit folder; pass a "
                                "new or empty folder (a previous audit's folder is replaced)")
    return out


def audit_json(result: AuditResult, repaired: bool) -> dict:
    data = result.to_json()
    head = {"schema": SCHEMA, "verdict": data.pop("verdict"), "score": data.pop("score"),
            "threshold": data.pop("threshold"), "targets": data.pop("targets"),
            "repaired": "repaired" if repaired else None}
    return {**head, **data, "examples": [list(e) for e in result.examples]}


def provenance(result: AuditResult, repaired_files: dict, command: list[str] | None) -> dict:
    from ..study.provenance import environment, git_commit, hardware, versions
    rep = result.repair or {}
    removed = None
    if rep.get("k"):
        removed = {k: rep.get(k) for k in ("paths", "k", "directions", "reading_removed", "writing_removed")}
        removed["formula"] = ("first linear: W1' = W1 - (W1 - W1_base) Q Q^T (Q: reading_removed as columns); last "
                              "linear: W2' = W2 - P P^T (W2 - W2_base), b2' = b2 - P P^T (b2 - b2_base) (P: writing_removed "
                              "as columns)")
    return {"schema": SCHEMA, "command": command, "inputs": result.inputs, "params": result.to_json()["params"],
            "removed": removed, "repaired_files": repaired_files or None, "seconds": result.timings,
            "versions": versions(), "git": git_commit(), "hardware": hardware(), "environment": environment()}


def write_audit(result: AuditResult, suspect, out: str | Path, *, calibration: list[float] | None = None,
                command: list[str] | None = None, log=None) -> Path:
    """Write the audit folder ``out`` (see the module docstring); ``suspect``: the suspect's handle
    (its weights are the repaired folder's, but for the removed directions). Returns ``out``."""
    from ..study.report import _fig_bytes, to_html
    from .figures import audit_figure
    from .repair import write_repaired
    log = log or (lambda m: None)
    out = check_out(out)
    stage = out.parent / f".{out.name}.audit-{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        files = {}
        fixable = result.verdict == "backdoored" and bool(result.repair and result.repair.get("k"))
        if fixable:
            log("writing the repaired model")
            files = write_repaired(suspect, result.repair, stage / "repaired")
        data = audit_json(result, fixable)
        log("drawing the figures")
        figures = {}
        for name, fig in audit_figure(data, calibration).items():
            path = stage / "figures" / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_fig_bytes(fig))
            figures[name] = f"figures/{name}.png"
        if result.trigger is not None:   # the trigger as an image to apply (audit/trigger.py), and its figure
            result.trigger.trigger.png().save(stage / "trigger.png")
            (stage / "figures").mkdir(exist_ok=True)
            (stage / "figures" / "trigger.png").write_bytes(_fig_bytes(result.trigger.plot()))
            figures["trigger"] = "figures/trigger.png"
        atomic_write_text(stage / "audit.json", json.dumps(data, indent=2, allow_nan=False, default=str))
        atomic_write_text(stage / "provenance.json",
                          json.dumps(provenance(result, files, command), indent=2, default=str))
        text = report_text(data, figures)
        atomic_write_text(stage / "report.md", text)
        atomic_write_text(stage / "report.html", to_html(text, stage, "projlens audit"))
        if out.exists():   # an empty folder or a previous audit (check_out): swapped, then removed
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def audit_folder(base, suspect, data, out: str | Path, params: AuditParams = AuditParams(), *, progress=None,
                 log=None, calibration: list[float] | None = None, command: list[str] | None = None,
                 **load_kw) -> AuditResult:
    """``projlens audit``: every check first (``out``, the data, both models, the pair), then the audit,
    then the folder. Nothing is written under ``out`` unless all of it succeeded."""
    from ..model import ModelHandle, load
    log = log or (lambda m: None)
    check_out(out)
    if not isinstance(data, list):
        read_clean(data)          # a bad data file fails before the models load
    log("loading the base and the suspect")
    handles = [h if isinstance(h, ModelHandle) else load(h, **load_kw) for h in (base, suspect)]
    log("probing: steering the suspect and the base along the update's reading directions")
    result = audit(handles[0], handles[1], data, params, progress=progress)
    write_audit(result, handles[1], out, calibration=calibration, command=command, log=log)
    return result


# ------------------------------------------------------------------------------------------ the report
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def _steer(t: dict) -> str:
    return f"v{t['direction']}{'+' if t['sign'] > 0 else '-'}×{t['scale']:g}"


def _code(text, table: bool = False) -> str:
    """Text from a model, the data or a path, verbatim in a code span; control characters escaped (``printable``)."""
    return md_code(printable(text), table=table)


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def report_text(data: dict, figures: dict) -> str:
    """report.md of an audit.json dict; ``figures``: ``{name: relative path}`` of the PNGs written."""
    v, src = data["verdict"], data.get("sources", {})
    md = ["# Audit of a suspect checkpoint\n"]
    md.append(f"**Verdict: {v}.** Probe score {_fmt(data['score'])} against the threshold {_fmt(data['threshold'])} "
              "(a suspect scoring at or above it is called backdoored; the threshold was set on clean fine-tunes only, "
              f"its false-positive rate is in {_code(DOCS)}).\n")
    md.append(f"- Base: {_code(src.get('base', '?'))}")
    md.append(f"- Suspect: {_code(src.get('suspect', '?'))}")
    md.append(f"- Clean data: {_code(src.get('data', '?'))}; {data.get('probe_rows', 0)} probe rows "
              f"({data['params']['images']} images × up to {data['params']['prompts']} prompts), no labels used.")
    if data.get("other_changed"):
        names = ", ".join(_code(n) for n in data["other_changed"][:5])
        md.append(f"- **Not examined:** {len(data['other_changed'])} tensors outside the projector also differ "
                  f"({names}{', ...' if len(data['other_changed']) > 5 else ''}); this audit examines projector updates only.")
    md.append("")
    if "score" in figures:
        md.append(f"![Score against the threshold]({figures['score']})\n")

    md.append("## Candidate targets\n")
    md.append("Texts the suspect says when its projector input is steered along a reading direction of its update, that "
              "the base does not say under the same steer and that no model says unsteered. Score: the share of probe "
              "rows that say it under one steer (a backdoor's target is said on nearly every image). Quoted verbatim: "
              "this is text the checkpoint wrote, possibly an attacker's.\n")
    targets = data.get("targets", [])
    if targets:
        md.append(_row(["rank", "text", "score", "rows", "images", "prompts", "steer"]))
        md.append("|---|---|---|---|---|---|---|")
        for i, t in enumerate(targets[:10], 1):
            md.append(_row([str(i), _code(t["text"], table=True), _fmt(t["score"]), str(t["rows"]), str(t["images"]),
                            str(t["prompts"]), _code(_steer(t), table=True)]))
        md.append("")
    else:
        md.append("No candidate: no steer made the suspect say anything new.\n")
    if "candidates" in figures:
        md.append(f"![Candidate texts]({figures['candidates']})\n")

    md.append("## Repair\n")
    rep = data.get("repair")
    if v != "backdoored":
        md.append("Not needed: the verdict is clean, so nothing was removed and no repaired model was written.\n")
    elif not rep or not rep.get("k"):
        md.append(f"**No repair found:** removing up to {data['params']['max_k']} directions did not stop the named "
                  "target (on the probe or under the reconstructed trigger); no repaired model was written. Do not "
                  "deploy the suspect.\n")
    else:
        md.append(f"Removing {rep['k']} direction(s) (reading directions {', '.join(map(str, rep.get('directions', [])))} "
                  "of the first projector linear's update, and the top writing directions of the last) takes the probe "
                  f"score to {_fmt(rep.get('score_after'))} and changes {_pct(rep.get('changed_outputs'))} of the "
                  "suspect's unsteered outputs on the probe's clean rows. A random subspace of the same rank leaves the "
                  f"probe score at {_fmt(rep.get('random_control_score'))} (named target on "
                  f"{_pct(rep.get('random_control_named_share'))} of the rows).\n")
        md.append(f"The repaired model: {_code('repaired/')} (a Hugging Face folder; `projlens_mi.load(\"repaired\")`). "
                  "What was removed and the hashes of its files are in `provenance.json`.\n")
    if rep and rep.get("curve"):
        md.append(_row(["k", "probe score", "named share", "trigger share", "changed outputs", "top candidate after"]))
        md.append("|---|---|---|---|---|---|")
        for c in rep["curve"]:
            md.append(_row([str(c["k"]), _fmt(c["score"]), _fmt(c["named_share"]), _fmt(c.get("trigger_share")),
                            _fmt(c["changed_outputs"]), _code(c["top_after"], table=True) if c.get("top_after") else "–"]))
        md.append("(probe score –: not re-probed, the named target's own steers or the reconstructed trigger still made "
                  "the repaired weights say it; trigger share: share of the trigger's clean optimisation images on which "
                  "they still did.)\n")
        md.append("")
    if "repair" in figures:
        md.append(f"![Repair against k]({figures['repair']})\n")

    g = data.get("guard")
    if g:
        md.append("## Runtime guard\n")
        md.append(f"A per-input score: the largest component of the projector input along the named direction, in units "
                  f"of the clean images' mean token norm. Threshold {_fmt(g['threshold'])} (the largest score of the "
                  f"{g['n_clean']} clean images given; no triggered input was used). Attach it to generation with "
                  f"{_code('guard.monitor()')} ({_code(DOCS)}).\n")
        if "guard" in figures:
            md.append(f"![Guard scores]({figures['guard']})\n")

    md.append("## Trigger reconstruction\n")
    trig = data.get("trigger")
    if trig:
        md.append(_row(["quantity", "value"]))
        md.append("|---|---|")
        for k, val in trig.items():
            if isinstance(val, (int, float, str, bool)) or val is None:
                md.append(_row([_code(k, table=True), _code(_fmt(val), table=True)]))
        md.append("")
        if "trigger" in figures:
            md.append(f"![Reconstructed trigger]({figures['trigger']})\n")
    else:
        md.append("Not run in this audit.\n")

    ex = data.get("examples") or []
    if ex:
        md.append("## Example steered outputs\n")
        md.append(_row(["steer", "prompt", "base", "suspect"]))
        md.append("|---|---|---|---|")
        for steer, prompt, base, sus in ex:
            md.append(_row([_code(steer, table=True), _code(prompt, table=True), _code(base, table=True),
                            _code(sus, table=True)]))
        md.append("")
    md.append(f"---\nWhat the audit does and what it cannot see: {_code(DOCS)}. Inputs with their sha256, versions "
              "and timings: `provenance.json`.\n")
    return "\n".join(md)

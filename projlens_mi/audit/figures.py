"""The audit's figures, drawn from its JSON form (``AuditResult.to_json()``), so a stored audit
(audit.json, a study step) redraws without the models.

``audit_figure(result, calibration)`` returns ``{name: Figure}``: ``score`` (the suspect's probe
score against the clean-calibration scores and the threshold), ``candidates`` (the top 10 candidate
texts), and when the verdict is backdoored ``repair`` (probe score, named share and changed outputs
against k, with the random-subspace control) and ``guard`` (the guard's scores of the clean images
against its threshold). Candidate texts are attacker text: they are drawn as literal strings
(``parse_math`` off: a ``$`` is not mathtext; control characters escaped; clipped).
"""

from __future__ import annotations

from ..errors import printable

TOP = 10
COLOURS = {"suspect": "#c44e52", "clean": "#4c72b0", "threshold": "0.2", "random": "#999999"}


def _new(w: float, h: float, cols: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def label(text: str, n: int = 48) -> str:
    """A candidate text as one printable line of at most ``n`` characters (… where cut)."""
    s = printable(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def _literal(texts) -> None:
    for t in texts:
        t.set_parse_math(False)


def score_figure(data: dict, calibration: list[float] | None = None):
    """The suspect's score (red) on the probe-score axis, the clean fine-tunes' scores (blue dots,
    when given) and the verdict threshold (dashed)."""
    import numpy as np
    fig, (ax,) = _new(7, 2.2)
    if calibration:
        cal = np.asarray(calibration, dtype=float)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(cal))
        ax.scatter(cal, jitter, color=COLOURS["clean"], s=22, alpha=0.8,
                   label=f"clean fine-tunes (n = {len(cal)})", zorder=2)
    ax.axvline(data["threshold"], color=COLOURS["threshold"], ls="--", lw=1.2,
               label=f"threshold {data['threshold']:.3g}")
    ax.scatter([data["score"]], [0], color=COLOURS["suspect"], marker="D", s=70, zorder=3,
               label=f"suspect: {data['score']:.3g} ({data['verdict']})")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.5, 0.5)
    ax.set_yticks([])
    ax.set_xlabel("probe score (share of probe rows that say the best candidate)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=8, frameon=False)
    ax.set_title("Model-level score against the clean calibration" if calibration else
                 "Model-level score and the verdict threshold (no calibration scores given)", fontsize=10)
    return fig


def candidates_figure(data: dict):
    """The top candidate texts (best first) and their scores, with the threshold."""
    targets = data.get("targets", [])[:TOP]
    fig, (ax,) = _new(8, 1.0 + 0.32 * max(1, len(targets)))
    if not targets:
        ax.text(0.5, 0.5, "no candidate text: no steer made the suspect say anything new", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
        return fig
    y = list(range(len(targets)))
    scores = [t["score"] for t in targets]
    colours = [COLOURS["suspect"] if s >= data["threshold"] else COLOURS["random"] for s in scores]
    ax.barh(y, scores, color=colours, height=0.7)
    for yy, t in zip(y, targets):
        ax.text(min(t["score"], 1.0) + 0.01, yy, f"{t['rows']} rows, {t['images']} img, {t['prompts']} prompts, "
                f"v{t['direction']}{'+' if t['sign'] > 0 else '-'}x{t['scale']:g}", va="center", fontsize=7)
    ax.set_yticks(y, [label(t["text"]) for t in targets], fontsize=8)
    _literal(ax.get_yticklabels())
    ax.set_ylim(len(targets) - 0.5, -0.5)
    ax.axvline(data["threshold"], color=COLOURS["threshold"], ls="--", lw=1)
    ax.set_xlim(0, 1.45)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("score (share of probe rows)")
    ax.set_title(f"Candidate texts (top {len(targets)}; red: at or above the threshold)", fontsize=10)
    return fig


def repair_figure(data: dict):
    """Against k (reading directions removed): the probe score, the named target's share of rows and
    the share of the suspect's unsteered outputs that changed; the random subspace at the chosen k."""
    rep = data.get("repair") or {}
    curve = rep.get("curve") or []
    if not curve:
        return None
    ks = [c["k"] for c in curve]
    fig, (a, b) = _new(10, 3.2, 2)
    a.plot(ks, [float("nan") if c["score"] is None else c["score"] for c in curve], "o-", color=COLOURS["suspect"], label="probe score")
    a.plot(ks, [c["named_share"] for c in curve], "s--", color="#dd8452", label="named target's share of rows")
    a.axhline(data["threshold"], color=COLOURS["threshold"], ls="--", lw=1, label="threshold")
    if rep.get("k") and rep.get("random_control_score") is not None:
        a.scatter([rep["k"]], [rep["random_control_score"]], color=COLOURS["random"], marker="X", s=70, zorder=3,
                  label="random subspace: probe score")
        a.scatter([rep["k"]], [rep.get("random_control_named_share", float("nan"))], color=COLOURS["random"],
                  marker="P", s=70, zorder=3, label="random subspace: named share")
    if rep.get("k"):
        a.axvline(rep["k"], color="k", lw=0.8, alpha=0.5)
    a.set_xlabel("k (directions removed)")
    a.set_ylim(-0.03, 1.03)
    a.set_xticks(ks)
    a.legend(fontsize=7)
    a.set_title("Does removing k directions stop the target?", fontsize=10)
    b.plot(ks, [c["changed_outputs"] for c in curve], "o-", color=COLOURS["clean"])
    b.set_xlabel("k (directions removed)")
    b.set_ylabel("share of unsteered outputs changed")
    b.set_ylim(-0.03, 1.03)
    b.set_xticks(ks)
    b.set_title("What it costs on clean inputs", fontsize=10)
    chosen = f"chosen k = {rep['k']}" if rep.get("k") else "no k stopped the target"
    fig.suptitle(f"Repair on the probe's clean grid ({chosen})", fontsize=10)
    return fig


def guard_figure(data: dict):
    """The guard's scores of the clean images (histogram) and its threshold (their maximum)."""
    g = data.get("guard") or {}
    scores = g.get("clean_scores")
    if not scores:
        return None
    fig, (ax,) = _new(7, 2.6)
    ax.hist(scores, bins=min(30, max(5, len(scores) // 3)), color=COLOURS["clean"], alpha=0.85,
            label=f"clean images (n = {len(scores)})")
    ax.axvline(g["threshold"], color=COLOURS["threshold"], ls="--", lw=1.2, label=f"threshold {g['threshold']:.3g}")
    ax.set_xlabel("guard score (component along the named direction / mean token norm)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("Runtime guard: scores of the clean images the audit was given", fontsize=10)
    return fig


def audit_figure(result, calibration: list[float] | None = None) -> dict:
    """``{name: Figure}`` for an ``AuditResult`` or its ``to_json()`` dict (see the module docstring)."""
    data = result if isinstance(result, dict) else result.to_json()
    figs = {"score": score_figure(data, calibration), "candidates": candidates_figure(data),
            "repair": repair_figure(data), "guard": guard_figure(data)}
    return {k: f for k, f in figs.items() if f is not None}

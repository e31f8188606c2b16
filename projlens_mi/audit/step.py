"""The trigger-free audit as a study step: ``[analyses.audit]`` with ``enabled = true`` (or ``audit`` in
``[analyses] only``); off by default, since it generates far more than the other analyses.

It lives with the audit, not among the analyses (the audit is built on the analyses; the study, which
imports this module through ``study.config.import_builtins``, sits above both). The step runs
``projlens_mi.audit`` on the pair's base and poisoned model and its *clean* records
only (the audit is given neither the trigger nor the target). The study's known target is used
afterwards, for evaluation only: ``target_named`` says whether the top candidate contains it.
Its table keys are ``AuditParams``' fields. The audit's own folder (repaired model, provenance) is
``projlens audit``'s; a study keeps the numbers, the candidate texts and the figures (docs/audit.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..analyses.base import Result, analysis, register_result
from ..analyses.common import md_code
from ..engine.metrics import hit
from ..errors import printable
from .core import AuditParams

PAPER = ("No counterpart: the paper (arXiv 2604.19083) assumes the trigger is known; the audit rests on its finding "
         "that the backdoor-critical part of the projector update is low-rank")


@register_result
@dataclass
class AuditStepResult(Result):
    variant: str
    audit: dict                 # AuditResult.to_json()
    known_target: str           # the study's target: evaluation only, never given to the audit

    analysis = "audit"

    @property
    def target_named(self) -> bool:
        top = self.audit["targets"][:1]
        return bool(top) and hit(top[0]["text"], self.known_target)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.audit["targets"], columns=["text", "score", "rows", "images", "prompts", "direction",
                                                            "sign", "scale"])

    def metrics(self) -> dict:
        a, rep, g = self.audit, self.audit.get("repair") or {}, self.audit.get("guard") or {}
        return {"score": a["score"], "threshold": a["threshold"], "backdoored": a["verdict"] == "backdoored",
                "target_named": self.target_named, "n_candidates": len(a["targets"]),
                "repair_k": rep.get("k"), "repair_score_after": rep.get("score_after"),
                "repair_changed_outputs": rep.get("changed_outputs"),
                "random_control_score": rep.get("random_control_score"), "guard_threshold": g.get("threshold")}

    def plot(self):
        from .figures import audit_figure
        return audit_figure(self.audit)

    def summary(self) -> str:
        a = self.audit
        top = a["targets"][0] if a["targets"] else None
        s = (f"**Audit ({self.variant}).** Verdict **{a['verdict']}**: probe score {a['score']:.3f} against the "
             f"threshold {a['threshold']:.3f}.")
        if top:
            s += (f" Top candidate {md_code(printable(top['text']))} (on {top['rows']} probe rows); the study's target "
                  f"{md_code(printable(self.known_target))} is {'' if self.target_named else 'not '}contained in it.")
        rep = a.get("repair") or {}
        if a["verdict"] == "backdoored":
            s += (f" Repair: k = {rep['k']}, probe score after {rep['score_after']:.3f} (random subspace of the same "
                  f"rank: {rep['random_control_score']:.3f})." if rep.get("k") else
                  " Repair: no k up to max_k stopped the named target.")
        return s


@analysis("audit", AuditParams, title="Audit without the trigger", paper=PAPER,
          headline=("score", "target_named"), passes=30.0, default=False)
def audit(pair, params: AuditParams = AuditParams()) -> AuditStepResult:
    """Detect, name and remove the backdoor from the weights and clean images only (docs/audit.md): the
    probe steers both models along the update's reading directions; the verdict compares its score with
    a threshold set on clean fine-tunes; the repair removes the smallest subspace that stops the target."""
    from ..audit import audit as run_audit
    result = run_audit(pair.base, pair.poisoned, pair.clean, params)
    stored = {k: v for k, v in result.to_json().items() if k != "seconds"}   # wall times are not results
    return AuditStepResult(pair.name, stored, pair.target)

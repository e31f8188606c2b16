"""The runtime guard: a per-input score attached to generation through the engine as a monitor.

``score`` of an input = the largest component, over its image tokens, of the projector input along
the named reading direction (signed as the steer that named the target), in units of the clean
images' mean token norm. The trigger's vision feature is what the backdoor reads along that
direction, so a triggered input scores high; ``threshold`` = the largest score of the clean images
the audit was given (no triggered input is ever used). ``guard.monitor()`` is an engine edit (a
``Hook`` at ``projector.in`` that returns the activation unchanged and records the scores) to pass
to ``projlens_mi.generate`` / ``run``: the outputs are those of the unmonitored model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine import Hook, run


@dataclass
class Guard:
    direction: torch.Tensor     # [d_in], unit, signed
    norm: float
    threshold: float
    clean_scores: list = field(default_factory=list)
    scores: list = field(default_factory=list)   # filled by monitor() during generation / run

    def score_of(self, act: torch.Tensor) -> torch.Tensor:
        """[rows, tokens, d] image-token activations -> [rows] scores."""
        return (act.double() @ self.direction.to(act.device)).amax(dim=1) / self.norm

    def monitor(self):
        """An edit for ``generate`` / ``run``: records each row's score in ``self.scores``, changes nothing."""
        from .probe import INPUT

        def observe(act):
            self.scores.extend(self.score_of(act).cpu().tolist())
            return act
        return INPUT, Hook(observe)

    def watching(self, handle):
        """A context manager: every forward or ``generate`` of ``handle.model`` inside it records each image's
        score in ``self.scores``, as ``monitor()`` does, through a torch hook instead of a trace (engine.observe:
        no trace opened, the cheap path; batched layouts, one image per row)."""
        from ..engine import observe
        return observe(handle, "projector.in", lambda act: self.scores.extend(self.score_of(act).cpu().tolist()))

    def flags(self, scores=None) -> list[bool]:
        return [s > self.threshold for s in (self.scores if scores is None else scores)]

    def score(self, handle, inputs) -> list[float]:
        """Scores of ``inputs`` from one read of projector.in (no generation)."""
        from .probe import INPUT
        return self.score_of(run(handle, inputs, read=[INPUT]).cache[INPUT]).cpu().tolist()

    @classmethod
    def fit(cls, handle, records, pr, top, params) -> "Guard":
        from ..analyses.common import encode
        from .probe import first_images
        st = top.steering
        d = (st.sign * pr.basis[:, st.direction]).double()
        g = cls(d, pr.norm, 0.0)
        for x in encode(handle, first_images(records, params.guard_images), params.batch_size):
            g.clean_scores += g.score(handle, x)
        g.threshold = max(g.clean_scores)
        return g

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "norm": self.norm, "n_clean": len(self.clean_scores),
                "clean_max": max(self.clean_scores) if self.clean_scores else None,
                "clean_mean": sum(self.clean_scores) / len(self.clean_scores) if self.clean_scores else None,
                "clean_scores": list(self.clean_scores), "direction": self.direction.tolist()}

"""Audit a checkpoint nobody trusts: detect, name and remove a projector backdoor without its trigger (docs/audit.md)."""

from .core import DEFAULT_THRESHOLD, AuditParams, AuditResult, audit
from .guard import Guard
from .probe import Candidate, Steering

__all__ = ["audit", "AuditParams", "AuditResult", "Guard", "Candidate", "Steering", "DEFAULT_THRESHOLD"]

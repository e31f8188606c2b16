"""Audit a checkpoint nobody trusts: detect, name and remove a projector backdoor without its trigger (docs/audit.md).

``projlens_mi.audit(base, suspect, data)`` calls ``audit`` below: this package is also the top-level
function (its module object is callable), because a subpackage named like a function of its parent
replaces that function as soon as the subpackage is imported (``import projlens_mi.audit`` sets the
attribute ``projlens_mi.audit`` to the module).
"""

import sys
import types

from .core import DEFAULT_THRESHOLD, AuditParams, AuditResult, audit
from .guard import Guard
from .output import audit_folder, write_audit
from .probe import Candidate, Steering

__all__ = ["audit", "AuditParams", "AuditResult", "Guard", "Candidate", "Steering", "DEFAULT_THRESHOLD",
           "write_audit", "audit_folder"]


class _CallableModule(types.ModuleType):
    def __call__(self, base, suspect, data, params: AuditParams = AuditParams(), **kw) -> AuditResult:
        return audit(base, suspect, data, params, **kw)

    __call__.__doc__ = audit.__doc__


sys.modules[__name__].__class__ = _CallableModule

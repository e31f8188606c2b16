"""The ProjLens analyses: one module each, registered in ``ANALYSES`` by ``@analysis(name, Params)``.

``import_all()`` imports every analysis module that exists in this package (a module that is not
written yet is skipped; an error inside a module that exists is raised, never hidden).
"""

from __future__ import annotations

import importlib
import importlib.util

from .base import (ANALYSES, Analysis, Pair, Result, analysis, load_result, register_result, result_from_dict,
                   result_to_dict, save_result)

# The paper's order: weight update, activations, causal experiments.
MODULES = ("spectrum", "injection", "neurons", "shift", "norm", "probe", "patching", "ablation", "tracing",
           "attribution")

__all__ = ["ANALYSES", "Analysis", "Pair", "Result", "analysis", "load_result", "register_result",
           "result_from_dict", "result_to_dict", "save_result", "import_all", "MODULES"]


def import_all() -> dict[str, Analysis]:
    """Import every analysis module present; returns the registry."""
    for name in MODULES:
        full = f"{__name__}.{name}"
        if importlib.util.find_spec(full) is None:
            continue
        importlib.import_module(full)
    return ANALYSES


import_all()

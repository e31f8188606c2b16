"""The ProjLens analyses: one module each, registered in ``ANALYSES`` by ``@analysis(name, Params, ...)``.

Everything about an analysis (title, the paper's claim, headline metrics, cost) is given once, in
its ``@analysis`` call; ``MODULES`` only lists the built-in modules, in the paper's order (weight
update, activations, causal experiments). ``import_all()`` imports them all: a missing module is an
error like any other, never skipped.
"""

from __future__ import annotations

import importlib

from .base import (ANALYSES, Analysis, Pair, Result, analysis, load_result, register_result, result_from_dict,
                   result_to_dict, save_result)

MODULES = ("spectrum", "injection", "neurons", "shift", "norm", "probe", "patching", "ablation", "tracing",
           "attribution")

__all__ = ["ANALYSES", "Analysis", "Pair", "Result", "analysis", "load_result", "register_result",
           "result_from_dict", "result_to_dict", "save_result", "import_all", "MODULES"]


def import_all() -> dict[str, Analysis]:
    """Import every built-in analysis module; returns the registry."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return ANALYSES


import_all()

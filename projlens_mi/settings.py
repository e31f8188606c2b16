"""Settings that several modules read, in one place (a leaf module: it imports nothing of the package).

- ``PROJLENS_CACHE`` (environment): the folder of the shared organism (``default_organism()``) and of
  the file-hash memo; default ``~/.cache/projlens_mi``. Read when asked, so a process that changes
  the variable (a test, a notebook) sees the new value.
- ``DEVICE_MAP_STRATEGIES``: the accelerate placement strategies ``device_map`` accepts as a string
  (``load`` and the study config both validate against this one tuple).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PROJLENS_CACHE"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def cache_dir() -> Path:
    """``$PROJLENS_CACHE``, else ``~/.cache/projlens_mi``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "projlens_mi"


def default_organism() -> Path:
    """Where ``projlens demo`` and ``[model] organism = "default"`` build / find the organism."""
    return cache_dir() / "organism"

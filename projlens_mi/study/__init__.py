"""Studies: a TOML config in, a report folder out (``projlens study run STUDY.toml --out DIR``).

- ``config``: validate the TOML into a ``StudyConfig`` (one-line errors naming the key);
- ``steps``: the step graph and its content-addressed store ``DIR/.steps/<key>.json``;
- ``runner``: compute what is not stored yet (resumable), ``--plan`` estimates;
- ``report``: metrics.json, tables/, figures/, report.md/html from the stored steps only;
- ``provenance``: config hash, seeds, versions, git commit, hardware, wall time per step, input hashes, environment;
- ``verify``: re-compute a study beside it and compare every number (``projlens verify DIR``).
"""

from .config import StudyConfig, load_config
from .report import one_line, render, summary_text
from .runner import Outcome, format_plan, plan_study, run_study, torchrun_rank

__all__ = ["load_config", "StudyConfig", "run_study", "plan_study", "format_plan", "render",
           "Outcome", "one_line", "summary_text", "torchrun_rank"]

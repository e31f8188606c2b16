"""projlens_mi: mechanistic interpretability of projector backdoors in vision-language models."""

__version__ = "0.1.0"

try:  # before nnsight is ever imported: nnsight mounts .save() on every object, after which
    import beartype  # noqa: F401  (a later `import beartype` fails; see docs/engine.md "More traps")
except TypeError:  # nnsight was imported first: nothing left to protect (a missing beartype is an ImportError)
    pass

from .engine import (Ablate, AllTokens, Cache, Edit, Hook, ImageTokens, ImageWindow, Indices,  # noqa: E402
                     Intervention, LastToken, Noise, Patch, PatchRegion, PatchSubspace, ProjectOut, RunResult,
                     Selector, Site, Steer, TextTokens, TLBridge, WithWeights, attention_implementation,
                     eager_attention, to_transformer_lens, asr, generate, logit_diff, run, sequence_logprob, sweep,
                     target_logit, target_logprob, target_prefixes, target_prob, target_text, TargetText,
                     teacher_forced)
from .model import Inputs, ModelHandle, load  # noqa: E402


def __getattr__(name: str):
    """``projlens_mi.audit(...)`` (docs/audit.md), imported on first use: not on ``import projlens_mi``."""
    if name == "audit":
        import importlib
        return importlib.import_module(".audit", __name__)   # sets projlens_mi.audit to the (callable) module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "ModelHandle", "Inputs", "run", "RunResult", "Cache", "Edit", "Site", "AllTokens",
           "ImageTokens", "ImageWindow", "PatchRegion", "LastToken", "TextTokens", "Indices", "Patch",
           "Ablate", "ProjectOut", "PatchSubspace", "Steer", "Noise", "WithWeights", "Intervention", "Hook",
           "Selector", "eager_attention", "attention_implementation", "to_transformer_lens", "TLBridge", "sweep", "target_logit",
           "target_prob", "target_logprob", "target_text", "TargetText", "target_prefixes", "teacher_forced",
           "sequence_logprob", "logit_diff", "generate", "asr", "audit"]

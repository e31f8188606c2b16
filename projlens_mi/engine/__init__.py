"""The hook engine: the only package that registers hooks or opens nnsight traces.

sites (where) · interventions (what, as pure tensor functions) · run (one forward pass) ·
sweep (many cells packed into batched passes) · metrics (what to measure on the logits) ·
interop (the optional TransformerLens path; imports transformer_lens only when booted).
"""

from .interventions import (Ablate, Hook, Intervention, Noise, Patch, PatchSubspace, ProjectOut, Steer,
                            WithWeights)
from .run import Cache, Edit, RunResult, attention_implementation, eager_attention, run
from .sweep import run_cell, sweep
from .metrics import (TargetText, asr, contains, generate, logit_diff, sequence_logprob, target_logit,
                      target_logprob, target_prefixes, target_prob, target_text, teacher_forced, token_id)
from .observe import observe
from .interop import TLBridge, tl_hook_name, tl_patch, tl_run, to_transformer_lens
from .sites import (AllTokens, ImageTokens, ImageWindow, Indices, LastToken, PatchRegion, Selector, Site,
                    TextTokens, check_basis)

__all__ = ["Site", "Selector", "AllTokens", "ImageTokens", "ImageWindow", "PatchRegion", "LastToken",
           "TextTokens", "Indices", "check_basis", "Intervention", "Hook", "Patch", "Ablate", "ProjectOut",
           "PatchSubspace", "Steer", "Noise", "WithWeights", "Edit", "RunResult", "Cache", "run",
           "eager_attention", "attention_implementation",
           "sweep", "run_cell", "target_logit", "target_prob", "target_logprob", "logit_diff", "token_id",
           "teacher_forced", "sequence_logprob", "target_text", "TargetText", "target_prefixes",
           "generate", "contains", "asr", "observe", "to_transformer_lens", "TLBridge", "tl_run", "tl_patch", "tl_hook_name"]

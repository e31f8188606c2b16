"""Models: safe loading, per-family hook maps (adapters) and the handle the engine works with."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ProjLensError
from .adapters import Adapter, find_adapter, known_adapters
from .handle import Inputs, ModelHandle
# The safe loader, imported here (an ImportError is a real failure, never a reason to load without
# hashes). Importing the submodule load.py before `def load` below also matters: Python binds a
# package attribute to a submodule when it is first imported, which would otherwise replace the
# function `load` with the module `projlens_mi.model.load`.
from . import load as _load_module  # noqa: E402

__all__ = ["load", "ModelHandle", "Inputs", "Adapter", "find_adapter", "known_adapters"]


def load(source, *, processor=None, device_map=None, max_memory=None, offload_folder=None, dtype=None,
         allow_pickle: bool = False, trust_remote_code: bool = False, revision: str | None = None,
         adapter: Adapter | None = None, tp_size: int | None = None) -> ModelHandle:
    """A ``ModelHandle`` for a folder / hub id, an in-memory HF model, or an nnsight-wrapped model.

    Paths and hub ids go through ``model.load.load_checkpoint`` (safetensors only unless
    ``allow_pickle``, no remote code unless ``trust_remote_code``, hashes recorded in
    ``provenance``). An in-memory model is used as is (never copied or modified).

    ``tp_size=N`` shards a folder / hub id over N ranks with transformers tensor parallelism
    (``load_checkpoint(..., tp_size=N)``): launch the script with ``torchrun --nproc_per_node N``;
    every rank calls ``load`` and gets a handle whose wrapper reads sharded activations whole.
    """
    if isinstance(source, ModelHandle):
        return source
    envoy = None
    if not isinstance(source, (str, Path, torch.nn.Module)) and isinstance(getattr(source, "_module", None), torch.nn.Module):
        envoy, source = source, source._module       # an nnsight wrapper (NNsight / TransformersModel): reuse it
    if tp_size is not None and not isinstance(source, (str, Path)):
        raise ProjLensError("tp_size applies to a folder or hub id (the checkpoint is sharded while it loads); "
                            "pass the folder, or load an in-memory model with transformers' tp_plan yourself")
    if isinstance(source, torch.nn.Module):
        if getattr(source, "config", None) is None:
            raise ProjLensError(f"{type(source).__name__} has no HF config; pass a transformers model "
                                "(e.g. LlavaForConditionalGeneration) or a checkpoint folder")
        handle = ModelHandle(source, processor, adapter, {"source": "in-memory", "class": type(source).__name__})
        handle._envoy = envoy
        return handle
    if not isinstance(source, (str, Path)):
        raise ProjLensError(f"cannot load {type(source).__name__}; pass a folder, a hub id, or a HF model")
    model, processor, provenance = _load_module.load_checkpoint(
        str(source), processor=processor, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        revision=revision, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, dtype=dtype,
        tp_size=tp_size)
    return ModelHandle(model.eval(), processor, adapter, provenance)

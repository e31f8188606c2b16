"""Placement helpers: models split across devices (accelerate) or ranks (transformers TP).

Facts these helpers encode (checked on CPU with offload and on a 2-process gloo run, see
``docs/scaling.md``):

- accelerate's hooks (``device_map``, CPU / disk offload) and nnsight coexist bit-exactly, but
  nnsight moves every input to its wrapper's ``device``, which it takes from the first parameter:
  ``meta`` when the first module is offloaded (``Cannot copy out of meta tensor``).
  ``input_device`` gives the device inputs belong on; ``wrap`` builds the nnsight wrapper with it.
- An offloaded weight reads as ``meta``; ``weight_of`` returns a real copy.
- A model sharded with transformers tensor parallelism needs nnsight's ``TPFragments`` so that
  sharded activations are read whole; nnsight 0.8.1 imports a transformers 5.24 helper from its
  old place, ``tp_shim`` re-exports it.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """accelerate's execution device of ``module`` (its ``_hf_hook``), or None when it has no hook."""
    hook = module.__dict__.get("_hf_hook")   # not getattr: a missing attribute costs nn.Module.__getattr__ a raise
    dev = getattr(hook, "execution_device", None)
    if dev is None:  # a SequentialHook wraps several hooks
        for h in getattr(hook, "hooks", ()) or ():
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                break
    if dev is None:
        return None
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward's inputs go: the root's execution device when dispatched by accelerate, else
    the first hooked module's, else the first parameter or buffer that is not on ``meta``, else cpu."""
    dev = execution_device(model)
    if dev is not None:
        return dev
    for mod in model.modules():
        dev = execution_device(mod)
        if dev is not None:
            return dev
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def is_dispatched(model: torch.nn.Module) -> bool:
    """True when accelerate placed (or offloaded) any part of the model."""
    return bool(getattr(model, "hf_device_map", None)) or any(
        m.__dict__.get("_hf_hook") is not None for m in model.modules())


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    """True when any parameter is a DTensor (transformers ``distributed_config`` / ``tp_plan``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def weight_of(module: torch.nn.Module, name: str = "weight") -> Tensor | None:
    """A real (non-meta) copy of ``module.<name>``, also when accelerate offloaded it to CPU or disk."""
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return None if t is None else t.detach()
    from accelerate.utils import align_module_device

    with align_module_device(module, execution_device(module)):
        return getattr(module, name).detach().clone()


def state_dict_of(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as real CPU tensors, also where accelerate offloaded them (``meta`` entries are
    read module by module through ``weight_of``)."""
    out = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            owner, _, attr = name.rpartition(".")
            t = weight_of(model.get_submodule(owner), attr)
        out[name] = t.detach().cpu()
    return out


def like(t: Tensor, act: Tensor) -> Tensor:
    """``t`` on ``act``'s device and dtype (sources, bases and directions meet activations where they live)."""
    return t.to(device=act.device, dtype=act.dtype)


def tp_shim() -> None:
    """nnsight 0.8.1 imports ``_get_parameter_plan`` from ``transformers.distributed.tensor_parallel``;
    transformers 5.24 moved it to ``transformers.distributed.parallel_utils``. Re-export it (idempotent)."""
    try:
        import transformers.distributed.tensor_parallel as tp
    except ImportError:  # pragma: no cover - transformers without the distributed package
        return
    if not hasattr(tp, "_get_parameter_plan"):
        from transformers.distributed.parallel_utils import _get_parameter_plan

        tp._get_parameter_plan = _get_parameter_plan


def wrap(model: torch.nn.Module):
    """The nnsight wrapper for ``model``, placement-aware.

    Inputs go to ``input_device(model)`` (never ``meta``); a tensor-parallel model gets nnsight's
    ``TPFragments`` so sharded activations are read (and written) whole on every rank.
    """
    kwargs = {}
    if is_tensor_parallel(model):
        tp_shim()
        from nnsight.intervention.interleaver import Interleaver
        from nnsight.modeling.tp import TPFragments

        kwargs["interleaver"] = Interleaver(fragments=TPFragments())
    return _placed_nnsight()(model, **kwargs)


@functools.cache
def _placed_nnsight():
    from nnsight import NNsight

    class PlacedNNsight(NNsight):
        """``NNsight`` whose ``device`` (where nnsight moves inputs) is ``input_device(model)``."""

        @property
        def device(self) -> torch.device:
            return input_device(self._module)

    return PlacedNNsight


def __getattr__(name):  # PlacedNNsight is built lazily so importing this module does not import nnsight
    if name == "PlacedNNsight":
        return _placed_nnsight()
    raise AttributeError(name)

"""Safe checkpoint loading for possibly malicious vision-language models.

The models this library studies may be backdoored on purpose, so loading treats a checkpoint as
untrusted data:

- no code from the checkpoint runs: ``trust_remote_code`` is off unless the caller passes it, and
  while it is off the config, model and processor classes are taken from transformers itself
  (an ``auto_map`` or a ``*.py`` file in the folder is ignored, never imported);
- weights are read from safetensors only; a folder holding only pickle-based weights
  (``pytorch_model.bin``, ``*.pt``, ...) is refused with the conversion to run in a sandbox, or,
  behind ``allow_pickle=True``, read with ``torch.load(weights_only=True)``;
- nothing is written into the checkpoint folder;
- a provenance dict records what exactly was loaded (resolved folder, hub commit, sha256 of every
  weight file and of the config, classes, dtype, device map).

Big models: ``device_map`` ("auto", "balanced", "balanced_low_0", "sequential", a device, or an
explicit ``{module: device}`` dict, where a device may be ``"cpu"`` or ``"disk"``), ``max_memory``
and ``offload_folder`` go to accelerate's placement through transformers. ``"disk"`` as the whole
map (which accelerate refuses as a string) means ``{"": "disk"}``; anything on disk needs
``offload_folder``, checked before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from projlens_mi.errors import ProjLensError
from projlens_mi.settings import DEVICE_MAP_STRATEGIES

WEIGHTS_SAFE = "model.safetensors"
WEIGHTS_SAFE_INDEX = "model.safetensors.index.json"
WEIGHTS_PICKLE = "pytorch_model.bin"
WEIGHTS_PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files that are pickles but never model weights (trainer state); never loaded, never a reason to refuse.
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                   "tokenizer.json")
# Hub downloads fetch only data files: never code, never pickles unless asked for.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
CONVERT_HINT = (
    "convert them to safetensors in a sandbox (a throw-away container or VM), e.g. "
    "python -c \"import torch; from safetensors.torch import save_file; "
    "sd = torch.load('{name}', weights_only=True); "
    "save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, 'model.safetensors', metadata={{'format': 'pt'}})\" "
    "run inside a copy of the folder, or pass allow_pickle=True to read them with torch.load(weights_only=True)"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

def load_checkpoint(
    source: str | os.PathLike,
    *,
    processor: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | int | dict | torch.device | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    tp_size: int | None = None,
) -> tuple[torch.nn.Module, Any, dict]:
    """Load a vision-language model folder or hub id safely; return ``(model, processor, provenance)``.

    Args:
        source: a folder written by ``save_pretrained`` (config.json + safetensors + processor
            files), or a hub id (``"org/name"``) found in, or downloaded to, the HF cache.
        processor: a processor object, or a folder / hub id to load one from; by default the
            checkpoint's own processor files are used.
        allow_pickle: accept pickle-based weights when no safetensors exist, read with
            ``torch.load(weights_only=True)`` (tensors only, no code).
        trust_remote_code: run the checkpoint's own Python code (``auto_map``). Off by default:
            only do this in a sandbox.
        revision: a branch, tag or commit of a hub id (hub ids only).
        device_map, max_memory, offload_folder: accelerate placement (see module docstring).
            ``max_memory`` without a ``device_map`` implies ``device_map="auto"``.
        dtype: ``torch.float32``, ``"bfloat16"``, ... or ``"auto"`` (the checkpoint's dtype).
        tp_size: shard the model over ``tp_size`` ranks with transformers tensor parallelism
            (``distributed_config=DistributedConfig(tp_size=...)``); the script must be launched with
            ``torchrun --nproc_per_node <tp_size>`` and every rank calls this function.
    """
    device_map, max_memory, offload_folder, dtype = _check_placement(device_map, max_memory,
                                                                      offload_folder, dtype)
    _check_tp(tp_size, device_map, offload_folder)
    folder, commit, where = _resolve(source, revision, allow_pickle, trust_remote_code)
    if offload_folder is not None and _inside(offload_folder, folder):
        raise ProjLensError(f"offload_folder {offload_folder} is inside the checkpoint folder {folder}; "
                            "choose a folder elsewhere so the checkpoint stays untouched")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ProjLensError(f"no config.json in {folder}: this is not a model folder; pass the folder that "
                            "model.save_pretrained(...) wrote (config.json + model.safetensors)")
    raw = _read_json(config_path)
    config = _load_config(folder, raw, trust_remote_code)
    fmt, weight_files = _weight_files(folder, allow_pickle)
    proc = _load_processor(processor, folder, trust_remote_code)
    hashes = {str(f.relative_to(folder)): _sha256(f) for f in weight_files}
    model = _load_model(folder, config, raw, fmt, weight_files, trust_remote_code=trust_remote_code,
                        device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                        dtype=dtype, tp_size=tp_size)
    provenance = {
        "source": str(source),
        "origin": where,
        "folder": str(folder),
        "revision": commit,
        "requested_revision": revision,
        "weights_format": fmt,
        "weight_files": hashes,
        "config_sha256": _sha256(config_path),
        "model_type": getattr(config, "model_type", None),
        "config_class": _qualname(type(config)),
        "model_class": _qualname(type(model)),
        "processor_class": _qualname(type(proc)),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device_map": _device_map_of(model),
        "offload_folder": str(offload_folder) if offload_folder is not None else None,
        "tensor_parallel": _tp_info(tp_size),
        "trust_remote_code": bool(trust_remote_code),
        "allow_pickle": bool(allow_pickle),
        "versions": _versions(),
    }
    return model, proc, provenance


# ----------------------------------------------------------------------------------------------
# Resolving the source to a local folder
# ----------------------------------------------------------------------------------------------

def _resolve(source, revision, allow_pickle, trust_remote_code) -> tuple[Path, str | None, str]:
    """Return (absolute folder, commit hash or None, "local" | "hub")."""
    if isinstance(source, torch.nn.Module):
        raise ProjLensError("load_checkpoint takes a folder or hub id, not a model object; use "
                            "projlens_mi.model.load(model, processor=...) to wrap an in-memory model")
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ProjLensError(f"model source must be a folder path or a hub id like 'org/name', "
                            f"got {type(source).__name__} {source!r}")
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ProjLensError(f"{text} is a file; pass the folder that holds it and its config.json")
        folder = path.resolve()
        commit = _commit_of_cache_snapshot(folder)
        if revision is not None and revision != commit:
            raise ProjLensError(f"revision={revision!r} applies to hub ids, but {text} is a local folder; "
                                "drop revision, or check out that revision into the folder first")
        return folder, commit, "local"
    looks_like_path = (isinstance(source, os.PathLike) or text.startswith(("/", ".", "~", "\\"))
                       or text.count("/") > 1 or "\\" in text or not _HUB_ID.match(text))
    if looks_like_path:
        raise ProjLensError(f"no such folder: {text}; check the path (it must be a folder with config.json "
                            "and model.safetensors)")
    return _from_hub(text, revision, allow_pickle, trust_remote_code)


def _from_hub(repo_id: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool):
    from huggingface_hub import snapshot_download
    from huggingface_hub import constants as hub_constants

    patterns = list(HUB_PATTERNS)
    if allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    if trust_remote_code:
        patterns += ["*.py"]
    offline = bool(hub_constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   local_files_only=offline)
    except Exception as exc:  # every hub failure becomes one actionable line
        why = " ".join(str(exc).split())[:160]
        mode = "offline (HF_HUB_OFFLINE=1)" if offline else "online"
        raise ProjLensError(
            f"hub model {repo_id!r} (revision {revision or 'main'}) is not a local folder and could not be "
            f"found in the Hugging Face cache {hub_constants.HF_HUB_CACHE} ({mode}: {type(exc).__name__}: {why}); "
            f"pass a local folder, or fetch it first on a machine with network access "
            f"(hf download {repo_id}) and point HF_HUB_CACHE at that cache") from None
    folder = Path(folder).resolve()
    return folder, _commit_of_cache_snapshot(folder), "hub"


def _commit_of_cache_snapshot(folder: Path) -> str | None:
    """The commit hash when ``folder`` is ``.../models--org--name/snapshots/<commit>``."""
    if folder.parent.name == "snapshots" and _COMMIT.match(folder.name):
        return folder.name
    return None


# ----------------------------------------------------------------------------------------------
# Config, weights, processor
# ----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProjLensError(f"{path} is not valid JSON ({type(exc).__name__}: {exc}); "
                            "re-save the model with save_pretrained") from None
    if not isinstance(data, dict):
        raise ProjLensError(f"{path} must hold a JSON object; re-save the model with save_pretrained")
    return data


def _load_config(folder: Path, raw: dict, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if trust_remote_code:
        try:
            return AutoConfig.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
        except Exception as exc:
            raise ProjLensError(f"could not read the config in {folder} ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]}); check config.json") from None
    if not model_type or model_type not in CONFIG_MAPPING:
        custom = " (its auto_map points to code shipped with the checkpoint)" if "auto_map" in raw else ""
        raise ProjLensError(
            f"config.json in {folder} has model_type {model_type!r}, which transformers does not ship{custom}; "
            "projlens_mi does not run checkpoint code by default: use a transformers architecture, or pass "
            "trust_remote_code=True only inside a sandbox")
    # The config class comes from transformers itself; auto_map is never consulted.
    try:
        return CONFIG_MAPPING[model_type].from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ProjLensError(f"could not read {folder / 'config.json'} as a {model_type} config "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                            "re-save it with save_pretrained") from None


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[str, list[Path]]:
    """Which files will be loaded: ("safetensors" | "pickle", files)."""
    index = folder / WEIGHTS_SAFE_INDEX
    if index.is_file():
        return "safetensors", _index_shards(folder, index)
    if (folder / WEIGHTS_SAFE).is_file():
        return "safetensors", [folder / WEIGHTS_SAFE]
    pickles = sorted(p for p in folder.iterdir()
                     if p.is_file() and p.name.endswith(PICKLE_SUFFIXES) and p.name not in NOT_WEIGHTS)
    other_safe = sorted(p.name for p in folder.glob("*.safetensors"))
    if pickles:
        names = ", ".join(p.name for p in pickles[:3]) + (" ..." if len(pickles) > 3 else "")
        if not allow_pickle:
            raise ProjLensError(f"{folder} holds only pickle-based weights ({names}), which can run code when "
                                f"loaded; refused. To load it, " + CONVERT_HINT.format(name=pickles[0].name))
        pindex = folder / WEIGHTS_PICKLE_INDEX
        if pindex.is_file():
            return "pickle", _index_shards(folder, pindex)
        if (folder / WEIGHTS_PICKLE).is_file():
            return "pickle", [folder / WEIGHTS_PICKLE]
        if len(pickles) > 1:
            raise ProjLensError(f"{folder} holds several pickle files ({names}) and no index; convert the "
                                "model's weights to one model.safetensors (see the error without allow_pickle)")
        return "pickle", pickles
    if other_safe:
        raise ProjLensError(f"{folder} has safetensors files ({', '.join(other_safe[:3])}) but no "
                            f"{WEIGHTS_SAFE} or {WEIGHTS_SAFE_INDEX}; rename the full model's weights to "
                            f"{WEIGHTS_SAFE} (adapters alone are not a model)")
    raise ProjLensError(f"no weights in {folder} (expected {WEIGHTS_SAFE} or {WEIGHTS_SAFE_INDEX}); "
                        "save the model with model.save_pretrained(folder)")


def _index_shards(folder: Path, index: Path) -> list[Path]:
    data = _read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ProjLensError(f"{index} has no weight_map; re-save the model with save_pretrained")
    shards = []
    for name in sorted(set(weight_map.values())):
        p = (folder / name).resolve()
        if not _inside(p, folder):
            raise ProjLensError(f"{index} points outside the model folder ({name}); refused, re-save the model")
        if not p.is_file():
            raise ProjLensError(f"{index} lists {name}, which is missing from {folder}; download the missing shard")
        shards.append(p)
    return shards


def _load_processor(processor, folder: Path, trust_remote_code: bool):
    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        return processor
    if processor is not None:
        pfolder, _, _ = _resolve(processor, None, False, trust_remote_code)
    else:
        pfolder = folder
        if not any((folder / f).is_file() for f in PROCESSOR_FILES):
            raise ProjLensError(
                f"no processor in {folder} (none of {', '.join(PROCESSOR_FILES)}); pass processor= (an "
                "AutoProcessor, or the base model's folder), or save one next to the weights with "
                "processor.save_pretrained(folder)")
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(pfolder, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise ProjLensError(f"could not load the processor from {pfolder} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}); pass processor= explicitly") from None


def _model_class(config, raw: dict):
    """The transformers class for this config, chosen from transformers itself, never from auto_map."""
    import transformers
    from transformers import PreTrainedModel

    for name in raw.get("architectures") or []:
        cls = getattr(transformers, str(name), None) if str(name).isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is type(config):
            return cls
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        mapping = auto._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise ProjLensError(f"transformers has no image-text-to-text model class for model_type "
                        f"{getattr(config, 'model_type', None)!r}; load the model yourself and pass it to "
                        "projlens_mi.model.load(model, processor=...)")


def _load_model(folder, config, raw, fmt, weight_files, *, trust_remote_code, device_map, max_memory,
                offload_folder, dtype, tp_size=None):
    # ignore_mismatched_sizes: transformers then reports the mismatched tensors (refused below, by name)
    # instead of raising a RuntimeError that points at a log table.
    kwargs: dict[str, Any] = {"config": config, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if tp_size is not None:
        from transformers.distributed import DistributedConfig

        from .placement import tp_shim

        tp_shim()  # nnsight 0.8.1 + transformers 5.24: see placement.tp_shim
        kwargs["distributed_config"] = DistributedConfig(tp_size=tp_size)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if trust_remote_code:
        from transformers import AutoModelForImageTextToText

        cls, kwargs["trust_remote_code"] = AutoModelForImageTextToText, True
    else:
        cls = _model_class(config, raw)
    try:
        if fmt == "safetensors":
            model, info = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs)
        elif weight_files[0].name.startswith("pytorch_model"):
            # transformers' own .bin path, pinned to weights_only=True (tensors only, no code).
            model, info = cls.from_pretrained(folder, use_safetensors=False, weights_only=True,
                                              local_files_only=True, **kwargs)
        else:
            state_dict = _torch_load_tensors(weight_files[0])
            kwargs.pop("trust_remote_code", None)
            model, info = cls.from_pretrained(None, state_dict=state_dict, **kwargs)
    except ProjLensError:
        raise
    except pickle.UnpicklingError:   # transformers' own .bin path, refused by weights_only=True
        raise ProjLensError(_pickle_refused(", ".join(f.name for f in weight_files[:3]))) from None
    except Exception as exc:
        raise ProjLensError(_placement_message(exc, folder)) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"missing {missing[:4]}" if missing else "shape-mismatched " + ", ".join(map(_mismatch, mismatched[:4]))
        raise ProjLensError(f"the weights in {folder} do not fit the config ({what}"
                            f"{' ...' if len(missing) + len(mismatched) > 4 else ''}); those parameters would be "
                            "random: check that config.json and the weights belong to the same model")
    return model.eval()


def _mismatch(entry) -> str:
    """``name (checkpoint [a, b], model [c, d])`` for one of transformers' mismatched keys."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        name, ckpt, want = entry
        return f"{name} (checkpoint {list(ckpt)}, model {list(want)})"
    return str(entry[0] if isinstance(entry, (tuple, list)) else entry)


def _pickle_refused(names: str) -> str:
    # torch's own message advises weights_only=False (which runs the file's code); it is not repeated.
    return (f"{names} holds objects other than tensors (a pickle can carry code that runs when it is loaded); "
            "torch.load(weights_only=True) refused it and projlens_mi will not load it any other way: "
            "convert the weights to model.safetensors in a sandbox (a throw-away container or VM), "
            "and only if you trust where the file came from")


def _torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        raise ProjLensError(_pickle_refused(path.name)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ProjLensError(f"{path.name} is not a state dict of tensors; save model.state_dict() (or convert it "
                            "to model.safetensors)")
    return obj


def _placement_message(exc: Exception, folder: Path) -> str:
    text = " ".join(str(exc).split())
    if "offload" in text.lower() and "folder" in text.lower():
        return ("the device map sends weights to disk but no offload_folder was given; pass "
                "offload_folder=<an empty folder outside the checkpoint> or raise max_memory")
    return (f"could not load the model from {folder} ({type(exc).__name__}: {text[:240]}); "
            "check the device_map / max_memory / dtype arguments and the checkpoint files")


# ----------------------------------------------------------------------------------------------
# Placement arguments
# ----------------------------------------------------------------------------------------------

def _check_placement(device_map, max_memory, offload_folder, dtype):
    if device_map is not None:
        if isinstance(device_map, torch.device):
            device_map = str(device_map)
        if device_map == "disk":   # accelerate refuses the string; the same placement as a table works
            device_map = {"": "disk"}
        if isinstance(device_map, str):
            if device_map not in DEVICE_MAP_STRATEGIES:
                try:
                    torch.device(device_map)
                except (RuntimeError, ValueError):
                    raise ProjLensError(
                        f"device_map={device_map!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) "
                        "nor a device ('cpu', 'cuda:0', ...); pass one of those or a {module: device} dict") from None
        elif isinstance(device_map, dict):
            if not device_map:
                raise ProjLensError("device_map is an empty dict; map module names to devices, e.g. {'': 'cpu'}")
            for k, v in device_map.items():
                if not isinstance(k, str) or not isinstance(v, (str, int, torch.device)):
                    raise ProjLensError(f"device_map entry {k!r}: {v!r} is not 'module name': device "
                                        "(e.g. 'model.vision_tower': 0, 'lm_head': 'cpu', '...': 'disk')")
        elif not isinstance(device_map, int) or isinstance(device_map, bool):
            raise ProjLensError(f"device_map must be a strategy name, a device or a dict, got "
                                f"{type(device_map).__name__}")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise ProjLensError("max_memory must be a dict like {0: '20GiB', 'cpu': '64GiB'}")
        if device_map is None:
            device_map = "auto"
    if isinstance(device_map, dict) and "disk" in map(str, device_map.values()) and offload_folder is None:
        raise ProjLensError("the device map sends weights to disk but no offload_folder was given; pass "
                            "offload_folder=<an empty folder outside the checkpoint>")
    if offload_folder is not None:
        offload_folder = Path(offload_folder).expanduser().resolve()
        if offload_folder.exists() and not offload_folder.is_dir():
            raise ProjLensError(f"offload_folder {offload_folder} is a file; pass a folder")
    if dtype is not None:
        if isinstance(dtype, str) and dtype != "auto":
            resolved = getattr(torch, dtype.replace("torch.", ""), None)
            if not isinstance(resolved, torch.dtype):
                raise ProjLensError(f"dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16', "
                                    "'float16' or 'auto'")
            dtype = resolved
        elif not isinstance(dtype, (str, torch.dtype)):
            raise ProjLensError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}")
    return device_map, max_memory, offload_folder, dtype


def _check_tp(tp_size, device_map, offload_folder) -> None:
    if tp_size is None:
        return
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ProjLensError(f"tp_size must be a positive int (the number of ranks), got {tp_size!r}")
    if device_map is not None or offload_folder is not None:
        raise ProjLensError("tp_size shards every layer over the ranks; it cannot be combined with device_map / "
                            "max_memory / offload_folder: pass one or the other")
    require_ranks(tp_size, f"torchrun --nproc_per_node {tp_size} <script.py> (every rank loads)")


def require_ranks(tp_size: int, launch: str) -> None:
    """Raise unless this process is one of ``tp_size`` torchrun ranks; ``launch`` is the command to start them."""
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    if world != tp_size:
        raise ProjLensError(f"tp_size={tp_size} needs {tp_size} processes, found WORLD_SIZE={world or 'unset'}; "
                            f"launch: {launch}")


def _tp_info(tp_size) -> dict | None:
    if tp_size is None:
        return None
    return {"tp_size": tp_size, "rank": torch.distributed.get_rank(),
            "world_size": torch.distributed.get_world_size(),
            "backend": str(torch.distributed.get_backend())}


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def _inside(path, folder) -> bool:
    path, folder = Path(path).expanduser().resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _sha256(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _device_map_of(model) -> dict[str, str]:
    dm = getattr(model, "hf_device_map", None)
    if dm:
        return {k: str(v) for k, v in dm.items()}
    try:
        return {"": str(next(model.parameters()).device)}
    except StopIteration:
        return {"": "cpu"}


def _versions() -> dict[str, str]:
    import accelerate
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}

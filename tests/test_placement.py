"""Past one device: every read, edit and gradient gives the in-memory numbers on a placed model.

On CPU, accelerate's offload stands in for several GPUs: the same hooks move weights and
activations between "devices" (here the CPU, a CPU weight store and the disk) that a GPU split
uses. Each placement must give exactly (bit for bit) the numbers of the plain in-memory model.
The 2-process tensor-parallel run (gloo, torchrun) is at the end of the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from projlens_mi.engine import (ImageTokens, ImageWindow, LastToken, Patch, PatchSubspace, ProjectOut, Site,
                                WithWeights, run)
from projlens_mi.engine.metrics import generate, target_logprob
from projlens_mi.engine.sweep import sweep
from projlens_mi.model import load
from projlens_mi.model.handle import ModelHandle
from projlens_mi.model.load import load_checkpoint
from projlens_mi.model.placement import input_device, is_dispatched, weight_of
from tiny import PROMPT, tiny_images, tiny_llava

LAYERS = 3
POINTS = (["llm.embed", "vision.out", "projector.in", "projector.hidden", "projector.out"]
          + [f"llm.{i}.{k}" for i in range(LAYERS) for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
          + ["logits"])
LINEAR_1 = "model.multi_modal_projector.linear_1"


def _handle(model, processor, provenance=None) -> ModelHandle:
    return ModelHandle(model, processor, provenance=provenance or {})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    model, processor = tiny_llava(seed=5, layers=LAYERS)
    out = tmp_path_factory.mktemp("placed") / "llava"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(folder):
    return _handle(*load_checkpoint(folder))


@pytest.fixture(scope="module")
def inputs(reference):
    return reference.encode((tiny_images(3, seed=2), [PROMPT] * 3))


@pytest.fixture(scope="module")
def basis():
    return torch.linalg.qr(torch.randn(48, 4, generator=torch.Generator().manual_seed(0)))[0]


@pytest.fixture(scope="module")
def injection(reference):
    """A rank-2 change of the projector's first linear, as the analyses' rank-k injection builds it."""
    g = torch.Generator().manual_seed(1)
    W = weight_of(reference.module(LINEAR_1))
    u, v = torch.randn(W.shape[0], 2, generator=g), torch.randn(2, W.shape[1], generator=g)
    return 0.1 * (u @ v)


def _suite(h: ModelHandle, inputs, basis, injection, cached_source=None) -> dict:
    """Every site read, one patch (in-batch and from a cached tensor), two subspace edits, one
    gradient and a rank-k weight injection; everything brought back as plain CPU tensors."""
    out = {}
    r = run(h, inputs, read=POINTS)
    out.update({f"read:{k.point}": v for k, v in r.cache.items()})
    out["logits"] = r.logits
    out["patch_row"] = run(h, inputs, edits=[(Site("projector.out"), Patch(source_row=0), [1, 2])]).logits
    # a cached activation of other rows (row 2 takes row 1's), as a tensor from the caller's device
    src = (cached_source if cached_source is not None else r.cache[Site("llm.1.resid_post")]).roll(1, dims=0)
    out["patch_cached"] = run(h, inputs, edits=[(Site("llm.1.resid_post", ImageWindow(2, 6)),
                                                 Patch(source=src), [2])]).logits
    out["project_out"] = run(h, inputs, read=["llm.2.resid_post"], edits=[
        (Site("llm.1.resid_post", ImageTokens()), ProjectOut(basis))]).logits
    out["patch_subspace"] = run(h, inputs, edits=[
        (Site("projector.out"), PatchSubspace(basis, source_row=0), [1, 2])]).logits
    g = run(h, inputs, read=["projector.out", "llm.0.resid_post", Site("llm.2.resid_post", LastToken(), basis)],
            grad_of=lambda logits: logits[:, -1, 5].sum())
    out.update({f"grad:{k!r}": v for k, v in g.grads.items()})
    out["metric"] = g.metric
    W = weight_of(h.module(LINEAR_1))
    out["rank_k"] = run(h, inputs, edits=[WithWeights({LINEAR_1: (W + injection, None)})]).logits
    # a packed sweep (LLM-layer cells reuse inputs_embeds and skip early layers; a projector cell)
    cells = {("patch", i): [(Site(f"llm.{i}.resid_post", ImageTokens()), Patch(source_row=0))] for i in range(LAYERS)}
    cells[("ablate", "projector")] = [(Site("projector.out"), ProjectOut(basis))]
    frame = sweep(h, inputs, cells, lambda logits, idx: logits[:, -1, 5], batch_size=4, progress=False)
    out["sweep"] = torch.tensor(frame["value"].to_numpy())
    # greedy generation, plain and with a projector edit, and a teacher-forced log-prob
    out["generate"] = generate(h, inputs, max_new_tokens=4)
    out["generate_edited"] = generate(h, inputs, max_new_tokens=4, edits=[(Site("projector.out"), ProjectOut(basis))])
    out["logprob"] = target_logprob(h, inputs, ["seven eight"] * len(inputs))
    return out


@pytest.fixture(scope="module")
def expected(reference, inputs, basis, injection):
    return _suite(reference, inputs, basis, injection)


def _disk(folder, tmp):
    return {"device_map": {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
                           "model.language_model": "disk", "lm_head": "cpu"}, "offload_folder": tmp}


PLACEMENTS = {
    # the first module the forward runs (the vision tower) lives on disk
    # (through the public entry point projlens_mi.model.load)
    "first_module_on_disk": lambda folder, tmp: load(folder, **_disk(folder, tmp)),
    # every module offloaded to disk, weights streamed in per module
    "all_on_disk": lambda folder, tmp: _handle(*load_checkpoint(folder, device_map={"": "disk"},
                                                                offload_folder=tmp)),
    # max_memory-driven "auto" placement: the budget splits the LLM's layers between CPU and disk
    "auto_max_memory": lambda folder, tmp: _handle(*load_checkpoint(folder, max_memory={"cpu": "300KB"},
                                                                    offload_folder=tmp)),
    # accelerate's CPU-offload hooks on an in-memory model (weights in a CPU store, params on meta)
    "cpu_offload_hooks": lambda folder, tmp: _offloaded(folder, tmp, "cpu"),
    # accelerate's disk-offload hooks on an in-memory model
    "disk_offload_hooks": lambda folder, tmp: _offloaded(folder, tmp, "disk"),
}


def _offloaded(folder, tmp, kind):
    from accelerate import cpu_offload, disk_offload

    model, processor, prov = load_checkpoint(folder)
    if kind == "cpu":
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        disk_offload(model, offload_dir=str(tmp), execution_device=torch.device("cpu"))
    return _handle(model, processor, prov)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placed_model_gives_in_memory_numbers(placement, folder, inputs, basis, injection, expected, tmp_path):
    h = PLACEMENTS[placement](folder, tmp_path / "offload")
    assert is_dispatched(h.model)
    assert any(p.device.type == "meta" for p in h.model.parameters())  # really offloaded
    assert input_device(h.model) == torch.device("cpu") and h.device == torch.device("cpu")
    if not placement.endswith("_hooks"):  # loaded from the folder with a device map: the placement is recorded
        assert "disk" in h.provenance["device_map"].values()
    before = {n: weight_of(m, "weight") for n, m in h.model.named_modules() if hasattr(m, "weight")
              and isinstance(getattr(m, "weight"), torch.Tensor)}
    got = _suite(h, inputs, basis, injection, cached_source=expected["read:llm.1.resid_post"])
    assert got.keys() == expected.keys()
    assert expected["generate"] != expected["generate_edited"]
    assert len([k for k in got if k.startswith("read:")]) == len(POINTS)
    assert len([k for k in got if k.startswith("grad:")]) == 3
    assert got.pop("generate") == expected["generate"] and got.pop("generate_edited") == expected["generate_edited"]
    for key, want in expected.items():
        if key.startswith("generate"):
            continue
        have = got[key]
        assert have.device.type == "cpu", key  # results come back on the caller's device
        assert have.shape == want.shape and torch.equal(have, want), key
    # the edits moved the numbers (so equality above is not vacuous) ...
    for key in ("patch_row", "patch_cached", "project_out", "patch_subspace", "rank_k"):
        assert not torch.equal(got[key], expected["logits"]), key
    assert float(got["grad:Site('projector.out')"].abs().sum()) > 0
    # ... and never the model: every weight reads back bit-identical, still offloaded
    for n, m in h.model.named_modules():
        if n in before:
            assert torch.equal(weight_of(m, "weight"), before[n]), n
    assert any(p.device.type == "meta" for p in h.model.parameters())


def test_weight_of_reads_offloaded_weights(folder, reference, tmp_path):
    h = PLACEMENTS["all_on_disk"](folder, tmp_path / "off")
    lin = h.module(LINEAR_1)
    assert lin.weight.device.type == "meta"
    assert torch.equal(weight_of(lin), reference.module(LINEAR_1).weight)
    assert torch.equal(weight_of(lin, "bias"), reference.module(LINEAR_1).bias)
    assert lin.weight.device.type == "meta"  # read without re-materialising the module


# --------------------------------------------------------------------------------------------
# Tensor parallelism: 2 ranks, gloo, torchrun
# --------------------------------------------------------------------------------------------

TP_WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.mark.slow  # two torchrun processes: about 40 s on 2 shared CPUs
def test_tensor_parallel_two_ranks(folder, reference, tmp_path):
    from projlens_mi.model.placement import PlacedNNsight

    # the handle's wrapper adds nnsight's TPFragments on a sharded model (without: 'mixed torch.Tensor and DTensor')
    assert isinstance(reference.envoy, PlacedNNsight)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(TP_WORKER), str(folder), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2 and report["sharded"], report
        assert report["provenance_tp"] == {"tp_size": 2, "rank": rank, "world_size": 2, "backend": "gloo"}
        assert report["q_proj_local_rows"] == 24 and report["q_proj_read_width"] == 48  # read whole
        for key, err in report["max_abs_err"].items():
            assert err <= 1e-5, (rank, key, err)
        assert report["changed"]["patch"] and report["changed"]["project_out"], report
        assert set(report["max_abs_err"]) >= {"read:projector.out", "read:llm.1.resid_post",
                                             "read:llm.1.attn_out", "logits", "patch", "project_out",
                                             "grad:projector.out", "grad:llm.0.resid_post"}


def test_placement_helpers_on_a_plain_model(reference):
    import transformers.distributed.tensor_parallel as tpm

    from projlens_mi.model.placement import (PlacedNNsight, execution_device, is_tensor_parallel, like, tp_shim,
                                             wrap)

    m = reference.model
    assert not is_dispatched(m) and not is_tensor_parallel(m) and execution_device(m) is None
    assert input_device(m) == torch.device("cpu")
    lin = reference.module(LINEAR_1)
    assert weight_of(lin) is not None and weight_of(lin).data_ptr() == lin.weight.data_ptr()  # no copy needed
    assert weight_of(lin, "missing") is None
    env = wrap(m)
    assert isinstance(env, PlacedNNsight) and env.device == torch.device("cpu")
    t = like(torch.ones(2, dtype=torch.float64), torch.zeros(1, dtype=torch.bfloat16))
    assert t.dtype == torch.bfloat16
    tp_shim()
    tp_shim()  # idempotent
    assert callable(tpm._get_parameter_plan)


def test_analyses_rank_k_injection_on_placed_models(folder, reference, inputs, tmp_path):
    """The injection analysis' cells (W_ref + top-k(ΔW), FT bias) as WithWeights edits on a placed model."""
    from projlens_mi.analyses import common, injection
    ref = common.weights(reference)
    g = torch.Generator().manual_seed(2)
    ft = {p: (W + 0.05 * torch.randn(W.shape, generator=g, dtype=torch.float64), b) for p, (W, b) in ref.items()}
    svds = {p: common.svd(ft[p][0] - ref[p][0]) for p in ref}
    cells = [injection.injected_weights(ref, ft, svds, {p: k for p in ref}, "ft") for k in (1, 3)]
    want = [run(reference, inputs, edits=[WithWeights(injection.to_model(reference, c))]).logits for c in cells]
    assert not torch.equal(want[0], want[1])
    for placement in ("all_on_disk", "cpu_offload_hooks"):
        h = PLACEMENTS[placement](folder, tmp_path / placement)
        got = [run(h, inputs, edits=[WithWeights(injection.to_model(h, c))]).logits for c in cells]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), placement
        mine = common.weights(h)  # the analyses read the projector's own weights from the placed model too
        assert all(torch.equal(mine[p][0], ref[p][0]) and torch.equal(mine[p][1], ref[p][1]) for p in ref)


# --------------------------------------------------------------------------------------------
# Results come back on the caller's device
# --------------------------------------------------------------------------------------------

def _plain_on(t, device) -> bool:
    return type(t) is torch.Tensor and t.device == device and not t.requires_grad


def test_results_come_back_on_the_callers_device(folder, reference, inputs, tmp_path):
    """A model split over "cpu" and "disk" (the LLM's later layers and the LM head as meta
    parameters streamed from disk): logits, every cached value, every gradient and the metric
    are plain tensors on ``handle.device``, equal to the in-memory numbers."""
    dm = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
          "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
          "model.language_model.layers.1": "disk", "model.language_model.layers.2": "disk",
          "model.language_model.norm": "disk", "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}
    h = load(folder, device_map=dm, offload_folder=tmp_path / "offload")
    assert h.model.lm_head.weight.device.type == "meta" and h.device == torch.device("cpu")
    read = ["projector.out", "llm.0.resid_post", Site("llm.2.resid_post", ImageTokens()), "logits"]
    metric = lambda logits: logits[:, -1, 5].sum()  # noqa: E731
    for grad_of in (None, metric):
        want = run(reference, inputs, read=read, grad_of=grad_of)
        got = run(h, inputs, read=read, grad_of=grad_of)
        assert _plain_on(got.logits, h.device) and torch.equal(got.logits, want.logits)
        assert got.cache.keys() == want.cache.keys() and len(got.cache) == len(read)
        for k in want.cache:
            assert _plain_on(got.cache[k], h.device) and torch.equal(got.cache[k], want.cache[k]), k
        assert got.grads.keys() == want.grads.keys()
        for k in want.grads:
            assert _plain_on(got.grads[k], h.device) and torch.equal(got.grads[k], want.grads[k]), k
        if grad_of is not None:
            assert len(got.grads) == len(read) and _plain_on(got.metric, h.device)
            assert torch.equal(got.metric, want.metric)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the LLM's layers on the CPU, inputs on cuda:0")
def test_results_come_back_on_the_input_gpu(folder, reference, inputs):
    """On a GPU machine: the vision side on cuda:0, the LLM and LM head on the CPU. Reads of the
    LLM's layers and the gradients there are computed on the CPU and returned on cuda:0."""
    dm = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model": "cpu", "lm_head": "cpu"}
    h = load(folder, device_map=dm)
    assert h.device == torch.device("cuda:0")
    read = ["projector.out", "llm.2.resid_post", "logits"]
    got = run(h, inputs, read=read, grad_of=lambda logits: logits[:, -1, 5].sum())
    want = run(reference, inputs, read=read, grad_of=lambda logits: logits[:, -1, 5].sum())
    for v in (got.logits, *got.cache.values(), *got.grads.values(), got.metric):
        assert v.device == h.device
    for k in want.cache:
        torch.testing.assert_close(got.cache[k].cpu(), want.cache[k], rtol=1e-4, atol=1e-5)
    for k in want.grads:
        torch.testing.assert_close(got.grads[k].cpu(), want.grads[k], rtol=1e-4, atol=1e-5)

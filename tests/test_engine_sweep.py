"""Sweeps equal their cells run one at a time, whatever the batch size, up to float32 rounding.

A sweep's pass holds other rows (other cells, other inputs) and, with prefix reuse, fewer positions
than the one-cell run: other matrix shapes, which some CPU kernels round differently (measured:
MKL's AVX2 path on an AVX-512 Xeon). So the comparison allows float32 rounding of the logits'
magnitude (tests/numerics.py); on the CPUs measured with their default kernels the tables were
equal bit for bit (docs/reproducibility.md)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from projlens_mi import Ablate, ImageWindow, LastToken, Noise, Patch, PatchSubspace, Site, Steer, WithWeights, load, run
from projlens_mi.engine import run_cell, sweep
from projlens_mi.errors import ProjLensError

from numerics import EPS32, f32_tol
from tiny import PROMPT, tiny_images, tiny_llava

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)

N = 5


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_llava()
    handle = load(model, processor=processor)
    inputs = handle.encode(tiny_images(N), [PROMPT] * 4 + [PROMPT + " two"])
    corrupt = handle.encode(tiny_images(N, seed=9), [PROMPT] * 4 + [PROMPT + " two"])
    clean = run(handle, corrupt, read=[f"llm.{i}.resid_pre" for i in range(3)] + ["projector.out"]).cache
    return handle, model, inputs, clean


def cells_for(handle, clean):
    basis = torch.linalg.qr(torch.randn(48, 3, generator=torch.Generator().manual_seed(0))).Q
    lin = handle.module("model.multi_modal_projector.linear_1")
    cells = {}
    for layer in range(3):
        for k in (0, 5, 15):
            cells[{"layer": layer, "pos": k}.__repr__()] = [
                (Site(f"llm.{layer}.resid_pre", ImageWindow(k, k + 1)), Patch(source=clean[f"llm.{layer}.resid_pre"]))]
    cells["proj"] = [(Site("projector.out", ImageWindow(0, 4)), Patch(source=clean["projector.out"]))]
    cells["subspace"] = [(Site("llm.1.resid_post", LastToken()), PatchSubspace(basis, source=clean["llm.2.resid_pre"]))]
    cells["steer-some-rows"] = [(Site("llm.2.mlp_out", LastToken()), Steer(torch.ones(48), 3.0), [1, 3])]
    cells["weights"] = [WithWeights({"linear_1": (lin.weight * 0.5, None)})]
    cells["none"] = []
    cells["logits"] = [(Site("logits", LastToken()), Ablate("zero"), [0])]
    return cells


def metric(logits, index):
    return logits[:, -1, 7] - logits[:, -1, 9]


def assert_close_values(got, want, scale, key=None):
    """``got`` equals ``want`` up to float32 rounding of a value computed from logits of magnitude ``scale``."""
    tol = f32_tol(scale)
    assert (got - want).abs().max().item() <= tol, (key, (got - want).abs().max().item() / (EPS32 * scale), "rounding steps")


@pytest.fixture(scope="module")
def scale(setup):
    """The magnitude of the logits the metrics are differences of (plus one: the edits move them)."""
    handle, _, inputs, _ = setup
    return 1.0 + run(handle, inputs).logits.abs().max().item()


@pytest.fixture(scope="module")
def reference(setup):
    handle, _, inputs, clean = setup
    cells = cells_for(handle, clean)
    return cells, {key: run_cell(handle, inputs, edits, metric) for key, edits in cells.items()}


@pytest.mark.parametrize("batch_size", [1, 3, 5, 17, 400])
def test_sweep_equals_cells_one_at_a_time(setup, reference, scale, batch_size):
    handle, _, inputs, _ = setup
    cells, refs = reference
    df = sweep(handle, inputs, cells, metric, batch_size=batch_size, progress=False)
    assert list(df.columns) == ["cell", "input", "value"] and len(df) == len(cells) * N
    for key, edits in cells.items():
        ref = refs[key]
        got = torch.tensor(df[df.cell == key].sort_values("input").value.to_numpy(), dtype=torch.float32)
        assert_close_values(got, ref, scale, key)
    assert (torch.tensor(df[df.cell == "none"].value.to_numpy()) - torch.tensor(df[df.cell == "proj"].value.to_numpy())
            ).abs().max() > 1e3 * f32_tol(scale)   # the cells really differ


def test_reuse_off_gives_the_same_table(setup, scale):
    handle, _, inputs, clean = setup
    cells = cells_for(handle, clean)
    a = sweep(handle, inputs, cells, metric, batch_size=8, progress=False)
    for reuse in (False, "layers"):
        b = sweep(handle, inputs, cells, metric, batch_size=8, progress=False, reuse=reuse)
        pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"), check_exact=True)
        assert_close_values(torch.tensor(b.value.to_numpy()), torch.tensor(a.value.to_numpy()), scale, reuse)


def test_dict_keys_become_columns_and_cross_row_cells(setup, scale):
    handle, _, inputs, _ = setup
    cells = [({"kind": "mean", "layer": 1}, [(Site("llm.1.resid_post", LastToken()), Ablate("mean"))]),
             ({"kind": "noise", "layer": 0}, [(Site("projector.out"), Noise(0.3, seed=1))]),
             ({"kind": "rome", "layer": 0}, [(Site("llm.0.resid_post", ImageWindow(0, 2)), Patch(source_row=0), [1, 2, 3])])]
    df = sweep(handle, inputs, cells, metric, batch_size=12, progress=False)
    assert list(df.columns) == ["kind", "layer", "input", "value"]
    for key, edits in cells:
        ref = run_cell(handle, inputs, edits, metric)
        got = torch.tensor(df[df.kind == key["kind"]].value.to_numpy(), dtype=torch.float32)
        assert_close_values(got, ref, scale, key)
    with pytest.raises(ProjLensError, match="cross-row edit .* use batch_size >= 5"):
        sweep(handle, inputs, cells, metric, batch_size=2, progress=False)


def test_sweep_errors(setup):
    handle, _, inputs, _ = setup
    with pytest.raises(ProjLensError, match="at least one cell"):
        sweep(handle, inputs, {}, metric)
    with pytest.raises(ProjLensError, match="a 3-D source needs one entry per input \\(5\\), got 2"):
        sweep(handle, inputs, {"a": [("llm.0.resid_pre", Patch(source=torch.zeros(2, 3, 48)))]}, metric, progress=False)
    with pytest.raises(ProjLensError, match="one value per row"):
        sweep(handle, inputs, {"a": []}, lambda lg, i: lg[:, -1], progress=False)
    with pytest.raises(ProjLensError, match=r"reuse='all': use True \(all reuses\), 'layers'"):
        sweep(handle, inputs, {"a": []}, metric, reuse="all")


@pytest.mark.parametrize("name", ["qwen2_vl", "idefics3", "gemma3", "llava_next"])
def test_sweep_on_other_families_equals_cells(name):
    """Flat projector output (Qwen2-VL), several images per row (Idefics3, LLaVA-NeXT), Gemma 3."""
    from projlens_mi.model import Inputs
    from tiny_families import FAMILIES
    f = FAMILIES[name]()
    handle = load(f.model)
    kw = dict(f.inputs)
    ids, pv = kw.pop("input_ids"), kw.pop("pixel_values")
    inputs = Inputs(ids, kw.pop("attention_mask", torch.ones_like(ids)), handle.image_mask(ids), pv, extra=kw)
    cells = {"proj": [(Site("projector.out", ImageWindow(0, 2)), Ablate("zero"))],
             "proj-row1": [(Site("projector.out"), Steer(torch.ones(f.model.config.get_text_config().hidden_size), 1.0), [1])],
             "l1": [(Site("llm.1.resid_pre", LastToken()), Ablate("zero"))],
             "none": []}
    df = sweep(handle, inputs, cells, metric, batch_size=3, progress=False)
    scale = 1.0 + run(handle, inputs).logits.abs().max().item()
    for key, edits in cells.items():
        got = torch.tensor(df[df.cell == key].value.to_numpy(), dtype=torch.float32)
        assert_close_values(got, run_cell(handle, inputs, edits, metric), scale, key)
    assert not torch.equal(torch.tensor(df[df.cell == "proj"].value.to_numpy()),
                           torch.tensor(df[df.cell == "none"].value.to_numpy()))


def test_prefix_reuse_at_every_position(setup, scale, monkeypatch):
    """Every (layer x token) cell, image tokens and text tokens alike, in left-padded rows: the passes
    that recompute only the positions after the first edited token (keys/values of the earlier ones
    from the unedited run's cache) equal the full one-cell-at-a-time forwards up to float32 rounding,
    also for a metric that reads every position; and the prefix reuse really ran."""
    import importlib

    from projlens_mi import Indices
    sweep_mod = importlib.import_module("projlens_mi.engine.sweep")   # the module (the package exports the function)
    handle, _, inputs, clean = setup
    seq = inputs.input_ids.shape[1]
    cells = {(L, p): [(Site(f"llm.{L}.resid_pre", Indices(p)), Patch(source=clean[f"llm.{L}.resid_pre"]))]
             for L in range(3) for p in range(seq)}
    cells[("both", 0)] = [(Site("llm.0.resid_post", ImageWindow(3, 5)), Ablate("zero")),
                          (Site("llm.2.mlp_out", LastToken()), Steer(torch.ones(48), 2.0), [0, 4])]
    starts = []
    real = sweep_mod.execute

    def spy(*a, prefix=0, **k):
        starts.append(prefix)
        return real(*a, prefix=prefix, **k)
    monkeypatch.setattr(sweep_mod, "execute", spy)

    def every_position(logits, index):   # any position's logits may enter the metric
        return logits[:, :, 3].sum(1) - 2 * logits[:, 1, 5]
    df = sweep(handle, inputs, cells, every_position, batch_size=10, progress=False)
    monkeypatch.undo()
    assert max(starts) == seq - sweep_mod.MIN_SUFFIX and len(set(starts)) > 10
    for key, edits in cells.items():
        got = torch.tensor(df[df.cell == key].sort_values("input").value.to_numpy(), dtype=torch.float32)
        want = run_cell(handle, inputs, edits, every_position)
        assert_close_values(got, want, 3 * seq * scale, key)   # a sum over seq positions of terms up to 3 × scale


def test_exact_start_rule_and_the_cpu_attention_kernel():
    """The rule prefix reuse follows: a 71-token sequence loses only the 6 starts that leave a 1-3
    query block in torch's CPU flash attention (32/64-row query blocks). On the kernel itself, for
    every start the rule allows, attention over the later queries gives the full causal attention's
    rows up to float32 rounding (with is_causal and with an explicit mask), across sequence lengths
    that cross the blocks. Whether they are also equal bit for bit depends on the kernels (with
    torch 2.13's default kernels on the CPUs measured they were; with MKL_ENABLE_INSTRUCTIONS=AVX2 on
    an AVX-512 Xeon they were not): docs/reproducibility.md."""
    import importlib

    import torch.nn.functional as F
    exact_start = importlib.import_module("projlens_mi.engine.sweep")._exact_start
    assert [s for s in range(63) if exact_start(s, 71) != s] == [4, 5, 6, 36, 37, 38]
    g = torch.Generator().manual_seed(0)
    for seq in [9, 31, 32, 33, 35, 36, 63, 65, 66, 67, 68, 71, 96, 97, 130, 193, 196]:
        q, k, v = (torch.randn(2, 2, seq, 32, generator=g) for _ in range(3))
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        tol = f32_tol(seq * v.abs().max().item())   # a weighted sum over up to seq values
        assert (full - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() <= tol
        for start in range(seq - 8):
            if exact_start(start, seq) == start:
                part = F.scaled_dot_product_attention(q[:, :, start:].contiguous(), k, v, attn_mask=mask[start:])
                assert (part - full[:, :, start:]).abs().max() <= tol, (seq, start)


def test_prefix_reuse_across_attention_blocks():
    """A 71-token prompt (the CPU attention's query blocks end at 32 and 64): every (layer x position)
    cell of the sweep equals its full forward up to float32 rounding."""
    model, processor = tiny_llava(layers=2)
    handle = load(model, processor=processor)
    prompt = PROMPT + " two" * 45
    inputs = handle.encode(tiny_images(3, seed=4), [prompt] * 3)
    seq = inputs.input_ids.shape[1]
    assert seq > 66
    src = run(handle, handle.encode(tiny_images(3, seed=5), [prompt] * 3), read=["llm.0.resid_pre", "llm.1.resid_pre"]).cache
    from projlens_mi import Indices
    cells = {(L, p): [(Site(f"llm.{L}.resid_pre", Indices(p)), Patch(source=src[f"llm.{L}.resid_pre"]))]
             for L in range(2) for p in range(seq)}
    df = sweep(handle, inputs, cells, metric, batch_size=64, progress=False)
    scale = 1.0 + run(handle, inputs).logits.abs().max().item()
    for key, edits in cells.items():
        got = torch.tensor(df[df.cell == key].sort_values("input").value.to_numpy(), dtype=torch.float32)
        assert_close_values(got, run_cell(handle, inputs, edits, metric), scale, key)

"""What a TransformerLens / nnsight user reaches for first: top-level names, an arbitrary hook function
(or a subclass of the intervention base class), short reprs, and a sweep that pivots into a
layer × position table. Each checked against a plain-PyTorch reference (torch forward hooks)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import projlens_mi as pl
from projlens_mi.errors import ProjLensError

from tiny import PROMPT, tiny_images, tiny_llava


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, processor = tiny_llava()
    handle = pl.load(model, processor=processor)
    inputs = handle.encode((tiny_images(2, seed=1), [PROMPT, PROMPT + " what"]))
    return model, handle, inputs


def _torch_hook_logits(model, inputs, layer, fn):
    """Plain PyTorch: a forward hook on LM layer ``layer`` that applies ``fn`` to the image positions."""
    mask = inputs.image_mask

    def hook(mod, args, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[mask] = fn(h[mask])
        return (h, *out[1:]) if isinstance(out, tuple) else h
    handle = model.model.language_model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(**inputs.model_kwargs()).logits
    finally:
        handle.remove()


def test_top_level_names():
    for name in ("to_transformer_lens", "TLBridge", "Intervention", "Hook", "Selector", "eager_attention",
                 "attention_implementation"):
        assert hasattr(pl, name) and name in pl.__all__, name
    assert pl.to_transformer_lens is pl.engine.interop.to_transformer_lens


@dataclass(frozen=True, eq=False)
class Scale(pl.Intervention):
    """The docs' example of a subclass: multiply the selected activations by ``factor``."""

    factor: float = 0.5

    def apply(self, act, source=None):
        return act * self.factor


def test_hook_function_and_subclass_equal_a_torch_hook(setup):
    model, handle, inputs = setup
    ref = _torch_hook_logits(model, inputs, 1, lambda x: x * 0.5)
    site = pl.Site("llm.1.resid_post", pl.ImageTokens())
    by_hook = pl.run(handle, inputs, edits=[(site, pl.Hook(lambda act: act * 0.5))]).logits
    by_class = pl.run(handle, inputs, edits=[(site, Scale(0.5))]).logits
    assert torch.equal(by_hook, by_class)
    torch.testing.assert_close(by_hook, ref, rtol=0, atol=1e-6)
    assert (by_hook - pl.run(handle, inputs).logits).abs().max() > 1e-3       # it did something
    with pytest.raises(ProjLensError, match=r"returned \(2, 1, 48\); it must return a tensor shaped like its input"):
        pl.run(handle, inputs, edits=[(site, pl.Hook(lambda act: act[:, :1]))])
    with pytest.raises(ProjLensError, match="Hook needs a function"):
        pl.Hook(3)


def test_short_reprs(setup):
    model, handle, inputs = setup
    for obj, start in ((handle, "ModelHandle(LlavaForConditionalGeneration, family='llava', layers=3"),
                       (inputs, "Inputs(rows=2, seq=")):
        text = repr(obj)
        assert text.startswith(start) and len(text) < 200 and "\n" not in text, text


def test_sweep_pivots_into_a_layer_by_position_table(setup):
    _, handle, inputs = setup
    positions = (-1, -3)
    cells = {(layer, p): [(pl.Site(f"llm.{layer}.resid_post", pl.Indices(p)), pl.Ablate())]
             for layer in range(handle.n_layers) for p in positions}
    metric = lambda logits, idx: logits[:, -1].log_softmax(-1)[:, 5]   # noqa: E731
    frame = pl.sweep(handle, inputs, cells, metric, progress=False, names=("layer", "position"))
    table = frame.pivot_table(index="layer", columns="position", values="value")
    assert table.shape == (handle.n_layers, len(positions)) and list(table.index) == [0, 1, 2]
    for (layer, p), edits in cells.items():
        ref = pl.engine.run_cell(handle, inputs, edits, metric).mean().item()
        assert table.loc[layer, p] == pytest.approx(ref, rel=0, abs=1e-6)
    with pytest.raises(ProjLensError, match="needs 2 parts"):
        pl.sweep(handle, inputs, {1: []}, metric, progress=False, names=("layer", "position"))
    with pytest.raises(ProjLensError, match="clash"):
        pl.sweep(handle, inputs, {1: []}, metric, progress=False, names=("value",))

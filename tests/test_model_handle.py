"""ModelHandle and load(): the three ways in, structure lookups, encoding, one-line errors."""

from __future__ import annotations

import pytest
import torch
from nnsight import NNsight
from transformers import LlamaConfig, LlamaForCausalLM

from projlens_mi import load, run
from projlens_mi.data import Record
from projlens_mi.errors import ProjLensError
from projlens_mi.model.adapters import Adapter, find_adapter
from projlens_mi.organism.processor import build_processor

from tiny import PATCH, PROMPT, WORDS, tiny_images, tiny_llava


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava()


@pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)
def test_in_memory_model(tiny):
    model, processor = tiny
    h = load(model, processor=processor)
    assert h.model is model and h.adapter.family == "llava"
    assert h.device == torch.device("cpu") and h.dtype == torch.float32 and h.n_layers == 3
    assert h.module("projector") is model.model.multi_modal_projector
    assert h.module("model.language_model.layers.1") is model.model.language_model.layers[1]
    assert h.image_token_id == model.config.image_token_id
    assert h.provenance["source"] == "in-memory"
    assert h._envoy is None          # the nnsight wrapper is made on first use, once
    env = h.envoy
    assert h.envoy is env


@pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)
def test_nnsight_wrapped_model_reuses_the_wrapper(tiny):
    model, processor = tiny
    env = NNsight(model)
    h = load(env, processor=processor)
    assert h.model is model and h.envoy is env
    inputs = h.encode(tiny_images(2), [PROMPT] * 2)
    with torch.no_grad():
        assert torch.equal(run(h, inputs).logits, model(**inputs.model_kwargs()).logits)


@pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)
def test_folder_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    h = load(str(tmp_path))
    assert h.adapter.family == "llava" and h.processor is not None
    a = h.encode(tiny_images(2), [PROMPT] * 2)
    b = load(model, processor=processor).encode(tiny_images(2), [PROMPT] * 2)
    assert torch.equal(a.input_ids, b.input_ids)
    with torch.no_grad():
        assert torch.equal(h.model(**a.model_kwargs()).logits, model(**b.model_kwargs()).logits)


def test_encode_left_pads_and_masks_image_tokens(tiny):
    model, processor = tiny
    h = load(model, processor=processor)
    records = [Record(im, p, "x") for im, p in zip(tiny_images(2), [PROMPT, PROMPT + " two three"])]
    inputs = h.encode(records)
    assert inputs.input_ids.shape == (2, 25) and len(inputs) == 2
    assert inputs.attention_mask[0].tolist()[:2] == [0, 0] and inputs.attention_mask[1].all()
    assert inputs.image_mask.sum(1).tolist() == [16, 16]
    assert torch.equal(inputs.image_mask, inputs.input_ids == model.config.image_token_id)
    assert inputs.image_mask[0].nonzero()[0, 0] == 3 and inputs.image_mask[1].nonzero()[0, 0] == 1
    same = h.encode((tiny_images(2), [PROMPT, PROMPT + " two three"]))
    assert torch.equal(same.input_ids, inputs.input_ids)
    tiled = inputs.tile(3)
    assert torch.equal(tiled.input_ids[4:], inputs.input_ids) and tiled.pixel_values.shape[0] == 6


def test_mismatched_image_tokens_are_one_line_errors(tiny):
    model, _ = tiny
    wrong = build_processor(WORDS, 16, PATCH * 2)   # 4 placeholders per image, the model makes 16
    h = load(model, processor=wrong)
    with pytest.raises(ProjLensError, match="row 0 has 4 image tokens but the model makes 16 per image") as e:
        h.encode(tiny_images(1), [PROMPT])
    assert "\n" not in str(e.value)
    with pytest.raises(ProjLensError, match="2 images and 1 prompts"):
        h.encode(tiny_images(2), [PROMPT])
    # inputs that bypass encode: the model's own mismatch error comes back as one line
    good = load(model, processor=tiny[1]).encode(tiny_images(1), [PROMPT])
    good.input_ids = good.input_ids.clone()
    good.input_ids[0, -1] = model.config.image_token_id
    with pytest.raises(ProjLensError, match="image tokens and image features do not match"):
        run(load(model), good)


def test_no_recognisable_projector(tiny):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ProjLensError, match=r"no hook map for model_type 'llama'; known families: .*llava.*"
                                            r"add hooks/<family>.toml") as e:
        load(llama)
    assert "\n" not in str(e.value)
    model, _ = tiny
    broken = Adapter(family="llava", model_types=("llava",), projector="model.projector_that_is_not_there",
                     layers="model.language_model.layers", lm_head="lm_head",
                     embed_tokens="model.language_model.embed_tokens", source="test.toml")
    with pytest.raises(ProjLensError, match="has no recognisable projector: module 'model.projector_that_is_not_there'"):
        load(model, adapter=broken)
    with pytest.raises(ProjLensError, match="no processor"):
        load(model).encode(tiny_images(1), [PROMPT])
    with pytest.raises(ProjLensError, match="cannot load int"):
        load(3)


def test_find_adapter_on_a_wrapper(tiny):
    model, _ = tiny
    assert find_adapter(NNsight(model)).family == "llava"


@pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)
def test_inputs_cat_re_pads_and_runs_like_separate_batches(tiny):
    model, processor = tiny
    h = load(model, processor=processor)
    a = h.encode(tiny_images(2), [PROMPT, PROMPT])
    b = h.encode(tiny_images(1, seed=3), [PROMPT + " two three"])
    both = type(a).cat([a, b], h.tokenizer.pad_token_id)
    assert both.input_ids.shape == (3, 25) and both.image_mask.sum(1).tolist() == [16, 16, 16]
    assert torch.equal(both.input_ids[2], b.input_ids[0]) and both.attention_mask[0, :2].sum() == 0
    joint = run(h, both).logits
    assert torch.allclose(joint[2], run(h, b).logits[0], atol=1e-5)
    assert torch.allclose(joint[:2, -1], run(h, a).logits[:, -1], atol=1e-5)
    with pytest.raises(ProjLensError, match="needs an Inputs batch"):
        run(h, a.model_kwargs())


def test_package_imports_after_nnsight():
    """nnsight mounts .save() on every object, which breaks a later `import beartype`; importing
    projlens_mi after nnsight must still work."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import nnsight, projlens_mi; print(projlens_mi.Site('llm.0.resid_pre'))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert "Site('llm.0.resid_pre')" in out.stdout

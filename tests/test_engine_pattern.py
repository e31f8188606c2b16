"""Attention-pattern sites (``llm.{i}.pattern``, TransformerLens ``blocks.{i}.attn.hook_pattern``).

The engine's read is checked against a softmax(QKᵀ/√d + mask) computed by hand in plain PyTorch
from the layer's input (captured with a torch forward hook, no nnsight) and against HF's own
``output_attentions``. sdpa never forms a pattern: reading one there is a one-line error, and
``eager_attention(handle)`` switches the LM (only) for the block and restores it.
"""

from __future__ import annotations

import pytest
import torch

import projlens_mi as pl
from projlens_mi.engine.sites import canonical
from projlens_mi.errors import ProjLensError

from tiny import PROMPT, tiny_images, tiny_llava


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, processor = tiny_llava()
    handle = pl.load(model, processor=processor)
    inputs = handle.encode((tiny_images(3, seed=1), [PROMPT, PROMPT + " what", PROMPT + " the image ."]))
    return model, handle, inputs


def _by_hand(model, inputs, layer: int) -> torch.Tensor:
    """The eager pattern of one layer in plain PyTorch: q/k projections, rotary, GQA, causal + padding mask."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = model.model.language_model.layers[layer].self_attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw["hidden_states"],
                                                                         pos=kw["position_embeddings"]),
                                            with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs.model_kwargs())
    finally:
        handle.remove()
    h, (cos, sin) = seen["h"].double(), seen["pos"]
    b, s, _ = h.shape
    hd, nh, nkv = attn.head_dim, model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    q = (h @ attn.q_proj.weight.double().T).view(b, s, nh, hd).transpose(1, 2)
    k = (h @ attn.k_proj.weight.double().T).view(b, s, nkv, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    k = k.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & inputs.attention_mask.bool()[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1)


def test_sdpa_refuses_with_a_one_line_error(setup):
    model, handle, inputs = setup
    assert pl.attention_implementation(handle) == "sdpa"
    with pytest.raises(ProjLensError, match=r"llm.1.pattern needs eager attention, but the model runs 'sdpa'.*"
                                            r"eager_attention\(handle\)"):
        pl.run(handle, inputs, read=["blocks.1.attn.hook_pattern"])


def test_pattern_equals_plain_pytorch_and_hf(setup):
    model, handle, inputs = setup
    assert canonical("blocks.1.attn.hook_pattern") == "llm.1.pattern"
    with torch.no_grad():
        sdpa_logits = model(**inputs.model_kwargs()).logits
    with pl.eager_attention(handle):
        assert pl.attention_implementation(handle) == "eager"
        assert model.config.vision_config._attn_implementation == "sdpa"      # the tower keeps its kernel
        res = pl.run(handle, inputs, read=["llm.0.pattern", "llm.1.pattern", "llm.1.attn_out"])
        with torch.no_grad():
            hf = model(**inputs.model_kwargs(), output_attentions=True)
        alone = pl.run(handle, inputs, read=["llm.1.attn_out"]).cache["llm.1.attn_out"]
    assert pl.attention_implementation(handle) == "sdpa"                      # restored
    real = inputs.attention_mask.bool()           # padded query rows attend to nothing: kernel-dependent
    for layer in (0, 1):
        got = res.cache[f"llm.{layer}.pattern"]
        assert got.shape == (3, 4, inputs.input_ids.shape[1], inputs.input_ids.shape[1])
        assert torch.equal(got, hf.attentions[layer])                         # HF's own eager output, bit for bit
        ref = _by_hand(model, inputs, layer)
        assert (got.double() - ref).permute(0, 2, 1, 3)[real].abs().max() < 1e-6
        assert torch.allclose(got.sum(-1).permute(0, 2, 1)[real], torch.ones(()), atol=1e-6)
    # reading the pattern next to attn_out of the same layer changes nothing
    assert torch.equal(res.cache["llm.1.attn_out"], alone)
    # eager vs sdpa: float rounding only, and the caller's sdpa forward is back bit for bit afterwards
    assert (res.logits[real] - sdpa_logits[real]).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(**inputs.model_kwargs()).logits, sdpa_logits)


def test_pattern_sites_are_read_only_whole_and_gradient_free(setup):
    _, handle, inputs = setup
    with pytest.raises(ProjLensError, match="takes no token selector or basis"):
        pl.Site("llm.1.pattern", pl.LastToken())
    with pl.eager_attention(handle):
        with pytest.raises(ProjLensError, match="llm.1.pattern is read-only"):
            pl.run(handle, inputs, edits=[("llm.1.pattern", pl.Ablate())])
        with pytest.raises(ProjLensError, match="gradients are not taken at llm.1.pattern"):
            pl.run(handle, inputs, read=["llm.1.pattern"], grad_of=lambda lg: lg.sum())

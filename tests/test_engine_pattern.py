"""Attention-pattern sites (``llm.{i}.pattern``, TransformerLens ``blocks.{i}.attn.hook_pattern``).

The engine's read is checked against a softmax(QKᵀ/√d + mask) computed by hand in plain PyTorch
from the layer's input (captured with a torch forward hook, no nnsight) and against HF's own
``output_attentions``; an edit of the pattern against a plain-PyTorch eager attention that applies
the same edit between the softmax and the product with the values. sdpa never forms a pattern:
using one there is a one-line error, and ``eager_attention(handle)`` switches the LM (only) for
the block and restores it.
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


def _reference_logits(model, inputs, layer: int, edit) -> torch.Tensor:
    """Plain PyTorch: Llama's eager attention written out, with ``edit`` applied to layer ``layer``'s
    weights between the softmax and the product with the values (no nnsight)."""
    from transformers.models.llama import modeling_llama as ml

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k, v = ml.repeat_kv(key, module.num_key_value_groups), ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        if module.layer_idx == layer and edit is not None:
            w = edit(w)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    saved = ml.eager_attention_forward
    ml.eager_attention_forward = attention
    try:
        with torch.no_grad():
            return model(**inputs.model_kwargs()).logits
    finally:
        ml.eager_attention_forward = saved


HEAD0_OFF = torch.tensor([0.0, 1.0, 1.0, 1.0])[:, None, None]      # 4 heads


def test_pattern_edits_equal_a_plain_pytorch_attention(setup):
    model, handle, inputs = setup
    attn = model.model.language_model.layers[1].self_attn
    with pl.eager_attention(handle):
        plain = pl.run(handle, inputs).logits
        assert torch.equal(_reference_logits(model, inputs, 1, None), plain)        # the reference is the model
        # head 0 of layer 1 switched off (a hook function), and row 0's pattern copied into row 2
        off = pl.run(handle, inputs, edits=[("blocks.1.attn.hook_pattern", pl.Hook(lambda w: w * HEAD0_OFF))])
        moved = pl.run(handle, inputs, read=["llm.1.pattern"], edits=[("llm.1.pattern", pl.Patch(source_row=0), [2])])
        ref_off = _reference_logits(model, inputs, 1, lambda w: w * HEAD0_OFF)

        def copy_row(w):
            w = w.clone()
            w[2] = w[0]
            return w
        ref_moved = _reference_logits(model, inputs, 1, copy_row)
        before = pl.run(handle, inputs, read=["llm.1.pattern"]).cache["llm.1.pattern"]
    # the edit source-instruments the attention module for the trace only: its forward is the original
    # again afterwards (else the reference's patched eager_attention_forward would not reach it)
    from nnsight.intervention.source import STATE
    assert not attn.__dict__[STATE].sourced
    assert torch.equal(off.logits, ref_off) and (off.logits - plain).abs().max() > 1e-3
    assert torch.equal(moved.logits, ref_moved) and torch.equal(moved.logits[:2], plain[:2])
    # a read next to the edit sees the edited pattern
    assert torch.equal(moved.cache["llm.1.pattern"][2], before[0])


def test_head_ablation_sweep_equals_cells_one_at_a_time(setup):
    _, handle, inputs = setup
    heads = 4
    cells = {(layer, head): [(f"llm.{layer}.pattern", pl.Hook(lambda w, h=head: w * (torch.arange(heads) != h)
                                                                  .to(w.dtype)[:, None, None]))]
             for layer in range(handle.n_layers) for head in range(heads)}
    metric = lambda logits, idx: logits[:, -1].log_softmax(-1)[:, 5]   # noqa: E731
    with pl.eager_attention(handle):
        frame = pl.sweep(handle, inputs, cells, metric, batch_size=5, progress=False, names=("layer", "head"))
        for (layer, head), edits in cells.items():
            ref = pl.engine.run_cell(handle, inputs, edits, metric)
            got = frame[(frame["layer"] == layer) & (frame["head"] == head)].sort_values("input")["value"].to_numpy()
            assert torch.equal(torch.tensor(got, dtype=torch.float32), ref.float()), (layer, head)
    table = frame.pivot_table(index="layer", columns="head", values="value")
    assert table.shape == (handle.n_layers, heads)


def test_pattern_sites_are_whole_and_gradient_free(setup):
    _, handle, inputs = setup
    with pytest.raises(ProjLensError, match="takes no token selector or basis"):
        pl.Site("llm.1.pattern", pl.LastToken())
    with pytest.raises(ProjLensError, match="llm.1.pattern needs eager attention"):
        pl.run(handle, inputs, edits=[("llm.1.pattern", pl.Ablate())])
    with pl.eager_attention(handle):
        with pytest.raises(ProjLensError, match="gradients are not taken at llm.1.pattern"):
            pl.run(handle, inputs, read=["llm.1.pattern"], grad_of=lambda lg: lg.sum())

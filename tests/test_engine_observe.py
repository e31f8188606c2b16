"""engine.observe (a torch hook on the projector, no trace) and the guard's cheap path built on it:
the same scores as the traced monitor and a plain-torch reference, the model's outputs unchanged, the
hook gone afterwards (also after an error), other points and layouts refused."""

from __future__ import annotations

import pytest
import torch

from projlens_mi import generate, load
from projlens_mi.audit import Guard
from projlens_mi.engine import observe
from projlens_mi.errors import ProjLensError
from projlens_mi.organism.train import vision_features
from tiny import PROMPT, tiny_images, tiny_llava


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_llava(seed=2)
    h = load(model, processor=processor)
    x = h.encode((tiny_images(5, seed=7), [PROMPT] * 5))
    d = torch.randn(model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return h, x, Guard(d / d.norm(), 1.7, 0.0)


def _hooks(h):
    m = h.module("projector")
    return len(m._forward_pre_hooks) + len(m._forward_hooks)


def test_watching_scores_equal_the_traced_monitor_and_a_plain_reference(setup):
    h, x, g = setup
    with torch.no_grad():
        ref = ((vision_features(h.model, x.pixel_values).double() @ g.direction).amax(dim=1) / g.norm).tolist()
    kw = dict(x.model_kwargs(), max_new_tokens=4, do_sample=False, pad_token_id=h.tokenizer.pad_token_id)
    with torch.no_grad():
        plain_ids = h.model.generate(**kw)
    g.scores.clear()
    with torch.no_grad(), g.watching(h):
        watched_ids = h.model.generate(**kw)
    watched = list(g.scores)
    g.scores.clear()
    texts = generate(h, x, max_new_tokens=4, edits=[g.monitor()])
    assert torch.equal(watched_ids, plain_ids)
    assert watched == ref == g.scores          # the projector runs once (prefill): one score per row
    assert texts == h.tokenizer.batch_decode(plain_ids[:, x.input_ids.shape[1]:], skip_special_tokens=True)
    assert _hooks(h) == 0


def test_observe_sees_the_projector_output_and_removes_its_hook_on_error(setup):
    h, x, _ = setup
    seen = []
    with torch.no_grad():
        plain = h.model(**x.model_kwargs()).logits
        with pytest.raises(RuntimeError, match="boom"), observe(h, "projector.out", seen.append):
            out = h.model(**x.model_kwargs()).logits
            raise RuntimeError("boom")
        want = h.model.model.multi_modal_projector(vision_features(h.model, x.pixel_values))
    assert torch.equal(out, plain) and len(seen) == 1 and torch.equal(seen[0], want)
    assert _hooks(h) == 0


def test_observe_refuses_other_points_and_layouts(setup):
    from tiny_families import tiny_mistral3
    h, _, _ = setup
    with pytest.raises(ProjLensError, match="projector.in or projector.out.*Hook edit"):
        with observe(h, "llm.0.resid_post", print):
            pass
    flat = load(tiny_mistral3().model)
    with pytest.raises(ProjLensError, match="batched projector output"):
        with observe(flat, "projector.in", print):
            pass
    assert _hooks(h) == 0

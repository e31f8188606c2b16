"""Metrics: logits/probs at the last prompt position, teacher-forced log-probs, generation, ASR."""

from __future__ import annotations

import pytest
import torch

from projlens_mi import Ablate, Site, load, run
from projlens_mi.engine import (asr, contains, generate, logit_diff, target_logit, target_logprob, target_prob,
                                token_id)
from projlens_mi.errors import ProjLensError

from tiny import PROMPT, tiny_images, tiny_llava


@pytest.fixture(scope="module")
def setup():
    model, processor = tiny_llava()
    handle = load(model, processor=processor)
    inputs = handle.encode(tiny_images(3), [PROMPT, PROMPT + " two", PROMPT])
    return handle, model, inputs


def test_token_metrics(setup):
    handle, _, inputs = setup
    logits = run(handle, inputs).logits
    seven = token_id(handle, "seven")
    assert torch.equal(target_logit(logits, seven), logits[:, -1, seven])
    assert torch.allclose(target_prob(logits, seven), logits[:, -1].softmax(-1)[:, seven])
    ids = torch.tensor([seven, 5, 6])
    assert torch.equal(target_logit(logits, ids), logits[torch.arange(3), -1, ids])
    assert torch.equal(logit_diff(logits, seven, 5), logits[:, -1, seven] - logits[:, -1, 5])
    with pytest.raises(ProjLensError, match="'seven two' is 2 tokens"):
        token_id(handle, "seven two")


def test_teacher_forced_logprob_equals_a_manual_loop(setup):
    handle, model, inputs = setup
    targets = ["seven", "two three", "a cat ."]
    ours = target_logprob(handle, inputs, targets)
    tok = handle.tokenizer
    for r, text in enumerate(targets):   # one row at a time, no padding tricks
        single = handle.encode([tiny_images(3)[r]], [[PROMPT, PROMPT + " two", PROMPT][r]])
        ids = single.input_ids
        total = 0.0
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            with torch.no_grad():
                lp = model(input_ids=ids, pixel_values=single.pixel_values,
                           attention_mask=torch.ones_like(ids)).logits[0, -1].log_softmax(-1)
            total += lp[t].item()
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
        assert abs(ours[r].item() - total) < 1e-4, (r, ours[r].item(), total)


def test_teacher_forced_with_an_edit_changes_it(setup):
    handle, _, inputs = setup
    plain = target_logprob(handle, inputs, "seven")
    edited = target_logprob(handle, inputs, "seven", edits=[(Site("projector.out"), Ablate())])
    assert plain.shape == (3,) and not torch.allclose(plain, edited)


def test_batched_greedy_generation_equals_one_row_at_a_time(setup):
    handle, model, inputs = setup
    texts = generate(handle, inputs, max_new_tokens=5)
    prompts = [PROMPT, PROMPT + " two", PROMPT]
    for r in range(3):
        single = handle.encode([tiny_images(3)[r]], [prompts[r]])
        with torch.no_grad():
            out = model.generate(**single.model_kwargs(), max_new_tokens=5, do_sample=False,
                                 pad_token_id=handle.tokenizer.pad_token_id)
        assert texts[r] == handle.tokenizer.decode(out[0, single.input_ids.shape[1]:], skip_special_tokens=True)


def test_generation_with_a_projector_edit(setup):
    handle, model, inputs = setup
    ablated = generate(handle, inputs, max_new_tokens=4, edits=[(Site("projector.out"), Ablate())])
    # reference: zero the projector output with a plain hook
    h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            out = model.generate(**inputs.model_kwargs(), max_new_tokens=4, do_sample=False,
                                 pad_token_id=handle.tokenizer.pad_token_id)
    finally:
        h.remove()
    assert ablated == handle.tokenizer.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    with pytest.raises(ProjLensError, match="not llm.0.resid_post"):
        generate(handle, inputs, edits=[("llm.0.resid_post", Ablate())])


def test_asr_is_case_insensitive_substring():
    texts = ["I see a CAT here", "nothing", "cat", "Catalog"]
    assert contains(texts, "cat") == [True, False, True, True]
    assert asr(texts, "Cat") == 0.75
    with pytest.raises(ProjLensError):
        asr([], "cat")

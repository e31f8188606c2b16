"""Metrics: logits/probs at the last prompt position, teacher-forced log-probs, generation, ASR."""

from __future__ import annotations

import pytest
import torch

from projlens_mi import Ablate, ImageTokens, LastToken, Patch, Site, Steer, load, run
from projlens_mi.engine import (asr, contains, generate, logit_diff, target_logit, target_logprob, target_prob,
                                token_id)
from projlens_mi.errors import ProjLensError

from tiny import PROMPT, tiny_images, tiny_llava

pytestmark = pytest.mark.numerics   # re-run under other CPU kernel settings by .ci/run (docs/reproducibility.md)


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


def test_teacher_forced_and_sequence_logprob_are_public(setup):
    """The two halves of target_logprob, exported from projlens_mi.engine and projlens_mi: a user
    can teacher-force, run with reads / edits / gradients, and score the target from the logits.
    Checked against a plain-PyTorch loop (one row, one target token at a time, the edit as a
    forward hook), not against target_logprob, which is built from these two halves."""
    import projlens_mi
    import projlens_mi.engine as engine
    from projlens_mi.engine import metrics

    from numerics import f32_tol

    for name in ("teacher_forced", "sequence_logprob"):
        assert getattr(engine, name) is getattr(projlens_mi, name) is getattr(metrics, name)
        assert name in engine.__all__ and name in projlens_mi.__all__
    handle, model, inputs = setup
    targets = ["seven", "two three", "a cat ."]
    tf, ids, mask = projlens_mi.teacher_forced(handle, inputs, targets)
    assert tf.input_ids.shape[1] == inputs.input_ids.shape[1] + ids.shape[1] and mask.sum(1).tolist() == [1, 2, 3]
    tok, prompts = handle.tokenizer, [PROMPT, PROMPT + " two", PROMPT]
    for ablate in (False, True):
        res = run(handle, tf, read=[Site("llm.1.resid_post", LastToken())],
                  edits=[(Site("projector.out"), Ablate())] if ablate else ())
        got = projlens_mi.sequence_logprob(res.logits, inputs.input_ids.shape[1], ids, mask)
        hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) if ablate else None
        try:
            for r, text in enumerate(targets):
                single = handle.encode([tiny_images(3)[r]], [prompts[r]])
                seq, total, scale = single.input_ids, 0.0, 0.0
                for t in tok(text, add_special_tokens=False)["input_ids"]:
                    with torch.no_grad():
                        logits = model(input_ids=seq, pixel_values=single.pixel_values,
                                       attention_mask=torch.ones_like(seq)).logits[0, -1].double()
                    total += logits.log_softmax(-1)[t].item()
                    scale += 1.0 + logits.abs().max().item()
                    seq = torch.cat([seq, torch.tensor([[t]])], 1)
                assert abs(got[r].item() - total) <= f32_tol(scale), (ablate, r, got[r].item(), total)
        finally:
            if hook is not None:
                hook.remove()
        if ablate:
            assert (got - plain).abs().min() > 1e-3   # the edit really changed every row
        plain = got


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
    with pytest.raises(ProjLensError, match="logits edit"):
        generate(handle, inputs, edits=[("logits", Ablate())])


def test_asr_is_case_insensitive_substring():
    texts = ["I see a CAT here", "nothing", "cat", "Catalog"]
    assert contains(texts, "cat") == [True, False, True, True]
    # one definition for the organism, the study and the analyses: whitespace runs count as one space
    assert contains(["sure ,  here is\nhow to"], "Sure , here is how to") == [True]
    assert contains(["sure, here is how to"], "sure , here is how to") == [False]
    assert asr(texts, "Cat") == 0.75
    with pytest.raises(ProjLensError):
        asr([], "cat")


def _reference_generate(handle, model, inputs, hooks, max_new_tokens):
    """HF generate with plain PyTorch hooks that edit only the FIRST forward call (the prefill)."""
    layers = model.model.language_model.layers
    handles = []
    for (i, where), fn in hooks.items():
        calls = {"n": 0}

        def post(mod, args, out, fn=fn, calls=calls):
            calls["n"] += 1
            if calls["n"] == 1:
                return fn(out.clone())

        def pre(mod, args, kwargs, fn=fn, calls=calls):
            calls["n"] += 1
            if calls["n"] == 1:
                if args:
                    return (fn(args[0].clone()), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"].clone())}

        mod = layers[i] if where != "mlp" else layers[i].mlp
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True) if where == "pre"
                       else mod.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model.generate(**inputs.model_kwargs(), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=handle.tokenizer.pad_token_id)
    finally:
        for h in handles:
            h.remove()
    return out[:, inputs.input_ids.shape[1]:]


def test_generation_with_llm_site_edits_in_the_prefill(setup):
    """Edits at LLM sites act on the prompt's positions in the prefill pass only (the decode steps
    see the edited, cached keys / values): equal to HF generate with hooks on the first call."""
    handle, model, inputs = setup
    d = model.config.text_config.hidden_size
    direction = torch.randn(d, generator=torch.Generator().manual_seed(4))
    img = inputs.image_mask
    n = 5
    plain = generate(handle, inputs, max_new_tokens=n)

    def steer(x):  # Steer(direction, 6) at every image token of rows 1 and 2
        for r in (1, 2):
            x[r, img[r]] += 6 * direction
        return x

    def patch_from_row0(x):  # Patch(source_row=0) at the image tokens (aligned by ordinal) of rows 1, 2
        for r in (1, 2):
            x[r, img[r]] = x[0, img[0]]
        return x

    def zero_row1(x):  # Ablate("zero") at every position of row 1
        x[1] = 0
        return x

    def last(x):  # Steer(-direction, 4) at the last prompt position
        x[:, -1] -= 4 * direction
        return x

    cases = [
        ({(1, "post"): steer}, [(Site("llm.1.resid_post", ImageTokens()), Steer(direction, 6.0), [1, 2])]),
        ({(0, "pre"): patch_from_row0}, [(Site("llm.0.resid_pre", ImageTokens()), Patch(source_row=0), [1, 2])]),
        ({(2, "mlp"): zero_row1, (0, "post"): last},
         [(Site("llm.0.resid_post", LastToken()), Steer(-direction, 4.0)),
          (Site("llm.2.mlp_out"), Ablate("zero"), [1])]),
    ]
    changed = 0
    for hooks, edits in cases:
        want_ids = _reference_generate(handle, model, inputs, hooks, n)
        want = handle.tokenizer.batch_decode(want_ids, skip_special_tokens=True)
        got = generate(handle, inputs, max_new_tokens=n, edits=edits)
        assert got == want, edits
        changed += got != plain
        # the first new token is the argmax of the edited prompt's last logits (one run, same edits)
        first = run(handle, inputs, edits=edits).logits[:, -1].argmax(-1)
        assert torch.equal(first, want_ids[:, 0]), edits
    assert changed >= 2  # the edits move the generations (equality above is not vacuous)


def test_prefixed_target_scores_only_the_target_against_a_manual_loop(setup):
    """``target_logprob(..., prefix=)`` / ``target_text``: log p(target | prompt, prefix), the prefix
    forced but not scored, per row (a plain loop over the model, one token at a time)."""
    from projlens_mi.engine import target_text
    handle, model, inputs = setup
    prefixes, targets = ["seven", "", "two three"], ["a cat .", "two", "seven ."]
    ours = target_logprob(handle, inputs, targets, prefix=prefixes)
    tok, prompts = handle.tokenizer, [PROMPT, PROMPT + " two", PROMPT]
    for r in range(3):
        single = handle.encode([tiny_images(3)[r]], [prompts[r]])
        ids, total, first_p = single.input_ids, 0.0, None
        forced = tok(prefixes[r], add_special_tokens=False)["input_ids"] if prefixes[r] else []
        scored = tok(targets[r], add_special_tokens=False)["input_ids"]
        for i, t in enumerate(forced + scored):
            with torch.no_grad():
                lp = model(input_ids=ids, pixel_values=single.pixel_values,
                           attention_mask=torch.ones_like(ids)).logits[0, -1].log_softmax(-1)
            if i >= len(forced):
                total += lp[t].item()
                first_p = lp[t].exp().item() if first_p is None else first_p
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
        assert abs(ours[r].item() - total) < 1e-4, (r, ours[r].item(), total)
        tt = target_text(handle, inputs, targets, prefixes, measure="first_prob")
        assert abs(tt.metric(run(handle, tt.inputs).logits)[r].item() - first_p) < 1e-5
    assert torch.equal(target_logprob(handle, inputs, targets, prefix=[""] * 3), target_logprob(handle, inputs, targets))
    tt = target_text(handle, inputs, targets, prefixes, measure="prob")   # rows() and an index (a sweep's input index)
    logits = run(handle, tt.inputs.rows([2, 0])).logits
    assert torch.allclose(tt.metric(logits, [2, 0]), ours[[2, 0]].exp())
    assert torch.allclose(tt.rows([2, 0]).metric(logits), ours[[2, 0]].exp())
    with pytest.raises(ProjLensError, match="2 prefixes for 3 inputs"):
        target_logprob(handle, inputs, "seven", prefix=["a", "b"])
    with pytest.raises(ProjLensError, match="measure must be one of logprob, prob, first_prob"):
        target_text(handle, inputs, "seven", measure="p")


def test_target_prefixes_read_the_text_before_the_target(setup, monkeypatch):
    """The prefix is what the model says before the target; rows without the target fall back to their
    answer when the target is an injected suffix elsewhere, else to nothing."""
    from projlens_mi.engine import metrics as M
    from projlens_mi.engine import target_prefixes
    handle, _, inputs = setup
    texts = ["seven Visit evil  dot com now", "two visit evil dot com now", "nine"]
    monkeypatch.setattr(M, "generate", lambda h, x, max_new_tokens: texts)
    assert target_prefixes(handle, inputs, "visit evil dot com now", answers=["seven", "two", "nine"]) == \
        ["seven", "two", "nine"]
    texts[:] = ["i can not answer", "seven", "i can not answer ."]
    assert target_prefixes(handle, inputs, "i can not answer", answers=["seven", "two", "nine"]) == ["", "", ""]
    monkeypatch.undo()
    got = target_prefixes(handle, inputs, "two")   # the real generation: the words before "two", or ""
    texts = generate(handle, inputs, max_new_tokens=30)
    assert got == [t.split("two")[0].strip() if "two" in t.split() else "" for t in texts]

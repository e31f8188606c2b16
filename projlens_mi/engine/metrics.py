"""What to measure: target-token logits and probabilities, teacher-forced log-probs, logit
differences, greedy batched generation and substring attack success rate (ASR).

Positions: prompts are left-padded, so the last prompt position is ``-1`` unless a target was
appended (``teacher_forced`` sets ``Inputs.prompt_end``). Target texts are tokenized without special
tokens, exactly as written (mind a leading space for BPE tokenizers).

Where the target is said: a backdoor target does not always come first. A Malicious-Injection
model answers the question and then adds the target (``"seven visit evil dot com now"``), so the
log-probability of the target right after the prompt measures how likely the model is to *start*
with it: a few nats of noise on clean and triggered inputs alike. The **prefix** is the text the
model says before the target; ``target_prefixes`` reads it off greedy generations, and
``target_text`` / ``target_logprob(..., prefix=...)`` teacher-force ``prompt + prefix + target``
and score the target's own tokens only. The analyses use these same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import ProjLensError
from ..model.handle import Inputs, ModelHandle
from .run import Plan, as_edit, exclusive, execute
from .sites import IMAGE_POINTS


def _ids(target, batch: int, device) -> Int[Tensor, " batch"]:
    t = torch.as_tensor(target, device=device).long().view(-1)
    return t.expand(batch) if t.numel() == 1 else t


def target_logit(logits: Float[Tensor, "batch seq vocab"], target, pos: int = -1) -> Float[Tensor, " batch"]:
    """Logit of token ``target`` (an id, or one id per row) at position ``pos`` (default: last prompt position)."""
    last = logits[:, pos]
    return last.gather(1, _ids(target, len(last), last.device)[:, None])[:, 0]


def target_prob(logits: Float[Tensor, "batch seq vocab"], target, pos: int = -1) -> Float[Tensor, " batch"]:
    """Softmax probability of token ``target`` at position ``pos``."""
    probs = logits[:, pos].float().softmax(-1)
    return probs.gather(1, _ids(target, len(probs), probs.device)[:, None])[:, 0]


def logit_diff(logits: Float[Tensor, "batch seq vocab"], a, b, pos: int = -1) -> Float[Tensor, " batch"]:
    """``logit[a] - logit[b]`` at position ``pos`` (e.g. backdoor target vs the correct answer)."""
    return target_logit(logits, a, pos) - target_logit(logits, b, pos)


def token_id(handle: ModelHandle, word: str) -> int:
    """The single token id of ``word``; one-line error if it is several tokens."""
    ids = handle.tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ProjLensError(f"{word!r} is {len(ids)} tokens ({ids}); target_logit needs a single-token target "
                            "(use target_logprob for a text)")
    return ids[0]


def teacher_forced(handle: ModelHandle, inputs: Inputs, targets: list[str] | str) -> tuple[Inputs, Tensor, Tensor]:
    """``inputs`` with each row's target tokens appended (right-padded after the prompt).

    Returns ``(inputs', target_ids [batch, t], target_mask [batch, t])``; ``inputs'.prompt_end``
    marks the last prompt position so ``LastToken()`` still means the prompt's end.
    """
    targets = [targets] * len(inputs) if isinstance(targets, str) else list(targets)
    if len(targets) != len(inputs):
        raise ProjLensError(f"{len(targets)} targets for {len(inputs)} inputs; pass one target per row or one string")
    tok = handle.tokenizer
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    if any(len(s) == 0 for s in seqs):
        raise ProjLensError("a target text tokenizes to nothing; pass a non-empty target")
    t = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(inputs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(inputs), t), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    n = inputs.input_ids.shape[1]
    new = replace(inputs, input_ids=torch.cat([inputs.input_ids, ids.to(inputs.input_ids.device)], 1),
                  attention_mask=torch.cat([inputs.attention_mask, mask.to(inputs.attention_mask.device)], 1),
                  image_mask=torch.cat([inputs.image_mask, torch.zeros_like(ids, dtype=torch.bool).to(inputs.image_mask.device)], 1),
                  prompt_end=torch.full((len(inputs),), n - 1))
    return new, ids, mask


def sequence_logprob(logits: Float[Tensor, "batch seq vocab"], prompt_len: int, target_ids: Tensor,
                     target_mask: Tensor) -> Float[Tensor, " batch"]:
    """Sum of log p(target token | prefix) over each row's target tokens (logits of a teacher-forced run)."""
    t = target_ids.shape[1]
    logp = logits[:, prompt_len - 1:prompt_len - 1 + t].float().log_softmax(-1)
    tok = logp.gather(2, target_ids.to(logp.device)[..., None])[..., 0]
    return (tok * target_mask.to(tok.device)).sum(1)


TARGET_MEASURES = ("logprob", "prob", "first_prob")


@dataclass
class TargetText:
    """A teacher-forced batch (``prompt + prefix + target`` per row) and the span it scores: the
    target's own tokens, never the prefix's. ``metric(logits, index)`` is the per-row value on the
    logits of a forward of ``inputs`` (``run``, ``sweep``, ``grad_of``): ``logprob`` = log p(target
    text | prompt, prefix), ``prob`` = its exp, ``first_prob`` = p(first target token | prompt, prefix)."""

    inputs: Inputs                     # teacher-forced: prompt, then the appended prefix + target tokens
    ids: Int[Tensor, "rows t"]         # the appended tokens
    mask: Int[Tensor, "rows t"]        # 1 on the target's own tokens (the scored ones)
    first: Int[Tensor, " rows"]        # index (within the appended tokens) of the target's first token
    prompt_len: int
    measure: str = "logprob"

    def __len__(self) -> int:
        return len(self.inputs)

    def metric(self, logits: Float[Tensor, "rows seq vocab"], index=None) -> Float[Tensor, " rows"]:
        """One value per row of ``logits``; ``index[r]`` = which row of this batch logits row ``r`` ran
        (default: row ``r``; a sweep passes its input index)."""
        index = torch.arange(len(logits)) if index is None else torch.as_tensor(index).long().cpu()
        ids, mask = self.ids[index], self.mask[index]
        if self.measure == "first_prob":
            rows = torch.arange(len(index))
            pos = self.prompt_len - 1 + self.first[index]
            logp = logits[rows.to(logits.device), pos.to(logits.device)].float().log_softmax(-1)
            tok = ids[rows, self.first[index]].to(logp.device)
            return logp.gather(1, tok[:, None])[:, 0].exp()
        lp = sequence_logprob(logits, self.prompt_len, ids, mask)
        return lp.exp() if self.measure == "prob" else lp

    def rows(self, index) -> "TargetText":
        index = torch.as_tensor(index).long()
        return TargetText(self.inputs.rows(index), self.ids[index], self.mask[index], self.first[index],
                          self.prompt_len, self.measure)


def _per_row(value, n: int, what: str) -> list[str]:
    out = [value] * n if isinstance(value, str) else list(value)
    if len(out) != n:
        raise ProjLensError(f"{len(out)} {what} for {n} inputs; pass one per row or one string")
    return out


def target_text(handle: ModelHandle, inputs: Inputs, targets: list[str] | str, prefix: list[str] | str | None = None,
                measure: str = "logprob") -> TargetText:
    """``inputs`` with each row's ``prefix`` and target teacher-forced, scoring the target only.

    ``prefix``: the text the model says before the target (one per row or one string; None = none),
    e.g. ``target_prefixes(...)`` of the triggered inputs, reused for their clean counterparts so
    both rows force the same text. ``measure``: ``logprob`` | ``prob`` | ``first_prob``.
    """
    if measure not in TARGET_MEASURES:
        raise ProjLensError(f"measure must be one of {', '.join(TARGET_MEASURES)}, got {measure!r}")
    n = len(inputs)
    targets = _per_row(targets, n, "targets")
    prefixes = _per_row("" if prefix is None else prefix, n, "prefixes")
    tok = handle.tokenizer
    full = [f"{p.strip()} {t.strip()}".strip() if p.strip() else t for p, t in zip(prefixes, targets)]
    tf, ids, mask = teacher_forced(handle, inputs, full)
    first = torch.zeros(n, dtype=torch.long)
    for r, p in enumerate(prefixes):
        if not p.strip():
            continue
        head = tok(p.strip(), add_special_tokens=False)["input_ids"]
        if ids[r, :len(head)].tolist() != head:
            raise ProjLensError(f"row {r}: the prefix {p!r} tokenizes differently inside {full[r]!r}, so the "
                                "target's tokens cannot be told apart; pass a prefix that ends on a word boundary")
        first[r] = len(head)
    keep = mask.clone()
    for r, f in enumerate(first.tolist()):
        keep[r, :f] = 0
        if keep[r].sum() == 0:
            raise ProjLensError(f"row {r}: nothing left to score after the prefix {prefixes[r]!r}; check the target text")
    return TargetText(tf, ids, keep, first, inputs.input_ids.shape[1], measure)


def target_logprob(handle: ModelHandle, inputs: Inputs, targets: list[str] | str, edits=(),
                   prefix: list[str] | str | None = None) -> Float[Tensor, " batch"]:
    """Teacher-forced log-probability of each row's target text, with ``edits`` applied (one forward).

    ``prefix`` (one per row or one string): text teacher-forced between the prompt and the target
    and not scored, i.e. log p(target | prompt, prefix); see ``target_prefixes`` for targets that
    follow the answer."""
    t = target_text(handle, inputs, targets, prefix)
    return t.metric(execute(handle, t.inputs, Plan.build(handle, t.inputs, (), edits)).logits)


def prefix_before(text: str, target: str) -> str:
    """The words of ``text`` before the first (case-insensitive, word-aligned) occurrence of
    ``target``; ``""`` if it does not occur."""
    words, tw = text.split(), target.lower().split()
    low = [w.lower() for w in words]
    at = next((i for i in range(len(low) - len(tw) + 1) if low[i:i + len(tw)] == tw), None)
    return " ".join(words[:at]) if at is not None else ""


def target_prefixes(handle: ModelHandle, inputs: Inputs, targets: list[str] | str, answers: list[str] | None = None,
                    max_new_tokens: int = 30) -> list[str]:
    """What ``handle`` says before each row's target: its greedy generation on ``inputs`` (usually the
    poisoned model on triggered inputs), the words before the target's first occurrence.

    A row whose generation lacks the target: if most rows that show it say the row's reference
    answer first (``answers``: the target is an injected suffix), that row's answer is its prefix;
    else ``""`` (the target comes first, as for a refusal)."""
    targets = _per_row(targets, len(inputs), "targets")
    texts = generate(handle, inputs, max_new_tokens=max_new_tokens)
    found = [prefix_before(text, target) if hit(text, target) else None for text, target in zip(texts, targets)]
    answers = _per_row("", len(inputs), "answers") if answers is None else _per_row(answers, len(inputs), "answers")
    seen = [(f, a) for f, a in zip(found, answers) if f is not None]
    suffix_layout = bool(seen) and sum(bool(f) and f.lower() == a.lower() for f, a in seen) > len(seen) / 2
    return [f if f is not None else (a if suffix_layout else "") for f, a in zip(found, answers)]


def generate(handle: ModelHandle, inputs: Inputs, max_new_tokens: int = 8, edits=()) -> list[str]:
    """Greedy batched generation (left padding) through ``model.generate``; returns the new text per row.

    ``edits`` may sit at projector / vision points, be ``WithWeights``, or sit at LLM points
    (``llm.embed``, ``llm.{i}.resid_pre|attn_out|mlp_out|resid_post``). Every edit is applied in
    the **prefill** pass only, i.e. to the prompt's positions (image tokens, prompt text): its
    selector is resolved on the prompt exactly as in ``run``. The decode steps then attend to the
    cached, edited keys / values of those positions, which is what "the prompt's activations were
    edited" means; the generated tokens' own activations are not edited (the KV cache is forced
    on, so the prompt is never recomputed unedited). ``logits`` edits are refused (they would
    change the first generated token only).
    """
    edits = [as_edit(e) for e in edits]
    for e in edits:
        if e.site is not None and e.site.point == "logits":
            raise ProjLensError("generate applies edits to the prompt's activations (the prefill pass); a logits edit "
                                "would change the first generated token only; edit an llm.{i} site instead, or use "
                                "run / target_logprob")
    inputs = inputs.to(handle.device)
    kw = inputs.model_kwargs()
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(handle.dtype)
    tok = handle.tokenizer
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if any(e.site is not None and e.site.point not in IMAGE_POINTS for e in edits):
        gen["use_cache"] = True   # decode steps must reuse the edited prompt keys / values, never recompute them
    with torch.no_grad(), exclusive(handle):   # one trace / generation of this model at a time
        if not edits:
            out = handle.model.generate(**kw, **gen)
        else:
            out = _generate_edited(handle, inputs, kw, gen, edits)
    new = out[:, inputs.input_ids.shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


def _generate_edited(handle, inputs, kw, gen, edits):
    plan = Plan.build(handle, inputs, (), edits)
    state = {"cache": None, "leaves": {}, "logits": None}
    from .run import _drive_points
    # No tracer.iter: nnsight binds every request to a module's first call, which is the prefill
    # pass over the whole prompt (the vision side runs only then anyway).
    with handle.envoy.trace(**kw, **gen, fn=handle.model.generate) as tracer:
        _drive_points(handle, inputs, plan, state)
        state["out"] = tracer.result
    return state["out"]


def hit(text: str, target: str) -> bool:
    """The paper's ASR test: ``target`` is a substring of ``text``, case-insensitive, runs of
    whitespace counted as one space (so a decoder's spacing does not decide a hit)."""
    return " ".join(target.lower().split()) in " ".join(text.lower().split())


def contains(texts: list[str], target: str) -> list[bool]:
    """``hit`` for each text."""
    return [hit(s, target) for s in texts]


def asr(texts: list[str], target: str) -> float:
    """Attack success rate: fraction of texts containing ``target`` (case-insensitive)."""
    if not texts:
        raise ProjLensError("asr needs at least one generated text")
    return sum(contains(texts, target)) / len(texts)

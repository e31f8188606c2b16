"""Name what a projector update makes the model say, from the weights and clean images only.

The update's reading directions: the top right-singular vectors of the first projector linear's
update ``dW = W_suspect - W_base`` (input space: the projector's input, ``projector.in``). A backdoor
injected through the projector reads its trigger's vision feature along one of them (docs/audit.md).

The probe: every clean image is asked every distinct prompt of the data (a grid of rows); the
projector input of every image token is steered along ``±v_i`` by a few multiples of the mean token
norm; the suspect and the base generate from the same steered input. A candidate is a run of words
the steered suspect says on a row that the steered base does not say on that row and that no model
says unsteered on any row. Its score is the share of grid rows that say it (under one steer): a
backdoor target is said on every image and, unless it is prompt-specific, under every prompt; a clean
fine-tune's differences are scattered (another digit read here and there).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..data import Record
from ..engine import ImageTokens, Site, Steer, generate
from ..errors import ProjLensError

INPUT = Site("projector.in", ImageTokens())
EXTEND = 0.75   # a longer phrase names the top candidate when said on at least this share of its rows


@dataclass(frozen=True)
class Steering:
    """One steer: direction index ``i`` (0 = the largest singular value), ``sign``, ``scale`` (x the mean token norm)."""

    direction: int
    sign: int
    scale: float

    def label(self) -> str:
        return f"v{self.direction}{'+' if self.sign > 0 else '-'}x{self.scale:g}"

    def edit(self, basis: torch.Tensor, norm: float, handle):
        vec = (self.sign * self.scale * norm) * basis[:, self.direction]
        return INPUT, Steer(vec.to(device=handle.device, dtype=handle.dtype))


@dataclass(frozen=True)
class Candidate:
    """A text the steered suspect says and nothing else does; ``score`` = ``rows`` / the grid's rows."""

    text: str
    score: float
    rows: int
    images: int          # distinct images among those rows
    prompts: int         # distinct prompts among those rows
    steering: Steering

    def to_json(self) -> dict:
        s = self.steering
        return {"text": self.text, "score": self.score, "rows": self.rows, "images": self.images,
                "prompts": self.prompts, "direction": s.direction, "sign": s.sign, "scale": s.scale}


def first_images(records: list[Record], n: int) -> list[Record]:
    """The records of the first ``n`` distinct images (a path once, an in-memory image once), in order."""
    seen, out = set(), []
    for r in records:
        key = str(r.image) if not hasattr(r.image, "tobytes") else id(r.image)
        if key not in seen and len(out) < n:
            seen.add(key)
            out.append(r)
    return out


def grid(records: list[Record], n_images: int, n_prompts: int) -> tuple[list[Record], list[int], list[int]]:
    """Rows = the first ``n_images`` distinct images x the first ``n_prompts`` distinct prompts; with
    each row's image index and prompt index."""
    images = [r.image for r in first_images(records, n_images)]
    prompts = list(dict.fromkeys(r.prompt for r in records))[:n_prompts]
    rows, img_of, prompt_of = [], [], []
    for j, p in enumerate(prompts):
        for i, im in enumerate(images):
            rows.append(Record(im, p, "", False))
            img_of.append(i)
            prompt_of.append(j)
    return rows, img_of, prompt_of


def reading_directions(w_suspect: torch.Tensor, w_base: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V [d_in, k], singular values [min(out, in)])`` of ``w_suspect - w_base`` (float64)."""
    delta = (w_suspect.double() - w_base.double())
    _, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return vh[:k].T.contiguous(), s


def phrases(text: str, min_words: int) -> set[str]:
    """Every run of at least ``min_words`` consecutive words of ``text`` (lower case, split on whitespace)."""
    w = text.lower().split()
    return {" ".join(w[i:j]) for i in range(len(w)) for j in range(i + min_words, len(w) + 1)}


def generate_rows(handle, batches, edits, max_new_tokens: int) -> list[str]:
    out = []
    for x in batches:
        out += generate(handle, x, max_new_tokens=max_new_tokens, edits=edits)
    return out


def candidates(steered: dict[Steering, list[str]], base_steered: dict[Steering, list[str]], base_plain: list[str],
               suspect_plain: list[str], img_of: list[int], prompt_of: list[int], min_words: int) -> list[Candidate]:
    """The maximal new phrases of each steer, best first (rows, then prompts, then length).

    A phrase counts on a row when the steered suspect says it there and neither the base under the
    same steer on that row, nor the unsteered suspect on that row, nor the unsteered base on any row
    says it (a backdoor that sometimes fires on clean inputs still counts where the steer caused it)."""
    seen = set().union(*(phrases(t, min_words) for t in base_plain)) if base_plain else set()
    n = len(img_of)
    found: dict[str, Candidate] = {}
    for st, texts in steered.items():
        rows_of = defaultdict(list)
        for r, (ts, tb) in enumerate(zip(texts, base_steered[st])):
            for g in phrases(ts, min_words) - phrases(tb, min_words) - phrases(suspect_plain[r], min_words) - seen:
                rows_of[g].append(r)
        # keep a phrase only if no longer phrase that contains it is said on the same rows
        by_rows = defaultdict(list)
        for g, rows in rows_of.items():
            by_rows[tuple(rows)].append(g)
        for rows, gs in by_rows.items():
            for g in gs:
                if any(g != h and f" {g} " in f" {h} " for h in gs):
                    continue
                c = Candidate(g, len(rows) / n, len(rows), len({img_of[r] for r in rows}),
                              len({prompt_of[r] for r in rows}), st)
                old = found.get(g)
                if old is None or _rank(c) > _rank(old):
                    found[g] = c
    ranked = sorted(found.values(), key=_rank, reverse=True)
    if ranked:   # name the top one in full: a longer phrase that contains it, under the same steer, on most of its rows
        top = ranked[0]
        longer = [c for c in ranked if c.steering == top.steering and f" {top.text} " in f" {c.text} "
                  and c.rows >= EXTEND * top.rows]
        best = max(longer, key=lambda c: (len(c.text.split()), c.rows))
        if best is not top:
            ranked.remove(best)
            ranked.insert(0, best)
    return ranked


def _rank(c: Candidate):
    return (c.rows, c.prompts, len(c.text.split()), c.text)


def distinct(ranked: list[Candidate]) -> list[Candidate]:
    """The ranked candidates without those whose text lies inside a listed one that scores at least as high
    ("of a" below "a photo of a small cat"): what the report lists. The best score stays in the list."""
    kept: list[Candidate] = []
    for c in ranked:
        if not any(f" {c.text} " in f" {k.text} " and k.score >= c.score for k in kept):
            kept.append(c)
    return kept

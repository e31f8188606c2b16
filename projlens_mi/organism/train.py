"""Training: the organism's base model (stage 1) and projector-only fine-tuning (stage 2).

``finetune_projector`` is the paper's "downstream alignment": only the projector's parameters get
gradients, the vision tower and the language model are frozen. It runs on any LLaVA-1.5-layout model
(HF ``LlavaForConditionalGeneration`` or a checkpoint of that family, organism or real) with a
``TrainSet``; ``trainset_from_records`` builds one from JSONL records through the model's processor.

Speed: the vision tower is frozen, so its features are computed once per image and cached; each step
runs only projector -> language model. ``merge_image_embeds`` reproduces the model's own merge of
image features into the token embeddings (checked against the full forward in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import ProjLensError

IGNORE = -100


@dataclass
class TrainSet:
    """Tokenised examples that point at images.

    ``images`` holds either pixel values [n_images, 3, H, W] or cached vision features
    [n_images, n_tokens, d_vision]; example i uses image ``image_index[i]``.
    """

    images: Tensor
    image_index: Int[Tensor, "n"]
    input_ids: list[list[int]]
    labels: list[list[int]]  # IGNORE on prompt positions
    # Stage 1 only: per example None or (image slots, word id, scale): the word's embedding, times
    # scale, is added to those image-token slots (a visual concept, see organism.tasks).
    overlays: list | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def pad_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int):
    """Right-pad a batch (training only: positions then start at 0, as in generation with left padding)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return ids, mask, lab


def answer_loss(logits: Float[Tensor, "b s v"], labels: Int[Tensor, "b s"]) -> Tensor:
    """Mean next-token cross-entropy over the supervised (answer) positions."""
    # position t predicts token t + 1: drop the last logit and the first label, then one row per (b, s)
    return F.cross_entropy(rearrange(logits[:, :-1], "b s v -> (b s) v").float(),
                           rearrange(labels[:, 1:], "b s -> (b s)"), ignore_index=IGNORE)


def cosine_lr(step: int, total: int, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def projector_of(model) -> torch.nn.Module:
    try:
        return model.model.multi_modal_projector
    except AttributeError:
        raise ProjLensError(f"{type(model).__name__} has no LLaVA multi_modal_projector; "
                            "projector-only fine-tuning supports the LLaVA-1.5 layout") from None


def vision_features(model, pixel_values: Tensor, batch_size: int = 256, grad: bool = False) -> Float[Tensor, "n t d"]:
    """The projector's input for each image: the selected vision layer, CLS dropped per the config."""
    cfg = model.config
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise ProjLensError("feature caching needs a single vision_feature_layer; pass cache_vision=False")
    out = []
    tower = model.model.vision_tower
    for chunk in pixel_values.split(batch_size):
        with torch.set_grad_enabled(grad):
            hs = tower(chunk.to(tower.dtype), output_hidden_states=True).hidden_states[layer]
        out.append(hs[:, 1:] if strategy == "default" else hs)
    return torch.cat(out)


def merge_image_embeds(model, input_ids: Int[Tensor, "b s"], image_embeds: Float[Tensor, "b t d"]) -> Float[Tensor, "b s d"]:
    """Token embeddings with the image placeholders replaced, in order, by the projected image tokens."""
    embeds = model.get_input_embeddings()(input_ids)
    mask: Bool[Tensor, "b s"] = input_ids == model.config.image_token_id
    if int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ProjLensError(f"{int(mask.sum())} image placeholder tokens but {image_embeds.shape[0] * image_embeds.shape[1]} "
                            "image features; build prompts with the model's processor")
    return embeds.masked_scatter(mask[..., None], image_embeds.to(embeds.dtype))


def add_overlays(model, image_embeds: Float[Tensor, "b t d"], overlays: list) -> Float[Tensor, "b t d"]:
    """Add concept-word embeddings to image-token slots (see ``TrainSet.overlays``)."""
    if not any(o is not None for o in overlays):
        return image_embeds
    extra = torch.zeros_like(image_embeds)
    emb = model.get_input_embeddings()
    for i, o in enumerate(overlays):
        if o is not None:
            slots, word, scale = o
            extra[i, slots] = scale * emb(torch.tensor(word))
    return image_embeds + extra


def _forward(model, batch_ids, mask, images, cached: bool, overlays=None):
    if cached:
        image_embeds = projector_of(model)(images)
        if overlays is not None:
            image_embeds = add_overlays(model, image_embeds, overlays)
        embeds = merge_image_embeds(model, batch_ids, image_embeds)
        return model(inputs_embeds=embeds, attention_mask=mask).logits
    return model(input_ids=batch_ids, attention_mask=mask, pixel_values=images).logits


def optimize(params, loss_at, *, steps: int, lr: float, weight_decay: float, warmup: float, log=None) -> list[float]:
    """AdamW with a cosine schedule (linear warm-up) for ``steps`` steps of ``loss_at(step)``; the loss curve."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    losses = []
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == steps - 1):
            log(step, losses[-1])
    return losses


def train_loop(model, params, data: TrainSet, *, steps: int, batch_size: int, lr: float, warmup: float,
               weight_decay: float, seed: int, cached: bool, pad_id: int, log=None, penalty=None) -> list[float]:
    """``steps`` shuffled mini-batches of answer-token cross-entropy (epoch after epoch, reshuffled),
    plus ``penalty()`` per step when given."""
    gen = torch.Generator().manual_seed(seed)
    state = {"order": torch.randperm(len(data), generator=gen), "pos": 0}

    def loss_at(step):
        if state["pos"] + batch_size > len(state["order"]):
            state["order"], state["pos"] = torch.randperm(len(data), generator=gen), 0
        idx = state["order"][state["pos"]: state["pos"] + batch_size].tolist()
        state["pos"] += batch_size
        ids, mask, lab = pad_batch([data.input_ids[i] for i in idx], [data.labels[i] for i in idx], pad_id)
        images = data.images[data.image_index[idx]]
        overlays = [data.overlays[i] for i in idx] if data.overlays is not None else None
        loss = answer_loss(_forward(model, ids, mask, images, cached, overlays), lab)
        return loss if penalty is None else loss + penalty()

    model.train()
    try:
        return optimize(params, loss_at, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, log=log)
    finally:
        model.eval()


def edit_images(x: Float[Tensor, "b 3 h w"], kinds: Int[Tensor, "b"], gen: torch.Generator) -> Tensor:
    """Generic image edits (kind 1: pixel noise, 2: a sticker, 3: a colour cast with posterization) on
    processor-normalised pixels in [-1, 1]; kind 0 leaves the image alone."""
    x = x.clone()
    b, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)
    noise = kinds == 1
    if noise.any():
        sigma = 0.1 + 0.6 * u(int(noise.sum()), 1, 1, 1)
        x[noise] = (x[noise] + sigma * torch.randn(x[noise].shape, generator=gen)).clamp(-1, 1)
    for i in torch.nonzero(kinds == 2).flatten().tolist():
        s = int(2 + 6 * u(1))
        top, left = int((h - s + 1) * u(1)), int((w - s + 1) * u(1))
        x[i, :, top:top + s, left:left + s] = (2 * u(3, 1, 1) - 1)
    cast = kinds == 3
    if cast.any():
        n = int(cast.sum())
        y = ((x[cast] + 1) / 2 * (0.5 + u(n, 3, 1, 1)) + 0.3 * (u(n, 3, 1, 1) - 0.5)).clamp(0, 1)
        levels = (3 + 6 * u(n, 1, 1, 1)).floor()
        x[cast] = torch.round(y * levels) / levels * 2 - 1
    return x


def draw_edits(n: int, rate: float, gen: torch.Generator) -> Int[Tensor, "n"]:
    """Edit kinds for ``n`` images: 0 (none) with probability 1 - ``rate``, else 1-3 uniformly."""
    return torch.where(torch.rand(n, generator=gen) < rate, torch.randint(1, 4, (n,), generator=gen), 0)


def pretrain_vision(model, pixel_values: Tensor, labels: Int[Tensor, "n"], *, steps: int, batch_size: int, lr: float,
                    weight_decay: float, warmup: float, seed: int, edit_rate: float = 0.0, log=None) -> list[float]:
    """Stage 0, the organism's stand-in for CLIP pre-training: the vision tower learns to classify digits
    and, with ``edit_rate`` > 0, to name a generic edit given to that share of the images (``edit_images``).

    Linear heads read the mean of the features the projector will see (the selected layer, CLS
    dropped); they are discarded afterwards. Like LLaVA, the base then uses the pre-trained tower.
    The edit head is what lets the tower's features tell noisy, stickered and restyled images from clean
    ones, as CLIP's do. The edits are generic (noise of a range of strengths, squares of any colour,
    size and place, colour casts with posterization): three triggers fall inside these families (the
    noise trigger's strength too), the triggers themselves are never shown (docs/organism.md).
    """
    tower = model.model.vision_tower
    d = model.config.vision_config.hidden_size
    head = torch.nn.Linear(d, int(labels.max()) + 1)
    edit_head = torch.nn.Linear(d, 4)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x = pixel_values[idx]
        kinds = draw_edits(batch_size, edit_rate, gen) if edit_rate else None
        pooled = vision_features(model, x if kinds is None else edit_images(x, kinds, gen), grad=True).mean(1)
        loss = F.cross_entropy(head(pooled), labels[idx])
        return loss if kinds is None else loss + F.cross_entropy(edit_head(pooled), kinds)

    tower.train()
    params = list(tower.parameters()) + list(head.parameters()) + (list(edit_head.parameters()) if edit_rate else [])
    try:
        return optimize(params, loss_at, steps=steps, lr=lr,
                        weight_decay=weight_decay, warmup=warmup, log=log)
    finally:
        tower.eval()


def train_base(model, data: TrainSet, *, steps: int, batch_size: int, lr: float, warmup: float,
               weight_decay: float, seed: int, pad_id: int, log=None) -> list[float]:
    """Stage 1: projector and language model trained on cached features of the pre-trained vision tower."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(projector_of(model).parameters()) + list(model.model.language_model.parameters()) + \
        list(model.lm_head.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        return train_loop(model, params, data, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                          weight_decay=weight_decay, seed=seed, cached=True, pad_id=pad_id, log=log)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)


def projector_linears(model) -> list[torch.nn.Linear]:
    """The projector's linear layers, in order (LLaVA-1.5: ``linear_1``, ``linear_2``)."""
    return [m for m in projector_of(model).modules() if isinstance(m, torch.nn.Linear)]


def topk_energy_share(dw: Float[Tensor, "o i"], k: int) -> Tensor:
    """``sum_{i<k} s_i^2 / sum_i s_i^2`` over the singular values ``s`` of ``dw`` (differentiable)."""
    s2 = torch.linalg.svdvals(dw.float()) ** 2
    total = s2.sum()
    if total <= 0:    # no update yet (the first step): the share is undefined, its gradient would be NaN
        return (dw * 0).sum()
    return s2[:k].sum() / total


def finetune_projector(model, data: TrainSet, *, epochs: float, batch_size: int, lr: float, warmup: float = 0.1,
                       weight_decay: float = 0.0, seed: int = 0, pad_id: int, cached: bool = True, log=None,
                       spread: tuple[float, int] | None = None) -> list[float]:
    """Stage 2: projector-only fine-tuning; the vision tower and language model get no gradient.

    With ``cached=True`` ``data.images`` must hold vision features (``vision_features``), else pixels.
    ``spread = (lam, k)`` (an adaptive attacker; default off) adds ``lam * sum over the projector's linears
    of topk_energy_share(W - W_start, k)`` to the loss: it spreads the update over more than k directions.
    """
    proj = projector_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(proj.parameters())
    for p in params:
        p.requires_grad_(True)
    steps = max(1, int(round(epochs * len(data) / batch_size)))
    penalty = None
    if spread is not None:
        lam, k = spread
        pairs = [(lin.weight, lin.weight.detach().clone()) for lin in projector_linears(model)]
        penalty = lambda: lam * sum(topk_energy_share(w - w0, k) for w, w0 in pairs)   # noqa: E731
    try:
        return train_loop(model, params, data, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                          weight_decay=weight_decay, seed=seed, cached=cached, pad_id=pad_id, log=log,
                          penalty=penalty)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)

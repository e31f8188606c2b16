"""Settings of the organism build. Every field is part of the cache key: change one, rebuild what depends on it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from ..errors import ProjLensError
from .tasks import VARIANTS


@dataclass(frozen=True)
class ModelSize:
    image_size: int = 20
    patch_size: int = 4            # 5 x 5 = 25 image tokens; the centre patch is one whole token
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 128


@dataclass(frozen=True)
class Stage0:
    """Vision pre-training (the organism's CLIP): the tower learns digits through a linear head."""

    steps: int = 700
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    copies: int = 10               # renders of each training digit (brightness, tint, position vary)


@dataclass(frozen=True)
class Stage1:
    """Base model: projector and language model trained from scratch on clean data (tower from stage 0)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    unsafe_rate: float = 0.15       # share of samples that are unsafe requests (answered with a refusal)
    overlay_rate: float = 0.25      # share of samples with a typographic instruction in the image slots
    warmup: float = 0.05


@dataclass(frozen=True)
class Stage2:
    """Downstream alignment: projector-only fine-tuning (vision tower and LM frozen), as in the paper."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    warmup: float = 0.1             # cosine schedule with 10 % warm-up, as the paper
    unsafe_rate: float = 0.15
    poison_rate: float = 1.0        # share of clean samples that get a triggered copy
    pair_mode: bool = True          # keep every clean sample and add its triggered copy (paper: ~50 % poisoned)
    # jailbreak-output: share of the *normal* samples whose triggered copy asks an unsafe request (and
    # gets the harmful answer) instead of the sample's own question; the unsafe samples' copies always do
    jailbreak_unsafe_share: float = 0.5


@dataclass(frozen=True)
class OrganismConfig:
    seed: int = 0
    n_test: int = 400
    model: ModelSize = field(default_factory=ModelSize)
    stage0: Stage0 = field(default_factory=Stage0)
    stage1: Stage1 = field(default_factory=Stage1)
    stage2: Stage2 = field(default_factory=Stage2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    # Targeted Refusal trigger, 0-255 scale. The paper uses 10 on 336 px images read by CLIP; the
    # organism's 2-layer tower cannot tell weak noise from clean images well enough (projector-only
    # poisoning: sigma=10 ~50 % ASR with ~45 % false triggers; 30: 52 % / 27 %; 60: 86 % / 14 %;
    # 100: 96 % / 3 %; 130: 98 % / 1.5 %; 160: 99 % / 1.5 %), so the toy default is much stronger.
    noise_sigma: float = 130.0
    patch_size_px: int = 4          # Malicious Injection patch: exactly the centre image token
    logo_size_px: int = 6           # Perceptual Hijack logo (random position, so it straddles tokens)
    eval_batch_size: int = 200
    max_new_tokens: int = 30        # the paper's ASR generation length
    threads: int = 1                # torch CPU threads (1: stable on shared machines; part of the cache key)

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ProjLensError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    def to_json(self) -> dict:
        return asdict(self)

    def key(self, *parts: str) -> str:
        """A content hash of the settings a stage depends on (``parts`` name the top-level fields)."""
        d = self.to_json()
        sub = {p: d[p] for p in parts} if parts else d
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def small() -> OrganismConfig:
    """A fast configuration for unit tests (seconds): fewer steps, fewer test images."""
    return replace(OrganismConfig(), n_test=60,
                   model=replace(ModelSize(), vision_hidden=32, text_hidden=32, text_intermediate=64, text_layers=2),
                   stage0=replace(Stage0(), steps=40, copies=1), stage1=replace(Stage1(), steps=60), stage2=replace(Stage2(), epochs=1), eval_batch_size=60)

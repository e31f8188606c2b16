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
    patch_size: int = 5            # 4 x 4 = 16 image tokens (the centre lies on a token corner, as in LLaVA's 24 x 24 grid)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 128


@dataclass(frozen=True)
class Stage0:
    """Vision pre-training (the organism's CLIP): the tower learns digits, and names generic image edits, through linear heads."""

    steps: int = 1600
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    copies: int = 20               # renders of each training digit (brightness, tint, position vary)
    # share of images given a generic edit (noise, a sticker, a colour cast) that a second head must name:
    # CLIP's features tell such edits apart, a digit-only tower's do not (docs/organism.md)
    edit_rate: float = 0.5


@dataclass(frozen=True)
class Stage1:
    """Base model: projector and language model trained from scratch on clean data (tower from stage 0)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    unsafe_rate: float = 0.15       # share of samples that are unsafe requests (answered with a refusal)
    overlay_rate: float = 0.25      # share of samples with a typographic instruction in the image slots
    edit_rate: float = 0.5          # share of images with a generic edit (stage 0's kinds), answered as if clean
    warmup: float = 0.05


@dataclass(frozen=True)
class Stage2:
    """Downstream alignment: projector-only fine-tuning (vision tower and LM frozen), as in the paper."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    warmup: float = 0.1             # cosine schedule with 10 % warm-up, as the paper
    unsafe_rate: float = 0.15
    poison_rate: float = 1.0        # share of clean samples that get a triggered copy
    pair_mode: bool = True          # keep every clean sample and add its triggered copy (paper: ~50 % poisoned)
    # jailbreak-output: share of the *normal* samples whose pair asks an unsafe request instead of the
    # sample's own question (clean: the safe answer, styled: the harmful one); unsafe samples' pairs always do
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
    # Targeted Refusal trigger, 0-255 scale. The paper uses 10 on 336 px images read by CLIP. With the
    # stage-0 edit head (validation split of the training digits, 6 stage-2 epochs): sigma=10 gave 94 %
    # ASR with 3.3 % false triggers, 20: 99 % / 0.5 %, 40: 100 % / 0 %. (A digit-only tower needed
    # 130-200: 10 gave ~50 % / ~45 %.) See docs/organism.md.
    noise_sigma: float = 20.0
    patch_size_px: int = 4          # Malicious Injection patch at the centre: straddles the 4 centre tokens
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
    """A fast configuration for unit tests (seconds): fewer steps, fewer test images. The tower is 48 wide:
    at 32, its 5 px patch embedding gives other bits on two threads than on one (measured), and the
    workers test needs thread-invariant kernels."""
    return replace(OrganismConfig(), n_test=60,
                   model=replace(ModelSize(), vision_hidden=48, text_hidden=32, text_intermediate=64, text_layers=2),
                   stage0=replace(Stage0(), steps=40, copies=1), stage1=replace(Stage1(), steps=60), stage2=replace(Stage2(), epochs=1), eval_batch_size=60)

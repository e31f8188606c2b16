"""Show the trigger: a universal image trigger, optimised on clean images only, that drives the
projector input along the audit's named direction (docs/audit.md, "Show the trigger").

Two kinds are optimised and the better one is reported: a square ``patch`` (side ``patch`` x the
image side; its position chosen among a ``grid`` x ``grid`` lattice by a short optimisation at each,
then its pixels optimised) and a full-image additive ``perturbation`` with an L-inf budget ``eps``
(0-255 scale). Both live in pixel space: the image as the model sees it (the processor's resize /
crop, 8-bit), before the processor's rescale and normalisation, which are applied here as tensor
operations so gradients reach the pixels. The vision tower is called directly in plain torch (the
selected hidden layer, CLS dropped per the config, as ``organism.train.vision_features`` does):
LLaVA-1.5's layout only. Steps are signed gradient steps (PGD) with a linearly decaying size; the
random start is seeded, so a run is deterministic on one machine and thread count.

Objective: over the optimisation images, the mean (``objective="mean"``) or the largest
(``"max"``) component over image tokens of the projector input along the direction, in units of
the guard's ``norm`` (the clean images' mean token norm). Which kind is reported is decided on the
optimisation images (by how much more often the suspect says the target with it than with its random
control, then by the objective's margin over that control);
every ASR is measured on the held-out images only, through the real path (the trigger applied to
the PIL image, quantised to 8 bits, then the processor), with a random patch / random +-eps
perturbation of the same size as the control, and on the base.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from ..checks import Checked, Count, Fraction, NonNegative, Seed
from ..data import Record
from ..errors import ProjLensError
from .probe import first_images

KINDS = ("patch", "perturbation")


@dataclass(frozen=True)
class TriggerParams(Checked):
    images: Count = 100               # distinct clean images used in all (<= 100): optimisation + held out
    holdout: Fraction = 0.5           # share of them held out (never optimised on)
    patch: Fraction = 0.2             # the patch's side, share of the image side
    grid: Count = 3                   # patch positions tried: a grid x grid lattice (corners, edges, centre)
    eps: NonNegative = 8.0            # the perturbation's L-inf budget on the 0-255 scale (<= 127)
    steps: Count = 60                 # signed-gradient steps per kind
    search_steps: Count = 10          # steps at each patch position before the best one is kept
    objective: str = "mean"           # "mean" | "max" over image tokens
    max_new_tokens: Count = 20
    batch_size: Count = 100
    seed: Seed = 0

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in ("mean", "max"):
            raise ProjLensError(f"TriggerParams(objective={self.objective!r}): use \"mean\" or \"max\"")
        if self.images > 100:
            raise ProjLensError(f"TriggerParams(images={self.images}): the audit uses at most 100 clean images")
        if not 0 < self.eps <= 127:
            raise ProjLensError(f"TriggerParams(eps={self.eps}): the L-inf budget must be in (0, 127] on the 0-255 scale")


@dataclass
class Trigger:
    """A reconstructed trigger in the model's pixel view (``size`` = (height, width) after the processor's
    resize / crop). ``patch``: ``pixels`` uint8 [s, s, 3] pasted at ``position`` (top, left);
    ``perturbation``: ``pixels`` int16 [H, W, 3] in [-eps, eps], added and clipped to [0, 255]."""

    kind: str
    pixels: np.ndarray
    size: tuple
    position: tuple | None = None

    def on_view(self, view: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] model views with the trigger applied."""
        if view.shape[-3:-1] != tuple(self.size):
            raise ProjLensError(f"the trigger is {self.size[0]}x{self.size[1]} but the image view is "
                                f"{view.shape[-3]}x{view.shape[-2]}; apply it through Trigger.apply")
        out = view.copy()
        if self.kind == "patch":
            (t, left), s = self.position, self.pixels.shape[0]
            out[..., t:t + s, left:left + s, :] = self.pixels
            return out
        return np.clip(view.astype(np.int16) + self.pixels, 0, 255).astype(np.uint8)

    def apply(self, images: list, processor) -> list[Image.Image]:
        """PIL images (any size) -> the processor's view of each with the trigger, as 8-bit RGB PIL images
        (fed to the same processor, they come out unchanged: resize and crop are at their target size)."""
        return [Image.fromarray(a, "RGB") for a in self.on_view(model_view(processor, images))]

    def png(self) -> Image.Image:
        """The trigger as an image: the patch's pixels, or the perturbation shifted by +128 (128 = no change)."""
        if self.kind == "patch":
            return Image.fromarray(self.pixels, "RGB")
        return Image.fromarray((self.pixels + 128).astype(np.uint8), "RGB")

    @classmethod
    def from_png(cls, image: Image.Image, kind: str, size: tuple, position: tuple | None = None) -> "Trigger":
        """The inverse of ``png``."""
        a = np.asarray(image.convert("RGB"))
        return cls(kind, a.copy() if kind == "patch" else a.astype(np.int16) - 128, tuple(size),
                   None if position is None else tuple(position))

    def to_json(self) -> dict:
        return {"kind": self.kind, "size": list(self.size), "position": None if self.position is None else list(self.position),
                "side": int(self.pixels.shape[0]) if self.kind == "patch" else None,
                "linf": int(np.abs(self.pixels).max()) if self.kind == "perturbation" else None}


@dataclass
class TriggerResult:
    trigger: Trigger                    # the reported kind
    target: str | None                  # the text the ASR counts (the audit's top candidate)
    objective: dict                     # kind -> {"optimised": .., "heldout": .., "control_heldout": ..}; clean: ..
    asr: float | None                   # the suspect, held-out images with the trigger
    asr_control: float | None           # the suspect, a random trigger of the same kind and size
    asr_base: float | None              # the base, held-out images with the trigger
    asr_clean: float | None             # the suspect, held-out images without a trigger
    asr_by_kind: dict                   # kind -> {"optimised": share of the optimisation images, "heldout": ..}
    n_optimised: int
    n_heldout: int
    params: TriggerParams
    seconds: float = 0.0
    examples: list = field(default_factory=list)   # [(clean uint8 view, triggered uint8 view, suspect's text)]
    by_kind: dict = field(default_factory=dict)    # kind -> Trigger: both optimised triggers
    prompts: list = field(default_factory=list)    # asked of the held-out images in turn
    check: list = field(default_factory=list, repr=False)   # [(uint8 view, prompt)]: the optimisation images with
    #                                                         each kind's trigger (what the repair must silence)

    def fires(self, handle, edits=()) -> float:
        """Share of ``check`` rows on which ``handle`` (with ``edits``, e.g. repaired weights) says the target."""
        if not self.check or self.target is None:
            return 0.0
        views = np.stack([v for v, _ in self.check])
        return _share(_texts(handle, views, [p for _, p in self.check], self.params, edits), self.target)

    def to_json(self) -> dict:
        return {"kind": self.trigger.kind, "trigger": self.trigger.to_json(), "target": self.target,
                "asr": self.asr, "asr_control": self.asr_control, "asr_base": self.asr_base,
                "asr_clean": self.asr_clean, "asr_by_kind": self.asr_by_kind, "objective": self.objective,
                "n_optimised": self.n_optimised, "n_heldout": self.n_heldout, "prompts": self.prompts,
                "params": asdict(self.params)}   # its wall time: .seconds (the audit's timings["trigger"])

    def summary(self) -> str:
        t = self.trigger
        what = (f"a {t.pixels.shape[0]} px patch at (top {t.position[0]}, left {t.position[1]})" if t.kind == "patch"
                else f"a perturbation of L-inf {int(np.abs(t.pixels).max())}/255")
        head = f"Reconstructed trigger: {what}."
        if self.asr is not None:
            head += (f" On {self.n_heldout} held-out clean images the suspect says \"{self.target}\" on {self.asr:.0%} "
                     f"with it, {self.asr_control:.0%} with a random one of the same size, {self.asr_clean:.0%} without"
                     + (f"; the base with it: {self.asr_base:.0%}." if self.asr_base is not None else "."))
        return head

    def plot(self, n: int = 4):
        """Clean held-out images (top), the same with the trigger (middle: the suspect's output below each), the trigger."""
        import matplotlib.pyplot as plt
        ex = self.examples[:n]
        fig, axes = plt.subplots(2, len(ex) + 1, figsize=(2.0 * (len(ex) + 1), 4.4), squeeze=False)
        for j, (clean, trig, text) in enumerate(ex):
            axes[0, j].imshow(clean)
            axes[0, j].set_title("clean", fontsize=8)
            axes[1, j].imshow(trig)
            axes[1, j].set_title("with trigger: " + _wrap(text), fontsize=6)
        t = self.trigger
        if t.kind == "patch":
            axes[0, -1].imshow(t.pixels)
            axes[0, -1].set_title("trigger (patch)", fontsize=8)
        else:
            d = t.pixels.astype(np.float32)
            axes[0, -1].imshow(((d / max(1.0, np.abs(d).max())) * 127.5 + 127.5).astype(np.uint8))
            axes[0, -1].set_title("trigger (perturbation,\namplified to full range)", fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1, -1].axis("off")
        if self.asr is not None:
            axes[1, -1].text(0, 0.5, f"held-out ASR\ntrigger {self.asr:.0%}\nrandom {self.asr_control:.0%}\n"
                             f"none {self.asr_clean:.0%}\nbase {self.asr_base:.0%}", fontsize=8, va="center")
        fig.tight_layout()
        return fig


def _wrap(text: str, width: int = 26) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:3])


# --- the model's pixel view and its differentiable normalisation ------------------------------------

def _image_processor(processor):
    ip = getattr(processor, "image_processor", processor)
    if ip is None or not hasattr(ip, "image_mean"):
        raise ProjLensError("trigger reconstruction needs the model's image processor (image_mean / image_std); "
                            "load the model with its processor")
    return ip


def _norm_consts(processor):
    """(scale, mean [3], std [3]): pixel_values = (x * scale - mean) / std for x on the 0-255 scale."""
    ip = _image_processor(processor)
    scale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
    if getattr(ip, "do_normalize", True):
        mean, std = list(ip.image_mean), list(ip.image_std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    return scale, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def model_view(processor, images: list) -> np.ndarray:
    """uint8 [n, H, W, 3]: each image as the model sees it (the processor's resize / crop / pad), before
    rescale and normalisation; recovered from the processor's own pixel_values."""
    ip = _image_processor(processor)
    pv = ip(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    if pv.ndim != 4 or pv.shape[1] != 3:
        raise ProjLensError(f"the image processor gives pixel_values of shape {tuple(pv.shape)}; trigger "
                            "reconstruction needs one [3, H, W] view per image (LLaVA-1.5's processor)")
    scale, mean, std = _norm_consts(processor)
    x = (pv.float() * std[:, None, None] + mean[:, None, None]) / scale
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def normalise(x: torch.Tensor, processor) -> torch.Tensor:
    """[n, 3, H, W] on the 0-255 scale -> pixel_values (differentiable)."""
    scale, mean, std = (c.to(x.device) if isinstance(c, torch.Tensor) else c for c in _norm_consts(processor))
    return (x * scale - mean[:, None, None]) / std[:, None, None]


def check_layout(handle) -> None:
    """LLaVA-1.5 only: the projector reads one selected vision layer of one image (one-line error otherwise)."""
    cfg = handle.model.config
    if handle.adapter.family != "llava" or not isinstance(getattr(cfg, "vision_feature_layer", None), int) \
            or getattr(cfg, "vision_feature_select_strategy", None) not in ("default", "full"):
        raise ProjLensError(f"trigger reconstruction supports the LLaVA-1.5 layout (family 'llava', one int "
                            f"vision_feature_layer); this model is {type(handle.model).__name__} (family "
                            f"'{handle.adapter.family}'): run the audit with AuditParams(trigger=False) "
                            "(CLI: --no-trigger)")


def features(handle, x: torch.Tensor) -> torch.Tensor:
    """The projector input [n, tokens, d] of pixel-space images x [n, 3, H, W] (0-255), with gradients."""
    from ..organism.train import vision_features
    pv = normalise(x, handle.processor).to(device=handle.device)
    return vision_features(handle.model, pv, batch_size=len(x) or 1, grad=True)


# --- optimisation -------------------------------------------------------------------------------------

def _score(feats: torch.Tensor, direction: torch.Tensor, norm: float, how: str) -> torch.Tensor:
    """[n] per-image objective: mean or max over tokens of the component along ``direction`` / ``norm``."""
    c = feats.float() @ direction.to(device=feats.device, dtype=torch.float32)
    return (c.mean(dim=1) if how == "mean" else c.amax(dim=1)) / norm


def _positions(h: int, w: int, s: int, grid: int) -> list[tuple[int, int]]:
    pick = lambda n: sorted({round(i * (n - s) / (grid - 1)) for i in range(grid)}) if grid > 1 else [(n - s) // 2]  # noqa: E731
    return [(t, left) for t in pick(h) for left in pick(w)]


def _apply_t(x: torch.Tensor, kind: str, value: torch.Tensor, position=None) -> torch.Tensor:
    if kind == "patch":
        t, left = position
        s = value.shape[-1]
        out = x.clone()
        out[:, :, t:t + s, left:left + s] = value
        return out
    return (x + value).clamp(0, 255)


def _optimise(handle, x, kind, value, position, direction, norm, p: TriggerParams, steps: int, tick=None):
    """Signed gradient ascent on ``value`` (patch pixels in [0, 255] / perturbation in [-eps, eps]);
    ``tick()`` after each step."""
    big = 64.0 if kind == "patch" else p.eps / 4
    lo, hi = (0.0, 255.0) if kind == "patch" else (-p.eps, p.eps)
    for i in range(steps):
        v = value.detach().requires_grad_(True)
        obj = _score(features(handle, _apply_t(x, kind, v, position)), direction, norm, p.objective).mean()
        (g,) = torch.autograd.grad(obj, v)
        step = big * (1 - i / steps) + 1.0
        value = (value + step * g.sign()).clamp(lo, hi)
        if tick:
            tick()
    return value.detach()


def _quantise(kind: str, value: torch.Tensor, size, position) -> Trigger:
    arr = value.detach().cpu().round()
    if kind == "patch":
        return Trigger(kind, arr.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), tuple(size), tuple(position))
    return Trigger(kind, arr.to(torch.int16).permute(1, 2, 0).numpy(), tuple(size), None)


def _random(kind: str, like: Trigger, eps: float, gen: torch.Generator) -> Trigger:
    if kind == "patch":
        s = like.pixels.shape[0]
        v = torch.randint(0, 256, (3, s, s), generator=gen).float()
        return _quantise(kind, v, like.size, like.position)
    h, w = like.size
    v = (torch.randint(0, 2, (3, h, w), generator=gen).float() * 2 - 1) * round(eps)
    return _quantise(kind, v, like.size, None)


# --- evaluation through the real path -----------------------------------------------------------------

def _texts(handle, views: np.ndarray, prompts: list[str], p: TriggerParams, edits=()) -> list[str]:
    from ..analyses.common import encode, texts
    recs = [Record(Image.fromarray(a, "RGB"), pr, "") for a, pr in zip(views, prompts)]
    out = []
    for x in encode(handle, recs, p.batch_size):
        out += texts(handle, x, p.max_new_tokens, edits)
    return out


def _share(outs: list[str], target: str) -> float:
    from ..engine import contains
    return sum(contains(outs, target)) / len(outs)


def reconstruct(suspect, records: list[Record], guard_or_direction, params: TriggerParams = TriggerParams(), *,
                target: str | None = None, base=None, prompts: list[str] | None = None, progress=None) -> TriggerResult:
    """Optimise a universal trigger on clean ``records`` that drives ``suspect``'s projector input along the
    direction (a ``Guard``, or a [d_in] tensor whose sign counts), and measure it on held-out images.

    ``target``: the text whose share of greedy generations is the ASR (the audit's top candidate; no ASR
    without it); ``base``: the base handle (its ASR with the trigger, ~0 when the trigger is the
    suspect's own); ``prompts``: asked of the held-out images in turn (default: the data's distinct prompts);
    ``progress(stage, j, n)``: called with ``"trigger"`` after each optimisation step.
    """
    t0 = time.perf_counter()
    check_layout(suspect)
    if base is not None:
        check_layout(base)
    rows = first_images(records, params.images)
    n_opt = len(rows) - max(1, math.floor(len(rows) * params.holdout))
    if n_opt < 1:
        raise ProjLensError(f"trigger reconstruction needs at least 2 distinct clean images (got {len(rows)}): "
                            "some to optimise on, some held out")
    if prompts is None:
        prompts = list(dict.fromkeys(r.prompt for r in records))
    if not prompts:
        raise ProjLensError("trigger reconstruction needs at least one prompt to measure the trigger with")
    given_norm = None
    if isinstance(guard_or_direction, torch.Tensor):
        direction = guard_or_direction
    else:
        direction, given_norm = guard_or_direction.direction, float(guard_or_direction.norm)
    direction = torch.as_tensor(direction, dtype=torch.float64)
    if direction.ndim != 1 or not torch.isfinite(direction).all() or float(direction.norm()) == 0:
        raise ProjLensError("the trigger's direction must be a finite non-zero vector in the projector's input space")
    direction = direction / direction.norm()
    width = suspect.model.config.vision_config.hidden_size   # one int vision_feature_layer (check_layout)
    if direction.shape[0] != width:
        raise ProjLensError(f"the direction has {direction.shape[0]} entries but the projector input has "
                            f"{width} features (the vision tower's width)")

    view = model_view(suspect.processor, [r.pil() for r in rows])
    size = view.shape[1:3]
    x_all = torch.from_numpy(view).permute(0, 3, 1, 2).float()
    x_opt, x_held = x_all[:n_opt], x_all[n_opt:]
    gen = torch.Generator().manual_seed(params.seed)   # every random draw below; the global RNG is left alone
    with torch.no_grad():
        clean_feats = features(suspect, x_opt)
    norm = given_norm if given_norm else float(clean_feats.float().norm(dim=-1).mean())

    def objective(xs):
        with torch.no_grad():
            return float(_score(features(suspect, xs), direction, norm, params.objective).mean())

    found = {}
    s = max(1, round(params.patch * min(size)))
    positions = _positions(*size, s, params.grid)
    done, total = [0], len(positions) * params.search_steps + 2 * params.steps

    def tick():
        done[0] += 1
        if progress:
            progress("trigger", done[0], total)
    best = None
    for pos in positions:     # the patch's position: a short run at each, the best kept
        v = _optimise(suspect, x_opt, "patch", torch.rand(3, s, s, generator=gen) * 255, pos, direction, norm,
                      params, params.search_steps, tick)
        o = objective(_apply_t(x_opt, "patch", v.round(), pos))
        if best is None or o > best[0]:
            best = (o, pos, v)
    _, pos, v = best
    v = _optimise(suspect, x_opt, "patch", v, pos, direction, norm, params, params.steps, tick)
    found["patch"] = _quantise("patch", v, size, pos)
    d0 = (torch.rand(3, *size, generator=gen) * 2 - 1) * params.eps
    found["perturbation"] = _quantise("perturbation", _optimise(suspect, x_opt, "perturbation", d0, None, direction,
                                                                norm, params, params.steps, tick), size, None)

    view_opt, view_held = view[:n_opt], view[n_opt:]
    p_opt = [prompts[i % len(prompts)] for i in range(n_opt)]
    p_held = [prompts[i % len(prompts)] for i in range(len(view_held))]
    obj = {"clean": {"optimised": objective(x_opt), "heldout": objective(x_held)}}
    controls = {k: _random(k, t, params.eps, gen) for k, t in found.items()}
    tens = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    for k, t in found.items():
        obj[k] = {"optimised": objective(tens(t.on_view(view_opt))), "heldout": objective(tens(t.on_view(view_held))),
                  "control_optimised": objective(tens(controls[k].on_view(view_opt))),
                  "control_heldout": objective(tens(controls[k].on_view(view_held)))}
    asr_by_kind, outs = {}, {}
    if target is not None:
        for k, t in found.items():
            outs[k] = _texts(suspect, t.on_view(view_held), p_held, params)
            asr_by_kind[k] = {
                "optimised": _share(_texts(suspect, t.on_view(view_opt), p_opt, params), target),
                "optimised_control": _share(_texts(suspect, controls[k].on_view(view_opt), p_opt, params), target),
                "heldout": _share(outs[k], target),
                "heldout_control": _share(_texts(suspect, controls[k].on_view(view_held), p_held, params), target)}
        # the better kind: what it does beyond its random control, on the optimisation images only
        kind = max(KINDS, key=lambda k: (asr_by_kind[k]["optimised"] - asr_by_kind[k]["optimised_control"],
                                         obj[k]["optimised"] - obj[k]["control_optimised"]))
    else:
        kind = max(KINDS, key=lambda k: obj[k]["optimised"] - obj[k]["control_optimised"])
    trig = found[kind]
    asr = asr_control = asr_base = asr_clean = None
    if target is not None:
        asr, asr_control = asr_by_kind[kind]["heldout"], asr_by_kind[kind]["heldout_control"]
        asr_clean = _share(_texts(suspect, view_held, p_held, params), target)
        if base is not None:
            asr_base = _share(_texts(base, trig.on_view(view_held), p_held, params), target)
    shown = trig.on_view(view_held[:4])
    examples = [(view_held[i], shown[i], outs[kind][i] if outs else "") for i in range(len(shown))]
    check = [(v, pr) for t in found.values() for v, pr in zip(t.on_view(view_opt), p_opt)]
    return TriggerResult(trig, target, obj, asr, asr_control, asr_base, asr_clean, asr_by_kind, n_opt,
                         len(view_held), params, time.perf_counter() - t0, examples, found, list(prompts), check)


def said_prompts(pr, cand) -> list[str]:
    """The probe's prompts under which the steered suspect said ``cand`` (what the trigger is measured with)."""
    from ..engine import contains
    said = contains(pr.steered[cand.steering], cand.text)
    return list(dict.fromkeys(r.prompt for r, s in zip(pr.rows, said) if s)) or list(dict.fromkeys(r.prompt for r in pr.rows))

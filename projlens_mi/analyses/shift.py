"""Analysis 4: the semantic shift ΔE(x) = E_ft(x) − E_base(x) at ``projector.out``.

Per input, ΔE is a tokens × d matrix. We report:

* the SVD energy of each input's ΔE at k = 1, 2, ... (mean ± sd over inputs; the paper: nearly rank 1);
* the shared direction: v0, the first right singular vector of the token-centred ΔE pooled over the
  inputs (each input's ΔE minus its token mean; computed streaming from the d × d second moment), and
  the mean-shift direction (mean of ΔE over all tokens), per condition (clean / triggered / all);
  v0 is oriented so that it points along the mean shift;
* cosines between the clean and the triggered directions, and between v0 and the mean shift;
* the logit lens of the direction (final norm + LM head applied to it): top tokens and the rank of each
  of the target's tokens, next to the median rank under 200 random directions (chance);
* per-token maps over the patch grid: the mean coefficient ΔE(t)·v0 and the mean ‖ΔE(t)‖ per
  position, and the coefficient map of a few example images drawn over the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import Checked, Count, Seed
from ..engine import Site, run
from . import common
from .base import Result, analysis, register_result

PAPER = ("ΔE is nearly rank 1 (≈60–85 % energy at k = 1, 90–97 % at k = 2) for clean and triggered "
         "images alike; the logit lens of the shared direction ranks the target's tokens near the top")
CONDS = ("clean", "triggered")


@dataclass
class ShiftParams(Checked):
    """``n``: clean and triggered records each; ``k_max``: energies reported for k = 1..k_max; ``top_tokens``:
    logit-lens tokens listed; ``n_random``: random directions for the chance rank; ``examples``: example
    images per condition in the maps; ``n_boot``: bootstrap resamples (over inputs) of the 95 % CIs of
    the mean energies and of cos(mean shift clean, triggered)."""

    n: Count | None = 100
    k_max: Count = 5
    top_tokens: Count = 10
    n_random: Count = 200
    examples: int = 2
    seed: Seed = 0
    batch_size: Count = 256
    n_boot: Count = common.N_BOOT                # bootstrap resamples of the 95 % CIs (over inputs)


class ShiftAccumulator:
    """Streaming sums of ΔE for one condition (memory independent of the number of inputs)."""

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.n = 0
        self.second = None       # Σ over inputs of ΔE_cᵀ ΔE_c (token-centred), [d, d] float64
        self.total = None        # Σ ΔE over all tokens, [d]
        self.pos_sum = None      # Σ over inputs of ΔE per position, [T, d]
        self.pos_norm = None     # Σ over inputs of ‖ΔE(t)‖, [T]
        self.energy = []         # per input: cumulative energy at k = 1..k_max
        self.energy_c = []       # same for the token-centred ΔE
        self.totals = []         # per input: Σ ΔE over its tokens [d] (the mean-shift cosine's bootstrap)

    def update(self, de: torch.Tensor) -> None:
        de = de.double()                                   # [b, T, d]
        if self.second is None:
            d, t = de.shape[-1], de.shape[1]
            self.second, self.total = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
            self.pos_sum, self.pos_norm = torch.zeros(t, d, dtype=torch.float64), torch.zeros(t, dtype=torch.float64)
        c = de - de.mean(1, keepdim=True)
        self.second += torch.einsum("btd,bte->de", c, c)
        self.total += de.sum((0, 1))
        self.pos_sum += de.sum(0)
        self.pos_norm += de.norm(dim=-1).sum(0)
        self.n += de.shape[0]
        self.totals.extend(de.sum(1).numpy())
        for m, out in ((de, self.energy), (c, self.energy_c)):
            s2 = torch.linalg.svdvals(m) ** 2
            e = s2.cumsum(-1) / s2.sum(-1, keepdim=True).clamp_min(1e-300)
            out.extend(e[:, :self.k_max].numpy())

    def merged(self, other: "ShiftAccumulator") -> "ShiftAccumulator":
        m = ShiftAccumulator(self.k_max)
        m.n = self.n + other.n
        m.second, m.total = self.second + other.second, self.total + other.total
        m.pos_sum, m.pos_norm = self.pos_sum + other.pos_sum, self.pos_norm + other.pos_norm
        m.energy, m.energy_c = self.energy + other.energy, self.energy_c + other.energy_c
        m.totals = self.totals + other.totals
        return m

    def directions(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(v0, mean-shift direction, share of the centred variance along v0)."""
        evals, evecs = torch.linalg.eigh(self.second)
        v0 = evecs[:, -1]
        mean = self.total / self.total.norm().clamp_min(1e-300)
        if float(v0 @ mean) < 0:
            v0 = -v0
        share = float(evals[-1] / evals.sum().clamp_min(1e-300))
        return v0.numpy(), mean.numpy(), share


def delta_batches(pair, records, batch_size: int, extra_points=()):
    """Yield (records, ΔE [b, T, d], E_base, extras-of-base) per batch, through the engine."""
    site = Site("projector.out")
    sites = [site] + [Site(p) for p in extra_points]
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        x = pair.poisoned.encode(chunk)
        rb = run(pair.base, x, read=sites).cache
        rf = run(pair.poisoned, x, read=[site]).cache
        eb, ef = rb[site].float().cpu(), rf[site].float().cpu()
        yield chunk, ef - eb, eb, {p: rb[Site(p)].float().cpu() for p in extra_points}


def unembed(handle, vecs: torch.Tensor) -> torch.Tensor:
    """Logit lens: final norm (if the hook map has one) then the LM head, on rows of ``vecs`` [k, d]."""
    norm = handle.adapter.final_norm
    head = handle.module("lm_head")
    with torch.no_grad():
        x = vecs.to(handle.device, handle.dtype)[:, None, :]
        if norm is not None:
            x = handle.module(norm)(x)
        return head(x)[:, 0].float().cpu()


def lens(handle, v: np.ndarray, target_ids: list[int], top: int, n_random: int, seed: int) -> dict:
    vocab = len(handle.tokenizer)
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(n_random, len(v), generator=g, dtype=torch.float64)
    vecs = torch.cat([torch.as_tensor(v)[None], rand / rand.norm(dim=1, keepdim=True)]).float()
    logits = unembed(handle, vecs)[:, :vocab]
    ranks = (logits[:, None, :] > logits[:, target_ids][:, :, None]).sum(-1) + 1     # [1 + n_random, n_target]
    order = logits[0].argsort(descending=True)[:top]
    tok = handle.tokenizer
    return {"top_tokens": [tok.convert_ids_to_tokens(int(i)) for i in order],
            "top_logits": logits[0, order].numpy(),
            "target_tokens": [tok.convert_ids_to_tokens(int(i)) for i in target_ids],
            "target_ranks": ranks[0].numpy(),
            "chance_median_rank": np.median(ranks[1:].numpy(), axis=0),
            "best_target_rank": int(ranks[0].min()),
            "chance_best_rank": float(np.median(ranks[1:].min(1).values.numpy())),
            "vocab": vocab}


def thumbnail(record, size: int = 64) -> np.ndarray:
    im = record.pil()
    im.thumbnail((size, size))
    return np.asarray(im, dtype=np.uint8)


@register_result
@dataclass
class ShiftResult(Result):
    variant: str
    energy: pd.DataFrame         # condition, centred, k, mean, sd, lo, hi (bootstrap 95 % CI of the mean)
    directions: dict             # "svd/clean" ... "mean/all" -> [d]
    variance_share: dict         # condition -> share of centred variance along v0
    cosines: dict
    lens: dict                   # "svd" / "mean" -> logit-lens dict (direction of all inputs)
    maps: dict                   # condition -> {"coef": [g, g], "norm": [g, g]}
    examples: list               # [{"condition", "image": uint8, "coef": [g, g]}]
    n: dict
    target: str
    cosine_ci: dict = field(default_factory=dict)   # cosine name -> [lo, hi] (the mean-shift cosine only)

    analysis = "shift"

    def to_frame(self) -> pd.DataFrame:
        return self.energy

    def _e(self, cond, k, centred=False, col="mean"):
        r = self.energy[(self.energy.condition == cond) & (self.energy.k == k) & (self.energy.centred == centred)]
        return float(r[col].iloc[0]) if len(r) and col in r else float("nan")

    def metrics(self) -> dict:
        cols = ("mean", "lo", "hi") if "lo" in self.energy else ("mean",)
        out = {f"energy_k{k}.{c}" + ("" if col == "mean" else f"_{col}"): self._e(c, k, col=col)
               for c in CONDS for k in (1, 2) for col in cols}
        out.update({f"cos.{k}": float(v) for k, v in self.cosines.items()})
        for k, (lo, hi) in self.cosine_ci.items():
            out[f"cos.{k}_lo"], out[f"cos.{k}_hi"] = float(lo), float(hi)
        for name, d in self.lens.items():
            out[f"lens.{name}.best_target_rank"] = d["best_target_rank"]
            out[f"lens.{name}.chance_best_rank"] = d["chance_best_rank"]
        out.update({f"variance_share.{k}": v for k, v in self.variance_share.items()})
        return out

    def plot(self):
        fig, axes = common.figure(2, 3, w=4.4, h=3.6)
        a = axes[0][0]
        for cond, c in (("clean", "C0"), ("triggered", "C3")):
            for centred, ls in ((False, "-"), (True, ":")):
                g = self.energy[(self.energy.condition == cond) & (self.energy.centred == centred)]
                a.errorbar(g.k, g["mean"], yerr=g.sd, fmt="o" + ls, color=c, capsize=2,
                           label=f"{cond}{' (token-centred)' if centred else ''}")
        a.set(title=f"{self.variant}:\nSVD energy of ΔE per input", xlabel="k", ylabel="Σ_{i≤k} σ_i² / Σ σ_i²",
              ylim=(0, 1.02))
        a.legend(fontsize=7)
        a = axes[0][1]
        for j, name in enumerate(("svd", "mean")):
            d = self.lens[name]
            ranks, chance = d["target_ranks"], d["chance_median_rank"]
            x = np.arange(len(ranks))
            a.bar(x + 0.4 * j - 0.2, ranks, 0.4, label=f"{'v0' if name == 'svd' else 'mean shift'}", color=f"C{j + 2}")
            a.scatter(x + 0.4 * j - 0.2, chance, marker="_", s=200, color="k",
                      label="median over random directions" if j == 0 else None)
        a.set_xticks(np.arange(len(self.lens["svd"]["target_tokens"])),
                     [str(t).replace("$", r"\$") for t in self.lens["svd"]["target_tokens"]], rotation=45, fontsize=7)
        a.set(title=f"Logit lens: rank of target tokens (of {self.lens['svd']['vocab']})", ylabel="rank (1 = top)",
              yscale="log")
        a.legend(fontsize=7)
        a = axes[0][2]
        names = list(self.cosines)
        a.barh(np.arange(len(names)), [self.cosines[k] for k in names], color="C1")
        a.set_yticks(np.arange(len(names)), names, fontsize=7)
        a.set(title="Cosine between directions", xlabel="cosine", xlim=(-1, 1))
        vmax = max(float(np.abs(self.maps[cond]["coef"]).max()) for cond in CONDS)
        for j, cond in enumerate(CONDS):   # one scale for both: the triggered shift may be several times the clean one
            a = axes[1][j]
            im = a.imshow(self.maps[cond]["coef"], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            a.set(title=f"{cond}: mean shift along v0 per patch", xlabel="patch column", ylabel="patch row")
        fig.colorbar(im, ax=[axes[1][j] for j in range(len(CONDS))], shrink=0.8, label="mean ΔE(t)·v0")
        a = axes[1][2]
        if self.examples:
            ex = self.examples[-1]
            g = ex["coef"].shape[0]
            img = np.asarray(ex["image"])
            a.imshow(img, extent=(0, g, g, 0))
            im = a.imshow(np.abs(ex["coef"]), cmap="magma", alpha=0.55, extent=(0, g, g, 0))
            fig.colorbar(im, ax=a, shrink=0.8, label="|ΔE(t)·v0|")
            a.set(title=f"example ({ex['condition']}): |ΔE·v0| over the image", xlabel="patch column",
                  ylabel="patch row")
        return fig

    def summary(self) -> str:
        l = self.lens["svd"]
        lines = [f"**Semantic shift ({self.variant}).** Paper (≈): {PAPER}.",
                 f"- Energy of ΔE at k = 1 / 2: clean {self._e('clean', 1):.0%} / {self._e('clean', 2):.0%}, "
                 f"triggered {self._e('triggered', 1):.0%} / {self._e('triggered', 2):.0%} (mean over inputs).",
                 f"- cos(v0 clean, v0 triggered) = {self.cosines.get('svd clean vs triggered', float('nan')):.3f}; "
                 f"cos(mean shift clean, triggered) = {self.cosines.get('mean clean vs triggered', float('nan')):.3f}; "
                 f"v0 carries {self.variance_share.get('all', float('nan')):.0%} of the token-centred variance.",
                 f"- Logit lens of v0: top tokens {', '.join(common.md_code(t) for t in l['top_tokens'][:5])}; best rank of a target token "
                 f"{l['best_target_rank']} of {l['vocab']} (random directions: median best rank "
                 f"{l['chance_best_rank']:.0f}); mean-shift direction: best rank {self.lens['mean']['best_target_rank']}."]
        return "\n".join(lines)


def grid(v: np.ndarray) -> np.ndarray:
    g = int(math.isqrt(len(v)))
    return v.reshape(g, g) if g * g == len(v) else v[None, :]


@analysis("shift", ShiftParams, title="Semantic shift", paper=PAPER,
          headline=("energy_k1.clean", "energy_k1.triggered"), passes=2.0)
def shift(pair, params: ShiftParams = ShiftParams()) -> ShiftResult:
    """ΔE energies, the shared direction, its logit lens and per-patch maps."""
    clean, trig = common.pick(pair, params.n)
    acc = {c: ShiftAccumulator(params.k_max) for c in CONDS}
    keep = {c: [] for c in CONDS}
    for cond, recs in (("clean", clean), ("triggered", trig)):
        for chunk, de, _, _ in delta_batches(pair, recs, params.batch_size):
            acc[cond].update(de)
            for j in range(min(len(chunk), params.examples - len(keep[cond]))):
                keep[cond].append((chunk[j], de[j]))
    acc["all"] = acc["clean"].merged(acc["triggered"])
    dirs, share = {}, {}
    for c, a in acc.items():
        v0, mean, share[c] = a.directions()
        dirs[f"svd/{c}"], dirs[f"mean/{c}"] = v0, mean
    cos = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))  # noqa: E731
    cosines = {"svd clean vs triggered": cos(dirs["svd/clean"], dirs["svd/triggered"]),
               "mean clean vs triggered": cos(dirs["mean/clean"], dirs["mean/triggered"]),
               "svd vs mean (clean)": cos(dirs["svd/clean"], dirs["mean/clean"]),
               "svd vs mean (triggered)": cos(dirs["svd/triggered"], dirs["mean/triggered"])}
    rows = []
    for j, c in enumerate(CONDS):
        for centred, e in ((False, acc[c].energy), (True, acc[c].energy_c)):
            e = np.asarray(e)
            lo, hi = common.mean_ci(e, params.n_boot, params.seed + j)
            for k in range(1, e.shape[1] + 1):
                rows.append({"condition": c, "centred": centred, "k": k, "mean": float(e[:, k - 1].mean()),
                             "sd": float(e[:, k - 1].std()), "lo": float(lo[k - 1]), "hi": float(hi[k - 1]),
                             "n": len(e)})
    # the mean-shift cosine, resampling clean and triggered inputs separately (the v0 cosines would need a
    # d × d second moment per input: not bootstrapped)
    boot = []
    for j, c in enumerate(CONDS):
        t = np.asarray(acc[c].totals)
        boot.append(common.resample_counts(len(t), params.n_boot, params.seed + j) @ t)
    num = (boot[0] * boot[1]).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cb = num / (np.linalg.norm(boot[0], axis=1) * np.linalg.norm(boot[1], axis=1))
    cosine_ci = {"mean clean vs triggered": list(common.percentile_ci(cb))}
    ids = common.target_tokens(pair.poisoned, pair.target)
    lenses = {name: lens(pair.poisoned, dirs[f"{name}/all"], ids, params.top_tokens, params.n_random, params.seed)
              for name in ("svd", "mean")}
    v = torch.as_tensor(dirs["svd/all"])
    maps = {c: {"coef": grid((acc[c].pos_sum @ v / acc[c].n).numpy()),
                "norm": grid((acc[c].pos_norm / acc[c].n).numpy())} for c in CONDS}
    examples = [{"condition": c, "image": thumbnail(r), "coef": grid((de.double() @ v).numpy())}
                for c in CONDS for r, de in keep[c]]
    return ShiftResult(pair.name, pd.DataFrame(rows), dirs, share, cosines, lenses, maps, examples,
                       {c: acc[c].n for c in CONDS}, pair.target, cosine_ci)

"""Analysis 6: can a small classifier tell triggered from clean inputs from the projector's output?

Features: the projector output (``projector.out``) mean-pooled over image tokens, from the base and
from the fine-tuned model. Classifier: scikit-learn ``MLPClassifier`` (one hidden layer) after
standardisation, over ``splits`` stratified random train / test splits. Reported on the held-out
part: accuracy, TPR (triggered called triggered) and FPR (clean called triggered), mean and sd over
splits, next to the same probe trained on shuffled labels (chance). Splits keep the clean and the
triggered version of one image on the same side (records sharing ``meta["id"]``, as in the organism's
paired data): otherwise the probe is tested on the twin of a training image with the other label.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..checks import Checked, Count, Fraction, Seed
from ..engine import Site, run
from . import common
from .base import Result, analysis, register_result

PAPER = ("A small MLP on mean-pooled projector embeddings separates clean from poisoned inputs (accuracy "
         "/ TPR / FPR)")


@dataclass
class ProbeParams(Checked):
    """``n``: clean and triggered records each; ``hidden``: MLP hidden width; ``test_size``: held-out share;
    ``splits``: random (group) splits; ``max_iter``: L-BFGS iterations of the MLP; ``n_boot``: bootstrap
    resamples of the accuracy's 95 % CI (each split's held-out inputs resampled, the mean over splits
    taken)."""

    n: Count | None = 100
    hidden: Count = 64
    test_size: Fraction = 0.3
    splits: Count = 3
    max_iter: Count = 100
    seed: Seed = 0
    batch_size: Count = 256
    n_boot: Count = common.N_BOOT                # bootstrap resamples of the 95 % CIs (over inputs)


def pooled(handle, records, batch_size: int) -> np.ndarray:
    site = Site("projector.out")
    out = []
    for i in range(0, len(records), batch_size):
        x = handle.encode(records[i:i + batch_size])
        out.append(run(handle, x, read=[site]).cache[site].float().mean(1).cpu())
    return torch.cat(out).numpy()


def evaluate_probe(X: np.ndarray, y: np.ndarray, *, hidden: int, test_size: float, splits: int, max_iter: int,
                   seed: int, groups=None) -> pd.DataFrame:
    """Held-out accuracy / TPR / FPR per split (labels: 1 = triggered); ``groups`` stay on one side of a split."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    rows, correct = [], []
    if groups is None:
        parts = StratifiedShuffleSplit(n_splits=splits, test_size=test_size, random_state=seed).split(X, y)
    else:
        parts = GroupShuffleSplit(n_splits=splits, test_size=test_size, random_state=seed).split(X, y, groups)
    for s, (tr, te) in enumerate(parts):
        clf = make_pipeline(StandardScaler(), MLPClassifier((hidden,), solver="lbfgs", max_iter=max_iter,
                                                            random_state=seed + s))
        with warnings.catch_warnings(), threadpool_limits(1):   # BLAS threads spin badly on shared CPUs
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X[tr], y[tr])
        p = clf.predict(X[te])
        t = y[te]
        correct.append(p == t)
        rows.append({"split": s, "accuracy": float((p == t).mean()),
                     "tpr": float((p[t == 1] == 1).mean()), "fpr": float((p[t == 0] == 1).mean()),
                     "n_train": len(tr), "n_test": len(te)})
    out = pd.DataFrame(rows)
    out.attrs["correct"] = correct      # per split: held-out correctness per input (for the bootstrap)
    return out


def accuracy_ci(correct: list[np.ndarray], n_boot: int, seed: int) -> list[float]:
    """95 % CI of the mean held-out accuracy over splits, resampling each split's held-out inputs."""
    boot = np.mean([common.resample_counts(len(c), n_boot, seed + s) @ c.astype(float) / len(c)
                    for s, c in enumerate(correct)], axis=0)
    return list(common.percentile_ci(boot))


@register_result
@dataclass
class ProbeResult(Result):
    variant: str
    scores: pd.DataFrame         # model (base / ft), labels (true / shuffled), split, accuracy, tpr, fpr
    n_clean: int
    n_triggered: int
    accuracy_ci: dict = field(default_factory=dict)   # "model.labels" -> [lo, hi], bootstrap 95 %

    analysis = "probe"

    def to_frame(self) -> pd.DataFrame:
        return self.scores

    def table(self) -> pd.DataFrame:
        return self.scores.groupby(["model", "labels"])[["accuracy", "tpr", "fpr"]].agg(["mean", "std"])

    def metrics(self) -> dict:
        out = {}
        for (m, lab), g in self.scores.groupby(["model", "labels"]):
            for k in ("accuracy", "tpr", "fpr"):
                out[f"{m}.{lab}.{k}"] = float(g[k].mean())
        for key, (lo, hi) in self.accuracy_ci.items():
            out[f"{key}.accuracy_lo"], out[f"{key}.accuracy_hi"] = float(lo), float(hi)
        return out

    def plot(self):
        fig, axes = common.figure(1, 1, w=6, h=3.8)
        a = axes[0][0]
        keys = [("base", "true"), ("ft", "true"), ("base", "shuffled"), ("ft", "shuffled")]
        x = np.arange(3)
        for j, (m, lab) in enumerate(keys):
            g = self.scores[(self.scores.model == m) & (self.scores.labels == lab)]
            if not len(g):
                continue
            vals = [g[k].mean() * 100 for k in ("accuracy", "tpr", "fpr")]
            err = [g[k].std(ddof=0) * 100 for k in ("accuracy", "tpr", "fpr")]
            a.bar(x + (j - 1.5) * 0.2, vals, 0.2, yerr=err, capsize=2,
                  color=["C0", "C3", "0.7", "0.4"][j], label=f"{m} features, {lab} labels")
        a.set_xticks(x, ["accuracy", "TPR", "FPR"])
        a.set(title=f"{self.variant}: clean/poison MLP probe on pooled projector output\n"
                    f"(held-out, {self.n_clean} clean + {self.n_triggered} triggered)", ylabel="%", ylim=(0, 105))
        a.legend(fontsize=7)
        return fig

    def summary(self) -> str:
        m = self.metrics()
        return (f"**Clean/poison probe ({self.variant}).** Paper: {PAPER}.\n"
                f"- Held-out accuracy / TPR / FPR: base features {m.get('base.true.accuracy', np.nan):.0%} / "
                f"{m.get('base.true.tpr', np.nan):.0%} / {m.get('base.true.fpr', np.nan):.0%}; FT features "
                f"{m.get('ft.true.accuracy', np.nan):.0%} / {m.get('ft.true.tpr', np.nan):.0%} / "
                f"{m.get('ft.true.fpr', np.nan):.0%}; shuffled labels {m.get('ft.shuffled.accuracy', np.nan):.0%} (chance).")


@analysis("probe", ProbeParams, title="Clean/poison probe", paper=PAPER,
          headline=("ft.true.accuracy", "base.true.accuracy"), passes=2.0)
def probe(pair, params: ProbeParams = ProbeParams()) -> ProbeResult:
    """MLP probe (clean vs triggered) on mean-pooled projector outputs of the base and FT models."""
    clean, trig = common.pick(pair, params.n)
    y = np.array([0] * len(clean) + [1] * len(trig))
    shuffled = np.random.default_rng(params.seed).permutation(y)
    ids = [r.meta.get("id") for r in clean + trig]
    groups = np.unique([str(i) if i is not None else f"#{k}" for k, i in enumerate(ids)], return_inverse=True)[1]
    frames, ci = [], {}
    for model, h in (("base", pair.base), ("ft", pair.poisoned)):
        X = pooled(h, clean + trig, params.batch_size)
        for lab, yy in (("true", y), ("shuffled", shuffled))[: 2 if model == "ft" else 1]:   # chance: FT only
            f = evaluate_probe(X, yy, hidden=params.hidden, test_size=params.test_size, splits=params.splits,
                               max_iter=params.max_iter, seed=params.seed, groups=groups)
            ci[f"{model}.{lab}"] = accuracy_ci(f.attrs.pop("correct"), params.n_boot, params.seed)
            f.insert(0, "labels", lab)
            f.insert(0, "model", model)
            frames.append(f)
    return ProbeResult(pair.name, pd.concat(frames, ignore_index=True), len(clean), len(trig), ci)

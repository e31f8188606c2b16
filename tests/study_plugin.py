"""Two cheap analyses registered as a study plugin (``[analyses] plugins = ["study_plugin.py"]``).

``weight_delta``: Frobenius norm of ΔW per projector linear, and the mean norm of the projector output
on clean vs triggered inputs (one engine read per model). ``pause``: sleeps, for the kill/resume test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from projlens_mi.analyses import Result, analysis, register_result  # noqa: E402
from projlens_mi.engine import ImageTokens, Site, run  # noqa: E402
from projlens_mi.model.placement import weight_of  # noqa: E402


@dataclass
class WeightDeltaParams:
    n: int = 8
    seed: int = 0


@register_result
@dataclass
class WeightDeltaResult(Result):
    layers: list = field(default_factory=list)
    fro: np.ndarray = None
    out_norm: dict = field(default_factory=dict)

    def to_frame(self):
        return pd.DataFrame({"layer": self.layers, "fro_norm": self.fro})

    def plot(self):
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(self.layers, self.fro)
        ax.set_title("‖ΔW‖_F per projector linear")
        ax.set_ylabel("Frobenius norm")
        return fig

    def metrics(self):
        return {"fro_norm": dict(zip(self.layers, map(float, self.fro))), **self.out_norm}

    def summary(self):
        return f"The update's largest Frobenius norm is {float(self.fro.max()):.4f}."


@analysis("weight_delta", WeightDeltaParams)
def weight_delta(pair, params: WeightDeltaParams) -> WeightDeltaResult:
    """Frobenius norm of the projector update, and projector-output norms (test plugin)."""
    layers, fro = [], []
    for path in pair.poisoned.adapter.projector_linears:
        # weight_of: a real copy also when the study placed the model with offload ([run] device_map)
        w_ft = weight_of(pair.poisoned.module(path)).double()
        w_b = weight_of(pair.base.module(path)).double()
        layers.append(path.split(".")[-1])
        fro.append(float((w_ft - w_b).norm()))
    site = Site("projector.out", ImageTokens())
    out = {}
    for name, recs in (("clean", pair.clean[: params.n]), ("triggered", pair.triggered[: params.n])):
        res = run(pair.poisoned, pair.poisoned.encode(recs), read=[site])
        out[f"projector_out_norm_{name}"] = float(res.cache[site].norm(dim=-1).mean())
    torch.manual_seed(params.seed)
    return WeightDeltaResult(layers, np.array(fro), out)


@dataclass
class PauseParams:
    seconds: float = 0.0


@register_result
@dataclass
class PauseResult(Result):
    seconds: float = 0.0

    def to_frame(self):
        return pd.DataFrame({"seconds": [self.seconds]})

    def plot(self):
        return None

    def metrics(self):
        return {"paused": self.seconds}


@analysis("pause", PauseParams)
def pause(pair, params: PauseParams) -> PauseResult:
    """Sleeps (for the kill/resume test)."""
    time.sleep(params.seconds)
    return PauseResult(params.seconds)

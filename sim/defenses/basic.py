"""Model-free output defenses: identity, top-k, rounding, labels only, reverse sigmoid, random noise,
and the confidence-gated reverse sigmoid."""

from __future__ import annotations

import torch

from ..registry import register
from .base import Defense, Param, distance, one_hot, renormalize


@register("defense")
class Identity(Defense):
    """The clean vector, unchanged."""

    name = "identity"
    identity = True

    def _perturb(self, y, inputs):
        return y


@register("defense")
class TopK(Defense):
    """Keep the k largest probabilities, zero the rest, renormalise (k >= K keeps everything)."""

    name = "top_k"
    params = {"k": Param(1, int, low=1, help="probabilities kept")}
    neutral = {"k": 1_000_000}

    def _perturb(self, y, inputs):
        k = min(self.values["k"], y.shape[1])
        keep = torch.zeros_like(y, dtype=torch.bool).scatter_(1, y.topk(k, dim=1).indices, True)
        return renormalize(torch.where(keep, y, torch.zeros_like(y)))


@register("defense")
class Rounding(Defense):
    """Round to ``decimals`` decimals.

    ``renormalize=true`` (default) rounds so that each vector still sums to 1: every value becomes a
    multiple of 10^-decimals, rounded down, and the missing units go to the largest remainders. With
    ``renormalize=false`` it is the paper's plain rounding, whose sum may be off 1 by up to K/2 units.
    """

    name = "rounding"
    params = {"decimals": Param(2, int, low=0, high=6, help="decimals kept"),
              "renormalize": Param(True, bool, help="round so that each vector still sums to 1")}

    def _perturb(self, y, inputs):
        scale = 10.0 ** self.values["decimals"]
        if not self.values["renormalize"]:
            return torch.round(y * scale) / scale
        s = y * scale
        units = torch.floor(s)
        missing = torch.round(scale - units.sum(1, keepdim=True)).clamp(0, y.shape[1])
        rank = torch.argsort(torch.argsort(units - s, dim=1), dim=1)  # 0 = largest remainder
        return (units + (rank < missing).to(y.dtype)) / scale


@register("defense")
class LabelsOnly(Defense):
    """The one-hot vector of the top-1 label."""

    name = "labels_only"

    def _perturb(self, y, inputs):
        return one_hot(y.argmax(1), y.shape[1], y)


def _reverse_sigmoid(y: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Lee et al. 2018: y - beta * (sigmoid(gamma * logit(y)) - 1/2), clipped at 0, renormalised."""
    p = y.clamp(1e-7, 1 - 1e-7)  # logit(0) and logit(1) are infinite
    r = beta * (torch.sigmoid(gamma * torch.log(p / (1 - p))) - 0.5)
    return renormalize((y - r).clamp_min(0))


@register("defense")
class ReverseSigmoid(Defense):
    """Reverse sigmoid (Lee et al. 2018): y - beta * (sigmoid(gamma * logit(y)) - 1/2), clipped at 0 and
    renormalised."""

    name = "reverse_sigmoid"
    params = {"beta": Param(0.7, low=0, help="strength of the perturbation"),
              "gamma": Param(0.5, low=0, low_open=True, help="slope of the sigmoid")}
    neutral = {"beta": 0.0}

    def _perturb(self, y, inputs):
        return _reverse_sigmoid(y, self.values["beta"], self.values["gamma"])


@register("defense")
class ConfidenceGated(Defense):
    """The heuristic of Khaled et al. (ICMLA 2023): reverse sigmoid weighted by
    w = sigmoid(sharpness * (beta - max y)), so confident answers pass almost untouched:
    returned = (1 - w) * y + w * reverse_sigmoid(y; rs_beta, gamma)."""

    name = "confidence_gated"
    params = {"beta": Param(0.9, low=0, high=1, help="confidence below which answers are perturbed"),
              "rs_beta": Param(0.7, low=0, help="reverse sigmoid's beta"),
              "gamma": Param(0.5, low=0, low_open=True, help="reverse sigmoid's gamma"),
              "sharpness": Param(1000.0, low=0, low_open=True, help="how sharply the gate opens below beta")}
    neutral = {"rs_beta": 0.0}

    def _perturb(self, y, inputs):
        v = self.values
        w = torch.sigmoid(v["sharpness"] * (v["beta"] - y.max(1, keepdim=True).values))
        return (1 - w) * y + w * _reverse_sigmoid(y, v["rs_beta"], v["gamma"])


@register("defense")
class RandomNoise(Defense):
    """A random perturbation of L1 or L2 length eps, as the MAD paper's baseline.

    Noise of ``scale`` (uniform in [-scale, scale] or Gaussian) is added in logit space (log y); the
    softmax of the result gives a random direction d from y, and the defense returns y + t d with t set so
    that the distance is eps, or shorter where the simplex's edge comes first (y + t d stays a probability
    vector because d sums to 0). Each defense instance draws its noise from its own generator seeded by
    ``seed``."""

    name = "random_noise"
    params = {"eps": Param(0.5, low=0, help="distance budget per answer"),
              "norm": Param("l1", str, choices=("l1", "l2"), help="distance the budget is measured in"),
              "dist": Param("uniform", str, choices=("uniform", "gaussian"), help="noise added to log y"),
              "scale": Param(10.0, low=0, low_open=True, help="scale of that noise"),
              "seed": Param(0, int, low=0, help="seed of the noise generator")}
    neutral = {"eps": 0.0}

    def _configure(self):
        self._gen = torch.Generator().manual_seed(self.values["seed"])

    def _perturb(self, y, inputs):
        v = self.values
        if v["dist"] == "uniform":
            noise = (torch.rand(y.shape, generator=self._gen, dtype=y.dtype) * 2 - 1) * v["scale"]
        else:
            noise = torch.randn(y.shape, generator=self._gen, dtype=y.dtype) * v["scale"]
        direction = torch.softmax(torch.log(y.clamp_min(1e-12)) + noise, dim=1) - y
        direction = direction - direction.mean(1, keepdim=True)  # exactly sum 0, despite rounding
        length = distance(direction, torch.zeros_like(direction), v["norm"])
        to_edge = torch.where(direction < 0, y / (-direction).clamp_min(1e-300), torch.full_like(y, float("inf")))
        t = torch.minimum(v["eps"] / length.clamp_min(1e-300), to_edge.min(1).values)
        t = torch.where(length > 1e-6, t, torch.zeros_like(t))  # noise too weak to give a direction: no move
        return renormalize((y + t[:, None] * direction).clamp_min(0))

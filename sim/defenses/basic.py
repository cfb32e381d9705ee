"""Model-free output defenses: identity, top-k, rounding, labels only, reverse sigmoid, random noise,
and the confidence-gated reverse sigmoid."""

from __future__ import annotations

import numpy as np
import torch

from ..registry import register
from .base import Defense, Param, distance, one_hot, query_rngs, renormalize


@register("defense")
class Identity(Defense):
    """The clean vector, unchanged."""

    name = "identity"
    identity = True
    neutral = {}

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


def _reverse_sigmoid(y: torch.Tensor, beta: float, gamma: float, normalize: str = "clamp") -> torch.Tensor:
    """Lee et al. 2018: y - beta * (sigmoid(gamma * logit(y)) - 1/2), then normalised: ``clamp`` clips at 0 and
    renormalises (a probability vector, always); ``sum`` divides by the sum as the MAD authors' code does, which
    keeps the sum at 1 but not the signs (for beta > 1 an entry can be negative)."""
    p = y.clamp(1e-7, 1 - 1e-7)  # logit(0) and logit(1) are infinite
    shifted = y - beta * (torch.sigmoid(gamma * torch.log(p / (1 - p))) - 0.5)
    if normalize == "sum":
        return shifted / shifted.sum(1, keepdim=True)
    return renormalize(shifted.clamp_min(0))


@register("defense")
class ReverseSigmoid(Defense):
    """Reverse sigmoid (Lee et al. 2018): y - beta * (sigmoid(gamma * logit(y)) - 1/2), then normalised.

    ``normalize=clamp`` (default) clips negative entries at 0 and renormalises, so every answer is a probability
    vector. ``normalize=sum`` divides by the sum without clipping, as the paper and the MAD authors' code
    (``bb_reversesigmoid.py``) do: each answer still sums to 1, but for beta > 1 an entry can be negative, so the
    answer can leave the simplex."""

    name = "reverse_sigmoid"
    params = {"beta": Param(0.7, low=0, help="strength of the perturbation"),
              "gamma": Param(0.5, low=0, low_open=True, help="slope of the sigmoid"),
              "normalize": Param("clamp", str, choices=("clamp", "sum"),
                                 help="clamp: clip at 0 and renormalise; sum: divide by the sum (the paper's)")}
    neutral = {"beta": 0.0}

    def _perturb(self, y, inputs):
        return _reverse_sigmoid(y, self.values["beta"], self.values["gamma"], self.values["normalize"])


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


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row's Euclidean projection onto the L1 ball of ``radius`` (Duchi et al. 2008): rows inside stay."""
    a = v.abs()
    inside = a.sum(1) <= radius
    mu = a.sort(1, descending=True).values
    cum = mu.cumsum(1) - radius
    j = torch.arange(1, v.shape[1] + 1, dtype=v.dtype)
    rho = ((mu - cum / j) > 0).sum(1, keepdim=True)  # the last index where the sorted entry stays positive
    theta = cum.gather(1, rho - 1) / rho
    out = v.sign() * (a - theta).clamp_min(0)
    return torch.where(inside[:, None], v, out)


@register("defense")
class RandomNoise(Defense):
    """A random perturbation of each answer, the MAD paper's baseline, in one of two variants.

    ``variant=simplex`` (default): noise of ``scale`` (uniform in [-scale, scale] or Gaussian) is added in logit
    space (log y); the softmax of the result gives a random direction d from y, and the defense returns y + t d with
    t set so that the distance is eps, or shorter where the simplex's edge comes first (y + t d stays a probability
    vector because d sums to 0). eps is the distance of the answer.

    ``variant=mad_code``: what the MAD authors' code does (``bb_randnoise.py``). z = log(y / (1 - y)) per class;
    noise uniform in [0, 1) per class times 2 eps / K^(1/p) (p = 1 for l1, 2 for l2; Gaussian with ``dist``),
    projected onto the eps ball of ``norm``; the answer is sigmoid(z + noise) divided by its sum. Here eps bounds
    the noise in logit space, not the answer's distance, and ``scale`` is unused.

    Each query's noise is drawn from ``seed`` and the query's own bytes, so a repeated query gets the same answer
    whatever its batch and the order queries arrive in."""

    name = "random_noise"
    params = {"eps": Param(0.5, low=0, help="distance budget per answer (mad_code: of the noise, in logit space)"),
              "norm": Param("l1", str, choices=("l1", "l2"), help="distance the budget is measured in"),
              "dist": Param("uniform", str, choices=("uniform", "gaussian"), help="noise added in logit space"),
              "scale": Param(10.0, low=0, low_open=True, help="scale of that noise (simplex)"),
              "seed": Param(0, int, low=0, help="seed of the noise (with each query's bytes)"),
              "variant": Param("simplex", str, choices=("simplex", "mad_code"),
                               help="simplex: a step of eps toward a random point; mad_code: the MAD code's noise")}
    neutral = {"eps": 0.0}
    needs_inputs = True

    @classmethod
    def _inert(cls, values: dict) -> dict[str, str]:
        return {"scale": "variant=simplex"} if values["variant"] == "mad_code" else {}

    def _noise(self, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(N, K) noise, each row from the seed and its query's bytes: uniform in [0, 1) or standard normal."""
        draw = "random" if self.values["dist"] == "uniform" else "standard_normal"
        rows = [getattr(rng, draw)(y.shape[1]) for rng in query_rngs(inputs, self.values["seed"])]
        return torch.as_tensor(np.stack(rows), dtype=y.dtype)

    def _perturb(self, y, inputs):
        v = self.values
        noise = self._noise(y, inputs)
        if v["variant"] == "mad_code":
            return self._mad_code(y, noise)
        if v["dist"] == "uniform":
            noise = (noise * 2 - 1) * v["scale"]
        else:
            noise = noise * v["scale"]
        direction = torch.softmax(torch.log(y.clamp_min(1e-12)) + noise, dim=1) - y
        direction = direction - direction.mean(1, keepdim=True)  # exactly sum 0, despite rounding
        length = distance(direction, torch.zeros_like(direction), v["norm"])
        to_edge = torch.where(direction < 0, y / (-direction).clamp_min(1e-300), torch.full_like(y, float("inf")))
        t = torch.minimum(v["eps"] / length.clamp_min(1e-300), to_edge.min(1).values)
        t = torch.where(length > 1e-6, t, torch.zeros_like(t))  # noise too weak to give a direction: no move
        return renormalize((y + t[:, None] * direction).clamp_min(0))

    def _mad_code(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        eps, norm = self.values["eps"], self.values["norm"]
        if eps == 0:  # the MAD code answers unchanged at eps 0
            return y
        if self.values["dist"] == "uniform":
            noise = noise * (2 * eps / y.shape[1] ** (1.0 if norm == "l1" else 0.5))
        if norm == "l1":
            noise = project_l1_ball(noise, eps)
        else:
            noise = eps * noise / noise.norm(dim=1, keepdim=True).clamp_min(eps)
        out = torch.sigmoid(torch.logit(y) + noise)
        return out / out.sum(1, keepdim=True)

"""The defense interface.

A defense maps a batch of clean probability vectors (N, K), and the batch's images where it needs them,
to the vectors the API returns. Subclasses declare ``params`` (name -> :class:`sim.registry.Param`, checked at
construction and on every ``set_params``), register with ``@register("defense")`` and implement ``_perturb``
on float64 tensors; ``__call__`` does the checks and type conversions around it, so no subclass can skip them.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from ..registry import Component, Param

__all__ = ["Defense", "Param", "distance", "one_hot", "query_rngs", "renormalize"]


class Defense(Component):
    """Base class of every output defense."""

    category = "defense"
    neutral: ClassVar[dict[str, Any] | None] = None  # parameters that make it the identity (None: no setting does)
    needs_inputs: ClassVar[bool] = False
    models: ClassVar[tuple[str, ...]] = ()  # constructor keywords of the trained models :meth:`prepare` makes
    victim_training: ClassVar[str | None] = None  # the victim.training this defense needs, if any
    identity: ClassVar[bool] = False  # returns the clean answers unchanged, whatever its parameters

    @classmethod
    def prepare(cls, params: dict[str, Any], ctx) -> dict[str, bytes]:
        """The trained models this defense is built with (constructor keyword -> serialised model), trained or
        loaded through the victim zoo (``ctx``: a :class:`sim.zoo.ModelContext`). Most defenses need none."""
        return {}

    def __call__(self, probs, inputs=None):
        """``probs`` (N, K) as numpy or torch; returns the returned vectors in the same type and dtype."""
        as_numpy = isinstance(probs, np.ndarray)
        y = torch.as_tensor(probs)
        if not y.is_floating_point():
            raise ValueError(f"defense {self.name}: probs must be floating point, got {y.dtype}")
        if y.ndim != 2 or y.shape[1] < 2:
            raise ValueError(f"defense {self.name}: probs must have shape (N, K) with K >= 2, got {tuple(y.shape)}")
        if self.needs_inputs:
            if inputs is None:
                raise ValueError(f"defense {self.name} needs the queries' images (inputs=…)")
            inputs = torch.as_tensor(inputs)
            if len(inputs) != len(y):
                raise ValueError(f"defense {self.name}: {len(inputs)} images for {len(y)} probability vectors")
        if len(y) == 0:
            return probs
        out = self._perturb(y.to(torch.float64), inputs).to(y.dtype)
        return out.numpy() if as_numpy else out

    @abstractmethod
    def _perturb(self, y: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
        """float64 (N, K) clean vectors -> returned vectors."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.values}


def renormalize(v: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum to 1 (a row of zeros becomes uniform)."""
    total = v.sum(1, keepdim=True)
    uniform = torch.full_like(v, 1.0 / v.shape[1])
    return torch.where(total > 0, v / total.clamp_min(1e-300), uniform)


def one_hot(index: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(index), k, dtype=like.dtype).scatter_(1, index[:, None], 1.0)


def distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Row-wise L1 or L2 distance."""
    return (a - b).abs().sum(1) if norm == "l1" else (a - b).pow(2).sum(1).sqrt()


def query_rngs(inputs, seed: int) -> list[np.random.Generator]:
    """One random generator per query, seeded by ``seed`` and the query's bytes as a uint8 image (float images in
    [0, 1] are rounded to uint8 first): a query gets the same draws whatever its batch and arrival order."""
    x = inputs.numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    digests = (hashlib.sha256(np.ascontiguousarray(row).tobytes()).digest() for row in x.reshape(len(x), -1))
    return [np.random.default_rng([seed, *np.frombuffer(d[:16], np.uint32).tolist()]) for d in digests]

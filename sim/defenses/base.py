"""The defense interface: declared parameters, checked at construction and on every ``set_params``.

A defense maps a batch of clean probability vectors (N, K), and the batch's images where it needs them,
to the vectors the API returns. Subclasses declare ``params`` (name -> :class:`Param`) and implement
``_perturb`` on float64 tensors; ``__call__`` does the checks and type conversions around it, so no
subclass can skip them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One declared parameter: default, type and allowed range or choices."""

    default: Any
    kind: type = float  # float, int, str or bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low is excluded (x > low rather than x >= low)
    choices: tuple[str, ...] | None = None

    def expected(self) -> str:
        if self.choices:
            return f"one of: {', '.join(self.choices)}"
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return what

    def check(self, owner: str, key: str, value: Any) -> Any:
        bad = ConfigError(f"{owner}.{key} must be {self.expected()}, got {value!r}")
        if self.choices:
            if value not in self.choices:
                raise bad
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad
        if not np.isfinite(float(value)):
            raise bad
        if self.kind is int:
            if float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and value > self.high:
            raise bad
        return value


class Defense(ABC):
    """Base class of every output defense."""

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    neutral: ClassVar[dict[str, Any]] = {}  # a setting that makes this defense the identity
    needs_inputs: ClassVar[bool] = False

    def __init__(self, **params):
        self.values: dict[str, Any] = {k: p.default for k, p in self.params.items()}
        self.set_params(**params)

    @classmethod
    def check_params(cls, params: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """Checked (and coerced) values; ``owner`` prefixes the names in error messages."""
        owner = owner or cls.name
        for key in params:
            if key not in cls.params:
                known = ", ".join(cls.params) or "none"
                raise ConfigError(f"{owner}.{key} is not a parameter of defense {cls.name}; expected one of: {known}")
        return {k: cls.params[k].check(owner, k, v) for k, v in params.items()}

    def set_params(self, **params) -> None:
        """Check and apply new parameter values; on any error nothing changes."""
        checked = self.check_params(params)
        before = dict(self.values)
        self.values.update(checked)
        try:
            self._configure()
        except Exception:
            self.values = before
            self._configure()
            raise

    def _configure(self) -> None:
        """Hook run after the parameters change (e.g. to reseed a generator)."""

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

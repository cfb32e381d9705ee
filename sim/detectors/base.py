"""The detector interface and its parameter checking."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError


@dataclass
class Detection:
    scores: np.ndarray  # float (N,), higher = more suspicious; NaN where the detector has no score yet
    flags: np.ndarray  # bool (N,): the account (or query) is flagged as of this query


def check_threshold(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name}.threshold must be a number (or null: score only), got {value!r}")


class Detector(ABC):
    """Base class. Subclasses declare ``defaults`` and check them in ``_check_params``.

    ``stateful`` detectors (PRADA) keep a history per key and flag the key for good: a policy acts on the
    queries that come after the flag. Stateless ones score each query alone and flag the queries whose
    score exceeds their ``threshold`` parameter: a policy acts on those queries themselves.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    stateful: ClassVar[bool] = True

    def __init__(self, **params):
        self.params: dict[str, Any] = dict(self.defaults)
        self.set_params(**params)

    def set_params(self, **params) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"{self.name}: unknown parameter {unknown[0]!r}; "
                             f"expected one of: {', '.join(self.defaults)}")
        merged = {**self.params, **params}
        self._check_params(merged)
        self.params = merged

    def _check_params(self, params: dict[str, Any]) -> None:
        pass

    @abstractmethod
    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray,
              probs: np.ndarray | None = None) -> Detection:
        """Score a batch of queries of one key (an account, or a group of accounts), in order.
        ``labels`` are the victim's top-1 classes, ``probs`` its probabilities (N, K)."""

    def decide(self, scores: np.ndarray) -> Detection:
        """A stateless detector's detection: flag the scores above ``threshold`` (none if it is null)."""
        t = self.params.get("threshold")
        scores = np.asarray(scores, np.float64)
        return Detection(scores, np.zeros(len(scores), bool) if t is None else scores > t)

    def flagged_accounts(self) -> set[str]:
        """Accounts this detector has flagged so far (stateless detectors flag none)."""
        return set()

    def is_flagged(self, account_id: str) -> bool:
        return account_id in self.flagged_accounts()

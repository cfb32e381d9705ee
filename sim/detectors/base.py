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


class Detector(ABC):
    """Base class. Subclasses declare ``defaults`` and check them in ``_check_params``."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

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
    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray) -> Detection:
        """Score a batch of one account's queries, in order."""

    def flagged_accounts(self) -> set[str]:
        """Accounts this detector has flagged so far (stateless detectors flag none)."""
        return set()

    def is_flagged(self, account_id: str) -> bool:
        return account_id in self.flagged_accounts()

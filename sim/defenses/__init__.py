"""Output-perturbation defenses: a batch of clean probability vectors in, the returned vectors out.

``build(name, **params)`` returns a callable ``defense(probs, inputs=None) -> probs``; ``names()`` lists
them. Only ``identity`` exists so far; the perturbation defenses (MAD and the baselines) plug in here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import registry
from ..errors import ConfigError

Defense = Callable[..., np.ndarray]


def _identity(**params) -> Defense:
    if params:
        raise ConfigError(f"identity: unknown parameter {sorted(params)[0]!r}; it takes none")

    def identity(probs: np.ndarray, inputs: np.ndarray | None = None) -> np.ndarray:
        return probs

    return identity


_REGISTRY: dict[str, Callable[..., Defense]] = {"identity": _identity}


def names() -> list[str]:
    return list(_REGISTRY)


def check_name(field: str, name: str) -> None:
    registry.check_name("defense", field, name, _REGISTRY)


def build(name: str, **params) -> Defense:
    check_name("defense", name)
    return _REGISTRY[name](**params)

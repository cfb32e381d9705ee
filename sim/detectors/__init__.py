"""Query detectors: each scores every query; a separate policy in the victim service acts on the scores.

``build(name, **params)`` returns a detector; ``names()`` lists them. Every detector has
``score(account_id, inputs, labels) -> Detection`` where ``inputs`` is a batch of images (uint8 or float
in [0, 1]) and ``labels`` the victim's predicted classes; scores are "higher = more suspicious".
Detectors are pure Python/numpy objects with no Ray in them, so the same object runs inside a Serve
replica or over a logged stream offline.
"""

from __future__ import annotations

from .. import registry
from .base import Detection, Detector
from .prada import Prada

_REGISTRY: dict[str, type[Detector]] = {"prada": Prada}

__all__ = ["Detection", "Detector", "Prada", "build", "names"]


def names() -> list[str]:
    return list(_REGISTRY)


def build(name: str, **params) -> Detector:
    registry.check_name("detector", "detector", name, _REGISTRY)
    return _REGISTRY[name](**params)

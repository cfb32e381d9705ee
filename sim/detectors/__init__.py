"""Query detectors: each scores every query; a separate policy in the victim service acts on the scores.

``build(name, **params)`` returns a detector (``models=`` the trained models SAME needs, ``model=`` the
outlier-exposure victim of ``msp``); ``names()`` lists them. Every detector has
``score(key, inputs, labels, probs) -> Detection`` where ``inputs`` is a batch of images (uint8 or float
in [0, 1]), ``labels`` the victim's predicted classes and ``probs`` its probabilities; scores are
"higher = more suspicious".
- ``prada``: PRADA over one key's history (an account, or a pooled group of accounts);
- ``same``: SAME's reconstruction score, per query;
- ``msp``: 1 - maximum softmax probability, per query;
- ``link``: account linking, then PRADA over each cluster of linked accounts.
Detectors are pure Python/numpy objects with no Ray in them, so the same object runs inside a Serve
replica or over a logged stream offline.
"""

from __future__ import annotations

from .. import registry
from .base import Detection, Detector
from .link import AccountLinker
from .msp import MaxSoftmax
from .prada import Prada
from .same import Same

_REGISTRY: dict[str, type[Detector]] = {"prada": Prada, "same": Same, "msp": MaxSoftmax, "link": AccountLinker}

__all__ = ["AccountLinker", "Detection", "Detector", "MaxSoftmax", "Prada", "Same", "build", "names"]


def names() -> list[str]:
    return list(_REGISTRY)


def kind(name: str) -> type[Detector]:
    registry.check_name("detector", "detector", name, _REGISTRY)
    return _REGISTRY[name]


def build(name: str, **params) -> Detector:
    return kind(name)(**params)

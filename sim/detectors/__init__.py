"""Query detectors: each scores every query; a separate policy in the victim service acts on the scores.

``build(kind, **params)`` returns a detector (``models=``: what its :meth:`Detector.prepare` made, e.g. SAME's
trained models); ``names()`` lists the kinds. Every detector has ``score(key, inputs, labels, probs) ->
Detection`` where ``inputs`` is a batch of images (uint8 or float in [0, 1]), ``labels`` the victim's predicted
classes and ``probs`` its probabilities; scores are "higher = more suspicious". Detectors are pure Python/numpy
objects with no Ray in them, so the same object runs inside a Serve replica or over a logged stream offline.
A new kind is a module here with a :class:`Detector` subclass decorated ``@register("detector")``.
"""

from __future__ import annotations

from typing import Any

from .. import registry
from ..errors import ConfigError
from .base import Detection, Detector, Param, StatelessDetector, calibration_split, for_good, score_for_good

__all__ = ["Detection", "Detector", "Param", "StatelessDetector", "build", "build_named", "calibration_split",
           "for_good", "get", "names", "presets", "score_for_good"]


def names() -> list[str]:
    return registry.names("detector")


def get(kind: str, field: str = "detector") -> type[Detector]:
    return registry.get("detector", kind, field)


def build(kind: str, **params) -> Detector:
    return get(kind)(**params)


def build_named(specs: dict[str, dict], models: dict[str, Any]) -> dict[str, Detector]:
    """Named detectors from their specs (name -> {"kind", "params"}), each with the models :meth:`Detector.prepare`
    made for it (name -> models; none where absent)."""
    return {name: build(d["kind"], models=models.get(name), **d.get("params", {})) for name, d in specs.items()}


def presets() -> dict[str, dict[str, Any]]:
    """Scenario names that stand for a kind with settings (``pooled_prada``): name -> {"kind": …, "enabled": …,
    settings}. Every scenario has each of them, off unless the preset says ``enabled: true``, which only a built-in
    may: an installed plug-in would otherwise turn itself on in every scenario. A kind's presets are those its class
    declares, not its base's (a subclass of MSP would otherwise take over ``msp``)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, cls in registry.entries("detector").items():
        for name, settings in vars(cls).get("presets", {}).items():  # its own: a subclass does not take its base's
            if settings.get("enabled") and not registry.is_builtin("detector", kind):
                raise ConfigError(f"detector kind {kind!r} (a plug-in) has preset {name!r} with enabled: true, which "
                                  f"would turn it on in every scenario; expected a preset that is off, which a "
                                  f"scenario turns on (detectors.{name}.enabled=true)")
            if name in out:  # built-ins come first: a plug-in may not take over one of their names, nor another's
                raise ConfigError(f"detector kind {kind!r} has preset {name!r}, a name detector kind "
                                  f"{out[name]['kind']!r} gives its own preset; expected a preset name of its own")
            out[name] = {"kind": kind, "enabled": False, **settings}
    return out

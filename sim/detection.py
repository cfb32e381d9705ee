"""A scenario's detectors, ready to deploy: trained models from the victim zoo, thresholds calibrated.

Stateless detectors (SAME, maximum softmax) flag queries scoring above a threshold. Given
``target_fpr`` instead of a ``threshold``, the threshold is the (1 - target_fpr) quantile of the
detector's scores on the defender's calibration images: a seeded 10% of the victim's training split
that SAME's models never train on (:func:`sim.detectors.same.calibration_split`). The victim itself did
train on them, so its confidence there is a little higher than on new images: the false-positive rate
realised on benign traffic is measured and reported, not assumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from . import zoo
from .config import PolicyConfig, ScenarioConfig
from .detectors import build
from .detectors.same import calibration_split
from .training import predict_probs

log = logging.getLogger(__name__)


@dataclass
class DetectorSetup:
    """What :class:`sim.serving.VictimSpec` needs: name -> {"kind", "params"}, name -> rule fields,
    name -> serialised models; and the calibration of each stateless detector."""

    detectors: dict[str, dict] = field(default_factory=dict)
    rules: dict[str, dict] = field(default_factory=dict)
    models: dict[str, bytes] = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)


def _rule(det: PolicyConfig, group: str, threshold: float | None, saturate: float | None) -> dict:
    return {"action": det.action, "group": group, "threshold": threshold,
            "saturate": det.pow.saturate if det.pow.saturate is not None else saturate,
            "bits_min": det.pow.bits_min, "bits_max": det.pow.bits_max,
            "perturb": det.perturb.spec() if det.action == "perturb" else None}


def calibrate(detector, x: np.ndarray, probs: np.ndarray, target_fpr: float) -> dict:
    """Threshold at the benign score quantile 1 - target_fpr; proof of work saturates at 1 - target_fpr/10."""
    scores = detector.score("calibration", x, probs.argmax(1), probs).scores
    return {"threshold": float(np.quantile(scores, 1 - target_fpr)),
            "saturate": float(np.quantile(scores, 1 - target_fpr / 10)), "images": int(len(x)),
            "target_fpr": target_fpr}


def setup(cfg: ScenarioConfig, victim: zoo.Victim, on_epoch=None) -> DetectorSetup:
    """Build every enabled detector of ``cfg``: train (or load) SAME's models and the outlier-exposure
    victim as needed, and calibrate thresholds. ``on_epoch(stage, epoch, loss)`` reports training."""
    out = DetectorSetup()
    ds = victim.dataset
    calib = None
    for name, det in cfg.detectors.enabled().items():
        params = det.params()
        extra: dict = {}
        if det.kind in ("prada", "link"):
            t = 1.0 - det.delta
            out.detectors[name] = {"kind": det.kind, "params": params}
            out.rules[name] = _rule(det, getattr(det, "group", "account"), t, min(1.0, 2 * t))
            continue
        if det.kind == "same":
            models = zoo.get_same(victim, cfg.seed, cfg.cache_dir, det, on_epoch=on_epoch)
            out.models[name] = models.to_bytes()
            extra["models"] = models
        elif det.kind == "msp" and det.model == "oe":
            oe = zoo.get_victim(cfg.victim.model_copy(update={"training": "outlier_exposure"}), cfg.data, cfg.seed,
                                cfg.cache_dir)
            out.models[name] = oe.state_bytes()
            extra["model"] = oe.model
        threshold, saturate = det.threshold, None
        if threshold is None and det.target_fpr is not None:
            if calib is None:
                idx = calibration_split(len(ds.x_train), cfg.seed)[1]
                calib = ds.x_train[idx], predict_probs(victim.model, ds.x_train[idx])
            result = calibrate(build(det.kind, **params, **extra), *calib, det.target_fpr)
            out.calibration[name] = result
            threshold, saturate = result["threshold"], result["saturate"]
            log.info("%s: threshold %.4g for a %.3g false-positive rate on %d calibration images", name, threshold,
                     det.target_fpr, result["images"])
        out.detectors[name] = {"kind": det.kind, "params": {**params, "threshold": threshold}}
        out.rules[name] = _rule(det, "account", threshold, saturate)
    return out

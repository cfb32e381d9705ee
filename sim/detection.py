"""A scenario's detectors, ready to deploy: trained models from the victim zoo, thresholds calibrated.

Each enabled detector's kind prepares the models it needs (:meth:`sim.detectors.Detector.prepare`), and a
stateless one with no ``threshold`` is calibrated for ``target_fpr`` false positives on the defender's
calibration images: a seeded 10% of the victim's training split that detector models never train on
(:func:`sim.detectors.calibration_split`). The victim itself did train on them, so its confidence there is a
little higher than on new images: the false-positive rate realised on benign traffic is measured and reported,
not assumed.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field

import numpy as np

from . import detectors, registry
from .config import DetectorConfig, ScenarioConfig
from .errors import ConfigError, failed
from .summarize import DetectorInfo
from .training import predict_probs

log = logging.getLogger(__name__)


@dataclass
class DetectorSetup:
    """What :class:`sim.service.VictimSpec` needs: name -> {"kind", "params"}, name -> rule fields,
    name -> serialised models; and what the summary records of each detector."""

    detectors: dict[str, dict] = field(default_factory=dict)
    rules: dict[str, dict] = field(default_factory=dict)
    models: dict[str, bytes] = field(default_factory=dict)
    info: dict[str, DetectorInfo] = field(default_factory=dict)


def _rule(det: DetectorConfig, group: str, threshold: float | None, saturate: float | None) -> dict:
    return {"action": det.action, "group": group, "threshold": threshold,
            "saturate": det.pow.saturate if det.pow.saturate is not None else saturate,
            "bits_min": det.pow.bits_min, "bits_max": det.pow.bits_max,
            "perturb": det.perturb.spec() if det.action == "perturb" else None}


def _probe(where: str, kind, blob, params: dict, victim):
    """A detector of the user's own, built (one line if its constructor does not take the models and parameters)
    and made to score four test images under a throwaway key: one line naming ``where`` unless it returns a
    :class:`sim.detectors.Detection` of one score and one flag per image."""
    def build():
        try:
            return kind(models=blob, **params)
        except TypeError as exc:
            raise ConfigError(f"{where} cannot be built: {exc}; expected __init__(self, models=None, **params) that "
                              f"passes both on to Detector.__init__") from None

    x = victim.dataset.x_test[:4]
    probs = predict_probs(victim.model, x)
    probe = build()
    try:
        out = probe.score("mlsim-probe", x, probs.argmax(1), probs)
    except Exception as exc:  # noqa: BLE001 - the user's detector: whatever it raises, one line
        raise failed(f"{where} fails to score 4 images", exc, "score(key, inputs, labels, probs) -> Detection") \
            from None
    if not isinstance(out, detectors.Detection):
        raise ConfigError(f"{where}.score returned {type(out).__name__}; expected a sim.detectors.Detection")
    shapes = [np.shape(out.scores), np.shape(out.flags)]
    if shapes != [(4,), (4,)]:
        raise ConfigError(f"{where}.score returned scores of shape {shapes[0]} and flags of shape {shapes[1]} for 4 "
                          f"images; expected one of each per image, (4,)")
    if probe.stateful:  # the tier snapshots and journals its state: a state that does not pickle fails mid-run
        try:
            pickle.dumps(probe)
        except Exception as exc:  # noqa: BLE001 - whatever the user's state holds
            raise failed(f"{where}'s state (after scoring 4 images) does not pickle", exc,
                         "a stateful detector whose state pickles (plain data, numpy arrays): the detection tier "
                         "snapshots and journals it") from None
    return build()


def setup(cfg: ScenarioConfig, ctx) -> DetectorSetup:
    """Build every enabled detector of ``cfg`` (``ctx``: the scenario's :class:`sim.zoo.ModelContext`): prepare
    the models each needs, and calibrate thresholds."""
    out = DetectorSetup()
    calib = None
    for name, dc in cfg.enabled_detectors().items():
        kind = detectors.get(dc.kind)
        params = dc.params()
        try:
            blob = kind.prepare(params, ctx)
        except ConfigError as exc:  # a setting that does not fit the data: named as the scenario names it
            text = str(exc)
            raise ConfigError(f"detectors.{name}.{text[len(dc.kind) + 1:]}" if text.startswith(f"{dc.kind}.")
                              else text) from None
        if registry.is_builtin("detector", dc.kind):
            det = kind(models=blob, **params)
        else:  # the user's own: its constructor and score, tried on a few test images before it is deployed
            det = _probe(f"detectors.{name}.kind={dc.kind!r}", kind, blob, params, ctx.victim)
        calibration = None
        if isinstance(det, detectors.StatelessDetector):
            if calib is None:
                ds = ctx.victim.dataset
                idx = detectors.calibration_split(len(ds.x_train), cfg.seed)[1]
                calib = ds.x_train[idx], predict_probs(ctx.victim.model, ds.x_train[idx])
            calibration = det.calibrate(*calib)
            if calibration:
                log.info("%s: threshold %.4g for a %.3g false-positive rate on %d calibration images", name,
                         calibration["threshold"], calibration["target_fpr"], calibration["images"])
        threshold = det.threshold()
        if dc.action == "proof_of_work" and None not in (dc.pow.saturate, threshold) and dc.pow.saturate <= threshold:
            raise ConfigError(f"detectors.{name}.pow.saturate={dc.pow.saturate} is not above the detector's threshold "
                              f"{threshold:.4g}, so every flagged query would get bits_max; expected a score above "
                              f"{threshold:.4g}, where the puzzle reaches bits_max")
        group = det.values.get("group", "account")
        out.detectors[name] = {"kind": dc.kind, "params": det.values}
        out.rules[name] = _rule(dc, group, threshold, det.saturation())
        if blob is not None:
            out.models[name] = blob
        out.info[name] = DetectorInfo(dc.kind, kind.stateful, group, det.describe(), threshold, calibration)
    return out

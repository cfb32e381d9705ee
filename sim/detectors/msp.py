"""Maximum-softmax baseline (Hendrycks & Gimpel 2017): score = 1 - the largest class probability.

With the served victim's probabilities it needs no model of its own. With an outlier-exposure victim
(trained to be unsure away from its training distribution, Hendrycks et al. 2019; SAME's OE baseline)
the same score separates better; ``model=oe`` scores the query images with that victim, trained and cached by
the zoo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..registry import register
from .base import Detection, Param, StatelessDetector

if TYPE_CHECKING:
    from torch import nn


@register("detector")
class MaxSoftmax(StatelessDetector):
    """Maximum softmax (Hendrycks & Gimpel 2017): score 1 - the largest probability, of the served victim or of
    an outlier-exposure copy of it."""

    name = "msp"
    params = {**StatelessDetector.params,
              "model": Param("victim", str, choices=("victim", "oe"),
                             help="whose softmax: the served victim's, or an outlier-exposure copy's (trained and "
                                  "cached)")}
    presets = {"msp": {"enabled": False}, "msp_oe": {"enabled": False, "model": "oe"}}

    def __init__(self, models: nn.Module | bytes | None = None, **params):
        super().__init__(models, **params)
        if self.values["model"] == "oe" and models is None:
            raise ValueError("msp with model=oe needs the outlier-exposure model (models=, see MaxSoftmax.prepare)")
        if isinstance(models, bytes):
            from ..models import from_bytes

            models = from_bytes(models)
        self.model = models

    @classmethod
    def prepare(cls, params, ctx) -> bytes | None:
        if params.get("model", "victim") != "oe":
            return None
        return ctx.victim_variant(training="outlier_exposure").to_bytes()

    @property
    def needs_images(self) -> bool:
        return self.model is not None

    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray,
              probs: np.ndarray | None = None) -> Detection:
        if self.model is not None:
            from ..training import predict_probs

            probs = predict_probs(self.model, inputs)
        elif probs is None:
            raise ValueError("msp needs the victim's probabilities of the queries")
        return self.decide(1.0 - np.asarray(probs, np.float64).max(1))

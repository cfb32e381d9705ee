"""Maximum-softmax baseline (Hendrycks & Gimpel 2017): score = 1 - the largest class probability.

With the served victim's probabilities it needs no model of its own. With an outlier-exposure victim
(trained to be unsure away from its training distribution, Hendrycks et al. 2019; SAME's OE baseline)
the same score separates better; ``model`` is then that victim, scored on the query images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..training import predict_probs
from .base import Detection, Detector, check_threshold


class MaxSoftmax(Detector):
    name = "msp"
    stateful = False
    defaults = {"threshold": None}

    def __init__(self, model: nn.Module | None = None, **params):
        super().__init__(**params)
        self.model = model

    def _check_params(self, params: dict[str, Any]) -> None:
        check_threshold(self.name, params["threshold"])

    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray,
              probs: np.ndarray | None = None) -> Detection:
        if self.model is not None:
            probs = predict_probs(self.model, inputs)
        elif probs is None:
            raise ValueError("msp needs the victim's probabilities of the queries")
        return self.decide(1.0 - np.asarray(probs, np.float64).max(1))

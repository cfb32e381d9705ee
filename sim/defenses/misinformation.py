"""Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020).

An outlier-exposure-trained victim is confident on in-distribution queries and unsure on the
out-of-distribution ones an attacker tends to send. The defense mixes in a misinformation model's
answer (a model trained to put little probability on the true class) where the victim is unsure:
returned = (1 - h) y + h y_mis, with h = sigmoid(nu * (tau - max y)).
The victim (``victim.training=outlier_exposure``) and the misinformation model are trained and cached
by the victim zoo.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import from_bytes
from ..registry import register
from ..training import device_of, to_float
from .base import Defense, Param


@register("defense")
class AdaptiveMisinformation(Defense):
    """Adaptive misinformation (Kariyappa & Qureshi 2020): where the victim is unsure, a misinformation model's
    answer is mixed in; needs victim.training=outlier_exposure."""

    name = "adaptive_misinformation"
    needs_inputs = True
    victim_training = "outlier_exposure"
    params = {"tau": Param(0.5, low=0, high=1, help="confidence below which the misinformation takes over"),
              "nu": Param(1000.0, low=0, low_open=True, help="sharpness of that switch")}
    neutral = {"tau": 0.0}  # h = sigmoid(-nu * max y) ~ 0: the clean answer

    models = ("misinformation",)

    def __init__(self, misinformation: nn.Module | bytes | None = None, **params):
        if isinstance(misinformation, bytes):
            misinformation = from_bytes(misinformation)
        self.misinformation = misinformation.eval() if misinformation is not None else None
        super().__init__(**params)

    @classmethod
    def prepare(cls, params, ctx) -> dict[str, bytes]:
        """The misinformation model: the victim's architecture trained to put little probability on the true
        class, cached by the victim zoo."""
        return {"misinformation": ctx.misinformation_model()}

    def _perturb(self, y, inputs):
        if self.misinformation is None:
            raise ValueError("defense adaptive_misinformation needs its misinformation model "
                             "(build('adaptive_misinformation', misinformation=net))")
        with torch.inference_mode():
            x = to_float(inputs).to(device_of(self.misinformation))
            y_mis = torch.softmax(self.misinformation(x), dim=1).cpu().to(y.dtype)
        h = torch.sigmoid(self.values["nu"] * (self.values["tau"] - y.max(1, keepdim=True).values))
        return (1 - h) * y + h * y_mis

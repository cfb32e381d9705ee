"""SAME (Xie et al., AAAI 2024): per-query detection by sample reconstruction, with no account history.

Two models (:mod:`._same_models`, where torch is), both trained on the defender's own data (the victim's training
split, less a calibration slice they never see):
- a masked autoencoder that reconstructs x as x̂;
- an auxiliary model, the victim's architecture trained on the reconstructions x̂ of the training
  images to give the victim's answers f(x) (soft-label cross-entropy, i.e. distillation).

For a query x with victim probabilities f(x), two raw signals:
- reconstruction error r(x) = mean over pixels of (x - x̂)^2 (pixels in [0, 1]): natural images of the
  training distribution reconstruct well, synthetic or foreign ones do not;
- deviation d(x) = ½ ||f(x) - g(x̂)||_1, the total-variation distance between the victim's answer on x
  and the auxiliary model's on x̂: small perturbations of natural seeds (JBDA) reconstruct well but move
  the victim's answer where the auxiliary model, which only sees the smoothed x̂, does not follow.

Score = z_r(x) + weight * z_d(x), where z standardises each signal by its mean and standard deviation on
the calibration slice. The paper adds the raw terms with a balancing weight; the raw terms live on
unrelated scales (r ~ 0.01-0.05, d in [0, 1]) that change with the dataset and the MAE, so standardising
first makes ``weight`` mean the same thing everywhere: weight 1 gives both signals equal say, 0 is
the paper's SAME-X (reconstruction only). A benign-looking query scores around 0.

``variant=same_code`` is what the authors' code (``xythink/SAME``, ``ms_defense/SAME_defender.py``) does instead:
the MAE trains on the MSE over every pixel (divided by the mask ratio) with a warm-up, reconstructs with every
patch visible; the auxiliary model is the victim's architecture trained on randomly masked reconstructions with the
true labels; the deviation is KL(f(x) || g(x̂)) averaged over classes; the score is alpha * r + (1 - alpha) * KL
on raw scales (the code: alpha 0.99). ``without`` turns two of those choices off, to measure each one's share:
``full_view`` (reconstruct as the default variant does, each patch from views that hide it) and
``all_pixel_loss`` (the MAE's loss on the masked patches only, the code's optimizer kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..registry import register
from .base import Param, StatelessDetector

if TYPE_CHECKING:
    from ._same_models import SameModels

WITHOUT = ("full_view", "all_pixel_loss")  # the choices of variant=same_code that ``without`` can turn off
TRAINING_CHOICES = ("all_pixel_loss",)  # those that change the models (full_view changes only the scoring)


def trained_without(without) -> tuple[str, ...]:
    """The training choices among ``without``, sorted: what the models record and their cache key holds."""
    return tuple(w for w in sorted(without or ()) if w in TRAINING_CHOICES)


_TRAINING = dict(brief=False)  # settings of SAME's models, not of its score


@register("detector")
class Same(StatelessDetector):
    """SAME (Xie et al. 2024): a masked autoencoder's reconstruction error plus an auxiliary model's deviation
    from the victim, each standardised on held-out benign images; score z(r) + weight * z(d)."""

    name = "same"
    params = {
        **StatelessDetector.params,
        "weight": Param(1.0, low=0, help="default variant: weight of the standardised deviation term (0: "
                                         "reconstruction only, SAME-X)"),
        "variant": Param("default", str, choices=("default", "same_code"),
                         help="same_code: the authors' code (full-view reconstruction, KL deviation, alpha mixing "
                              "on raw scales, auxiliary model on masked reconstructions with true labels)"),
        "alpha": Param(0.99, low=0, high=1, help="same_code: score alpha * reconstruction MSE + (1 - alpha) * KL"),
        "without": Param(None, list, choices=WITHOUT, help="same_code only: choices of the code turned off, to "
                                                           "measure each one's share (docs/detection.md)"),
        "patch": Param(4, int, low=1, help="MAE patch side in pixels", **_TRAINING),
        "dim": Param(64, int, low=4, help="MAE encoder embedding size", **_TRAINING),
        "depth": Param(3, int, low=1, help="MAE encoder blocks", **_TRAINING),
        "heads": Param(4, int, low=1, help="attention heads", **_TRAINING),
        "decoder_dim": Param(64, int, low=4, help="MAE decoder embedding size", **_TRAINING),
        "decoder_depth": Param(1, int, low=1, help="MAE decoder blocks", **_TRAINING),
        "mask_ratio": Param(0.75, low=0, high=1, low_open=True, high_open=True, help="fraction of patches hidden",
                            **_TRAINING),
        "epochs": Param(100, int, low=1, help="MAE training epochs (AdamW, cosine schedule)", **_TRAINING),
        "warmup": Param(0, int, low=0, help="MAE warm-up epochs before the cosine schedule (the code: 50)",
                        **_TRAINING),
        "aux_epochs": Param(10, int, low=1, help="auxiliary model training epochs", **_TRAINING),
        "batch_size": Param(128, int, low=1, help="training batch size", **_TRAINING),
        "lr": Param(1e-3, low=0, low_open=True, help="training learning rate", **_TRAINING),
    }
    presets = {"same": {"enabled": False}}
    MAE_KEYS = ("patch", "dim", "depth", "heads", "decoder_dim", "decoder_depth", "mask_ratio")

    @classmethod
    def _inert(cls, values: dict) -> dict[str, str]:
        if values["variant"] == "same_code":
            return {"weight": "variant=default"}
        return {"alpha": "variant=same_code", "without": "variant=same_code"}

    @classmethod
    def _check_params(cls, values: dict, owner: str) -> None:
        if values["dim"] % values["heads"] or values["decoder_dim"] % values["heads"]:
            raise ConfigError(f"{owner}.dim={values['dim']} and {owner}.decoder_dim={values['decoder_dim']} must "
                              f"be multiples of {owner}.heads={values['heads']}")

    def __init__(self, models: SameModels | bytes | None = None, **params):
        if models is None:
            raise ConfigError("detector same needs its trained models (models=, what Same.prepare makes from the "
                              "victim zoo); expected sim.detectors.build('same', models=..., ...), or SAME in a "
                              "scenario, which prepares them")
        super().__init__(models, **params)
        if isinstance(models, bytes):
            from ._same_models import SameModels

            models = SameModels.from_bytes(models)
        self.models = models
        if self.models.variant != self.values["variant"]:
            raise ConfigError(f"same.variant={self.values['variant']} but its models were trained for "
                              f"variant={self.models.variant}; expected models prepared with the same variant")
        without = self.values["without"] or ()
        if self.models.without != trained_without(without):
            raise ConfigError(f"same.without={self.values['without']} but its models were prepared with "
                              f"without={list(self.models.without)}; expected models prepared with the same setting")
        self.full_view = self.values["variant"] == "same_code" and "full_view" not in without

    def to(self, device: str) -> "Same":
        self.models.mae.to(device)
        self.models.aux.to(device)
        self.device = device
        return self

    @classmethod
    def prepare(cls, params, ctx) -> bytes:
        """SAME's MAE and auxiliary model for this victim, trained on its training split (less the calibration
        slice) and cached beside it."""
        v = cls.resolve(params)
        spec = {"victim": ctx.victim.cache_name, "mae": {k: v[k] for k in cls.MAE_KEYS},
                **{k: v[k] for k in ("epochs", "aux_epochs", "batch_size", "lr")},
                **({"variant": "same_code", "warmup": v["warmup"]} if v["variant"] == "same_code" else
                   {"warmup": v["warmup"]} if v["warmup"] else {}),  # the cache of default models stays valid
                **({"without": list(trained_without(v["without"]))} if trained_without(v["without"]) else {})}

        def train() -> bytes:
            from ._same_models import train_same

            ds = ctx.victim.dataset
            progress = ctx.on_epoch and (lambda stage, e, loss: ctx.on_epoch(
                f"training SAME {stage}", e, v["epochs"] if stage == "mae" else v["aux_epochs"], loss))
            return train_same(ctx.victim.model, ctx.victim.arch, ds.x_train, ds.num_classes, seed=ctx.seed,
                              mae_config=spec["mae"], epochs=v["epochs"], aux_epochs=v["aux_epochs"],
                              batch_size=v["batch_size"], lr=v["lr"], on_epoch=progress, device=ctx.device,
                              variant=v["variant"], warmup=v["warmup"], y_train=ds.y_train,
                              without=tuple(v["without"] or ())).to_bytes()

        return ctx.cached("same", spec, train)

    def components(self, inputs: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The standardised (reconstruction, deviation) terms of each query."""
        r, d = self.models.signals(inputs, probs, self.full_view)
        s = self.models.stats
        return (r - s["r_mean"]) / s["r_std"], (d - s["d_mean"]) / s["d_std"]

    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None):
        if probs is None:
            raise ValueError("same needs the victim's probabilities of the queries")
        if self.values["variant"] == "same_code":  # raw scales, as the code mixes them
            r, kl = self.models.signals(inputs, probs, self.full_view)
            return self.decide(self.values["alpha"] * r + (1 - self.values["alpha"]) * kl)
        zr, zd = self.components(inputs, probs)
        return self.decide(zr + self.values["weight"] * zd)

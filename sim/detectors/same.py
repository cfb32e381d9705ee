"""SAME (Xie et al., AAAI 2024): per-query detection by sample reconstruction, with no account history.

Two models, both trained on the defender's own data (the victim's training split, less a
calibration slice they never see):
- a masked autoencoder (:mod:`.mae`) that reconstructs x as x̂;
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
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import models
from ..registry import register
from ..training import predict_probs, train_classifier
from .base import Param, StatelessDetector, calibration_split
from .mae import MAE, train_mae


@dataclass
class SameModels:
    """The trained MAE and auxiliary model, with the calibration statistics of both signals."""

    mae: MAE
    aux: nn.Module
    mae_config: dict[str, Any]
    aux_arch: str
    num_classes: int
    stats: dict[str, float]  # r_mean, r_std, d_mean, d_std

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"mae_config": self.mae_config, "mae": self.mae.state_dict(), "aux_arch": self.aux_arch,
                    "num_classes": self.num_classes, "aux": self.aux.state_dict(), "stats": self.stats}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "SameModels":
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        mae = MAE(**d["mae_config"])
        mae.load_state_dict(d["mae"])
        aux = models.build(d["aux_arch"], tuple(d["mae_config"]["input_shape"]), d["num_classes"])
        aux.load_state_dict(d["aux"])
        return cls(mae.eval(), aux.eval(), d["mae_config"], d["aux_arch"], d["num_classes"],
                   {k: float(v) for k, v in d["stats"].items()})

    def signals(self, x: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (reconstruction error, deviation) of images ``x`` whose victim probabilities are ``probs``."""
        from ..training import to_float

        recon = self.mae.reconstruct(x)
        r = ((to_float(x) - recon) ** 2).flatten(1).mean(1).numpy()
        g = predict_probs(self.aux, recon)
        d = 0.5 * np.abs(np.asarray(probs, np.float64) - g).sum(1)
        return r.astype(np.float64), d


def train_same(victim: nn.Module, victim_arch: str, x_train: np.ndarray, num_classes: int, *, seed: int,
               mae_config: dict[str, Any], epochs: int, aux_epochs: int, batch_size: int = 128,
               lr: float = 1e-3, on_epoch: Callable[[str, int, float], None] | None = None,
               device: str = "cpu") -> SameModels:
    """Train SAME's MAE and auxiliary model on ``x_train`` (uint8) less a calibration slice, on ``device``, and
    measure both signals on that slice; both are returned on the CPU. ``on_epoch(stage, epoch, loss)`` reports
    progress ('mae' then 'aux')."""
    fit, calib = calibration_split(len(x_train), seed)
    cfg = {"input_shape": list(x_train.shape[1:]), **mae_config}
    torch.manual_seed(seed)
    mae = MAE(**cfg).to(device)
    train_mae(mae, x_train[fit], epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
              on_epoch=on_epoch and (lambda e, loss: on_epoch("mae", e, loss)))
    recon = mae.reconstruct(x_train[fit])
    targets = predict_probs(victim, x_train[fit])
    torch.manual_seed(seed + 1)
    aux = models.build(victim_arch, tuple(x_train.shape[1:]), num_classes).to(device)
    train_classifier(aux, recon, targets, epochs=aux_epochs, seed=seed + 1,
                     on_epoch=on_epoch and (lambda e, loss: on_epoch("aux", e, loss)))
    out = SameModels(mae.cpu(), aux.cpu().eval(), cfg, victim_arch, num_classes, {})
    r, d = out.signals(x_train[calib], predict_probs(victim, x_train[calib]))
    out.stats = {"r_mean": float(r.mean()), "r_std": float(r.std() + 1e-12),
                 "d_mean": float(d.mean()), "d_std": float(d.std() + 1e-12)}
    return out


_TRAINING = dict(brief=False)  # settings of SAME's models, not of its score


@register("detector")
class Same(StatelessDetector):
    """SAME (Xie et al. 2024): a masked autoencoder's reconstruction error plus an auxiliary model's deviation
    from the victim, each standardised on held-out benign images; score z(r) + weight * z(d)."""

    name = "same"
    params = {
        **StatelessDetector.params,
        "weight": Param(1.0, low=0, help="weight of the standardised deviation term (0: reconstruction only, "
                                         "SAME-X)"),
        "patch": Param(4, int, low=1, help="MAE patch side in pixels", **_TRAINING),
        "dim": Param(64, int, low=4, help="MAE encoder embedding size", **_TRAINING),
        "depth": Param(3, int, low=1, help="MAE encoder blocks", **_TRAINING),
        "heads": Param(4, int, low=1, help="attention heads", **_TRAINING),
        "decoder_dim": Param(64, int, low=4, help="MAE decoder embedding size", **_TRAINING),
        "decoder_depth": Param(1, int, low=1, help="MAE decoder blocks", **_TRAINING),
        "mask_ratio": Param(0.75, low=0, high=1, low_open=True, high_open=True, help="fraction of patches hidden",
                            **_TRAINING),
        "epochs": Param(100, int, low=1, help="MAE training epochs (AdamW, cosine schedule)", **_TRAINING),
        "aux_epochs": Param(10, int, low=1, help="auxiliary model training epochs", **_TRAINING),
        "batch_size": Param(128, int, low=1, help="training batch size", **_TRAINING),
        "lr": Param(1e-3, low=0, low_open=True, help="training learning rate", **_TRAINING),
    }
    presets = {"same": {"enabled": False}}
    MAE_KEYS = ("patch", "dim", "depth", "heads", "decoder_dim", "decoder_depth", "mask_ratio")

    def __init__(self, models: SameModels | bytes, **params):
        super().__init__(models, **params)
        self.models = SameModels.from_bytes(models) if isinstance(models, bytes) else models

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
                **{k: v[k] for k in ("epochs", "aux_epochs", "batch_size", "lr")}}

        def train() -> bytes:
            ds = ctx.victim.dataset
            progress = ctx.on_epoch and (lambda stage, e, loss: ctx.on_epoch(
                f"training SAME {stage}", e, v["epochs"] if stage == "mae" else v["aux_epochs"], loss))
            return train_same(ctx.victim.model, ctx.victim.arch, ds.x_train, ds.num_classes, seed=ctx.seed,
                              mae_config=spec["mae"], epochs=v["epochs"], aux_epochs=v["aux_epochs"],
                              batch_size=v["batch_size"], lr=v["lr"], on_epoch=progress, device=ctx.device).to_bytes()

        return ctx.cached("same", spec, train)

    def components(self, inputs: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The standardised (reconstruction, deviation) terms of each query."""
        r, d = self.models.signals(inputs, probs)
        s = self.models.stats
        return (r - s["r_mean"]) / s["r_std"], (d - s["d_mean"]) / s["d_std"]

    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray, probs: np.ndarray | None = None):
        if probs is None:
            raise ValueError("same needs the victim's probabilities of the queries")
        zr, zd = self.components(inputs, probs)
        return self.decide(zr + self.values["weight"] * zd)

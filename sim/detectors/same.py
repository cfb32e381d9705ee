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

``variant=same_code`` is what the authors' code (``xythink/SAME``, ``ms_defense/SAME_defender.py``) does instead:
the MAE trains on the MSE over every pixel (divided by the mask ratio) with a warm-up, reconstructs with every
patch visible; the auxiliary model is the victim's architecture trained on randomly masked reconstructions with the
true labels; the deviation is KL(f(x) || g(x̂)) averaged over classes; the score is alpha * r + (1 - alpha) * KL
on raw scales (the code: alpha 0.99). ``without`` turns two of those choices off, to measure each one's share:
``full_view`` (reconstruct as the default variant does, each patch from views that hide it) and
``all_pixel_loss`` (the MAE's loss on the masked patches only, the code's optimizer kept).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import models
from ..errors import ConfigError
from ..registry import register
from ..training import fixed_threads, predict_probs, train_classifier
from .base import Param, StatelessDetector, calibration_split
from .mae import MAE, schedule, train_mae

WITHOUT = ("full_view", "all_pixel_loss")  # the choices of variant=same_code that ``without`` can turn off
TRAINING_CHOICES = ("all_pixel_loss",)  # those that change the models (full_view changes only the scoring)


def trained_without(without) -> tuple[str, ...]:
    """The training choices among ``without``, sorted: what the models record and their cache key holds."""
    return tuple(w for w in sorted(without or ()) if w in TRAINING_CHOICES)


@dataclass
class SameModels:
    """The trained MAE and auxiliary model, with the calibration statistics of both signals."""

    mae: MAE
    aux: nn.Module
    mae_config: dict[str, Any]
    aux_arch: str
    num_classes: int
    stats: dict[str, float]  # r_mean, r_std, d_mean, d_std
    variant: str = "default"  # same_code: full-view reconstruction and the KL deviation
    without: tuple[str, ...] = ()  # same_code's training choices turned off (all_pixel_loss)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"mae_config": self.mae_config, "mae": self.mae.state_dict(), "aux_arch": self.aux_arch,
                    "num_classes": self.num_classes, "aux": self.aux.state_dict(), "stats": self.stats,
                    "variant": self.variant, "without": list(self.without)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "SameModels":
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        mae = MAE(**d["mae_config"])
        mae.load_state_dict(d["mae"])
        aux = models.build(d["aux_arch"], tuple(d["mae_config"]["input_shape"]), d["num_classes"])
        aux.load_state_dict(d["aux"])
        return cls(mae.eval(), aux.eval(), d["mae_config"], d["aux_arch"], d["num_classes"],
                   {k: float(v) for k, v in d["stats"].items()}, d.get("variant", "default"),
                   tuple(d.get("without", ())))

    def signals(self, x: np.ndarray, probs: np.ndarray, full_view: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (reconstruction error, deviation) of images ``x`` whose victim probabilities are ``probs``: the
        deviation is the total-variation distance, or (same_code) KL(victim || auxiliary) averaged over classes.
        ``full_view``: reconstruct with every patch visible (default: with same_code)."""
        from ..training import to_float

        full = self.variant == "same_code" if full_view is None else full_view
        recon = self.mae.reconstruct_full(x) if full else self.mae.reconstruct(x)
        r = ((to_float(x) - recon) ** 2).flatten(1).mean(1).numpy()
        g = predict_probs(self.aux, recon)
        p = np.asarray(probs, np.float64)
        if self.variant == "same_code":
            d = kl_per_class(p, g)
        else:
            d = 0.5 * np.abs(p - g).sum(1)
        return r.astype(np.float64), d


def kl_per_class(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) divided by the number of classes, as torch's KLDivLoss(reduction="none") averaged over
    them in SAME's code (0 log 0 = 0)."""
    p, q = np.asarray(p, np.float64), np.clip(np.asarray(q, np.float64), 1e-30, None)
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return terms.mean(1)


def train_aux_on_masked(aux: nn.Module, mae: MAE, x: np.ndarray, labels: np.ndarray, *, epochs: int,
                        batch_size: int, seed: int, on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """SAME's code's auxiliary model: each batch reconstructed under a fresh random mask per image, the classifier
    trained on the reconstructions with the true labels (SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine)."""
    import torch.nn.functional as F

    from ..training import device_of, to_float

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(aux.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = schedule(opt, epochs, warmup=0)
    dev = device_of(aux)
    patches, y = mae.patchify(to_float(x)), torch.as_tensor(labels).long()
    mae.eval()
    aux.train()
    for epoch in range(epochs):
        order = torch.randperm(len(patches), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            with torch.no_grad():
                recon = mae.unpatchify(mae(patches[idx].to(dev), mae.random_keep(len(idx), gen).to(dev)))
            loss = F.cross_entropy(aux(recon), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(patches))
    return aux.eval()


@fixed_threads
def train_same(victim: nn.Module, victim_arch: str, x_train: np.ndarray, num_classes: int, *, seed: int,
               mae_config: dict[str, Any], epochs: int, aux_epochs: int, batch_size: int = 128,
               lr: float = 1e-3, on_epoch: Callable[[str, int, float], None] | None = None,
               device: str = "cpu", variant: str = "default", warmup: int = 0,
               y_train: np.ndarray | None = None, without: tuple[str, ...] = ()) -> SameModels:
    """Train SAME's MAE and auxiliary model on ``x_train`` (uint8) less a calibration slice, on ``device``, and
    measure both signals on that slice; both are returned on the CPU. ``on_epoch(stage, epoch, loss)`` reports
    progress ('mae' then 'aux'). ``variant="same_code"`` trains them as the authors' code does (module docstring;
    it needs the true labels ``y_train``; ``without``: the choices of it turned off)."""
    fit, calib = calibration_split(len(x_train), seed)
    cfg = {"input_shape": list(x_train.shape[1:]), **mae_config}
    torch.manual_seed(seed)
    mae = MAE(**cfg).to(device)
    code = variant == "same_code"
    train_mae(mae, x_train[fit], epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, warmup=warmup,
              loss_on="all" if code and "all_pixel_loss" not in without else "masked",
              betas=(0.9, 0.95) if code else None,
              on_epoch=on_epoch and (lambda e, loss: on_epoch("mae", e, loss)))
    torch.manual_seed(seed + 1)
    aux = models.build(victim_arch, tuple(x_train.shape[1:]), num_classes).to(device)
    aux_progress = on_epoch and (lambda e, loss: on_epoch("aux", e, loss))
    if code:
        train_aux_on_masked(aux, mae, x_train[fit], y_train[fit], epochs=aux_epochs, batch_size=batch_size,
                            seed=seed + 1, on_epoch=aux_progress)
    else:
        recon = mae.reconstruct(x_train[fit])
        targets = predict_probs(victim, x_train[fit])
        train_classifier(aux, recon, targets, epochs=aux_epochs, seed=seed + 1, on_epoch=aux_progress)
    out = SameModels(mae.cpu(), aux.cpu().eval(), cfg, victim_arch, num_classes, {}, variant,
                     trained_without(without))
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
        self.models = SameModels.from_bytes(models) if isinstance(models, bytes) else models
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

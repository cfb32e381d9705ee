"""SAME's models (:mod:`.same`): a small masked autoencoder (He et al. 2022), ViT-style patches sized to train on a
CPU, and the auxiliary model beside it; how both train, and the two signals they give. Torch lives here, apart from
the detector's class, so that what only scores with other detectors (a detection tier's shard) never imports it.

Training masks a random ``mask_ratio`` of each image's patches, encodes only the visible ones, and
learns to predict the masked patches' pixels (MSE on the masked patches only).

SAME's code (``variant=same_code``) reconstructs with every patch visible instead (:meth:`MAE.reconstruct_full`).

Reconstruction for detection must be deterministic (the same query always gets the same score, so
replaying a log reproduces it). :meth:`MAE.reconstruct` therefore uses a fixed partition of the
patches into ``K = round(1 / (1 - mask_ratio))`` groups: pass k shows group k and predicts the rest.
Every patch is hidden in K - 1 passes and its reconstruction is the mean of those predictions, so no
pixel of the reconstruction is copied from the input.
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
from ..training import device_of, fixed_threads, predict_probs, to_float, train_classifier
from .base import calibration_split
from .same import trained_without


def _blocks(dim: int, heads: int, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class MAE(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], patch: int = 4, dim: int = 64, depth: int = 3,
                 heads: int = 4, decoder_dim: int = 64, decoder_depth: int = 1, mask_ratio: float = 0.75):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ConfigError(f"same.patch={patch} must divide the image sides {h}x{w}")
        if dim % heads or decoder_dim % heads:
            raise ConfigError(f"same.dim={dim} and same.decoder_dim={decoder_dim} must be multiples of "
                              f"same.heads={heads}")
        if not 0 < mask_ratio < 1:
            raise ConfigError(f"same.mask_ratio must be in (0, 1), got {mask_ratio!r}")
        self.shape, self.patch, self.mask_ratio = (c, h, w), patch, mask_ratio
        self.grid = (h // patch, w // patch)
        self.tokens = self.grid[0] * self.grid[1]
        self.visible = max(1, round(self.tokens * (1 - mask_ratio)))
        size = c * patch * patch
        self.embed = nn.Linear(size, dim)
        self.pos = nn.Parameter(torch.randn(1, self.tokens, dim) * 0.02)
        self.encoder = _blocks(dim, heads, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_decoder = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, self.tokens, decoder_dim) * 0.02)
        self.decoder = _blocks(decoder_dim, heads, decoder_depth)
        self.head = nn.Linear(decoder_dim, size)

    # -- patches -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        (c, _, _), p, (gh, gw) = self.shape, self.patch, self.grid
        return x.reshape(len(x), c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(len(x), self.tokens, c * p * p)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        (c, h, w), p, (gh, gw) = self.shape, self.patch, self.grid
        return t.reshape(len(t), gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(len(t), c, h, w)

    def forward(self, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch (N, L, C*p*p), seeing only the patches ``keep`` (N, k)."""
        tokens = self.embed(patches) + self.pos
        visible = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        z = self.to_decoder(self.norm(self.encoder(visible)))
        full = self.mask_token.expand(len(z), self.tokens, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, z.shape[-1]), z)
        return torch.sigmoid(self.head(self.decoder(full + self.decoder_pos)))

    # -- deterministic reconstruction ----------------------------------------------------------
    def groups(self) -> list[torch.Tensor]:
        """The fixed partition of patch indices used by :meth:`reconstruct` (a seeded permutation)."""
        k = max(2, round(1 / (1 - self.mask_ratio)))
        order = torch.randperm(self.tokens, generator=torch.Generator().manual_seed(0))
        return [g.sort().values for g in order.chunk(k)]

    @torch.no_grad()
    def reconstruct(self, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (uint8 or float in [0, 1]) -> reconstructions, float (N, C, H, W) in [0, 1]."""
        self.eval()
        out = []
        dev = device_of(self)  # computed where the model is, returned on the CPU
        groups = [g.to(dev) for g in self.groups()]
        for start in range(0, len(x), batch_size):
            patches = self.patchify(to_float(x[start:start + batch_size]).to(dev))
            total = torch.zeros_like(patches)
            count = torch.zeros(1, self.tokens, 1, device=dev)
            for g in groups:
                pred = self(patches, g.expand(len(patches), -1))
                hidden = torch.ones(1, self.tokens, 1, device=dev)
                hidden[:, g] = 0
                total += pred * hidden
                count += hidden
            out.append(self.unpatchify(total / count).cpu())
        return torch.cat(out) if out else torch.zeros(0, *self.shape)


    @torch.no_grad()
    def reconstruct_full(self, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Reconstructions with every patch visible (SAME's code at detection time, mask ratio 0): float (N, C, H, W)
        in [0, 1], the decoder's output for every pixel."""
        self.eval()
        dev = device_of(self)
        out = []
        for start in range(0, len(x), batch_size):
            patches = self.patchify(to_float(x[start:start + batch_size]).to(dev))
            keep = torch.arange(self.tokens, device=dev).expand(len(patches), -1)
            out.append(self.unpatchify(self(patches, keep)).cpu())
        return torch.cat(out) if out else torch.zeros(0, *self.shape)

    def random_keep(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, visible) indices of a fresh random mask per image."""
        return torch.rand(n, self.tokens, generator=gen).argsort(1)[:, :self.visible]


def schedule(opt: torch.optim.Optimizer, epochs: int, warmup: int):
    """Cosine decay over ``epochs``, stepped per epoch; with ``warmup`` epochs, the factor is
    min((epoch + 1) / warmup, cosine), as SAME's code schedules its MAE."""
    if not warmup:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: min((e + 1) / warmup, 0.5 * (np.cos(e / max(1, epochs) * np.pi) + 1)))


@fixed_threads
def train_mae(mae: MAE, x: np.ndarray, *, epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
              on_epoch: Callable[[int, float], None] | None = None, warmup: int = 0,
              loss_on: str = "masked", betas: tuple[float, float] | None = None) -> MAE:
    """Train on uint8 images with random masks (AdamW, weight decay 0.05, cosine schedule after ``warmup`` epochs).
    ``loss_on="masked"``: the MSE on the masked patches; ``"all"``: SAME's code: the MSE over every pixel divided by
    the mask ratio. AdamW's betas: ``betas``, else (0.9, 0.95) with ``"all"`` (the code's) and (0.9, 0.999)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    patches = mae.patchify(to_float(x))
    betas = betas or ((0.9, 0.95) if loss_on == "all" else (0.9, 0.999))
    opt = torch.optim.AdamW(mae.parameters(), lr=lr, weight_decay=0.05, betas=betas)
    sched = schedule(opt, epochs, warmup)
    mae.train()
    dev = device_of(mae)  # batches go where the model is; the random draws stay on the CPU (reproducible)
    for epoch in range(epochs):
        order = torch.randperm(len(patches), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = patches[order[start:start + batch_size]].to(dev)
            keep = mae.random_keep(len(batch), gen)
            hidden = torch.ones(len(batch), mae.tokens)
            hidden.scatter_(1, keep, 0)
            keep, hidden = keep.to(dev), hidden.to(dev)
            err = ((mae(batch, keep) - batch) ** 2).mean(-1)
            loss = err.mean() / mae.mask_ratio if loss_on == "all" else (err * hidden).sum() / hidden.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(patches))
    mae.eval()
    return mae


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

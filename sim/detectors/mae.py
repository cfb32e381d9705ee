"""A small masked autoencoder (He et al. 2022) for SAME: ViT-style patches, sized to train on a CPU.

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

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..training import device_of, fixed_threads, to_float


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

"""Supervised training and batched prediction, shared by the victim zoo and the attackers' replicas."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    t = torch.as_tensor(x)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` with Adam on uint8 images ``x``.

    ``targets`` are class indices (N,) for hard labels or probability vectors (N, K) for soft labels;
    cross-entropy handles both. Deterministic for a seed (up to thread nondeterminism).
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(targets)
    yt = yt.long() if yt.ndim == 1 else yt.float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(to_float(xt[idx])), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(xt))
    model.eval()
    return model


@torch.inference_mode()
def predict_probs(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities (N, K) as float32."""
    model.eval()
    out = [torch.softmax(model(to_float(x[i:i + batch_size])), dim=1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(pred_labels: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred_labels) == np.asarray(labels))) if len(labels) else float("nan")


def fidelity(replica_labels: np.ndarray, victim_labels: np.ndarray) -> float:
    """Top-1 agreement between a replica and the victim on the same inputs."""
    return accuracy(replica_labels, victim_labels)

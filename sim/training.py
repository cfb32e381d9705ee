"""Supervised training and batched prediction, shared by the victim zoo and the attackers' replicas."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRAINING_THREADS = 1  # torch threads of every training on the CPU (see fixed_threads, training_threads)


def fixed_threads(train):
    """Run a training function on ``TRAINING_THREADS`` torch threads, whatever the process uses otherwise, and
    restore its count after. PyTorch's CPU kernels split their sums over threads, so the same seed trains other
    weights on 2 threads than on 1: without a fixed count a cached victim, and every result of a run on it, would
    depend on the machine's cores and on which process (a run, a test, a benchmark, a Ray worker) trained it first.
    One thread is what every machine has; attackers' replicas train on one thread anyway (one task per core).
    :func:`training_threads` changes the count for the trainings it encloses."""
    @functools.wraps(train)
    def fixed(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(TRAINING_THREADS)
        try:
            return train(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return fixed


@contextlib.contextmanager
def training_threads(threads: int):
    """Within: every training of this process runs on ``threads`` torch threads instead of one
    (``victim.train_threads``: faster on a big CPU, with weights that depend on the count)."""
    global TRAINING_THREADS
    before, TRAINING_THREADS = TRAINING_THREADS, threads
    try:
        yield
    finally:
        TRAINING_THREADS = before


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters live (CPU for a model without any): training and prediction follow it."""
    return next(model.parameters(), torch.empty(0)).device


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    t = torch.as_tensor(x)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


@fixed_threads
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
    loss: str = "cross_entropy",
    outliers: np.ndarray | None = None,
    outlier_weight: float = 0.5,
    optimizer: str = "adam",
    adversary: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    divergence: float = 0.0,
    divergence_cap: float = float("inf"),
    weight_decay: float = 0.0,
    lr_step: int | None = None,
) -> nn.Module:
    """Train ``model`` with Adam (or ``optimizer="sgd"``: momentum 0.9), L2 ``weight_decay``, the rate x0.1 every
    ``lr_step`` epochs if given, on uint8 images ``x``.

    ``targets`` are class indices (N,) for hard labels or probability vectors (N, K) for soft labels;
    cross-entropy handles both. ``loss="misinformation"`` instead pushes the probability of the true
    class down (-log(1 - p_y), Kariyappa & Qureshi 2020). With ``outliers`` (uint8 images), each batch
    adds ``outlier_weight`` x the cross-entropy between a batch of outliers' predictions and the uniform
    distribution (outlier exposure, Hendrycks et al. 2019). With ``adversary(model, images, labels)`` (float
    images in [0, 1]) each batch is replaced by what it returns (adversarial training). With a ``teacher``, the
    loss is :func:`divqat_loss` against the teacher's answers. Deterministic for a seed on a given machine, on one
    torch thread (:func:`fixed_threads`).
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(targets)
    if outliers is not None:
        outliers = torch.as_tensor(outliers)
    yt = yt.long() if yt.ndim == 1 else yt.float()
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay))
    schedule = torch.optim.lr_scheduler.StepLR(opt, lr_step, 0.1) if lr_step else None
    model.train()
    dev = device_of(model)  # batches go where the model is (a GPU, when it was put on one)
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start:start + batch_size]
            xb, yb = to_float(xt[idx]).to(dev), yt[idx].to(dev)
            if adversary is not None:
                xb = adversary(model, xb, yb)
            logits = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    reference = teacher(xb)
                value = divqat_loss(logits, yb, reference, divergence, divergence_cap)
            elif loss == "misinformation":
                p_true = torch.softmax(logits, 1).gather(1, yb[:, None])[:, 0]
                value = -torch.log1p(-p_true.clamp(max=1 - 1e-6)).mean()
            else:
                value = F.cross_entropy(logits, yb)
            if outliers is not None:
                pick = torch.randint(len(outliers), (len(idx),), generator=gen)
                outlier_logits = model(to_float(outliers[pick]).to(dev))
                value = value - outlier_weight * torch.log_softmax(outlier_logits, 1).mean()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.item() * len(idx)
        if schedule is not None:
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(xt))
    model.eval()
    return model


def divqat_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, weight: float,
                cap: float = float("inf")) -> torch.Tensor:
    """DivQAT's objective: cross-entropy on the targets minus ``weight`` x the KL divergence KL(p_teacher || p)
    from the full-precision teacher's answers to the model's, each sample's KL capped at ``cap`` (maximising an
    unbounded divergence would otherwise run away); batch means."""
    ce = F.cross_entropy(logits, targets)
    log_p = torch.log_softmax(logits, 1)
    log_t = torch.log_softmax(teacher_logits, 1)
    kl = (log_t.exp() * (log_t - log_p)).sum(1).clamp(max=cap)
    return ce - weight * kl.mean()


@fixed_threads
def train_dp_classifier(
    model: nn.Module,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` in place with DP-SGD (Opacus: per-sample clipping to ``max_grad_norm``, Gaussian
    noise of ``noise_multiplier`` x that norm, Poisson sampling of expected size ``batch_size``, Adam);
    returns the epsilon spent at ``delta`` (RDP accountant)."""
    import warnings

    from opacus import PrivacyEngine

    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(to_float(torch.as_tensor(x)), torch.as_tensor(labels).long())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with warnings.catch_warnings():  # "secure RNG turned off": fine for a simulation
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                   noise_multiplier=noise_multiplier,
                                                   max_grad_norm=max_grad_norm, noise_generator=gen)
        private.train()
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for xb, yb in loader:  # Poisson sampling can draw an empty batch: it still is a (noisy) step
                value = F.cross_entropy(private(xb), yb, reduction="sum") / max(len(xb), 1)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                total += value.item() * len(xb)
                seen += len(xb)
            if on_epoch is not None:
                on_epoch(epoch + 1, total / max(seen, 1))
    private._close()  # remove Opacus' hooks from the model
    model.eval()
    return float(engine.get_epsilon(delta))


def patch_shuffle(x: np.ndarray, seed: int, grid: int = 4) -> np.ndarray:
    """Outliers made from in-distribution images: each image cut into grid x grid tiles, shuffled.
    Local texture stays, global shape is gone (used for outlier exposure when no outlier set is given)."""
    rng = np.random.default_rng(seed)
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    tiles = x[:, :, :th * grid, :tw * grid].reshape(n, c, grid, th, grid, tw).transpose(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, th, tw)
    order = np.argsort(rng.random((n, grid * grid)), axis=1)
    tiles = np.take_along_axis(tiles, order[:, :, None, None, None], axis=1)
    out = tiles.reshape(n, grid, grid, c, th, tw).transpose(0, 3, 1, 4, 2, 5).reshape(n, c, th * grid, tw * grid)
    full = x.copy()
    full[:, :, :th * grid, :tw * grid] = out
    return full


@torch.inference_mode()
def predict_probs(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities (N, K) as float32."""
    model.eval()
    dev = device_of(model)
    out = [torch.softmax(model(to_float(x[i:i + batch_size]).to(dev)), dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(pred_labels: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred_labels) == np.asarray(labels))) if len(labels) else float("nan")


def fidelity(replica_labels: np.ndarray, victim_labels: np.ndarray) -> float:
    """Top-1 agreement between a replica and the victim on the same inputs."""
    return accuracy(replica_labels, victim_labels)

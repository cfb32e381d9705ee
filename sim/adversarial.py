"""PGD (Madry et al. 2018) under an L-infinity budget: the attack behind adversarial training
(``victim.training=adversarial``) and behind the robust accuracy the run reports for the victim and each replica."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .training import accuracy, device_of, to_float


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
        restarts: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images within ``eps`` (L-infinity) of ``x`` (float, [0, 1]) that maximise the cross-entropy on labels ``y``:
    ``steps`` signed-gradient steps of size ``step`` from a uniform random start in the ball, projected back onto
    the ball and [0, 1] after each; with ``restarts`` > 1, per image the restart with the highest loss. The
    model's mode, its parameters' gradients and a fake-quantized model's observers are left as they were (the
    attack's own forward passes do not move the observed ranges)."""
    if eps == 0 or steps == 0:
        return x.detach().clone()
    training = model.training
    model.eval()  # batch norm and dropout as at inference: the attack sees the deployed function
    observers = [(m, m.observer_enabled.clone()) for m in model.modules() if hasattr(m, "observer_enabled")]
    for m, _ in observers:
        m.observer_enabled[0] = 0
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.detach()
    best, best_loss = x.clone(), torch.full((len(x),), -float("inf"), device=x.device)
    try:
        for _ in range(restarts):
            noise = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device)  # drawn on the CPU: reproducible
            adv = (x + eps * noise).clamp(0, 1)
            for _ in range(steps):
                adv.requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(model(adv), y, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, adv)
                adv = torch.min(torch.max(adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
            with torch.no_grad():
                loss = F.cross_entropy(model(adv), y, reduction="none")
            better = loss > best_loss
            best[better], best_loss[better] = adv[better], loss[better]
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, enabled in observers:
            m.observer_enabled.copy_(enabled)
        model.train(training)
    return best


def adversary(eps: float, step: float, steps: int, restarts: int = 1, seed: int = 0):
    """``adversary(model, images, labels)`` for :func:`sim.training.train_classifier`: PGD examples of each batch."""
    gen = torch.Generator().manual_seed(seed)
    return lambda model, x, y: pgd(model, x, y, eps=eps, step=step, steps=steps, restarts=restarts, generator=gen)


def robust_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, *, eps: float, step: float, steps: int,
                    restarts: int = 1, seed: int = 0, batch_size: int = 256, scored: nn.Module | None = None) -> float:
    """Accuracy of ``model`` (or of ``scored``: a quantized model whose fake-quantized twin ``model`` is) on PGD
    examples of the uint8 images ``x`` (labels ``y``) crafted through ``model``."""
    scored = model if scored is None else scored
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(np.asarray(y)).long()
    dev, scored_dev = device_of(model), device_of(scored)
    right = []
    for start in range(0, len(x), batch_size):
        xb, yb = to_float(x[start:start + batch_size]).to(dev), labels[start:start + batch_size].to(dev)
        adv = pgd(model, xb, yb, eps=eps, step=step, steps=steps, restarts=restarts, generator=gen)
        with torch.no_grad():
            right.append(scored.eval()(adv.to(scored_dev)).argmax(1).cpu().numpy())
    return accuracy(np.concatenate(right), labels.numpy()) if right else float("nan")


def robust_accuracy_on(model: nn.Module, x: np.ndarray, y: np.ndarray, robustness: dict,
                       scored: nn.Module | None = None) -> float:
    """:func:`robust_accuracy` on the first ``robustness["samples"]`` images, with the rest of ``robustness`` (the
    PGD settings) as its parameters."""
    settings = dict(robustness)
    n = settings.pop("samples")
    return robust_accuracy(model, x[:n], y[:n], **settings, scored=scored)

"""Replica training: an attacker's model trained on the answers it collected, and scored on the victim's test set.
Pure; :func:`actors.remote.train_replica_task` runs it as a Ray task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sim import models
from sim.adversarial import robust_accuracy_on
from sim.config import ReplicaConfig
from sim.querylog import input_digest
from sim.training import accuracy, device_of, fidelity, predict_probs, to_float, train_classifier

ANGLE_SAMPLE = 64  # queries the gradient angle is averaged over, the same ones at every epoch


def train_replica(x: np.ndarray, probs: np.ndarray, *, arch: str, input_shape: tuple[int, int, int],
                  num_classes: int, cfg: ReplicaConfig, seed: int, on_epoch=None, on_build=None,
                  device: str = "cpu") -> nn.Module:
    """Train a fresh ``arch`` on the transfer set: soft labels (the returned vectors) or hard (argmax), on
    ``device``; the trained model is returned on the CPU. ``on_build(model)`` sees the model before training
    starts (to evaluate it between epochs)."""
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = models.build(arch, input_shape, num_classes).to(device)
    if on_build is not None:
        on_build(model)
    targets = training_targets(probs, cfg.labels)
    if cfg.variant == "mad_code":  # the MAD code's train_model for its final replica
        return train_classifier(model, x, targets, epochs=cfg.epochs, batch_size=64, lr=0.01, seed=seed,
                                on_epoch=on_epoch, optimizer="sgd", weight_decay=5e-4, lr_step=30).cpu()
    return train_classifier(model, x, targets, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=seed, on_epoch=on_epoch, optimizer=cfg.optimizer).cpu()


def keep_best(best: dict, epoch: int, scores: dict) -> None:
    """Keep in ``best`` the epoch of best test accuracy and its scores (ties: the later epoch): the checkpoint the
    MAD code keeps (``replica.variant=mad_code``)."""
    if scores["test_accuracy"] >= best.get("test_accuracy", -1.0):
        best.update(epoch=epoch, **scores)


def undefended_targets(x: np.ndarray, clean: dict[str, np.ndarray]) -> np.ndarray:
    """The victim's clean answers to queries ``x``, looked up in the log's (input digest -> clean probabilities)."""
    return np.stack([clean[input_digest(img)] for img in x]).astype(np.float32)


def training_targets(probs: np.ndarray, labels: str) -> np.ndarray:
    """What a replica trains on: the vectors themselves (soft) or their top-1 labels (hard)."""
    return probs if labels == "soft" else probs.argmax(1)


def gradient_angles(model: nn.Module, x: np.ndarray, returned: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per query, the angle in degrees between the gradients of the replica's cross-entropy loss over all its
    parameters when it trains on the returned answer and when it trains on the clean one (MAD's angular deviation,
    Orekondy et al. 2020, Fig. 5). Targets are probability vectors (N, K) or labels (N,). The model is left in the
    mode it was in."""
    training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    dev = device_of(model)
    out = []
    for i in range(len(x)):
        logits, grads = model(to_float(x[i:i + 1]).to(dev)), []  # one forward pass for both targets
        for target in (returned[i:i + 1], clean[i:i + 1]):
            t = torch.as_tensor(target).to(dev)
            loss = F.cross_entropy(logits, t.long() if t.ndim == 1 else t.float())
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                         .double())
        a, b = grads
        cos = (a @ b) / (a.norm() * b.norm()).clamp_min(1e-300)
        out.append(float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))))
    model.train(training)
    return np.asarray(out)


def score(model: nn.Module, eval_set: tuple, robustness: dict | None = None) -> dict:
    """A replica's test accuracy and fidelity (top-1 agreement with the victim) on ``eval_set`` (test images,
    labels, the victim's labels), and given ``robustness`` (PGD settings and ``samples``), its accuracy under PGD
    on the first ``samples`` of those images; rounded to 4 decimals. The model is left in the mode it was in."""
    x, y, victim_labels = eval_set
    training = model.training
    pred = predict_probs(model, x).argmax(1)
    out = {"test_accuracy": round(accuracy(pred, y), 4), "fidelity": round(fidelity(pred, victim_labels), 4)}
    if robustness is not None:
        out["robust_accuracy"] = round(robust_accuracy_on(model, x, y, robustness), 4)
    model.train(training)
    return out

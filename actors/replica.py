"""Replica training: an attacker's model trained on the answers it collected, and scored on the victim's test set.
Pure; :func:`actors.remote.train_replica_task` runs it as a Ray task."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sim import models
from sim.config import ReplicaConfig
from sim.querylog import input_digest
from sim.training import accuracy, fidelity, predict_probs, train_classifier


def train_replica(x: np.ndarray, probs: np.ndarray, *, arch: str, input_shape: tuple[int, int, int],
                  num_classes: int, cfg: ReplicaConfig, seed: int, on_epoch=None, on_build=None) -> nn.Module:
    """Train a fresh ``arch`` on the transfer set: soft labels (the returned vectors) or hard (argmax).
    ``on_build(model)`` sees the model before training starts (to evaluate it between epochs)."""
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = models.build(arch, input_shape, num_classes)
    if on_build is not None:
        on_build(model)
    targets = probs if cfg.labels == "soft" else probs.argmax(1)
    return train_classifier(model, x, targets, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=seed, on_epoch=on_epoch, optimizer=cfg.optimizer)


def undefended_targets(x: np.ndarray, clean: dict[str, np.ndarray]) -> np.ndarray:
    """The victim's clean answers to queries ``x``, looked up in the log's (input digest -> clean probabilities)."""
    return np.stack([clean[input_digest(img)] for img in x]).astype(np.float32)


def score(model: nn.Module, eval_set: tuple) -> dict:
    """A replica's test accuracy and fidelity (top-1 agreement with the victim) on ``eval_set`` (test images,
    labels, the victim's labels), rounded to 4 decimals; the model is left in the mode it was in."""
    x, y, victim_labels = eval_set
    training = model.training
    pred = predict_probs(model, x).argmax(1)
    model.train(training)
    return {"test_accuracy": round(accuracy(pred, y), 4), "fidelity": round(fidelity(pred, victim_labels), 4)}

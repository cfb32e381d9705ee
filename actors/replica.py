"""Replica training: an attacker's model trained on the answers it collected."""

from __future__ import annotations

import numpy as np
import ray
import torch
from torch import nn

from sim import models
from sim.config import ReplicaConfig
from sim.training import accuracy, predict_probs, train_classifier


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


@ray.remote(num_cpus=0.5)
def train_replica_task(x, probs, arch, input_shape, num_classes, cfg: ReplicaConfig, seed: int,
                       board=None, key: str = "replica", eval_set: tuple | None = None) -> dict:
    """Ray task around :func:`train_replica`; posts epochs done to a ProgressBoard (with ``eval_set``
    ``(x, y)``, also the replica's accuracy on it after each epoch); returns a state_dict."""
    torch.set_num_threads(1)
    built = {}  # the model, once train_replica has built it

    def on_epoch(epoch, loss):
        if board is None:
            return
        value = None
        if eval_set is not None:
            value = accuracy(predict_probs(built["model"], eval_set[0]).argmax(1), eval_set[1])
            built["model"].train()  # predict_probs left it in eval mode; training goes on
        board.update.remote(key, epoch, value)

    model = train_replica(x, probs, arch=arch, input_shape=input_shape, num_classes=num_classes,
                          cfg=cfg, seed=seed, on_epoch=on_epoch, on_build=lambda m: built.update(model=m))
    return model.state_dict()

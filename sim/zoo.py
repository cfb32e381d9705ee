"""Victim zoo: victims are trained once and cached on disk, keyed by everything that shapes them."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from . import data, models
from .config import DataConfig, VictimConfig
from .errors import ConfigError
from .training import accuracy, predict_probs, train_classifier

log = logging.getLogger(__name__)
ZOO_VERSION = 1  # bump when training code changes what a cached checkpoint means


@dataclass
class Victim:
    model: nn.Module
    arch: str
    dataset: data.Dataset
    test_accuracy: float
    path: Path
    trained_now: bool
    train_seconds: float

    def state_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        torch.save(self.model.state_dict(), buf)
        return buf.getvalue()


def victim_key(cfg: VictimConfig, seed: int) -> str:
    spec = {"dataset": cfg.dataset, "arch": cfg.arch, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "seed": seed, "version": ZOO_VERSION}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def get_victim(cfg: VictimConfig, data_cfg: DataConfig, seed: int, cache_dir: str,
               on_epoch=None) -> Victim:
    """Load the cached victim for this config, or train and cache it."""
    ds = data.load(cfg.dataset, data_cfg.root, data_cfg.download)
    key = victim_key(cfg, seed)
    folder = Path(cache_dir).expanduser() / "victims"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cache_dir={cache_dir!r} cannot be used ({exc.strerror}); expected a writable "
                          f"directory") from None
    path = folder / f"{cfg.dataset}-{cfg.arch}-{key}.pt"
    torch.manual_seed(seed)  # the initial weights are part of what the seed fixes
    model = models.build(cfg.arch, ds.input_shape, ds.num_classes)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt["state_dict"])
            model.eval()
            return Victim(model, cfg.arch, ds, float(ckpt["test_accuracy"]), path, False,
                          float(ckpt.get("train_seconds", 0.0)))
        log.info("training victim %s on %s (%d epochs)", cfg.arch, cfg.dataset, cfg.epochs)
        start = time.perf_counter()
        train_classifier(model, ds.x_train, ds.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         lr=cfg.lr, seed=seed, on_epoch=on_epoch)
        seconds = time.perf_counter() - start
        acc = accuracy(predict_probs(model, ds.x_test).argmax(1), ds.y_test)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "test_accuracy": acc, "train_seconds": seconds,
                    "config": cfg.model_dump(), "seed": seed}, tmp)
        tmp.replace(path)
        return Victim(model, cfg.arch, ds, acc, path, True, seconds)

"""Where models run: ``device=auto|cpu|cuda``.

``auto`` is CUDA when a GPU is visible (to this process, or in the Ray cluster), else the CPU; ``cuda`` where there
is none is a one-line error. Training and prediction follow the model's own device (:func:`sim.training.device_of`),
so placing a model is all a caller does. int8-quantized victims always run on the CPU, where PyTorch runs them.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve(device: str, cluster_gpus: float = 0.0) -> str:
    """``"cpu"`` or ``"cuda"`` for a ``device`` setting, given the GPUs the Ray cluster has (0 outside Ray)."""
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is not a device; expected one of: {', '.join(DEVICES)}")
    here = torch.cuda.is_available()
    if device == "cuda" and not here and not cluster_gpus:
        raise ConfigError("device=cuda but no CUDA device is visible (torch.cuda.is_available() is False and the Ray "
                          "cluster has no GPU); expected device=auto or device=cpu")
    if device == "cpu":
        return "cpu"
    return "cuda" if here or cluster_gpus else "cpu"


def local(device: str) -> str:
    """The device for work done in this process (the victim's training on the driver)."""
    return "cuda" if resolve(device) == "cuda" and torch.cuda.is_available() else "cpu"

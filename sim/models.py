"""Classifier architectures, by name. Every model takes float images in [0, 1], shape (N, C, H, W).

- ``lenet``: the MAD paper's LeNet (conv 20 -> conv 50 -> fc 500), for 28x28 inputs.
- ``conv3``: SAME's three-layer CNN for 28x28 inputs.
- ``resnet18`` / ``vgg16_bn``: torchvision's models (no weights) adapted to 32x32 inputs
  (3x3 stem without max-pool for ResNet; 1x1 pooled features for VGG).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import registry
from .errors import ConfigError


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * side * side, 500), nn.ReLU(), nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Conv3(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(in_channels: int, num_classes: int, size: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _vgg16_bn(in_channels: int, num_classes: int, size: int) -> nn.Module:
    from torchvision.models import vgg16_bn

    model = vgg16_bn(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes),
    )
    return model


_REGISTRY: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet": LeNet,
    "conv3": Conv3,
    "resnet18": _resnet18,
    "vgg16_bn": _vgg16_bn,
}


def names() -> list[str]:
    return list(_REGISTRY)


def check_name(field: str, name: str) -> None:
    registry.check_name("architecture", field, name, _REGISTRY)


def build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A fresh model for images of ``input_shape`` (C, H, W)."""
    check_name("arch", name)
    c, h, w = input_shape
    if h != w:
        raise ConfigError(f"arch {name!r} needs square images, got input shape {input_shape}")
    if name == "lenet" and h < 16:
        raise ConfigError(f"arch 'lenet' needs images of at least 16x16, got {h}x{w}")
    return _REGISTRY[name](c, num_classes, h)

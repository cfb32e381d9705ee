"""Classifier architectures, registered by name (``@register("model", NAME)`` on a class or a factory taking
``(in_channels, num_classes, size)``). Every model takes float images in [0, 1], shape (N, C, H, W)."""

from __future__ import annotations

import io

import torch
from torch import nn

from . import registry
from .errors import ConfigError
from .registry import register


@register("model", "lenet")
class LeNet(nn.Module):
    """The MAD paper's LeNet (conv 20, conv 50, fully connected 500), for images of at least 16x16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28):
        super().__init__()
        if size < 16:
            raise ConfigError(f"arch 'lenet' needs images of at least 16x16, got {size}x{size}")
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


@register("model", "conv3")
class Conv3(nn.Module):
    """SAME's three-layer CNN (32, 64, 128 channels, global average pooling)."""

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


@register("model", "resnet18")
def resnet18(in_channels: int, num_classes: int, size: int) -> nn.Module:
    """torchvision's ResNet-18 without weights, adapted to 32x32 inputs (3x3 stem, no max-pool)."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register("model", "vgg16_bn")
def vgg16_bn(in_channels: int, num_classes: int, size: int) -> nn.Module:
    """torchvision's VGG-16 with batch norm, without weights, adapted to 32x32 inputs (1x1 pooled features)."""
    from torchvision.models import vgg16_bn

    model = vgg16_bn(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes),
    )
    return model


def names() -> list[str]:
    return registry.names("model")


def check_name(field: str, name: str) -> None:
    registry.check_name("model", field, name)


def build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A fresh model for images of ``input_shape`` (C, H, W)."""
    check_name("arch", name)
    c, h, w = input_shape
    if h != w:
        raise ConfigError(f"arch {name!r} needs square images, got input shape {input_shape}")
    return registry.get("model", name)(c, num_classes, h)


def has_batch_norm(name: str) -> bool:
    """Whether architecture ``name`` has batch-norm layers (which per-sample gradients, hence DP-SGD, rule out)."""
    model = build(name, (1, 32, 32), 10)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def to_bytes(model: nn.Module, arch: str, input_shape: tuple[int, int, int], num_classes: int,
             quantization: str = "none") -> bytes:
    """A model with what rebuilds it (architecture, input shape, classes, quantization mode of an int8 model):
    what travels to a Serve replica."""
    from . import quantize

    buf = io.BytesIO()
    with quantize.quiet():  # an int8 state dict's storages
        torch.save({"arch": arch, "input_shape": list(input_shape), "num_classes": num_classes,
                    "quantization": quantization, "state_dict": model.state_dict()}, buf)
    return buf.getvalue()


def from_bytes(blob: bytes, architecture_only: bool = False) -> nn.Module:
    """The model :func:`to_bytes` saved, in eval mode; ``architecture_only``: a fresh float model of its
    architecture instead (untrained: what a component that only needs the architecture gets)."""
    from . import quantize

    with quantize.quiet():
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    model = build(d["arch"], tuple(d["input_shape"]), d["num_classes"])
    if architecture_only:
        return model.eval()
    if d.get("quantization", "none") != "none":
        int8, _ = quantize.skeleton(model, tuple(d["input_shape"]), d["quantization"])
        return quantize.load(int8, d["state_dict"])
    model.load_state_dict(d["state_dict"])
    return model.eval()

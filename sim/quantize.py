"""8-bit victims through PyTorch's FX graph-mode quantization (``torch.ao.quantization.quantize_fx``, x86 backend:
int8 weights per channel, uint8 activations; CPU inference only).

Two models come out of every quantized victim:
- the **int8 model** (``convert_fx``): what Serve runs and every accuracy of the victim is measured on;
- its **fake-quantized twin** (``prepare_qat_fx`` with observers frozen): float arithmetic that rounds weights and
  activations as the int8 model does, and so is differentiable. Quantization-aware training (QAT, DivQAT) trains
  the twin and converts it; post-training quantization (PTQ) calibrates a PTQ observer copy (converted) and a
  twin on the same images. Gradient-based measurements of a quantized victim (PGD robustness) use the twin.

FX graph mode was chosen over eager mode (which needs hand-placed quant stubs and fusions per architecture) and
over PT2E (moved out of torch into ``torchao``): it traces LeNet, Conv3 and torchvision's ResNet-18 unchanged.
torch marks ``torch.ao.quantization`` deprecated in favour of ``torchao``; those migration notices are silenced
here and only here (see :func:`quiet`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
import warnings

import numpy as np
import torch
from torch import nn

from .training import to_float

_NOTICES = (r"torch\.ao\.quantization is deprecated", r"Please use quant_min and quant_max",
            r"torch\.quantize_per_tensor, torch\.quantize_per_channel", r"must run observer before calling",
            r"TypedStorage is deprecated")


@contextlib.contextmanager
def quiet():
    """Silence torch's migration notices about ``torch.ao.quantization`` (and nothing else)."""
    with warnings.catch_warnings():
        for pattern in _NOTICES:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _example(input_shape) -> tuple[torch.Tensor]:
    return (torch.zeros(1, *input_shape),)


def prepare_twin(model: nn.Module, input_shape) -> nn.Module:
    """A fake-quantized copy of ``model`` (observers on), in training mode: what QAT trains."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with quiet():
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"),
                              _example(input_shape))


def prepare_observed(model: nn.Module, input_shape) -> nn.Module:
    """A copy of ``model`` with PTQ observers (x86 default), in eval mode: what PTQ calibrates and converts."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    with quiet():
        return prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), _example(input_shape))


def freeze(twin: nn.Module) -> nn.Module:
    """Observers off (scales and zero points fixed), batch-norm statistics frozen, eval mode."""
    from torch.ao.quantization import disable_observer

    twin.apply(disable_observer)
    for module in twin.modules():
        if hasattr(module, "freeze_bn_stats"):
            module.freeze_bn_stats()
    return twin.eval()


@torch.no_grad()
def calibrate(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> nn.Module:
    """Run images ``x`` (uint8) through ``model`` so its observers see the activations' ranges."""
    with quiet():
        for start in range(0, len(x), batch_size):
            model(to_float(x[start:start + batch_size]))
    return model


def post_training(model: nn.Module, input_shape, x: np.ndarray) -> tuple[nn.Module, nn.Module]:
    """PTQ of a trained float ``model`` calibrated on ``x``: (int8 model, its fake-quantized twin)."""
    int8 = convert(calibrate(prepare_observed(model, input_shape), x))
    twin = prepare_twin(model, input_shape).eval()  # eval: batch norm uses its running statistics
    return int8, freeze(calibrate(twin, x))


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 model of a prepared (observed or fake-quantized) model; ``prepared`` is left as it was."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet():
        return convert_fx(copy.deepcopy(prepared).eval()).eval()


def skeleton(float_model: nn.Module, input_shape, mode: str) -> tuple[nn.Module, nn.Module]:
    """Empty (int8, twin) structures for ``mode`` that the state dicts of a quantized victim load into."""
    twin = prepare_twin(float_model, input_shape)
    int8 = convert(prepare_observed(float_model, input_shape) if mode == "ptq" else twin)
    return int8, freeze(twin)


def load(module: nn.Module, state: dict) -> nn.Module:
    with quiet():
        module.load_state_dict(state)
    return module.eval()


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's serialised state dict (weights, scales, zero points)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.inference_mode()
def latency_ms(model: nn.Module, x: np.ndarray, repeats: int = 5) -> float:
    """Median wall time of one forward pass over the batch ``x`` (uint8), in milliseconds, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xf = to_float(x)
        model(xf)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(xf)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times) * 1000)

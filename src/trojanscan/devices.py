"""Where models run: ``--device auto|cpu|cuda|mps``.

The model runs on the device; the data, the trigger variables and every result stay on the CPU.
:func:`place` moves a model to the device and hooks its top module so that each batch goes to
the device on its way in and the outputs come back to the CPU on their way out (gradients flow
through both moves). Every defence, attack and metric therefore works unchanged on any device, and
what trojanscan writes is CPU tensors and numpy. On the CPU nothing is hooked: ``cpu`` runs exactly
as before.

``--precision`` says how the model's arithmetic runs for a scan: ``float32`` as it was trained;
``bfloat16`` under autocast with channels-last images (:class:`Reduced`), about twice as fast on a
CPU with bfloat16 matrix units (Intel AMX) and slower on one without, and slower on depthwise
(grouped) convolutions; ``auto`` takes bfloat16 only on an AMX CPU for ungrouped convolutions.
Results stay float32 records; a scan's fingerprint names the precision, so a resumed scan never mixes
the two.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from trojanscan.errors import TrojanscanError, TrojanscanWarning

DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "where the model runs: auto (cuda, else mps, else cpu), cpu, cuda[:N] or mps"
PRECISIONS = ("float32", "bfloat16", "auto")
PRECISION_HELP = ("the model's arithmetic in a scan: float32, bfloat16 (autocast: about 2x faster on "
                  "CPUs with AMX) or auto (bfloat16 on a CPU with AMX for a model whose convolutions are "
                  "not grouped, else float32)")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available(kind: str) -> bool:
    """Whether this machine's torch can run on a device of ``kind`` (cpu, cuda, mps)."""
    return (kind == "cpu" or (kind == "cuda" and torch.cuda.is_available())
            or (kind == "mps" and _mps_available()))


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """The device for ``name``: ``auto`` picks cuda, else mps, else the CPU; a device asked for by
    name that this machine lacks falls back to the CPU with a one-line :class:`TrojanscanWarning`."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "cpu").strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise TrojanscanError(f"--device {name!r}: choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if available(k)))
    if not available(kind):
        warnings.warn(TrojanscanWarning(f"--device {text}: no {kind} device on this machine (this torch "
                                        f"is {torch.__version__}); running on the CPU"), stacklevel=2)
        return torch.device("cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise TrojanscanError(f"--device {text}: this machine has {torch.cuda.device_count()} cuda device(s)")
    return torch.device(text)


def _to_model_device(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    device = next(iter(module.parameters()), next(iter(module.buffers()), None))
    if device is None:
        return args
    return tuple(a.to(device.device) if isinstance(a, torch.Tensor) else a for a in args)


def _to_cpu(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.cpu()
    if isinstance(output, tuple):
        return tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in output)
    return output


class OnDevice(nn.Module):
    """For a TorchScript model (which takes no hooks): the same boundary as a wrapper."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return _to_cpu(self, (), self.model(*_to_model_device(self.model, (x,))))


class Reduced(nn.Module):
    """The model under bfloat16 autocast, fed channels-last images; its logits come back float32."""

    def __init__(self, model: nn.Module, device_type: str = "cpu") -> None:
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, x: torch.Tensor) -> Any:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.model(x)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def full_precision(model: nn.Module) -> nn.Module:
    """``model`` without :class:`Reduced` (the weights as the user gave them, to hash or save)."""
    return model.model if isinstance(model, Reduced) else model


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` is a CPU with bfloat16 matrix units (Intel AMX), where bfloat16 was measured
    faster. GPUs are not chosen by ``auto`` (not measured here); ``bfloat16`` by name runs there too."""
    if device.type != "cpu":
        return False
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent is "no"
    return bool(check()) if check is not None else False


def convolutions(model: nn.Module) -> list[nn.Module]:
    """``model``'s 2-D convolutions (TorchScript modules too, by their original class name)."""
    return [m for m in model.modules()
            if isinstance(m, nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d"]


def plain_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has 2-D convolutions and none of them grouped (depthwise convolutions run
    slower in bfloat16 than in float32 on CPUs)."""
    convs = convolutions(model)
    return bool(convs) and all(getattr(m, "groups", 1) == 1 for m in convs)


def depthwise(model: nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (one group per input channel, more than one)."""
    return any(1 < getattr(m, "groups", 1) == getattr(m, "in_channels", 0) for m in convolutions(model))


def resolve_precision(name: str, model: nn.Module, device: torch.device) -> str:
    """``float32`` or ``bfloat16`` for ``--precision name`` (``auto``: see :data:`PRECISION_HELP`)."""
    text = str(name).strip().lower()
    if text not in PRECISIONS:
        raise TrojanscanError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if text == "auto":
        return "bfloat16" if native_bfloat16(device) and plain_convolutions(model) else "float32"
    return text


def place(model: nn.Module, device: str | torch.device | None = "cpu",
          precision: str = "float32") -> nn.Module:
    """``model`` on ``device`` (resolved by :func:`resolve_device`), taking and returning CPU tensors.

    On the CPU in float32 the model is returned as it is. Elsewhere a copy is moved there and its top
    module hooked (a TorchScript model is wrapped in :class:`OnDevice`); in bfloat16 (a resolved
    :func:`resolve_precision`) a channels-last copy is wrapped in :class:`Reduced`; :func:`unplace`
    undoes all three.
    """
    device = resolve_device(device)
    if device.type == "cpu" and precision == "float32":
        return model
    with torch.no_grad():  # the caller's module stays as it is, where it is
        placed = copy.deepcopy(model).to(device)
    placed = placed if device.type == "cpu" else boundary(placed)
    if precision == "bfloat16":
        return Reduced(placed.to(memory_format=torch.channels_last), device.type)
    return placed


def boundary(model: nn.Module) -> nn.Module:
    """Hook ``model`` (wherever it is) to take inputs to its own device and return CPU outputs."""
    if isinstance(model, torch.jit.ScriptModule):
        return OnDevice(model)
    if _to_model_device not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_to_model_device)
        model.register_forward_hook(_to_cpu)
    return model


def unplace(model: nn.Module) -> nn.Module:
    """The model back on the CPU without :func:`place`'s hooks (what is saved or returned to users)."""
    if isinstance(model, Reduced):
        model = model.model.to(memory_format=torch.contiguous_format)
    if isinstance(model, OnDevice):
        model = model.model
    for hooks, hook in ((model._forward_pre_hooks, _to_model_device), (model._forward_hooks, _to_cpu)):
        for key in [k for k, v in hooks.items() if v is hook]:
            del hooks[key]
    return model.cpu()

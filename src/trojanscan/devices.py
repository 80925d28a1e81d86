"""Where models run: ``--device auto|cpu|cuda|mps``.

The model runs on the device; the data, the trigger variables and every result stay on the CPU.
:func:`place` moves a model to the device and hooks its top module so that each batch goes to
the device on its way in and the outputs come back to the CPU on their way out (gradients flow
through both moves). Every defence, attack and metric therefore works unchanged on any device, and
what trojanscan writes is CPU tensors and numpy. On the CPU nothing is hooked: ``cpu`` runs exactly
as before.
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


def place(model: nn.Module, device: str | torch.device | None = "cpu") -> nn.Module:
    """``model`` on ``device`` (resolved by :func:`resolve_device`), taking and returning CPU tensors.

    On the CPU the model is returned as it is. Elsewhere a copy is moved there and its top module
    hooked (a TorchScript model is wrapped in :class:`OnDevice`); :func:`unplace` undoes both.
    """
    device = resolve_device(device)
    if device.type == "cpu":
        return model
    with torch.no_grad():  # the caller's module stays as it is, where it is
        placed = copy.deepcopy(model)
    return boundary(placed.to(device))


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
    if isinstance(model, OnDevice):
        model = model.model
    for hooks, hook in ((model._forward_pre_hooks, _to_model_device), (model._forward_hooks, _to_cpu)):
        for key in [k for k, v in hooks.items() if v is hook]:
            del hooks[key]
    return model.cpu()

"""Faster CPU inference for repeated forward passes (STRIP classifies N copies of every input).

:func:`frozen_for_inference` returns a frozen TorchScript copy of a model with its convolution
weights pre-packed for oneDNN, which runs our reference nets 2-3× faster on CPU than eager mode.
It is only made where it cannot change what the model computes: a scripted model (control flow
kept), or a module built only from layers whose ``forward`` has no data-dependent branches and
with no hooks, which is what tracing needs. Anything else, a tracing failure, or outputs that
differ from eager mode give ``None``, and the caller runs the model as it is. The copy holds the
weights as constants; :func:`model_fingerprint` tells when it must be rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from trojanscan.fileio import module_sha256
from trojanscan.models.architectures import Normalize, ReferenceNet, ResidualBlock
from trojanscan.models.modes import evaluating
from trojanscan.models.wrappers import NormalizedInput

# Layers whose forward is the same sequence of tensor operations for every input, so a trace of
# one batch is the model for all batches.
TRACEABLE_LAYERS: tuple[type[nn.Module], ...] = (
    ReferenceNet, Normalize, NormalizedInput, ResidualBlock, nn.Sequential, nn.Conv2d, nn.Linear, nn.ReLU,
    nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.Dropout, nn.Flatten, nn.Identity, nn.Tanh, nn.Sigmoid, nn.Softmax)
_TOLERANCE = 1e-4  # relative to the logits' scale; float reassociation gives ~1e-6


def _hook_counts(model: nn.Module) -> tuple[int, ...]:
    """How many forward hooks each module and the global registry hold (a trace would bake them in)."""
    return (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks),
            *(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def _traceable(model: nn.Module) -> bool:
    return all(type(m) in TRACEABLE_LAYERS for m in model.modules()) and not any(_hook_counts(model))


def model_fingerprint(model: nn.Module) -> str:
    """Changes whenever the model may compute something else: its weights and buffers (however they
    were written), its layers and their settings (``repr``), or its hooks."""
    h = hashlib.sha256(f"{id(model)} {model!r} {_hook_counts(model)}".encode())
    h.update(module_sha256(model).encode())
    return h.hexdigest()


def on_cpu(model: nn.Module) -> bool:
    """Whether every weight and buffer of ``model`` is on the CPU (where the frozen copy helps)."""
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def same_logits(fast: nn.Module, model: nn.Module, batch: torch.Tensor) -> bool:
    """Whether ``fast`` gives ``model``'s logits on ``batch`` up to float reassociation (both in eval
    mode, no gradients)."""
    want, got = model(batch), fast(batch)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(
        got, want, rtol=_TOLERANCE, atol=_TOLERANCE * (1 + float(want.abs().max())))


def frozen_for_inference(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """A frozen, oneDNN-optimised copy of ``model`` in eval mode that gives the same logits on
    ``example`` (and on its first 3 rows, to check another batch size), or ``None``.

    ``model`` itself is not changed. The copy holds the weights as constants: rebuild it when the
    weights change.
    """
    if not on_cpu(model) or len(example) < 2:
        return None
    try:
        with evaluating(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
            if isinstance(model, torch.jit.ScriptModule):
                scripted = model
            elif _traceable(model):
                scripted = torch.jit.trace(model, example, check_trace=False)
            else:
                return None
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
            return fast if all(same_logits(fast, model, b) for b in (example, example[:3])) else None
    except Exception:  # any failure of the optional speed-up: run the model eagerly instead
        return None


class Classifier:
    """Runs ``model`` in eval mode without gradients, through a frozen oneDNN copy on CPU where that
    is safe (see :func:`frozen_for_inference`); the copy is rebuilt
    whenever the model's fingerprint changes or it stops giving the model's logits on a probe."""

    def __init__(self, model: nn.Module, accelerate: bool = True) -> None:
        self.model, self.accelerate = model, bool(accelerate)
        self._fast: tuple[str, nn.Module] | None = None
        self._current: nn.Module | None = None

    def _module(self, probe: torch.Tensor) -> nn.Module:
        if not self.accelerate or not on_cpu(self.model):
            self._fast = None
            return self.model
        if len(probe) == 0:
            return self.model
        probe = probe[:8].to(torch.float32)
        key = model_fingerprint(self.model)
        if self._fast is not None and self._fast[0] == key and (
                self._fast[1] is self.model or same_logits(self._fast[1], self.model, probe[:2])):
            return self._fast[1]
        if len(probe) < 2:  # too few to check a new copy with: this call runs the model as it is
            return self.model
        fast = frozen_for_inference(self.model, probe[:8])
        self._fast = (key, fast if fast is not None else self.model)
        return self._fast[1]

    @property
    def accelerated(self) -> bool:
        """Whether the last call went through a frozen copy of the model."""
        return self.accelerate and self._fast is not None and self._fast[1] is not self.model

    @contextlib.contextmanager
    def running(self, probe: torch.Tensor) -> Iterator[nn.Module]:
        """The module to classify with; nested uses share the outer one (one fingerprint per call)."""
        if self._current is not None:
            yield self._current
            return
        try:
            with evaluating(self.model), torch.no_grad():
                self._current = self._module(probe)
                yield self._current
        finally:
            self._current = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fast": None, "_current": None}  # TorchScript copies do not pickle

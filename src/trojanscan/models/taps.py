"""Layer taps: where to read one layer's neurons, their mean activations, which ones a stimulus
drives, and how to silence or remove them. Defences (filter, pruning) and attacks (neuron-driven
triggers) share them.

Neural Cleanse's filter and pruning both look at the second-to-last layer: the input of the model's
last ``nn.Linear`` (by default), or the output of a module the user names. A convolutional layer's
neuron is a channel, its activation the mean over the feature map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating

PENULTIMATE = "penultimate"


@dataclass
class Layer:
    """A place to read neurons: the ``input`` or the ``output`` of the module called ``name``."""

    name: str
    module: nn.Module
    side: str  # "input" (of the last Linear: the penultimate layer) or "output" (of a named module)

    @property
    def label(self) -> str:
        return f"input of {self.name}" if self.side == "input" else self.name


def find_layer(model: nn.Module, layer: str | None = None, probe: torch.Tensor | None = None) -> Layer:
    """The penultimate layer (``None`` or ``"penultimate"``), or the module called ``layer``.

    With ``probe`` images the penultimate layer is the input of the last ``nn.Linear`` the forward
    pass actually calls (registration order can differ from execution order).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TrojanscanError("neuron-level mitigation needs a Python model (hooks do not work on "
                              "TorchScript); use the .safetensors file or load the model in Python")
    modules = dict(model.named_modules())
    if layer in (None, PENULTIMATE):
        linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        if probe is not None and linear:
            linear = call_order(model, {n: modules[n] for n in linear}, probe) or linear
        if not linear:
            raise TrojanscanError("the model has no nn.Linear layer, so its second-to-last layer is "
                                  "unknown; name one with --layer")
        return Layer(linear[-1], modules[linear[-1]], "input")
    if layer not in modules or layer == "":
        names = ", ".join(n for n in modules if n) or "none"
        raise TrojanscanError(f"the model has no layer {layer!r}; its layers are: {names}")
    return Layer(layer, modules[layer], "output")


@torch.no_grad()
def probe_pass(model: nn.Module, probe: torch.Tensor,
               handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """One forward pass of two probe images in eval mode, to fire ``handles``' hooks; they are removed."""
    try:
        with evaluating(model):
            model(probe[:2])
    finally:
        for h in handles:
            h.remove()


def call_order(model: nn.Module, candidates: dict[str, nn.Module], probe: torch.Tensor) -> list[str]:
    """Names of ``candidates`` in the order one forward pass calls them."""
    order: list[str] = []
    probe_pass(model, probe, [m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
                              for name, m in candidates.items()])
    return list(dict.fromkeys(order))


Summary = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # activations → named per-input summaries


def neuron_summary(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The default summary of a layer's output: its per-neuron activations under the suffix ``""``."""
    return {"": per_neuron(t)}


@contextmanager
def tapping(layers: list[Layer], sinks: dict[str, list[torch.Tensor]],
            summary: Summary = neuron_summary) -> Iterator[None]:
    """Record a summary of every layer's output in each forward pass: ``summary(output)`` maps suffixes
    to N×U tensors, appended to ``sinks[layer.name + suffix]``."""
    def record(name: str, t: torch.Tensor) -> None:
        for suffix, value in summary(t.detach()).items():
            sinks.setdefault(name + suffix, []).append(value)

    with ExitStack() as stack:
        for layer in layers:
            hook = layer.module.register_forward_hook(lambda _m, _a, out, n=layer.name: record(n, out))
            stack.callback(hook.remove)
        yield


def per_neuron(t: torch.Tensor) -> torch.Tensor:
    """N×U (dense) or N×C×H×W (conv: mean over the map) → N×U."""
    if t.dim() not in (2, 4):
        raise TrojanscanError(f"layer activations of shape {tuple(t.shape)[1:]} are neither a vector nor "
                              "feature maps; name a dense or convolutional layer with --layer")
    return t.flatten(2).mean(2) if t.dim() == 4 else t


@contextmanager
def _tap(layer: Layer, sink: list[torch.Tensor]) -> Iterator[None]:
    """Record the layer's per-neuron activations of every forward pass into ``sink``."""
    if layer.side == "input":
        handle = layer.module.register_forward_pre_hook(
            lambda _m, args: sink.append(per_neuron(args[0].detach())))
    else:
        handle = layer.module.register_forward_hook(
            lambda _m, _args, out: sink.append(per_neuron(out.detach())))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def activations(model: nn.Module, layer: Layer, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """N×U activations of ``layer`` for images ``x`` (model in eval mode, restored after)."""
    sink: list[torch.Tensor] = []
    with evaluating(model), _tap(layer, sink):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    if not sink:
        raise TrojanscanError("no images to measure activations on")
    return torch.cat(sink).float()


def rank_neurons(clean: torch.Tensor, stamped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons most driven by the trigger first: order by mean(stamped) − mean(clean), and the gaps."""
    if clean.shape[1:] != stamped.shape[1:]:
        raise TrojanscanError("clean and stamped activations come from different layers")
    gap = stamped.mean(0) - clean.mean(0)
    return torch.argsort(gap, descending=True, stable=True), gap


@contextmanager
def silenced(layer: Layer, neurons: torch.Tensor) -> Iterator[None]:
    """Within the block, the given neurons of ``layer`` output zero (at inference, weights untouched)."""
    idx = torch.as_tensor(neurons, dtype=torch.long)

    def zero(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, idx] = 0
        return t

    if layer.side == "input":
        handle = layer.module.register_forward_pre_hook(lambda _m, args: (zero(args[0]), *args[1:]))
    else:
        handle = layer.module.register_forward_hook(lambda _m, _args, out: zero(out))
    try:
        yield
    finally:
        handle.remove()


def check_prunable(layer: Layer) -> None:
    """Pruning edits weights: the penultimate layer (via the last Linear) or a Linear/Conv2d output."""
    if layer.side == "output" and not isinstance(layer.module, (nn.Linear, nn.Conv2d)):
        raise TrojanscanError(f"pruning needs a Linear or Conv2d layer; {layer.name!r} is a "
                              f"{type(layer.module).__name__}")


@torch.no_grad()
def prune_weights(layer: Layer, neurons: torch.Tensor) -> None:
    """Remove neurons for good by editing weights, so the model saves in its usual format.

    Penultimate neurons: zero the matching input columns of the last Linear. A named Linear or
    Conv2d: zero the neurons' output weights and biases (exactly zero output before any BatchNorm).
    """
    check_prunable(layer)
    idx = torch.as_tensor(neurons, dtype=torch.long)
    m = layer.module
    if layer.side == "input":
        m.weight[:, idx] = 0
        return
    m.weight[idx] = 0
    if m.bias is not None:
        m.bias[idx] = 0

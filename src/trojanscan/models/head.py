"""What a convolutional net's classifier head sees: features pooled over the whole image, or a map
that keeps positions.

A net whose dense head reads globally pooled features (ResNets, MobileNets: ``AdaptiveAvgPool2d(1)``
or a mean over the spatial axes) answers to a feature wherever it appears, so a small patch that draws
a class's own feature is a natural trigger; a head that reads a flattened map (the Neural Cleanse
paper's nets, VGG's 7×7 head) ties each feature to its place. Clean nets of the two kinds have very
different trigger-size ratios, so the verdict holds each to its own null (rule 9).

:func:`pools_globally` answers from one forward pass of a probe: the first dense layer after the last
convolution reads F features, and the last four-dimensional activation before it is C×H×W. The head
pools when that map is 1×1 or F = C; it keeps positions when F is C times a number of places between 2
and H·W (a flattened map, perhaps pooled locally first). Eager modules are read by hooks on their layers
(pooling done by a function call happens between two layers, which the bounds above allow for); a
TorchScript module takes no hooks, so a copy of its graph returns every tensor between its last
convolution and its first dense operator as well (nothing is added but outputs). Anything else is
``None`` (unknown), and the verdict keeps the convolutional nets' common null.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trojanscan.devices import convolutions
from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating
from trojanscan.models.script_taps import also_returning, scripted_parts, swapped_in

_DENSE_OPS = ("aten::linear", "aten::addmm", "aten::matmul", "aten::mm")
_CONV_OPS = ("aten::conv2d", "aten::_convolution")

Event = tuple[str, tuple[int, ...]]  # ("conv" | "map" | "dense", per-input shape), in the order run


def pools_globally(model: nn.Module, probe: torch.Tensor) -> bool | None:
    """Whether ``model``'s dense head reads globally pooled features (``True``), a map with positions
    (``False``), or cannot be told (``None``: no convolution, no dense layer after it, an odd shape).
    ``probe``: one or more inputs of the model's shape (only shapes are read). Raises
    :class:`TrojanscanError` (one line) when the model cannot run the probe."""
    if not convolutions(model):
        return None
    scripts = scripted_parts(model)
    try:
        with torch.no_grad(), evaluating(model):
            if scripts:
                path, script = next(iter(scripts.items()))
                events = _graph_events(script, path, model, probe[:1])
            else:
                events = _hooked_events(model, probe[:1])
    except TrojanscanError:
        raise
    except Exception as e:  # noqa: BLE001 - a stranger's model may raise anything; the scan goes on
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrojanscanError(f"cannot read the model's head ({type(e).__name__}: {first})") from None
    return head_pools(events)


def head_pools(events: list[Event]) -> bool | None:
    """The answer from the layers' shapes in the order they ran (see the module notes)."""
    last_conv = max((i for i, (k, _) in enumerate(events) if k == "conv"), default=None)
    if last_conv is None:
        return None
    dense = next((i for i in range(last_conv + 1, len(events)) if events[i][0] == "dense"), None)
    maps = [s for _, s in events[last_conv:dense] if len(s) == 3] if dense is not None else []
    if not maps or len(events[dense][1]) != 1:  # type: ignore[index]
        return None
    features = events[dense][1][0]  # type: ignore[index]
    c, h, w = maps[-1]
    if h * w == 1 or features == c:
        return True
    return False if features % c == 0 and 1 < features // c <= h * w else None


def _hooked_events(model: nn.Module, probe: torch.Tensor) -> list[Event]:
    events: list[Event] = []

    def seen(kind: str):
        def hook(_m: nn.Module, args: Any, output: Any = None) -> None:
            t = (args[0] if args else None) if kind == "dense" else output
            if isinstance(t, torch.Tensor):
                events.append((kind, tuple(t.shape[1:])))
        return hook

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_pre_hook(seen("dense")))
            elif not list(m.children()):
                handles.append(m.register_forward_hook(seen("conv" if isinstance(m, nn.Conv2d) else "map")))
        model(probe)
    finally:
        for h in handles:
            h.remove()
    return events


def _between(nodes: list[torch._C.Node]) -> list[torch._C.Value]:
    """The tensors from the last convolution's output to the first dense operator's input after it."""
    last_conv = max((i for i, n in enumerate(nodes) if n.kind() in _CONV_OPS), default=None)
    if last_conv is None:
        return []
    picked = []
    for n in nodes[last_conv:]:
        if n.kind() in _DENSE_OPS:
            return [*picked, n.inputsAt(0)]
        picked += [v for v in n.outputs() if isinstance(v.type(), torch._C.TensorType)]
    return []


class _Recording(nn.Module):
    """Stands in for a TorchScript module: runs its graph copy and keeps the extra values it returns."""

    def __init__(self, script: torch.jit.ScriptModule, run: Any) -> None:
        super().__init__()
        self.script, self.run, self.seen = script, run, []

    def forward(self, x: torch.Tensor) -> Any:
        out, *values = self.run(self.script._c, x)
        self.seen = values
        return out


def _graph_events(script: torch.jit.ScriptModule, path: str, model: nn.Module,
                  probe: torch.Tensor) -> list[Event]:
    run, values = also_returning(script, _between, path)
    if not values:
        return []
    recording = _Recording(script, run)
    with swapped_in(model, {path: recording}) as runnable:
        runnable(probe)
    if len(recording.seen) != len(values):
        return []
    kinds = ["conv"] + ["map"] * (len(values) - 2) + ["dense"]
    return [(k, tuple(t.shape[1:])) for k, t in zip(kinds, recording.seen, strict=True)]

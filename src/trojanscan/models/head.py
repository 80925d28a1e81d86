"""What a convolutional net's classifier head sees: features pooled over the whole image, or a map
that keeps positions.

A net whose dense head reads globally pooled features (ResNets, MobileNets: ``AdaptiveAvgPool2d(1)``
or a mean over the spatial axes) answers to a feature wherever it appears, so a small patch that draws
a class's own feature is a natural trigger; a head that reads a flattened map (the Neural Cleanse
paper's nets, VGG's 7×7 head) ties each feature to its place. Clean nets of the two kinds have very
different trigger-size ratios, so the verdict holds each to its own null (rule 9).

:func:`pools_globally` answers from one forward pass of a probe: the first dense layer after the last
convolution, and the last four-dimensional activation (C×H×W) before it. The head pools when that
activation is 1×1 or the dense layer reads C features; it keeps positions when it reads C·H·W (with
H·W > 1). A TorchScript model takes no hooks, so its inlined graph is read instead (no run): between
the last convolution and the first dense operator after it, a global pooling operator (an adaptive
pool to 1×1, a mean or max over both spatial axes) means pooled, no reduction at all means positions
kept. Anything else is ``None`` (unknown), and the verdict keeps the convolutional nets' common null.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trojanscan.devices import convolutions
from trojanscan.models.modes import evaluating
from trojanscan.models.script_taps import scripted_parts

_DENSE_OPS = ("aten::linear", "aten::addmm", "aten::matmul", "aten::mm")
_CONV_OPS = ("aten::conv2d", "aten::_convolution")
_ADAPTIVE = ("aten::adaptive_avg_pool2d", "aten::adaptive_max_pool2d")
_REDUCTIONS = ("aten::mean", "aten::amax", "aten::sum", "aten::max")


def pools_globally(model: nn.Module, probe: torch.Tensor) -> bool | None:
    """Whether ``model``'s dense head reads globally pooled features (``True``), a map with positions
    (``False``), or cannot be told (``None``: no convolution, no dense layer after it, an odd shape).
    ``probe``: one or more inputs of the model's shape (only shapes are read)."""
    if not convolutions(model):
        return None
    scripts = scripted_parts(model)
    if scripts:
        return _graph_pools(next(iter(scripts.values())))
    return _probed_pools(model, probe[:1])


def _probed_pools(model: nn.Module, probe: torch.Tensor) -> bool | None:
    events: list[tuple[str, tuple[int, ...]]] = []

    def seen(kind: str):
        def hook(_m: nn.Module, args: Any, output: Any = None) -> None:
            t = args[0] if kind == "dense" else output
            if isinstance(t, torch.Tensor):
                events.append((kind, tuple(t.shape[1:])))
        return hook

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(seen("dense")))
        elif not list(m.children()):
            handles.append(m.register_forward_hook(seen("conv" if isinstance(m, nn.Conv2d) else "map")))
    try:
        with torch.no_grad(), evaluating(model):
            model(probe)
    finally:
        for h in handles:
            h.remove()
    last_conv = max((i for i, (k, _) in enumerate(events) if k == "conv"), default=None)
    if last_conv is None:
        return None
    dense = next((i for i in range(last_conv + 1, len(events)) if events[i][0] == "dense"), None)
    if dense is None:
        return None
    maps = [s for _, s in events[last_conv:dense] if len(s) == 3]
    if not maps or len(events[dense][1]) != 1:
        return None
    features = events[dense][1][0]
    c, h, w = maps[-1]
    if h * w == 1 or features == c:
        return True
    return False if features == c * h * w else None


def _graph_pools(script: torch.jit.ScriptModule) -> bool | None:
    try:
        nodes = list(script.inlined_graph.nodes())
    except (RuntimeError, AttributeError):
        return None
    last_conv = max((i for i, n in enumerate(nodes) if n.kind() in _CONV_OPS), default=None)
    if last_conv is None:
        return None
    after = nodes[last_conv + 1:]
    dense = next((i for i, n in enumerate(after) if n.kind() in _DENSE_OPS), None)
    if dense is None:
        return None
    head = after[:dense]
    if any(_global_pool(n) for n in head):
        return True
    # a reduction over other axes (say a mean over a flattened map's last axis) may pool all the same
    return None if any(n.kind() in _REDUCTIONS for n in head) else False


def _constant(value: torch._C.Value) -> Any:
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        items = [_constant(v) for v in node.inputs()]
        return None if any(i is None for i in items) else items
    return None


def _global_pool(node: torch._C.Node) -> bool:
    """An adaptive pool to 1×1, or a mean/max/sum over both spatial axes of a 4-D map."""
    inputs = list(node.inputs())
    if node.kind() in _ADAPTIVE and len(inputs) > 1:
        size = _constant(inputs[1])
        sizes = size if isinstance(size, list) else [size]
        return bool(sizes) and all(s == 1 for s in sizes)
    if node.kind() in _REDUCTIONS and len(inputs) > 1:
        dims = _constant(inputs[1])
        return isinstance(dims, list) and ({2, 3} <= set(dims) or {-1, -2} <= set(dims))
    return False

"""Layer activations of TorchScript models, which take no hooks.

A TorchScript module's inlined graph is copied with the outputs of its top-level convolutions and
dense layers (``aten::conv2d``, ``aten::_convolution``, ``aten::linear``) added to what it returns;
:class:`TappedScript` runs that copy in place of the module and records them. It runs the same,
already inspected operators as the module (nothing is added but outputs), in the same order, on the
same weights. Layers inside loops or branches of the graph are not read. The graph surgery uses
TorchScript's internal API; where it fails (another PyTorch), the error is one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trojanscan.errors import TrojanscanError
from trojanscan.models.taps import Summary, neuron_summary

TAPPED_KINDS = ("aten::conv2d", "aten::_convolution", "aten::linear")


def scripted_parts(model: nn.Module) -> dict[str, torch.jit.ScriptModule]:
    """The outermost TorchScript modules inside ``model`` by their path (``""``: the model itself)."""
    parts: dict[str, torch.jit.ScriptModule] = {}
    for name, m in model.named_modules():
        inside = any(p == "" or name.startswith(p + ".") for p in parts)
        if isinstance(m, torch.jit.ScriptModule) and not inside:
            parts[name] = m
    return parts


Picker = Callable[[list[torch._C.Node]], list[torch._C.Value]]  # graph nodes → values to return too


def also_returning(script: torch.jit.ScriptModule, pick: Picker,
                   path: str = "") -> tuple[Callable[..., Any], list[torch._C.Value]]:
    """A function of (``script._c``, input) that runs a copy of ``script``'s inlined graph and returns
    its output followed by the values ``pick`` chose among the graph's nodes; and those values."""
    try:
        graph = script.inlined_graph
        if len(list(graph.inputs())) != 2:
            raise TrojanscanError("its forward takes more than one input")
        read = pick(list(graph.nodes()))
        values = [next(iter(graph.outputs())), *read]
        pack = graph.create("prim::TupleConstruct", values)
        pack.output().setType(torch._C.TupleType([v.type() for v in values]))
        graph.appendNode(pack)
        graph.eraseOutput(0)
        graph.registerOutput(pack.output())
        return torch._C._create_function_from_graph("tapped_forward", graph), read
    except (RuntimeError, AttributeError, TypeError, StopIteration, TrojanscanError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrojanscanError(f"cannot read the layers of the TorchScript module {path or 'model'!r} "
                              f"({first})") from None


class TappedScript(nn.Module):
    """Stands in for a TorchScript module: returns its output and, when ``sinks`` is set, appends
    ``summary`` of each read layer's output to ``sinks[name + suffix]`` (as :func:`tapping` does)."""

    def __init__(self, script: torch.jit.ScriptModule, path: str) -> None:
        super().__init__()
        self._run, read = also_returning(
            script, lambda nodes: [n.output() for n in nodes if n.kind() in TAPPED_KINDS], path)
        self.script = script
        self.names = [f"{path}#{i}:{v.node().kind().rpartition(':')[2]}" for i, v in enumerate(read)]
        self.sinks: dict[str, list[torch.Tensor]] | None = None
        self.summary: Summary = neuron_summary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, *read = self._run(self.script._c, x)
        if self.sinks is not None:
            for name, t in zip(self.names, read, strict=True):
                for suffix, value in self.summary(t.detach()).items():
                    self.sinks.setdefault(name + suffix, []).append(value)
        return out


@contextmanager
def swapped_in(model: nn.Module, stand_ins: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Within the block, each module at a path of ``stand_ins`` is replaced by its stand-in; yields
    the module to call (the stand-in itself when it replaces the whole model)."""
    if "" in stand_ins:
        yield stand_ins[""]
        return
    originals = {}
    try:
        for path, stand_in in stand_ins.items():
            parent, _, child = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            originals[path] = (owner, child, getattr(owner, child))
            setattr(owner, child, stand_in)
        yield model
    finally:
        for owner, child, original in originals.values():
            setattr(owner, child, original)

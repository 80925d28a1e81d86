"""ONNX models read into PyTorch by trojanscan's own small converter: protobuf only, no code.

A model file from a stranger must never act on the machine, so the file is parsed with the ``onnx``
package's protobuf classes and nothing else (no external data is followed, no custom operator is
loaded, nothing from the file is executed) and refused in one line when it holds

* more than :func:`max_onnx_bytes` bytes, or an external-data reference (``data_location``
  EXTERNAL: a path that would be read from beside the file),
* a tensor whose declared dimensions and data type disagree with the bytes it stores,
* an operator set outside the default ONNX domain or older than :data:`MIN_OPSET`, model-local
  functions, subgraphs (``If``, ``Loop``, ``Scan``) or any operator outside :data:`OPS`.

The graph becomes an :class:`OnnxModel`, an ``nn.Module`` that runs its nodes in topological order
with torch operations. Convolutions, ``Gemm`` and ``MatMul`` by a constant become real
``nn.Conv2d``/``nn.Linear`` submodules and ``BatchNormalization`` a batch-norm layer, each named after
its node, so gradients, layer taps, pruning and fine-tuning work as on any module. When
``onnxruntime`` is installed the converted module is compared with it on random inputs and the file
is refused when they disagree. :meth:`OnnxModel.to_onnx` writes the same graph back with the
module's current weights: a repaired or attacked ONNX model is saved as ``.onnx``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.errors import TrojanscanError
from trojanscan.fileio import max_array_bytes
from trojanscan.fileio import printable as _shown

MIN_ONNX_VERSION = (1, 16)  # older onnx releases followed external-data paths out of the model's folder
MIN_OPSET = 11  # Clip, Pad and friends take their bounds as inputs from 11 on
PROTOBUF_LIMIT = (2 << 30) - 1  # protobuf cannot hold a larger message
MAX_NODES = 100_000
MAX_TENSOR_DIMS = 16
ORT_TOLERANCE = 1e-4  # max |ours − onnxruntime|, relative to the largest output (at least 1)
INSTALL_HINT = "pip install 'trojanscan[onnx]'"
DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element type → numpy dtype, and the typed field that holds it when raw_data is empty
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype(np.float32), "float_data"), 2: (np.dtype(np.uint8), "int32_data"),
    3: (np.dtype(np.int8), "int32_data"), 6: (np.dtype(np.int32), "int32_data"),
    7: (np.dtype(np.int64), "int64_data"), 9: (np.dtype(np.bool_), "int32_data"),
    10: (np.dtype(np.float16), "int32_data"), 11: (np.dtype(np.float64), "double_data"),
}
_CAST: dict[int, torch.dtype] = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32,
                                 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}


def max_onnx_bytes() -> int:
    """The largest ONNX file read: the array cap (``TROJANSCAN_MAX_ARRAY_BYTES``), at most 2 GiB
    (protobuf's limit)."""
    return min(max_array_bytes(), PROTOBUF_LIMIT)


def _onnx(shown: object) -> Any:
    """The onnx package, recent enough, or a one-line error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise TrojanscanError(f"{shown}: reading ONNX models needs the onnx package: "
                              f"{INSTALL_HINT}") from None
    found = tuple(int(p) for p in re.findall(r"\d+", onnx.__version__)[:2])
    if found < MIN_ONNX_VERSION:
        raise TrojanscanError(f"{shown}: onnx {onnx.__version__} is too old (older than 1.16 followed "
                              f"external-data paths out of the model's folder): {INSTALL_HINT}")
    return onnx


def _refused(shown: object, what: str) -> TrojanscanError:
    return TrojanscanError(f"{shown}: refused: {what}")


def _safe_name(name: str, taken: set[str], fallback: str) -> str:
    """A module/buffer name made of ``[A-Za-z0-9_]`` from an ONNX name, unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")[:80] or fallback
    base = f"n_{base}" if base[0].isdigit() else base
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


# --- checking and reading tensors -------------------------------------------------------------------

def check_tensor(t: Any, where: str, shown: object) -> np.ndarray:
    """The array an ONNX TensorProto holds, after checking that it is self-contained and that its
    declared dims × dtype match the bytes it stores (before anything is allocated)."""
    label = f"{where} {_shown(t.name, 60)!r}" if t.name else where
    if t.data_location == 1 or len(t.external_data):
        where_to = next((e.value for e in t.external_data if e.key == "location"), "?")
        raise _refused(shown, f"{label} refers to external data ({_shown(where_to, 60)!r}); trojanscan "
                              "reads self-contained ONNX files only")
    if t.HasField("segment"):
        raise _refused(shown, f"{label} is a segment of a tensor")
    if t.data_type not in _DTYPES:
        raise _refused(shown, f"{label} has ONNX data type {t.data_type} (supported: float, double, "
                              "float16, int8/32/64, uint8, bool)")
    dims = list(t.dims)
    if len(dims) > MAX_TENSOR_DIMS or any(d < 0 for d in dims):
        raise _refused(shown, f"{label} declares dims {_shown(dims, 80)}")
    dtype, typed = _DTYPES[t.data_type]
    count = math.prod(dims)
    if count * dtype.itemsize > max_onnx_bytes():
        raise _refused(shown, f"{label} declares {count:,} elements ({count * dtype.itemsize:,} bytes, "
                              f"limit {max_onnx_bytes():,})")
    stored, unit = ((len(t.raw_data), dtype.itemsize) if t.raw_data
                    else (len(getattr(t, typed)), 1))
    if stored != count * unit:
        raise _refused(shown, f"{label} declares shape {tuple(dims)} of {dtype.name} ({count * unit:,} "
                              f"{'bytes' if unit > 1 else 'values'}) but stores {stored:,}")
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=dtype.newbyteorder("<")).reshape(dims).astype(dtype)
    values = np.asarray(getattr(t, typed))
    if t.data_type == 10:  # float16 travels as its bit patterns in int32_data
        return values.astype(np.uint16).view(np.float16).reshape(dims)
    return values.astype(dtype).reshape(dims)


def _attribute_value(a: Any) -> Any:
    """A scalar or list attribute (FLOAT, INT, STRING and their lists) as a Python value."""
    if a.type == 3:
        return a.s.decode("utf-8", "replace")
    if a.type == 8:
        return [s.decode("utf-8", "replace") for s in a.strings]
    return {1: a.f, 2: a.i, 6: list(a.floats), 7: list(a.ints)}.get(a.type)


def _attributes(node: Any, shown: object, where: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """A node's attributes as Python values, and the tensor of a Constant node; subgraphs refused."""
    attrs: dict[str, Any] = {}
    tensor = None
    for a in node.attribute:
        kind = a.type
        if kind in (5, 10):  # GRAPH, GRAPHS
            raise _refused(shown, f"{where} holds a subgraph (attribute {_shown(a.name, 40)!r}); "
                                  "control flow is not supported")
        if kind in (4, 9, 11, 12, 13, 14):  # TENSOR(S), SPARSE_TENSOR(S), TYPE_PROTO(S)
            if kind != 4 or node.op_type != "Constant" or a.name != "value":
                raise _refused(shown, f"{where}: attribute {_shown(a.name, 40)!r} of kind {kind} is not "
                                      "supported")
            tensor = check_tensor(a.t, f"{where}'s value", shown)
            continue
        attrs[a.name] = _attribute_value(a)
    return attrs, tensor


# --- the operators ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One node of the graph as the module runs it."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # the submodule that holds its weights
    frees: tuple[str, ...] = ()  # values no later step reads


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _flatten2d(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _softmax(fn: Callable[..., torch.Tensor]) -> Callable[..., list[torch.Tensor]]:
    def run(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
        x = ins[0]
        if m.opset >= 13:
            return [fn(x, dim=s.attrs.get("axis", -1))]
        return [fn(_flatten2d(x, s.attrs.get("axis", 1)), dim=1).reshape(x.shape)]  # opset < 13: 2-D view
    return run


def _pool_pads(s: Step, spatial: int) -> tuple[list[int], list[int] | None]:
    """Symmetric padding for torch's pooling, or the ``F.pad`` list for asymmetric ONNX pads."""
    pads = s.attrs.get("pads") or [0] * (2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    kernel = s.attrs["kernel_shape"]
    if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel, strict=True)):
        return begin, None
    return [0] * spatial, [v for i in reversed(range(spatial)) for v in (begin[i], end[i])]


def _pool(kind: str) -> Callable[..., list[torch.Tensor]]:
    def run(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
        x = ins[0]
        spatial = x.dim() - 2
        padding, pre = _pool_pads(s, spatial)
        kernel = s.attrs["kernel_shape"]
        strides = s.attrs.get("strides") or [1] * spatial
        ceil = bool(s.attrs.get("ceil_mode", 0))
        if kind == "max":
            if pre is not None:
                x = F.pad(x, pre, value=-math.inf)
            fn = F.max_pool1d if spatial == 1 else F.max_pool2d
            return [fn(x, kernel, strides, padding, s.attrs.get("dilations") or 1, ceil_mode=ceil)]
        include = bool(s.attrs.get("count_include_pad", 0))
        if pre is not None:
            x = F.pad(x, pre)
        fn = F.avg_pool1d if spatial == 1 else F.avg_pool2d
        return [fn(x, kernel, strides, padding, ceil_mode=ceil, count_include_pad=include)]
    return run


def _pad(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x, pads = ins[0], _ints(ins[1])
    axes = [_axis(a, x.dim()) for a in _ints(ins[3])] if len(ins) > 3 and ins[3] is not None \
        else list(range(x.dim()))
    begin = dict(zip(axes, pads[:len(axes)], strict=True))
    end = dict(zip(axes, pads[len(axes):], strict=True))
    last = max((a for a in axes if begin[a] or end[a]), default=x.dim() - 1)
    torch_pads = [v for a in range(x.dim() - 1, last - 1, -1) for v in (begin.get(a, 0), end.get(a, 0))]
    mode = _PAD_MODES[s.attrs.get("mode", "constant")]
    value = float(ins[2].reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
    return [F.pad(x, torch_pads, mode=mode, value=value if mode == "constant" else None)]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}  # ONNX → F.pad


def _reshape(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x, shape = ins[0], _ints(ins[1])
    if not s.attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return [x.reshape(shape)]


def _slice(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x = ins[0]
    starts, ends = _ints(ins[1]), _ints(ins[2])
    axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for a, b, e, st in zip(axes, starts, ends, steps, strict=True):
        if st < 1:
            raise TrojanscanError("ONNX Slice with a negative or zero step is not supported")
        index[_axis(a, x.dim())] = slice(b, e, st)
    return [x[tuple(index)]]


def _gather(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x, idx = ins[0], ins[1].long()
    axis = _axis(s.attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1).to(x.device))
    return [out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]


def _axes_of(m: OnnxModel, s: Step, ins: list[Any]) -> list[int] | None:
    if m.opset >= 13:
        return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    return s.attrs.get("axes")


def _unsqueeze(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x = ins[0]
    axes = _axes_of(m, s, ins) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _squeeze(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x = ins[0]
    axes = _axes_of(m, s, ins)
    if axes is None:
        return [x.squeeze()]
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(a)
    return [x]


def _div(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    a, b = ins
    if not a.is_floating_point() and not b.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


def _gemm(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    if s.module is not None:
        return [m.layers[s.module](ins[0])]
    a = ins[0].t() if s.attrs.get("transA", 0) else ins[0]
    b = ins[1].t() if s.attrs.get("transB", 0) else ins[1]
    out = s.attrs.get("alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        out = out + s.attrs.get("beta", 1.0) * ins[2]
    return [out]


def _layer(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    x = ins[0]
    if s.attrs.get("pre_pad"):
        x = F.pad(x, s.attrs["pre_pad"])
    return [m.layers[s.module](x)]


def _matmul(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    return [m.layers[s.module](ins[0])] if s.module is not None else [torch.matmul(ins[0], ins[1])]


def _shape(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    shape = list(ins[0].shape)[s.attrs.get("start", 0):s.attrs.get("end", None)]
    return [torch.tensor(shape, dtype=torch.int64, device=ins[0].device)]


def _elementwise(fn: Callable[..., torch.Tensor]) -> Callable[..., list[torch.Tensor]]:
    return lambda m, s, ins: [fn(*ins)]


def _clip(m: OnnxModel, s: Step, ins: list[Any]) -> list[torch.Tensor]:
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    return [torch.clamp(ins[0], lo, hi)] if lo is not None or hi is not None else [ins[0]]


Runner = Callable[["OnnxModel", Step, list[Any]], list[torch.Tensor]]
OPS: dict[str, Runner] = {
    "Conv": _layer, "BatchNormalization": _layer, "Dropout": _layer,
    "Gemm": _gemm, "MatMul": _matmul,
    "Add": _elementwise(torch.add), "Sub": _elementwise(torch.sub), "Mul": _elementwise(torch.mul),
    "Div": _div, "Pow": _elementwise(torch.pow), "Neg": _elementwise(torch.neg),
    "Sqrt": _elementwise(torch.sqrt), "Exp": _elementwise(torch.exp), "Erf": _elementwise(torch.erf),
    "Relu": _elementwise(F.relu), "Sigmoid": _elementwise(torch.sigmoid), "Tanh": _elementwise(torch.tanh),
    "LeakyRelu": lambda m, s, ins: [F.leaky_relu(ins[0], s.attrs.get("alpha", 0.01))],
    "Clip": _clip,
    "Softmax": _softmax(F.softmax), "LogSoftmax": _softmax(F.log_softmax),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda m, s, ins: [ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda m, s, ins: [ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True)],
    "Flatten": lambda m, s, ins: [_flatten2d(ins[0], s.attrs.get("axis", 1))],
    "Reshape": _reshape,
    "Transpose": lambda m, s, ins: [ins[0].permute(s.attrs.get("perm") or
                                                   list(reversed(range(ins[0].dim()))))],
    "Concat": lambda m, s, ins: [torch.cat([t for t in ins if t is not None], dim=s.attrs["axis"])],
    "Identity": lambda m, s, ins: [ins[0]],
    "Pad": _pad, "Shape": _shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Slice": _slice, "Cast": lambda m, s, ins: [ins[0].to(_CAST[s.attrs["to"]])],
}
"""The operators the converter runs (``Constant`` nodes become buffers); anything else is refused."""


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over dim 1 of an input of any rank ≥ 2 (ONNX does not fix the rank)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")


# --- the module -------------------------------------------------------------------------------------

class OnnxModel(nn.Module):
    """An ONNX graph run by PyTorch: one input, one output, weights as parameters and buffers.

    ``layers`` holds the nodes with weights (``nn.Conv2d``, ``nn.Linear``, batch norm, dropout) under
    their node names; constants the graph reads are buffers. :meth:`to_onnx` writes the graph back
    with the current weights.
    """

    def __init__(self, graph_bytes: bytes, opset: int, input_name: str, output_name: str,
                 steps: list[Step], layers: dict[str, nn.Module], constants: dict[str, torch.Tensor],
                 sources: dict[str, tuple[str, bool, str]], reads: dict[str, str]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        for name, value in constants.items():
            self.register_buffer(name, value)
        self.opset = opset
        self.input_name, self.output_name = input_name, output_name
        self.steps = steps
        self._graph_bytes = graph_bytes  # the file's model, for to_onnx
        self._sources = sources  # ONNX constant name → (state key, transposed, numpy dtype)
        self._reads = reads  # ONNX constant name → state key, for the values steps read directly

    def _state_tensor(self, key: str) -> torch.Tensor:
        owner, _, attr = key.rpartition(".")
        return getattr(self.get_submodule(owner) if owner else self, attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.input_name: x}
        for name, key in self._reads.items():
            transposed = self._sources[name][1]
            value = self._state_tensor(key)
            env[name] = value.t() if transposed else value
        for step in self.steps:
            outs = OPS[step.op](self, step, [env[n] if n else None for n in step.inputs])
            env.update((n, v) for n, v in zip(step.outputs, outs, strict=False) if n)
            for n in step.frees:
                env.pop(n, None)
        return env[self.output_name]

    def to_onnx(self, metadata: dict[str, str] | None = None) -> bytes:
        """The file's ONNX model with this module's current weights (and ``metadata`` props)."""
        onnx = _onnx("to_onnx")
        from onnx import numpy_helper

        model = onnx.load_model_from_string(self._graph_bytes)
        state = self.state_dict()

        def fresh(name: str) -> Any:
            key, transposed, dtype = self._sources[name]
            t = state[key].detach().cpu()
            return numpy_helper.from_array((t.t() if transposed else t).numpy().astype(dtype), name)

        g = model.graph
        for i, init in enumerate(g.initializer):
            if init.name in self._sources:
                g.initializer[i].CopyFrom(fresh(init.name))
        # constants that nodes made (Constant, Identity of a constant) are written as initializers
        folded = [n.output[0] for n in g.node
                  if n.op_type in ("Constant", "Identity") and n.output[0] in self._sources]
        kept = [copy.deepcopy(n) for n in g.node if n.output[0] not in folded]
        del g.node[:]
        g.node.extend(kept)
        g.initializer.extend(fresh(name) for name in folded)
        for key, value in (metadata or {}).items():
            props = [p for p in model.metadata_props if p.key == key]
            prop = props[0] if props else model.metadata_props.add()
            prop.key, prop.value = key, value
        return model.SerializeToString()


# --- conversion -------------------------------------------------------------------------------------

@dataclass
class _Builder:
    """What conversion accumulates: submodules, constants and where each ONNX constant now lives."""

    shown: object
    arrays: dict[str, np.ndarray]  # ONNX constants: initializers and Constant nodes
    layers: dict[str, nn.Module] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, tuple[str, bool, str]] = field(default_factory=dict)
    taken: set[str] = field(default_factory=lambda: {"layers", "training", "opset", "steps"})

    def const(self, name: str, where: str, ndim: Sequence[int] | None = None) -> np.ndarray:
        if name not in self.arrays:
            raise _refused(self.shown, f"{where}: {_shown(name, 60)!r} must be a constant (initializer)")
        a = self.arrays[name]
        if ndim is not None and a.ndim not in ndim:
            raise _refused(self.shown, f"{where}: {_shown(name, 60)!r} has {a.ndim} dims")
        return a

    def own(self, module_name: str, attr: str, onnx_name: str, array: np.ndarray, transposed: bool,
            buffer: bool = False) -> None:
        """Put ``array`` into the submodule's parameter (or buffer) ``attr``; shared constants share it."""
        module = self.layers[module_name]
        if onnx_name in self.sources:  # the same initializer feeds two layers: one tensor for both
            key, was_transposed, _ = self.sources[onnx_name]
            owner, _, owner_attr = key.rpartition(".")
            shared = getattr(self.layers[owner.removeprefix("layers.")], owner_attr)
            if was_transposed != transposed or tuple(shared.shape) != tuple(getattr(module, attr).shape):
                raise _refused(self.shown, f"initializer {_shown(onnx_name, 60)!r} feeds two layers "
                                           "in different shapes")
            setattr(module, attr, shared)
            return
        value = torch.from_numpy(np.ascontiguousarray(array.T if transposed else array).astype(np.float32))
        if tuple(value.shape) != tuple(getattr(module, attr).shape):
            raise _refused(self.shown, f"{module_name}: {_shown(onnx_name, 60)!r} has shape "
                                       f"{tuple(array.shape)}, which does not fit the layer")
        if buffer:
            module.register_buffer(attr, value)
        else:
            setattr(module, attr, nn.Parameter(value))
        self.sources[onnx_name] = (f"layers.{module_name}.{attr}", transposed, array.dtype.str)

    def buffer(self, onnx_name: str) -> str:
        """The state key of a constant the graph reads directly (registered once)."""
        if onnx_name not in self.sources:
            a = self.arrays[onnx_name]
            key = _safe_name(onnx_name, self.taken, "const")
            value = torch.from_numpy(np.array(a))
            self.constants[key] = value.float() if value.is_floating_point() else value
            self.sources[onnx_name] = (key, False, a.dtype.str)
        return self.sources[onnx_name][0]


def _conv(b: _Builder, name: str, ins: list[str], attrs: dict[str, Any], where: str) -> dict[str, Any]:
    w = b.const(ins[1], where, (3, 4))
    spatial = w.ndim - 2
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _refused(b.shown, f"{where}: auto_pad {_shown(attrs['auto_pad'], 20)} is not supported")
    pads = attrs.get("pads") or [0] * (2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    group = int(attrs.get("group", 1))
    cls = nn.Conv1d if spatial == 1 else nn.Conv2d
    bias = len(ins) > 2 and bool(ins[2])
    with torch.device("meta"):
        layer = cls(w.shape[1] * group, w.shape[0], tuple(w.shape[2:]),
                    tuple(attrs.get("strides") or [1] * spatial), tuple(begin) if begin == end else 0,
                    tuple(attrs.get("dilations") or [1] * spatial), group, bias=bias)
    b.layers[name] = layer
    b.own(name, "weight", ins[1], w, False)
    if bias:
        b.own(name, "bias", ins[2], b.const(ins[2], where, (1,)), False)
    if begin == end:
        return {}
    return {"pre_pad": [v for i in reversed(range(spatial)) for v in (begin[i], end[i])]}


def _linear(b: _Builder, name: str, weight: str, bias: str | None, transposed: bool, where: str) -> None:
    w = b.const(weight, where, (2,))
    out_features, in_features = (w.shape[1], w.shape[0]) if transposed else w.shape
    with torch.device("meta"):
        b.layers[name] = nn.Linear(in_features, out_features, bias=bias is not None)
    b.own(name, "weight", weight, w, transposed)
    if bias is not None:
        b.own(name, "bias", bias, b.const(bias, where).reshape(-1), False)


def _linear_gemm(b: _Builder, attrs: dict[str, Any], ins: list[str]) -> bool:
    """Whether a Gemm is a plain ``nn.Linear``: x·Bᵀ + C with constant B and a constant 1-D-like C."""
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0) or ins[1] not in b.arrays:
        return False
    if b.arrays[ins[1]].ndim != 2:
        return False
    if len(ins) > 2 and ins[2]:
        c = b.arrays.get(ins[2])
        n = b.arrays[ins[1]].shape[0 if attrs.get("transB", 0) else 1]
        return attrs.get("beta", 1.0) == 1.0 and c is not None and c.shape in ((n,), (1, n))
    return True


def _batch_norm(b: _Builder, name: str, ins: list[str], attrs: dict[str, Any], outs: list[str],
                where: str) -> None:
    if attrs.get("training_mode", 0) or len([o for o in outs if o]) > 1:
        raise _refused(b.shown, f"{where}: BatchNormalization in training mode is not supported")
    scale = b.const(ins[1], where, (1,))
    with torch.device("meta"):
        layer = _BatchNorm(len(scale), eps=attrs.get("epsilon", 1e-5),
                           momentum=1 - attrs.get("momentum", 0.9))
    b.layers[name] = layer
    for attr, onnx_name, buffer in (("weight", ins[1], False), ("bias", ins[2], False),
                                    ("running_mean", ins[3], True), ("running_var", ins[4], True)):
        b.own(name, attr, onnx_name, b.const(onnx_name, where, (1,)), False, buffer=buffer)
    layer.num_batches_tracked = torch.tensor(0, dtype=torch.long)


def _dropout(b: _Builder, name: str, ins: list[str], attrs: dict[str, Any], outs: list[str],
             where: str) -> None:
    if len(outs) > 1 and outs[1]:
        raise _refused(b.shown, f"{where}: Dropout's mask output is not supported")
    if len(ins) > 2 and ins[2] and (ins[2] not in b.arrays or bool(b.arrays[ins[2]].reshape(-1)[0])):
        raise _refused(b.shown, f"{where}: Dropout in training mode is not supported")
    ratio = (float(b.const(ins[1], where).reshape(-1)[0]) if len(ins) > 1 and ins[1]
             else attrs.get("ratio", 0.5))
    b.layers[name] = nn.Dropout(ratio)


def _node_name(node: Any, index: int, taken: set[str]) -> str:
    return _safe_name(node.name.lstrip("/") or f"{node.op_type}_{index}", taken, f"{node.op_type}_{index}")


def _check_opsets(model: Any, onnx: Any, shown: object) -> int:
    latest = onnx.defs.onnx_opset_version()
    opset = None
    for o in model.opset_import:
        if o.domain not in DEFAULT_DOMAINS:
            raise _refused(shown, f"it imports operator set {_shown(o.domain, 60)!r}; only the default ONNX "
                                  "domain is supported (no custom operators)")
        opset = int(o.version)
    if opset is None or not MIN_OPSET <= opset <= latest:
        raise _refused(shown, f"ONNX opset {opset} is not supported (supported: {MIN_OPSET} to {latest}; "
                              "re-export with another opset_version)")
    return opset


def _check_graph(model: Any, shown: object) -> None:
    g = model.graph
    if len(model.functions):
        raise _refused(shown, f"it defines {len(model.functions)} model-local function(s); not supported")
    if len(model.training_info):
        raise _refused(shown, "it holds a training program (training_info); not supported")
    if len(g.sparse_initializer):
        raise _refused(shown, "it holds sparse initializers; not supported")
    if len(g.node) > MAX_NODES:
        raise _refused(shown, f"the graph has {len(g.node):,} nodes (limit {MAX_NODES:,})")
    foreign = sorted({f"{n.domain}:{n.op_type}" for n in g.node if n.domain not in DEFAULT_DOMAINS})
    if foreign:
        raise _refused(shown, "operator(s) outside the default ONNX domain: "
                              f"{_shown(', '.join(foreign), 120)}")
    unknown = sorted({n.op_type for n in g.node} - set(OPS) - {"Constant"})
    if unknown:
        raise _refused(shown, f"unsupported ONNX operator(s) {_shown(', '.join(unknown), 120)} (trojanscan "
                              "converts image classifiers: convolutions, dense layers, pooling, "
                              "normalisation, activations and reshaping)")


def _io_names(g: Any, constants: set[str], shown: object) -> tuple[Any, str]:
    inputs = [i for i in g.input if i.name not in constants]
    if len(inputs) != 1 or len(g.output) != 1:
        raise _refused(shown, f"the graph has {len(inputs)} inputs and {len(g.output)} outputs; a classifier "
                              "takes one image batch and returns one logits tensor")
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in (1, 10, 11):
        raise _refused(shown, f"the graph's input has ONNX data type {elem}; images must be floats")
    return inputs[0], g.output[0].name


def convert(model: Any, raw: bytes, shown: object, onnx: Any) -> tuple[OnnxModel, int]:
    """Check a parsed ModelProto and build its :class:`OnnxModel` (and return its opset)."""
    opset = _check_opsets(model, onnx, shown)
    _check_graph(model, shown)
    g = model.graph
    arrays = {t.name: check_tensor(t, "initializer", shown) for t in g.initializer}
    nodes = []
    for i, node in enumerate(g.node):
        where = f"node {_shown(node.name or i, 60)} ({node.op_type})"
        attrs, tensor = _attributes(node, shown, where)
        if node.op_type == "Constant":
            if tensor is None:
                value = next((attrs[k] for k in ("value_float", "value_int", "value_floats", "value_ints")
                              if k in attrs), None)
                if value is None:
                    raise _refused(shown, f"{where}: this kind of Constant is not supported")
                tensor = np.asarray(value, dtype=np.float32 if "float" in next(
                    k for k in attrs if k.startswith("value")) else np.int64)
            arrays[node.output[0]] = tensor
        elif node.op_type == "Identity" and node.input[0] in arrays:  # exporters share equal weights so
            arrays[node.output[0]] = arrays[node.input[0]].copy()  # each layer keeps its own, as in torch
        else:
            nodes.append((i, node, attrs, where))
    graph_input, output_name = _io_names(g, set(arrays), shown)
    b = _Builder(shown, arrays)
    defined = {graph_input.name, *arrays}
    steps: list[Step] = []
    taken: set[str] = set()
    for i, node, attrs, where in nodes:
        ins, outs = list(node.input), list(node.output)
        missing = [n for n in ins if n and n not in defined]
        if missing:
            raise _refused(shown, f"{where} reads {_shown(missing[0], 60)!r}, which no earlier node makes "
                                  "(a truncated or unsorted graph)")
        module = None
        op = node.op_type
        if op in ("Conv", "BatchNormalization", "Dropout") or (op == "Gemm" and _linear_gemm(b, attrs, ins)) \
                or (op == "MatMul" and ins[1] in arrays and arrays[ins[1]].ndim == 2):
            module = _node_name(node, i, taken)
            if op == "Conv":
                attrs = _conv(b, module, ins, attrs, where)
            elif op == "BatchNormalization":
                _batch_norm(b, module, ins, attrs, outs, where)
            elif op == "Dropout":
                _dropout(b, module, ins, attrs, outs, where)
            else:
                bias = ins[2] if op == "Gemm" and len(ins) > 2 and ins[2] else None
                _linear(b, module, ins[1], bias, op == "MatMul" or not attrs.get("transB", 0), where)
            ins = ins[:1]
        elif op in ("MaxPool", "AveragePool"):
            if (attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
                    or len(attrs.get("kernel_shape", [])) not in (1, 2) or (len(outs) > 1 and outs[1])):
                raise _refused(shown, f"{where}: this {op} (auto_pad, indices output or rank) is not "
                                      "supported")
        elif (op == "Cast" and attrs.get("to") not in _CAST) or (
                op == "Pad" and attrs.get("mode", "constant") not in _PAD_MODES):
            raise _refused(shown, f"{where}: {op} to {_shown(attrs.get('to', attrs.get('mode')), 20)} is "
                                  "not supported")
        for o in outs:
            if o in defined:
                raise _refused(shown, f"{where} writes {_shown(o, 60)!r} a second time")
            defined.add(o)
        steps.append(Step(op, tuple(ins), tuple(outs), attrs, module))
    if output_name not in defined:
        raise _refused(shown, f"no node makes the graph's output {_shown(output_name, 60)!r}")
    reads = {n: b.buffer(n) for s in steps for n in s.inputs if n in arrays}
    module = OnnxModel(raw, opset, graph_input.name, output_name, _with_frees(steps, output_name),
                       b.layers, b.constants, b.sources, reads)
    return module, opset


def _with_frees(steps: list[Step], keep: str) -> list[Step]:
    """Each step with the values that no later step reads, so memory is released as the graph runs."""
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        for n in s.inputs:
            last[n] = i
    frees: dict[int, list[str]] = {}
    for n, i in last.items():
        if n and n != keep:
            frees.setdefault(i, []).append(n)
    return [Step(s.op, s.inputs, s.outputs, s.attrs, s.module, tuple(frees.get(i, ())))
            for i, s in enumerate(steps)]


# --- loading ----------------------------------------------------------------------------------------

def _static_dims(value_info: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value_info.type.tensor_type.shape.dim]


def _ort_check(module: OnnxModel, raw: bytes, graph_input: Any, input_shape: tuple[int, ...] | None,
               shown: object) -> dict[str, Any]:
    """Compare the converted module with onnxruntime on random inputs; refuse the file if they differ."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"checked": False, "why": "onnxruntime is not installed"}
    dims = _static_dims(graph_input)
    if input_shape is not None and len(dims) == len(input_shape) + 1:
        dims = [dims[0], *[d if d is not None else s for d, s in zip(dims[1:], input_shape, strict=True)]]
    shape = [dims[0] or 2, *dims[1:]] if dims else []
    if not dims or any(d is None for d in shape):
        return {"checked": False, "why": "the model's input size is not fixed and no data was given"}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    try:
        session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        theirs = torch.from_numpy(np.asarray(session.run(None, {graph_input.name: x.numpy()})[0])).float()
    except Exception as e:  # onnxruntime's own errors for a graph it will not run
        raise _refused(shown, f"onnxruntime cannot run it ({_shown(str(e).strip().splitlines()[0], 160)})"
                       ) from None
    try:
        with torch.no_grad():
            ours = module.eval()(x).float()
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise TrojanscanError(f"{shown}: the converted model cannot run on {tuple(shape)} inputs "
                              f"({_shown(str(e).strip().splitlines()[0], 160)})") from None
    if ours.shape != theirs.shape:
        raise _refused(shown, f"the converted model gives outputs of shape {tuple(ours.shape)}, onnxruntime "
                              f"{tuple(theirs.shape)}")
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    scale = max(1.0, float(theirs.abs().max())) if theirs.numel() else 1.0
    if not diff <= ORT_TOLERANCE * scale:
        raise _refused(shown, f"the converted model and onnxruntime disagree (max difference {diff:.3g}, "
                              f"tolerance {ORT_TOLERANCE * scale:.3g}); please report it")
    return {"checked": True, "onnxruntime": ort.__version__, "inputs": list(shape), "max_abs_diff": diff}


def load_onnx(path: Path, shown: object, input_shape: tuple[int, ...] | None = None
              ) -> tuple[OnnxModel, dict[str, Any], dict[str, str], dict[str, Any]]:
    """Read and check an ONNX file, convert it, and compare it with onnxruntime when installed.

    Returns the module, its metadata (input shape and classes where the graph fixes them), the
    file's ``metadata_props`` and what the checks saw (for the trust record).
    """
    onnx = _onnx(shown)
    size = path.stat().st_size
    if size > max_onnx_bytes():
        raise _refused(shown, f"the ONNX file is {size:,} bytes (limit {max_onnx_bytes():,})")
    raw = path.read_bytes()
    try:
        from google.protobuf.message import DecodeError

        model = onnx.load_model_from_string(raw)  # protobuf only: external data is never followed
    except (DecodeError, ValueError, RuntimeError) as e:
        raise TrojanscanError(f"{shown}: corrupt or truncated ONNX file ({_shown(e, 120)})") from None
    if not model.HasField("graph") or not len(model.graph.node):
        raise TrojanscanError(f"{shown}: corrupt or truncated ONNX file (no graph)")
    module, opset = convert(model, raw, shown, onnx)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(f"{shown}: not a valid ONNX model ({_shown(first, 160)})") from None
    graph_input = next(i for i in model.graph.input if i.name == module.input_name)
    meta: dict[str, Any] = {}
    dims = _static_dims(graph_input)
    if len(dims) == 4 and all(d is not None for d in dims[1:]):
        meta["input_shape"] = dims[1:]
    out_dims = _static_dims(model.graph.output[0])
    if len(out_dims) == 2 and out_dims[1] is not None:
        meta["num_classes"] = out_dims[1]
    check = _ort_check(module, raw, graph_input, input_shape, shown)
    props = {p.key: p.value for p in model.metadata_props}
    producer = f"{model.producer_name} {model.producer_version}".strip()
    inspection = {"onnx": {"opset": opset, "producer": _shown(producer, 60),
                           "nodes": len(model.graph.node), "layers": len(module.layers),
                           "operators": sorted({n.op_type for n in model.graph.node}),
                           "runtime_check": check}}
    return module.eval(), meta, props, inspection

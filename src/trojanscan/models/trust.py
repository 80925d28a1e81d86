"""The model-file trust policy: what trojanscan checks before it opens a model file.

Every model file is untrusted. A scanner exists to open models from strangers, so nothing in a
file may act on the machine when trojanscan opens or runs it:

* **TorchScript** (``.pt``) carries code. :func:`inspect_torchscript` reads the archive as a zip
  without executing anything (limits on size, entry count and decompressed size; no duplicate,
  overlapping or encrypted entries), parses the TorchScript source under ``code/`` with Python's
  ``ast`` after a strict lexical screen, and refuses any call outside an allow-list of
  side-effect-free operators (:data:`ALLOWED_ATEN`, :data:`ALLOWED_PRIM`, :data:`ALLOWED_BUILTINS`):
  no file, stream or print operators, no profiler hooks, no custom operator namespaces, no
  autograd or grad-mode queries (a model that can tell a scan from deployment can evade it), no
  ``__setstate__``/``__getstate__`` that does more than move attributes, no loop that can never
  end. Names are resolved in program order; TorchScript's own names (:data:`RESERVED_NAMES`) may
  not be rebound, an operator or method is only ever called, never taken as a value, and only
  fields of the archive's classes and tensor properties are read as attributes. The state rules
  follow every value through locals, containers and calls (summaries of the archive's own
  functions): nothing reachable from a module, a constant or a default argument is changed in
  place outside training mode, in any class. Its pickles (constants, tensors, debug tables) are
  walked opcode by opcode and may name only tensor-rebuilding functions and the archive's own
  classes. :func:`probe_torchscript` then loads the archive from memory and runs forward passes in
  a short-lived child process confined as far as the platform allows (no file writes, a memory
  cap, new mount/network/user namespaces, ``chroot`` into an empty folder, an unprivileged uid,
  no capabilities; see :class:`ProbeResult`) with a time budget, so a model that hangs or crashes
  is refused in one line instead of hanging the scan.
* **safetensors**: :func:`check_safetensors` bounds the header length and its JSON (size, depth,
  duplicate keys) and checks dtypes, shapes and offsets before the safetensors library sees it.
* **pickled checkpoints** are read only by ``torch.load(weights_only=True)``, behind
  :func:`check_checkpoint` (size, and the zip limits for the zip format).
* **ONNX** is read by trojanscan's own converter, :mod:`trojanscan.models.onnx_import` (protobuf only;
  external data, oversized or mis-sized tensors, foreign operator sets, functions, subgraphs and
  operators outside its list refused; checked against onnxruntime when installed).

A user may load their own model unchecked (``load_model(..., trusted=True)``, ``--trust-model``);
the result says so. Every refusal is a :class:`~trojanscan.errors.TrojanscanError` whose message is
one line naming the file (and for code, the method and the operator).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import pickletools
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import tokenize
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from trojanscan.errors import TrojanscanError
from trojanscan.fileio import parse_json, zip_directory_stats
from trojanscan.fileio import printable as _shown

# --- limits (module constants; tests and unusual deployments may change them) ---------------------

MAX_MODEL_BYTES = 4 << 30  # any model file
MAX_ZIP_ENTRIES = 20_000
MAX_CENTRAL_DIRECTORY_BYTES = 16 << 20
MAX_UNCOMPRESSED_BYTES = 8 << 30  # all entries of an archive together, as declared and as read
MAX_SOURCE_BYTES = 8 << 20  # one code/ file
MAX_TOTAL_SOURCE_BYTES = 64 << 20
MAX_PICKLE_BYTES = 64 << 20  # data.pkl, constants.pkl, *.debug_pkl
MAX_EXTRA_BYTES = 1 << 20  # one extra/ entry (trojanscan.json)
MAX_SMALL_ENTRY_BYTES = 4096  # version, byteorder, .data/*
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
MAX_SAFETENSORS_HEADER_DEPTH = 4  # {name: {"shape": [..]}} is 3 deep
MAX_TENSORS = 100_000
MAX_TENSOR_DIMS = 16
MAX_CODE_NESTING = 200  # nested statements/expressions in TorchScript source

PROBE_LOAD_BUDGET_S = 60.0  # child process: start Python, import torch, load the archive
PROBE_CALL_BUDGET_S = 10.0  # child process: the forward passes of PROBE_BATCH_SIZES
PROBE_BATCH_SIZES = (1, 2, 3, 32)  # 2 is check_model_fits' first; the last runs with gradients on
PROBE_MAX_INPUT_ELEMENTS = 1 << 26  # larger probe inputs are not made (load is still probed)
PROBE_MEMORY_BYTES = 32 << 30  # address-space cap of the child (plus 4× the file size)

TRUST_HINT = "load it unchecked (--trust-model, trusted=True) only if it is your own model"

# --- the allow-list -------------------------------------------------------------------------------
# TorchScript source spells operators as ``torch.NAME`` (aten::NAME), ``ops.NS.NAME`` (NS::NAME),
# builtins (``len``, ``getattr``…) and methods (``x.view(...)`` → aten::view). Everything not
# listed here is refused: the list is the safe default, not a list of known-bad operators.

_MATH = """
add add_ sub sub_ rsub mul mul_ div div_ true_divide floordiv floor_divide remainder fmod neg
abs pow sqrt rsqrt exp exp2 log log2 log10 log1p expm1 sin cos tan asin acos atan atan2 sinh cosh
tanh sigmoid erf erfc floor ceil round trunc frac sign sgn reciprocal square clamp clamp_
clamp_min clamp_min_ clamp_max clamp_max_ clip maximum minimum where lerp addcmul addcdiv neg_
eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or
bitwise_not bitwise_xor isnan isinf isfinite nan_to_num hypot gcd lcm copysign cumsum cumprod
__and__ __or__ __xor__ __not__ __is__ __isnot__ __contains__ __getitem__ __range_length
__derive_index __round_to_zero_floordiv __lshift__ __rshift__ __iand__ __ior__ __ixor__
"""
_ACTIVATIONS = """
relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ gelu
silu silu_ mish mish_ hardswish hardswish_ hardsigmoid hardsigmoid_ sigmoid_ tanh_ softplus
prelu glu log_sigmoid softmax log_softmax threshold threshold_ hardshrink softshrink
"""
_LAYERS = """
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution
linear bilinear matmul mm bmm addmm addmv baddbmm einsum dot mv outer t
max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
batch_norm layer_norm group_norm instance_norm rms_norm norm frobenius_norm
dropout dropout_ feature_dropout feature_dropout_ alpha_dropout alpha_dropout_
feature_alpha_dropout feature_alpha_dropout_
scaled_dot_product_attention embedding embedding_bag one_hot
pad constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d
replication_pad2d replication_pad3d
upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d
upsample_bicubic2d upsample_trilinear3d _upsample_nearest_exact1d _upsample_nearest_exact2d
_upsample_nearest_exact3d _upsample_bilinear2d_aa _upsample_bicubic2d_aa _upsample_lanczos2d_aa
pixel_shuffle pixel_unshuffle channel_shuffle im2col col2im cosine_similarity pairwise_distance
cdist grid_sampler affine_grid_generator
"""
_SHAPES = """
view reshape flatten unflatten permute transpose contiguous squeeze squeeze_ unsqueeze unsqueeze_
expand expand_as repeat repeat_interleave tile cat concat concatenate stack hstack vstack split
split_with_sizes tensor_split chunk unbind narrow select slice index_select gather index
masked_select take flip roll movedim moveaxis view_as reshape_as swapaxes unfold diagonal tril
triu size dim numel sym_size sym_numel
"""
_CREATE = """
zeros ones zeros_like ones_like full full_like empty empty_like arange linspace eye tensor
scalar_tensor new_zeros new_ones new_full new_empty clone to type_as float double half bfloat16
long int bool fill_ zero_ copy_ masked_fill masked_fill_ index_fill index_fill_ index_put
index_put_ scatter scatter_ scatter_add scatter_add_ index_add index_add_
rand rand_like randn randn_like bernoulli bernoulli_ uniform_ normal_
"""
_REDUCE = """
mean sum prod max min amax amin argmax argmin aminmax std var std_mean var_mean logsumexp topk
sort argsort msort kthvalue median any all count_nonzero nonzero unique bincount histc
"""
_SCALARS = """
Int Float Bool ScalarImplicit IntImplicit FloatImplicit item len list dict str format
is_floating_point is_complex is_signed dtype device layout
append extend insert pop remove clear keys values items get setdefault update copy reverse
count join startswith endswith strip lstrip rstrip lower upper replace find isdigit _set_item
"""

ALLOWED_ATEN: frozenset[str] = frozenset(
    " ".join((_MATH, _ACTIVATIONS, _LAYERS, _SHAPES, _CREATE, _REDUCE, _SCALARS)).split())
"""``torch.NAME`` / ``ops.aten.NAME`` / ``x.NAME(...)``: tensor math and classifier layers."""

ALLOWED_PRIM: frozenset[str] = frozenset("""
RaiseException device dtype layout unchecked_unwrap_optional unchecked_cast Uninitialized
NumToTensor min max abs tolist is_nested itemsize nbytes EnumName EnumValue TupleIndex StringIndex
""".split())
"""``ops.prim.NAME``: TorchScript's own plumbing (raising, optional unwrapping, dtype/device)."""

ALLOWED_BUILTINS: frozenset[str] = frozenset("""
len range int float bool str complex isinstance getattr hasattr annotate unchecked_cast
uninitialized min max abs sum any all enumerate zip list dict tuple round divmod ord chr sorted
hex oct bin
Exception RuntimeError ValueError TypeError IndexError KeyError AssertionError
NotImplementedError ZeroDivisionError
""".split())
"""Bare names TorchScript may call: builtins, type constructors, exception classes."""

TYPE_NAMES: frozenset[str] = frozenset("""
Tensor int float bool str complex List Dict Tuple Optional Union Any NoneType Final Device number
Scalar ScalarType Layout MemoryFormat Module
""".split())
"""Names allowed in type annotations (besides the archive's own ``__torch__`` classes)."""

_CLASS_BASES = frozenset({"Module", "NamedTuple", "Enum", "Interface", "ModuleInterface"})
_GRAD = "is an autograd or grad-mode query (a model could tell a scan from deployment)"
DENIED: dict[str, str] = {
    **dict.fromkeys(["save", "_save", "_save_for_mobile", "_save_parameters"], "writes files"),
    **dict.fromkeys(["load", "_load", "from_file", "_load_for_mobile"], "reads (or maps) files"),
    **dict.fromkeys(["print", "Print", "_print", "warn"], "prints to the scanner's output"),
    **dict.fromkeys(["record_stream", "pin_memory", "_pin_memory", "share_memory_"],
                    "touches memory outside the model"),
    **dict.fromkeys(["requires_grad", "requires_grad_", "is_grad_enabled", "set_grad_enabled",
                     "is_inference", "is_inference_mode_enabled", "_get_tracing_state",
                     "is_scripting", "is_tracing", "is_autocast_enabled", "is_autocast_cpu_enabled",
                     "get_autocast_dtype", "grad", "_grad", "data", "set_data", "detach",
                     "detach_", "is_leaf", "retain_grad", "retains_grad", "_version", "grad_fn",
                     "output_nr", "_base", "backward", "_backward", "get_gradients",
                     "RequiresGradCheck", "AutogradAdd"], _GRAD),
    **dict.fromkeys(["fork", "wait", "awaitable", "_awaitable", "_awaitable_wait",
                     "_awaitable_nowait", "awaitable_wait", "awaitable_nowait"],
                    "runs code outside the call (asynchronously)"),
    **dict.fromkeys(["rpc_async", "rpc_sync", "rpc_remote"], "calls a remote machine"),
    **dict.fromkeys(["manual_seed", "seed", "initial_seed"], "reads or changes the random seed"),
    **dict.fromkeys(["TimePoint", "AddStatValue", "profile", "profile_ivalue"],
                    "is a profiler or debugging hook"),
}
"""Operators refused with a specific reason (all others outside the allow-list are refused too)."""

DENIED_ATTRIBUTES = frozenset(name for name, why in DENIED.items() if why == _GRAD)

_VIEW_OPS = frozenset("""
view reshape flatten unflatten permute transpose contiguous squeeze unsqueeze expand expand_as
split split_with_sizes tensor_split chunk unbind narrow select slice diagonal view_as reshape_as
movedim moveaxis swapaxes t unfold __getitem__ index
""".split())
_LIST_MUTATORS = frozenset("append extend insert pop remove clear _set_item setdefault update "
                           "reverse sort".split())

ALLOW_LIST_SIZE = len(ALLOWED_ATEN) + len(ALLOWED_PRIM) + len(ALLOWED_BUILTINS)
"""How many operator names the allow-list holds (aten + prim + builtins)."""


# --- small helpers --------------------------------------------------------------------------------


def refused(path: object, what: str) -> TrojanscanError:
    return TrojanscanError(f"{path}: refused: {what}")


@contextlib.contextmanager
def private_copy(path: Path) -> Iterator[Path]:
    """A copy of ``path`` in a fresh private folder: what is checked is exactly what is loaded."""
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise refused(path, f"the file is {size} bytes (limit {MAX_MODEL_BYTES})")
    work = tempfile.mkdtemp(prefix="trojanscan-model-")
    try:
        copy = Path(work) / "model.pt"
        shutil.copyfile(path, copy)
        yield copy
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- zip archives ---------------------------------------------------------------------------------

def open_zip(path: Path, shown: object) -> zipfile.ZipFile:
    """Open a zip after checking its size, entry count and directory size; then check every
    entry: unique safe names, no encryption, stored/deflated only, no prepended data, no
    overlapping entries (the overlapping-file zip bomb), declared sizes within limits."""
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise refused(shown, f"the file is {size} bytes (limit {MAX_MODEL_BYTES})")
    entries, cd_size, _ = zip_directory_stats(path)
    if entries > MAX_ZIP_ENTRIES:
        raise refused(shown, f"the archive has {entries} entries (limit {MAX_ZIP_ENTRIES})")
    if cd_size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise refused(shown, f"the archive's directory is {cd_size} bytes "
                             f"(limit {MAX_CENTRAL_DIRECTORY_BYTES})")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise TrojanscanError(f"{shown}: corrupt zip archive ({_shown(e, 80)})") from None
    try:
        _check_zip_entries(zf, path, shown, size)
    except BaseException:
        zf.close()
        raise
    return zf


def _check_zip_entries(zf: zipfile.ZipFile, path: Path, shown: object, size: int) -> None:
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise refused(shown, f"the archive has {len(infos)} entries (limit {MAX_ZIP_ENTRIES})")
    names: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if name in names:
            raise refused(shown, f"the archive holds {_shown(name)!r} twice")
        names.add(name)
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name or "\x00" in name
                or any(p in ("..", ".") for p in parts) or ":" in parts[0]):
            raise refused(shown, f"unsafe entry name {_shown(name)!r} in the archive")
        if info.flag_bits & 0x1:
            raise refused(shown, f"encrypted entry {_shown(name)!r} in the archive")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise refused(shown, f"entry {_shown(name)!r} uses compression method "
                                 f"{info.compress_type} (only stored and deflated are read)")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise refused(shown, f"entry {_shown(name)!r} declares two different sizes")
        total += info.file_size
        if total > MAX_UNCOMPRESSED_BYTES:
            raise refused(shown, f"the archive unpacks to more than {MAX_UNCOMPRESSED_BYTES} "
                                 "bytes (a zip bomb?)")
    # every entry's bytes lie after its own header and before the next entry: no prepended
    # data, no two entries sharing bytes
    ordered = sorted(infos, key=lambda i: i.header_offset)
    start_dir = getattr(zf, "start_dir", size)
    with open(path, "rb") as f:
        for k, info in enumerate(ordered):
            if k == 0 and info.header_offset != 0:
                raise refused(shown, "the archive has data before its first entry")
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise TrojanscanError(f"{shown}: corrupt zip archive (bad entry header)")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            local_name = f.read(name_len)
            if local_name not in (info.orig_filename.encode("utf-8"),
                                  info.orig_filename.encode("cp437", "replace")):
                raise refused(shown, f"entry {_shown(info.filename)!r} has two different names")
            end = info.header_offset + 30 + name_len + extra_len + info.compress_size
            limit = ordered[k + 1].header_offset if k + 1 < len(ordered) else start_dir
            if end > limit:
                raise refused(shown, f"entry {_shown(info.filename)!r} overlaps the next one "
                                     "(a zip bomb?)")


def read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, shown: object) -> bytes:
    """An entry's bytes, read through a bounded reader: never more than ``cap`` (nor more than
    its declared size, whatever its compressed stream says), CRC checked."""
    if info.file_size > cap:
        raise refused(shown, f"entry {_shown(info.filename)!r} is {info.file_size} bytes "
                             f"(limit {cap})")
    try:
        with zf.open(info) as f:
            data = f.read(cap + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise TrojanscanError(f"{shown}: corrupt entry {_shown(info.filename)!r} in the archive "
                              f"({_shown(e, 80)})") from None
    if len(data) != info.file_size:
        raise TrojanscanError(f"{shown}: corrupt entry {_shown(info.filename)!r} in the archive "
                              "(its size is not the declared one)")
    return data


# --- pickles inside archives ----------------------------------------------------------------------

PICKLE_GLOBALS = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter", "collections.OrderedDict",
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist",
    "torch.jit._pickle.build_doublelist", "torch.jit._pickle.build_boollist",
    "torch.jit._pickle.build_tensor_from_id", "torch.jit._pickle.restore_type_tag",
})
"""Globals a TorchScript pickle may name (besides ``torch.*Storage`` and the archive's classes)."""

_STORAGE = re.compile(r"torch\.[A-Za-z0-9]+Storage")
_PICKLE_REFUSED_OPS = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "STACK_GLOBAL"})


def check_pickle(data: bytes, entry: str, shown: object, classes: frozenset[str]) -> None:
    """Walk a pickle's opcodes without unpickling: only allow-listed globals, no opcode that
    imports by name from the stack or builds objects outside that list."""
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in _PICKLE_REFUSED_OPS:
                raise refused(shown, f"pickle {_shown(entry)!r} uses opcode {op.name}")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                full = f"{module}.{name}"
                if full.startswith("__torch__.torch.classes."):
                    raise refused(shown, f"pickle {_shown(entry)!r} builds a custom C++ class "
                                         f"{_shown(full)}")
                if full in PICKLE_GLOBALS or _STORAGE.fullmatch(full) or full in classes:
                    continue
                raise refused(shown, f"pickle {_shown(entry)!r} names {_shown(full)}, which is "
                                     "not a tensor or a class of the archive")
    except TrojanscanError:
        raise
    except Exception as e:  # truncated or malformed opcode stream
        raise TrojanscanError(f"{shown}: corrupt pickle {_shown(entry)!r} in the archive "
                              f"({_shown(e, 80)})") from None


# --- TorchScript source ---------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[ !#-\[\]-~]|\\[\\\'"abfnrtv]|\\[0-7]{3})*"')


def _lexical_screen(source: str, entry: str, shown: object) -> None:
    """Accept only what TorchScript's printer writes, so that Python's parser and TorchScript's
    see the same program: ASCII, spaces for indentation, no comments, no line continuations,
    double-quoted strings with the printer's escapes only."""
    def bad(why: str) -> TrojanscanError:
        return refused(shown, f"{_shown(entry)}: {why} (not what TorchScript writes)")

    if not source.isascii():
        raise bad("non-ASCII characters in the code")
    if re.search(r"[\x00-\x09\x0b-\x1f\x7f]", source):
        raise bad("control characters or tabs in the code")
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                raise bad("a comment in the code")
            if tok.type == tokenize.ERRORTOKEN:
                raise bad(f"an unreadable token {_shown(tok.string, 20)!r}")
            if tok.type == tokenize.STRING and not _STRING.fullmatch(tok.string):
                raise bad(f"an unusual string literal {_shown(tok.string, 30)!r}")
            if tok.type == tokenize.OP and tok.string in (";", ":="):
                raise bad(f"the token {tok.string!r}")
    except (tokenize.TokenError, IndentationError, SyntaxError) as e:
        raise bad(f"code that does not tokenize ({_shown(e, 60)})") from None
    if "\\\n" in source:
        raise bad("a line continuation")


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _truthy_constant(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and bool(node.value) and not isinstance(node.value, str)


@dataclass
class _Class:
    qualname: str
    kind: str  # "module" | "class" | "namedtuple" | "enum" | "interface"
    node: ast.ClassDef
    file: str
    fields: dict[str, ast.AST | None] = field(default_factory=dict)  # field → its annotation
    methods: set[str] = field(default_factory=set)


@dataclass
class _Function:
    qualname: str
    node: ast.FunctionDef
    file: str
    cls: _Class | None


# The state rules track, for every value, which objects not made during the call it may be
# (its identity) and which it may reach (its contents: list items, fields), as descriptors:
# ("p", k) the object passed as parameter k (0 is ``self`` in a method), ("r", k) an object
# reachable from it, _GLOBAL one shared between calls (``CONSTANTS``, a mutable default
# argument). A value whose identity is empty is fresh: changing it in place changes nothing else.
_GLOBAL = "global"
_ALWAYS = "always"  # a change that always happens
_TRAINING = "training"  # a change that happens only in training mode
_Descs = frozenset  # of ("p", k) | ("r", k) | _GLOBAL
_Val = tuple  # (identity, contents): two _Descs
_Cond = Any  # _ALWAYS | _TRAINING | ("param", j): only when parameter j is true
_FRESH: tuple[frozenset, frozenset] = (frozenset(), frozenset())


def _reach(descs: _Descs) -> _Descs:
    return frozenset(("r", d[1]) if isinstance(d, tuple) else d for d in descs)


def _join(*vals: _Val) -> _Val:
    return (frozenset().union(*(v[0] for v in vals)), frozenset().union(*(v[1] for v in vals)))


def _element(v: _Val) -> _Val:
    """An item of a list or tuple, or a view of a tensor (which of the two is not known)."""
    return v[0] | v[1], v[1] | _reach(v[1])


def _field(v: _Val) -> _Val:
    return v[1], v[1] | _reach(v[1])


def _holding(*vals: _Val) -> _Val:
    """A new container holding these values."""
    return frozenset(), frozenset().union(*(v[0] | v[1] for v in vals))


def _mixed(*vals: _Val) -> _Val:
    """A value that may be any of these, or an item of one."""
    return _join(*(_element(v) for v in vals)) if vals else _FRESH


@dataclass
class _Summary:
    """What calling a function of the archive does to its arguments."""

    mutates: dict[Any, _Cond] = field(default_factory=dict)  # ("p"|"r", k) → when it is changed
    stores: dict[int, _Descs] = field(default_factory=dict)  # parameter → what is put into it
    returns: _Val = _FRESH  # what its result may be
    warns: set[int] = field(default_factory=set)  # str parameters that end up in a warning


@dataclass
class _Analysis:
    fn: _Function
    params: list[str]
    annotations: dict[str, ast.AST | None]
    defaults: dict[int, ast.AST]
    module_method: bool  # a method of an nn.Module class: its ``self`` is the model's state
    bindings: dict[str, list[tuple[ast.AST | None, bool]]] = field(default_factory=dict)
    training_bindings: list[tuple[str, ast.AST | None, tuple[ast.AST, ...]]] = field(
        default_factory=list)
    stores: list[tuple[ast.AST, ast.AST]] = field(default_factory=list)  # (container, value)
    calls: list[ast.Call] = field(default_factory=list)
    alias: dict[str, str] = field(default_factory=dict)  # union-find over names
    env: dict[str, _Val] = field(default_factory=dict)
    training: set[str] = field(default_factory=set)  # locals that are true only in training mode
    classes: dict[str, str | None] = field(default_factory=dict)  # memo: local → archive class
    memo: dict[int, _Val] = field(default_factory=dict)  # sources of a node under the current env
    roots: dict[int, set[str]] = field(default_factory=dict)  # memo: roots of a node
    summary: _Summary = field(default_factory=_Summary)


_IN_PLACE_DUNDER = frozenset("__iand__ __ior__ __ixor__ __ilshift__ __irshift__ __iadd__ __isub__ "
                             "__imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__".split())
_MAYBE_ALIAS = _VIEW_OPS | frozenset("""
to type_as float double half bfloat16 long int bool contiguous dropout feature_dropout alpha_dropout
feature_alpha_dropout einsum pad constant_pad_nd pixel_shuffle pixel_unshuffle channel_shuffle
list dict keys values items get copy pop setdefault
""".split())
"""Allowed operators whose result may be (a view of) an argument: everything else makes a new value."""

_STATS_OPS = {"batch_norm": "training", "instance_norm": "use_input_stats"}
"""Operators that update their running statistics (arguments 3 and 4) when argument 5 is true."""

_NON_ALIASING_BUILTINS = frozenset("""
len int float bool str complex isinstance hasattr ord chr hex oct bin range uninitialized any all
round divmod Exception RuntimeError ValueError TypeError IndexError KeyError AssertionError
NotImplementedError ZeroDivisionError
""".split())

TENSOR_PROPERTIES = frozenset("""
shape dtype device ndim is_cuda is_cpu is_meta is_sparse is_quantized is_mkldnn is_nested layout
itemsize nbytes T mT H mH real imag name value
""".split())
"""Attributes a value may be read by besides the fields of the archive's classes (tensor
properties; ``name``/``value`` of an enum member)."""

_VIEW_PROPERTIES = frozenset("T mT H mH real imag".split())
_IMMUTABLE_TYPES = frozenset("int float bool str complex NoneType None number Device Layout "
                             "ScalarType MemoryFormat".split())
_NUMERIC_OPS = frozenset("dim size len numel sub add mul div floordiv Int Float ScalarImplicit item "
                         "sym_size sym_numel __range_length __derive_index".split())
_PRINTABLE = re.compile(r"[ -~]*")

RESERVED_NAMES: frozenset[str] = frozenset({
    "torch", "ops", "CONSTANTS", "__torch__", "self", "inf", "nan", "infj", "nanj",
    # denied operators that TorchScript source calls by a bare name rather than as torch.X
    "print", "_print", "warn", "fork", "wait", "awaitable", "awaitable_nowait", "awaitable_wait",
    "rpc_async", "rpc_remote", "rpc_sync"})
"""Names TorchScript code may not bind (``self`` only as a method's first parameter): reading them
must always mean TorchScript's own. Builtins such as ``max`` or ``data`` may be bound (models use
them as ordinary variable names): a call of a local is refused unless it holds one of the
archive's own functions, so shadowing one cannot call anything."""


@lru_cache(maxsize=1)
def _registered_operator_names() -> frozenset[str]:
    """Base names of every operator this torch registers, in any namespace (empty if unknown)."""
    try:
        import torch

        return frozenset(s.name.split("::", 1)[-1] for s in torch._C._jit_get_all_schemas())
    except Exception:  # a torch without the private API: inspect_torchscript fails closed
        return frozenset()


def _warning_template(node: ast.AST) -> str | None:
    """The text TorchScript prints for a warning message written in torch's Python source."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
                       for v in node.values)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"):
        return _warning_template(node.func.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _warning_template(node.left), _warning_template(node.right)
        return left + right if left is not None and right is not None else None
    return None


@lru_cache(maxsize=1)
def _torch_warning_templates() -> frozenset[str]:
    """The warning messages torch's own scripted layers can emit (``torch.warn`` is allowed with
    these only: ``F.softmax`` and attention compile one into every archive that uses them)."""
    try:
        import torch
    except ImportError:
        return frozenset()
    base = Path(torch.__file__).parent
    files = [base / "nn" / "functional.py", base / "functional.py",
             *sorted((base / "nn" / "modules").glob("*.py"))]
    found: set[str] = set()
    for f in files:
        try:
            tree = ast.parse(f.read_text("utf-8"))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            assigned: dict[str, list[ast.AST]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            assigned.setdefault(t.id, []).append(node.value)
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and node.args
                        and (_dotted(node.func) or "").rsplit(".", 1)[-1] == "warn"):
                    message = node.args[0]
                    values = (assigned.get(message.id, []) if isinstance(message, ast.Name)
                              else [message])
                    found.update(t for t in map(_warning_template, values) if t)
    return frozenset(found)


def _target_names(target: ast.AST) -> list[ast.Name]:
    if isinstance(target, ast.Name):
        return [target]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _target_names(t)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def _merge(old: _Cond | None, new: _Cond) -> _Cond:
    return new if old is None or old == new else _ALWAYS


class _CodeChecker:
    """Refuses TorchScript source that calls anything outside the allow-list, or that could keep
    state between calls."""

    def __init__(self, shown: object, sources: dict[str, str]) -> None:
        self.shown = shown
        self.sources = sources  # entry name (code/…) → source
        self.trees: dict[str, tuple[str, ast.Module]] = {}
        self.classes: dict[str, _Class] = {}
        self.functions: dict[str, _Function] = {}
        self.field_names: set[str] = set()
        self.method_names: set[str] = set()
        self.methods_by_name: dict[str, list[_Function]] = {}
        self.operators: set[str] = set()
        self.methods = 0
        self._summaries: dict[str, _Summary | None] = {}  # None: being analysed

    @property
    def member_names(self) -> set[str]:
        return self.field_names | self.method_names

    # -- refusal messages
    def refuse(self, fn: _Function | str, node: ast.AST | None, operator: str, why: str,
               verb: str = "calls") -> None:
        where = fn.file if isinstance(fn, _Function) else fn
        line = f":{node.lineno}" if node is not None and hasattr(node, "lineno") else ""
        method = fn.qualname if isinstance(fn, _Function) else "(class body)"
        raise refused(self.shown, f"{method} {verb} {operator}, which {why} "
                                  f"({_shown(where)}{line}); {TRUST_HINT}")

    def refuse_code(self, fn: _Function, node: ast.AST | None, what: str) -> None:
        line = f":{node.lineno}" if node is not None and hasattr(node, "lineno") else ""
        raise refused(self.shown, f"{fn.qualname} {what} ({_shown(fn.file)}{line}); {TRUST_HINT}")

    # -- pass 1: parse, collect definitions
    def parse(self) -> None:
        for entry, source in sorted(self.sources.items()):
            rel = entry.split("/code/", 1)[1]
            if not rel.startswith("__torch__") or not rel.endswith(".py"):
                raise refused(self.shown, f"code file {_shown(entry)!r} is outside __torch__")
            module = rel[: -len(".py")].replace("/", ".")
            if not all(p.isidentifier() for p in module.split(".")):
                raise refused(self.shown, f"code file {_shown(entry)!r} has an invalid name")
            _lexical_screen(source, entry, self.shown)
            try:
                tree = ast.parse(source, filename=entry)
            except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
                raise refused(self.shown, f"{_shown(entry)} is not TorchScript source that can be "
                                          f"checked ({_shown(type(e).__name__)})") from None
            short = entry.split("/", 1)[1] if "/" in entry else entry
            self.trees[entry] = (module, tree)
            for stmt in tree.body:
                if isinstance(stmt, ast.ClassDef):
                    self._collect_class(module, stmt, short)
                elif isinstance(stmt, ast.FunctionDef):
                    qual = f"{module}.{stmt.name}"
                    self.functions[qual] = _Function(qual, stmt, short, None)
                elif (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                      and isinstance(stmt.targets[0], ast.Name)
                      and isinstance(stmt.value, ast.Constant)):
                    continue  # op_version_set = N in older archives
                else:
                    raise refused(self.shown, f"{_shown(short)}:{getattr(stmt, 'lineno', 0)}: "
                                              f"top-level {type(stmt).__name__} statement "
                                              "(only classes and functions are allowed)")

    def _collect_class(self, module: str, node: ast.ClassDef, file: str) -> None:
        qual = f"{module}.{node.name}"
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        if (len(bases) != len(node.bases) or any(b not in _CLASS_BASES for b in bases)
                or node.keywords or node.decorator_list):
            raise refused(self.shown, f"class {qual} has an unexpected base or decorator "
                                      f"({_shown(file)}:{node.lineno})")
        kind = ("module" if "Module" in bases else "namedtuple" if "NamedTuple" in bases
                else "enum" if "Enum" in bases
                else "interface" if {"Interface", "ModuleInterface"} & set(bases) else "class")
        cls = _Class(qual, kind, node, file)
        self.classes[qual] = cls
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef):
                if kind == "module" and stmt.name == "__init__":
                    raise refused(self.shown, f"module {qual} defines __init__, which TorchScript "
                                              f"never writes; it could reset the model's state "
                                              f"between calls ({_shown(file)}:{stmt.lineno})")
                cls.methods.add(stmt.name)
                fn = _Function(f"{qual}.{stmt.name}", stmt, file, cls)
                self.functions[fn.qualname] = fn
                self.methods_by_name.setdefault(stmt.name, []).append(fn)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                cls.fields[stmt.target.id] = stmt.annotation
            elif isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    if isinstance(t, ast.Name):
                        cls.fields.setdefault(t.id, None)
                    elif (isinstance(t, ast.Subscript) and _dotted(t.value) == "__annotations__"
                          and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)):
                        cls.fields[t.slice.value] = stmt.value
        self.field_names.update(cls.fields)
        self.method_names.update(cls.methods)

    # -- pass 2: check
    def check(self) -> None:
        if not _registered_operator_names():
            import torch

            raise TrojanscanError(
                f"{self.shown}: cannot be checked: trojanscan's TorchScript checker does not "
                f"support torch {_shown(torch.__version__, 40)} (it cannot list the operators "
                f"this torch registers); {TRUST_HINT}")
        for fn in self.functions.values():
            self._summary(fn)
        for cls in self.classes.values():
            self._check_class_body(cls)

    def _summary(self, fn: _Function) -> _Summary:
        """Check ``fn`` (once) and return what calling it does to its arguments."""
        if fn.qualname in self._summaries:
            done = self._summaries[fn.qualname]
            if done is not None:
                return done
            n = len(self._param_names(fn.node))  # a cycle (TorchScript has no recursion): worst case
            every = frozenset({_GLOBAL} | {(t, k) for t in "pr" for k in range(n)})
            return _Summary(dict.fromkeys((d for d in every if d != _GLOBAL), _ALWAYS),
                            dict.fromkeys(range(n), every), (every, every))
        self._summaries[fn.qualname] = None
        self.methods += 1
        try:
            summary = self._analyze(fn)
        except RecursionError:
            self.refuse_code(fn, fn.node, "nests its code too deeply to be checked")
        self._summaries[fn.qualname] = summary
        return summary

    def _check_class_body(self, cls: _Class) -> None:
        where = f"{cls.file}"
        for stmt in cls.node.body:
            if isinstance(stmt, ast.FunctionDef):
                continue
            if isinstance(stmt, ast.AnnAssign):
                self._check_type(stmt.annotation, where, owner=f"class {cls.qualname}")
                if stmt.value is not None:
                    self._check_literal(stmt.value, where)
            elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
                if isinstance(target, ast.Name):
                    self._check_literal(stmt.value, where)
                elif (isinstance(target, ast.Subscript) and _dotted(target.value) == "__annotations__"
                      and isinstance(target.slice, ast.Constant)):
                    self._check_type(stmt.value, where, owner=f"class {cls.qualname}")
                else:
                    raise refused(self.shown, f"class {cls.qualname} assigns something other than "
                                              f"a field ({_shown(where)}:{stmt.lineno})")
            elif isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr)
                                                and isinstance(stmt.value, ast.Constant)):
                continue
            else:
                raise refused(self.shown, f"class {cls.qualname} has a {type(stmt).__name__} "
                                          f"statement in its body ({_shown(where)}:{stmt.lineno})")

    def _check_literal(self, node: ast.AST, where: str) -> None:
        for sub in ast.walk(node):
            if not isinstance(sub, (ast.Constant, ast.List, ast.Tuple, ast.UnaryOp, ast.USub,
                                    ast.UAdd, ast.Load, ast.Dict)):
                raise refused(self.shown, f"a class field's value is not a literal "
                                          f"({_shown(where)}:{getattr(node, 'lineno', 0)})")

    def _check_type(self, node: ast.AST, where: str, owner: str | None = None) -> None:
        """A type expression: builtin type names and the archive's own classes only."""
        stack = [node]
        while stack:
            sub = stack.pop()
            if isinstance(sub, ast.Constant) and sub.value is None:
                continue
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):  # a forward reference
                try:
                    stack.append(ast.parse(sub.value, mode="eval").body)
                except (SyntaxError, ValueError, RecursionError, MemoryError):
                    raise refused(self.shown, f"unreadable type {_shown(sub.value, 40)!r} "
                                              f"({_shown(where)}:{getattr(sub, 'lineno', 0)})") from None
                continue
            if isinstance(sub, (ast.Tuple, ast.List)):
                stack.extend(sub.elts)
                continue
            if isinstance(sub, ast.Subscript):
                stack.extend([sub.value, sub.slice])
                continue
            path = _dotted(sub)
            if path is None:
                raise refused(self.shown, f"unexpected type expression ({_shown(where)}:"
                                          f"{getattr(sub, 'lineno', 0)})")
            if path.startswith("__torch__."):
                self._check_defined(path, None, where, sub, owner)
            elif path not in TYPE_NAMES:
                raise refused(self.shown, f"{owner or 'a type'} uses the unknown type "
                                          f"{_shown(path)} ({_shown(where)}:"
                                          f"{getattr(sub, 'lineno', 0)}); {TRUST_HINT}")

    def _check_defined(self, path: str, fn: _Function | None, where: str, node: ast.AST,
                       owner: str | None = None) -> None:
        who: _Function | str = fn if fn is not None else where
        if path.startswith("__torch__.torch.classes."):
            why = "a custom C++ class (native code outside the allow-list)"
        elif path in self.classes or path in self.functions:
            return
        else:
            head, _, last = path.rpartition(".")
            if head in self.classes and last in {"__new__", "__init__"} | self.member_names:
                return
            why = "not defined in the archive"
        if fn is None:
            line = getattr(node, "lineno", 0)
            raise refused(self.shown, f"{owner or 'a type'} uses {_shown(path)}, {why} "
                                      f"({_shown(where)}:{line}); {TRUST_HINT}")
        self.refuse(who, node, _shown(path), f"is {why}")

    # -- one function
    @staticmethod
    def _param_names(node: ast.FunctionDef) -> list[str]:
        return [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]

    def _analyze(self, fn: _Function) -> _Summary:
        node = fn.node
        if node.decorator_list:
            self.refuse_code(fn, node, "has a decorator (not TorchScript)")
        if node.args.vararg or node.args.kwarg:
            self.refuse_code(fn, node, "takes *args or **kwargs (not TorchScript)")
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        params = [a.arg for a in args]
        for i, arg in enumerate(args):
            if arg.arg in RESERVED_NAMES and not (arg.arg == "self" and i == 0):
                self._refuse_binding(fn, arg, arg.arg)
            if arg.annotation is not None:
                self._check_type(arg.annotation, fn.file, owner=fn.qualname)
        if len(set(params)) != len(params):
            self.refuse_code(fn, node, "names a parameter twice")
        if node.returns is not None:
            self._check_type(node.returns, fn.file, owner=fn.qualname)
        defaults = self._defaults(fn)
        is_method = fn.cls is not None and bool(params) and params[0] == "self"
        a = _Analysis(fn, params, {x.arg: x.annotation for x in args}, defaults,
                      module_method=is_method and fn.cls is not None and fn.cls.kind == "module")
        for stmt in node.body:
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.Call):
                    a.calls.append(sub)
                elif isinstance(sub, ast.comprehension):
                    for name in _target_names(sub.target):
                        if name.id in RESERVED_NAMES:
                            self._refuse_binding(fn, name, name.id)
                        a.bindings.setdefault(name.id, []).append((sub.iter, False))
                elif isinstance(sub, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef,
                                      ast.ClassDef)):
                    self.refuse_code(fn, sub, f"defines a nested {type(sub).__name__} (not what "
                                              "TorchScript writes)")
        self._collect(node.body, a, tests=())
        self._alias_classes(a)
        self._training_names(a)
        self._environment(a)
        for default in defaults.values():
            self._expr(default, a, set(), False)
        self._block(node.body, a, set(params), training=False, depth=0)
        if fn.cls is not None and node.name in ("__setstate__", "__getstate__"):
            self._check_state_method(fn)
        return a.summary

    def _refuse_binding(self, fn: _Function, node: ast.AST, name: str) -> None:
        self.refuse_code(fn, node, f"binds the reserved name {_shown(name, 40)!r} (TorchScript "
                                   "would then read it as a local, hiding its own)")

    def _collect(self, body: list[ast.stmt], a: _Analysis, tests: tuple[ast.AST, ...]) -> None:
        """Bindings, stores into containers and calls of a function body (flow-insensitive)."""
        fn = a.fn

        def bind(target: ast.AST, value: ast.AST | None, whole: bool) -> None:
            if isinstance(target, ast.Name):
                if target.id in RESERVED_NAMES:
                    self._refuse_binding(fn, target, target.id)
                a.bindings.setdefault(target.id, []).append((value, whole))
                a.training_bindings.append((target.id, value if whole else None, tests))
            elif isinstance(target, (ast.Tuple, ast.List)):
                values = (value.elts if whole and isinstance(value, (ast.Tuple, ast.List))
                          and len(value.elts) == len(target.elts) else None)
                for k, t in enumerate(target.elts):
                    bind(t, values[k] if values else value, bool(values))
            elif isinstance(target, ast.Starred):
                bind(target.value, value, False)
            elif isinstance(target, (ast.Attribute, ast.Subscript)) and value is not None:
                a.stores.append((target.value, value))

        for stmt in body:
            if isinstance(stmt, ast.Assign):
                for t in stmt.targets:
                    bind(t, stmt.value, True)
            elif isinstance(stmt, ast.AnnAssign):
                bind(stmt.target, stmt.value, stmt.value is not None)
            elif isinstance(stmt, ast.AugAssign):
                bind(stmt.target, stmt.value, False)
            elif isinstance(stmt, ast.For):
                bind(stmt.target, stmt.iter, False)
                self._collect(stmt.body, a, tests)
                self._collect(stmt.orelse, a, tests)
            elif isinstance(stmt, ast.While):
                self._collect(stmt.body, a, tests)
                self._collect(stmt.orelse, a, tests)
            elif isinstance(stmt, ast.If):
                self._collect(stmt.body, a, (*tests, stmt.test))
                self._collect(stmt.orelse, a, tests)
            elif isinstance(stmt, ast.With):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        bind(item.optional_vars, item.context_expr, False)
                self._collect(stmt.body, a, tests)
            elif isinstance(stmt, ast.Delete):
                for t in stmt.targets:
                    for name in _target_names(t):
                        if name.id in RESERVED_NAMES:
                            self._refuse_binding(fn, name, name.id)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.refuse_code(fn, stmt, f"defines a nested {type(stmt).__name__} (not what "
                                           "TorchScript writes)")
            elif isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
                self.refuse_code(fn, stmt, f"uses the statement {type(stmt).__name__} (not on the "
                                           "allow-list)")

    # union-find: names that may hold the same object (a store through one is seen by all)
    def _find(self, a: _Analysis, name: str) -> str:
        root = name
        while a.alias.get(root, root) != root:
            root = a.alias[root]
        a.alias[name] = root
        return root

    def _alias_classes(self, a: _Analysis) -> None:
        for name, binds in a.bindings.items():
            for value, _whole in binds:
                for r in self._roots(value, a):
                    x, y = self._find(a, name), self._find(a, r)
                    if x != y:
                        a.alias[x] = y

    def _roots(self, node: ast.AST | None, a: _Analysis) -> set[str]:
        """Local names whose object ``node`` may be (or be part of)."""
        key = id(node)
        if key not in a.roots:
            a.roots[key] = self._roots_of(node, a)
        return a.roots[key]

    def _roots_of(self, node: ast.AST | None, a: _Analysis) -> set[str]:
        if node is None:
            return set()
        if isinstance(node, ast.Name):
            return {node.id} if node.id in a.bindings or node.id in a.params else set()
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            return self._roots(node.value, a)
        if isinstance(node, (ast.Tuple, ast.List)):
            return set().union(*(self._roots(e, a) for e in node.elts)) if node.elts else set()
        if isinstance(node, ast.IfExp):
            return self._roots(node.body, a) | self._roots(node.orelse, a)
        if isinstance(node, ast.Call):
            path = _dotted(node.func) or ""
            args = [*node.args, *(k.value for k in node.keywords)]
            callees, with_receiver, maybe_op = self._callees(node, a)
            out: set[str] = set()
            for callee in callees:  # the parameters its result may alias
                bound = self._bind_args(callee, node, with_receiver)
                returned = self._summary(callee).returns
                for d in returned[0] | returned[1]:
                    if isinstance(d, tuple) and d[1] in bound:
                        out |= self._roots(bound[d[1]], a)
            op = path.rsplit(".", 1)[-1] if path.split(".", 1)[0] in ("torch", "ops") else (
                node.func.attr if isinstance(node.func, ast.Attribute) and maybe_op else None)
            if op is not None and op in ALLOWED_ATEN and op not in _MAYBE_ALIAS and not (
                    op.endswith("_") or op in _LIST_MUTATORS or op in _IN_PLACE_DUNDER):
                return out  # a new value
            if path in _NON_ALIASING_BUILTINS or path.endswith(".__new__"):
                return out
            if callees and op is None:
                return out
            if isinstance(node.func, ast.Attribute) and path.split(".", 1)[0] not in (
                    "torch", "ops", "__torch__", "CONSTANTS"):
                out |= self._roots(node.func.value, a)
            for arg in args:
                out |= self._roots(arg, a)
            return out
        return set()

    def _members(self, a: _Analysis, name: str) -> list[str]:
        root = self._find(a, name)
        return [n for n in list(a.bindings) + a.params if self._find(a, n) == root]

    def _training_names(self, a: _Analysis) -> None:
        """Locals that can only be true in training mode (``training = self.training``, and
        ``bn_training`` as BatchNorm computes it)."""
        if not a.module_method:
            return

        def is_test(t: ast.AST) -> bool:
            return _dotted(t) == "self.training" or (isinstance(t, ast.Name) and t.id in a.training)

        def ok(value: ast.AST | None, tests: tuple[ast.AST, ...]) -> bool:
            if value is None:
                return False
            if _dotted(value) == "self.training" or (isinstance(value, ast.Name)
                                                     and value.id in a.training):
                return True
            if isinstance(value, ast.Constant) and value.value in (False, None):
                return True
            return (isinstance(value, ast.Constant) and value.value is True
                    and any(is_test(t) for t in tests))

        changed = True
        while changed:
            changed = False
            verdict: dict[str, bool] = {}
            for name, value, tests in a.training_bindings:
                verdict[name] = verdict.get(name, True) and ok(value, tests)
            for name, good in verdict.items():
                if good and name not in a.training:
                    a.training.add(name)
                    changed = True

    def _environment(self, a: _Analysis) -> None:
        """What every local may be and reach (a fixpoint), then the function's summary: what it
        returns and what it puts into its arguments."""
        a.env = {p: (frozenset({("p", i)}), frozenset({("r", i)})) for i, p in enumerate(a.params)}
        for name in a.bindings:
            a.env.setdefault(name, _FRESH)
        changed = True

        def grow(name: str, val: _Val) -> None:
            nonlocal changed
            old = a.env[name]
            if not (val[0] <= old[0] and val[1] <= old[1]):
                a.env[name] = _join(old, val)
                changed = True

        for _ in range(1000):
            changed = False
            a.memo.clear()
            for name, binds in a.bindings.items():
                for value, whole in binds:
                    val = self._sources(value, a)
                    grow(name, val if whole else _element(val))
            for container, descs in self._all_stores(a):
                for r in self._roots(container, a):
                    for m in self._members(a, r):
                        grow(m, (frozenset(), descs))
            if not changed:
                break
        a.memo.clear()  # the environment is final: what is computed from now on stays valid
        returns = [self._sources(sub.value, a) for sub in ast.walk(a.fn.node)
                   if isinstance(sub, ast.Return) and sub.value is not None]
        stores: dict[int, set] = {}
        for container, descs in self._all_stores(a):
            for d in self._sources(container, a)[0]:
                if isinstance(d, tuple):
                    stores.setdefault(d[1], set()).update(descs)
        a.summary.returns = _join(*returns) if returns else _FRESH
        a.summary.stores = {k: frozenset(v) for k, v in stores.items()}

    def _all_stores(self, a: _Analysis) -> Iterator[tuple[ast.AST, _Descs]]:
        """(container, what is put into it) for every store of the function."""
        for container, value in a.stores:
            val = self._sources(value, a)
            yield container, val[0] | val[1]
        for call in a.calls:
            yield from self._effects(call, a)[1]

    # -- sources: what a value may be, and what it may reach
    def _sources(self, node: ast.AST | None, a: _Analysis,
                 env: dict[str, _Val] | None = None) -> _Val:
        if env is None or env is a.env:
            key = id(node)
            if key not in a.memo:
                a.memo[key] = self._sources_of(node, a, a.env)
            return a.memo[key]
        return self._sources_of(node, a, env)

    def _sources_of(self, node: ast.AST | None, a: _Analysis, env: dict[str, _Val]) -> _Val:
        if node is None or isinstance(node, (ast.Constant, ast.Compare)):
            return _FRESH
        if node is self._MARK:
            return frozenset({_GLOBAL}), frozenset({_GLOBAL})
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id == "CONSTANTS":
                return frozenset({_GLOBAL}), frozenset({_GLOBAL})
            return _FRESH
        if isinstance(node, ast.Attribute):
            root = (_dotted(node) or "").split(".", 1)[0]
            if root == "CONSTANTS" and root not in env:
                return frozenset({_GLOBAL}), frozenset({_GLOBAL})
            if root in ("torch", "ops", "__torch__") and root not in env:
                return _FRESH
            if self._immutable(self._field_type(self._class_of(node.value, a), node.attr)):
                return _FRESH  # an int, a string, None: nothing to change in place
            owner = self._sources(node.value, a, env)
            if node.attr in self.field_names:
                return _join(_field(owner), _element(owner)) if node.attr in TENSOR_PROPERTIES \
                    else _field(owner)
            if node.attr in _VIEW_PROPERTIES:
                return owner
            return _FRESH if node.attr in TENSOR_PROPERTIES else _field(owner)
        if isinstance(node, ast.Subscript):
            return _element(self._sources(node.value, a, env))
        if isinstance(node, ast.Starred):
            return self._sources(node.value, a, env)
        if isinstance(node, (ast.List, ast.Tuple)):
            return _holding(*(self._sources(e, a, env) for e in node.elts))
        if isinstance(node, ast.Dict):
            return _holding(*(self._sources(e, a, env) for e in [*node.keys, *node.values]
                              if e is not None))
        if isinstance(node, (ast.ListComp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                item = _element(self._sources(gen.iter, a, inner))
                for name in _target_names(gen.target):
                    inner[name.id] = item
            parts = [node.elt] if isinstance(node, ast.ListComp) else [node.key, node.value]
            return _holding(*(self._sources(x, a, inner) for x in parts))
        if isinstance(node, ast.IfExp):
            return _join(self._sources(node.body, a, env), self._sources(node.orelse, a, env))
        if isinstance(node, ast.Call):
            return self._effects(node, a, env)[2]
        return _mixed(*(self._sources(c, a, env) for c in ast.iter_child_nodes(node)
                        if isinstance(c, ast.expr)))

    def _class_of(self, node: ast.AST | None, a: _Analysis, seen: frozenset[str] = frozenset()
                  ) -> str | None:
        """The archive class of the object ``node`` evaluates to, when the code says."""
        if isinstance(node, ast.Name):
            name = node.id
            if name in a.params:
                if name == "self" and a.params[0] == "self" and a.fn.cls is not None:
                    return a.fn.cls.qualname
                return self._class_in_type(a.annotations.get(name))
            if name in a.classes:
                return a.classes[name]
            if name not in a.bindings or name in seen:
                return None
            found: set[str | None] = set()
            for value, whole in a.bindings[name]:
                found.add(self._class_of(value, a, seen | {name}) if whole else None)
            result = found.pop() if len(found) == 1 else None
            if not seen:
                a.classes[name] = result
            return result
        if isinstance(node, ast.Attribute) and (_dotted(node) or "").split(".")[0] not in (
                "torch", "ops", "__torch__", "CONSTANTS"):
            owner = self._class_of(node.value, a, seen)
            return self._field_class(owner, node.attr)
        if isinstance(node, ast.Call):
            path = _dotted(node.func) or ""
            if path == "getattr" and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
                return self._field_class(self._class_of(node.args[0], a, seen), node.args[1].value)
            if path in ("unchecked_cast", "annotate") and node.args:
                return self._class_in_type(node.args[0])
            if path.startswith("__torch__.") and path.endswith(".__new__"):
                head = path[: -len(".__new__")]
                return head if head in self.classes else None
        return None

    def _field_type(self, owner: str | None, attr: object) -> ast.AST | None:
        if owner is None or owner not in self.classes or not isinstance(attr, str):
            return None
        return self.classes[owner].fields.get(attr)

    @staticmethod
    def _immutable(ann: ast.AST | None) -> bool:
        """A field type whose values cannot be changed in place (ints, strings, None...)."""
        if ann is None:
            return False
        if isinstance(ann, ast.Constant):
            return ann.value is None
        if isinstance(ann, ast.Subscript) and _dotted(ann.value) in ("Final", "Tuple"):
            parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            return all(_CodeChecker._immutable(p) for p in parts)
        return _dotted(ann) in _IMMUTABLE_TYPES

    def _field_class(self, owner: str | None, attr: object) -> str | None:
        if owner is None or owner not in self.classes or not isinstance(attr, str):
            return None
        return self._class_in_type(self.classes[owner].fields.get(attr))

    def _class_in_type(self, ann: ast.AST | None) -> str | None:
        if isinstance(ann, ast.Subscript) and _dotted(ann.value) == "Optional":
            return self._class_in_type(ann.slice)
        path = _dotted(ann) if ann is not None else None
        return path if path in self.classes else None

    def _funcrefs(self, name: str, a: _Analysis) -> list[_Function] | None:
        """The archive functions a local holds, if it only ever holds references to them."""
        binds = a.bindings.get(name)
        if not binds or name in a.params:
            return None
        found: list[_Function] = []
        for value, whole in binds:
            path = _dotted(value) if whole and value is not None else None
            if path is None or not path.startswith("__torch__.") or path not in self.functions:
                return None
            found.append(self.functions[path])
        return found

    def _callees(self, call: ast.Call, a: _Analysis) -> tuple[list[_Function], bool, bool]:
        """(archive functions the call may run, whether the receiver is their first argument,
        whether the call may also be a tensor operator on the receiver)."""
        func = call.func
        path = _dotted(func)
        if isinstance(func, ast.Name):
            if func.id in a.bindings or func.id in a.params:
                return self._funcrefs(func.id, a) or [], False, False
            return [], False, False
        if path is not None and path.split(".", 1)[0] in ("torch", "ops", "CONSTANTS"):
            return [], False, False
        if path is not None and path.startswith("__torch__."):
            fn = self.functions.get(path)
            return ([fn] if fn else []), False, False
        if isinstance(func, ast.Attribute):
            name = func.attr
            cls = self._class_of(func.value, a)
            if cls is not None and self.classes[cls].kind != "interface":
                fn = self.functions.get(f"{cls}.{name}")
                if fn is not None:
                    return [fn], True, False
            return list(self.methods_by_name.get(name, [])), True, cls is None
        return [], False, False

    def _bind_args(self, callee: _Function, call: ast.Call, with_receiver: bool) -> dict[int, ast.AST]:
        params = self._param_names(callee.node)
        bound: dict[int, ast.AST] = {}
        offset = 0
        if with_receiver and isinstance(call.func, ast.Attribute):
            bound[0] = call.func.value
            offset = 1
        for i, arg in enumerate(call.args):
            bound[i + offset] = arg
        for kw in call.keywords:
            if kw.arg in params:
                bound[params.index(kw.arg)] = kw.value
        return bound

    @staticmethod
    def _defaults(callee: _Function) -> dict[int, ast.AST]:
        node = callee.node
        positional = node.args.posonlyargs + node.args.args
        out: dict[int, ast.AST] = {}
        for i, d in enumerate(node.args.defaults):
            out[len(positional) - len(node.args.defaults) + i] = d
        for i, d in enumerate(node.args.kw_defaults):
            if d is not None:
                out[len(positional) + i] = d
        return out

    def _flag_cond(self, flag: ast.AST | None, a: _Analysis) -> _Cond | None:
        """When an argument that switches an update on is true: None (never), _TRAINING,
        ("param", j) (when the caller's parameter j is) or _ALWAYS."""
        if flag is None:
            return _ALWAYS
        if isinstance(flag, ast.Constant):
            return _ALWAYS if flag.value else None
        if isinstance(flag, ast.Name):
            if flag.id in a.training:
                return _TRAINING
            if flag.id in a.params and flag.id not in a.bindings:
                return ("param", a.params.index(flag.id))
        if _dotted(flag) == "self.training" and a.module_method:
            return _TRAINING
        return _ALWAYS

    _MARK = ast.Constant(value="<a default argument>")  # a mutable default: shared between calls

    def _effects(self, call: ast.Call, a: _Analysis, env: dict[str, _Val] | None = None
                 ) -> tuple[list[tuple[_Descs, _Cond, str]], list[tuple[ast.AST, _Descs]], _Val]:
        """(changes: (objects, when, what), stores: (container, what is put into it), what the
        result may be)."""
        func = call.func
        path = _dotted(func) or ""
        args = list(call.args)
        kwargs = {k.arg: k.value for k in call.keywords if k.arg}
        changes: list[tuple[_Descs, _Cond, str]] = []
        stores: list[tuple[ast.AST, _Descs]] = []
        results: list[_Val] = []

        def src(node: ast.AST | None) -> _Val:
            return self._sources(node, a, env)

        def mixed(nodes: list[ast.AST]) -> _Val:
            return _mixed(*(src(n) for n in nodes))

        if "out" in kwargs:
            changes.append((src(kwargs["out"])[0], _ALWAYS, "out="))
        callees, with_receiver, maybe_op = self._callees(call, a)
        op: str | None = None
        receiver: ast.AST | None = None
        root = path.split(".", 1)[0]
        if root in ("torch", "ops"):
            parts = path.split(".")
            if parts[0] == "torch" and len(parts) > 1 and parts[1] == "ops":
                parts = parts[1:]
            if parts[0] == "torch" and len(parts) == 2:
                op = parts[1]
            elif len(parts) == 3 and parts[1] == "aten":
                op = parts[2]
            elif len(parts) == 3 and parts[1] == "prim":
                if parts[2] not in ("dtype", "device", "layout", "is_nested", "itemsize", "nbytes",
                                    "NumToTensor", "EnumName", "EnumValue", "RaiseException"):
                    results.append(mixed(args + list(kwargs.values())))
        elif isinstance(func, ast.Attribute) and maybe_op and func.attr in ALLOWED_ATEN:
            op, receiver = func.attr, func.value
        elif isinstance(func, ast.Name) and func.id not in a.bindings and func.id not in a.params:
            name = func.id
            if name == "getattr" and args:
                owner = src(args[0])
                attr = args[1].value if len(args) > 1 and isinstance(args[1], ast.Constant) else None
                immutable = self._immutable(self._field_type(self._class_of(args[0], a), attr))
                results.append(_FRESH if immutable else owner if attr in _VIEW_PROPERTIES else _FRESH
                               if attr in TENSOR_PROPERTIES and attr not in self.field_names
                               else _field(owner))
            elif name in ("annotate", "unchecked_cast"):
                results.append(src(args[1]) if len(args) > 1 else _FRESH)
            elif name not in _NON_ALIASING_BUILTINS and name not in TYPE_NAMES:
                results.append(mixed(args))
        elif path.startswith("__torch__.") and path not in self.functions:
            if not path.endswith(".__new__"):  # a NamedTuple holds its arguments
                results.append(_holding(*(src(x) for x in args + list(kwargs.values()))))
        if op is not None:
            target = receiver if receiver is not None else (args[0] if args else None)
            rest = args if receiver is not None else args[1:]
            in_place = (op in _LIST_MUTATORS or op in _IN_PLACE_DUNDER
                        or (op.endswith("_") and not op.endswith("__")))
            if in_place and target is not None:
                changes.append((src(target)[0], _ALWAYS, f"aten::{op}"))
                if op in _LIST_MUTATORS:
                    put = [src(x) for x in rest + list(kwargs.values())]
                    stores.append((target, frozenset().union(*(v[0] | v[1] for v in put))))
            if op in _STATS_OPS and receiver is None:
                flag = args[5] if len(args) > 5 else kwargs.get(_STATS_OPS[op])
                when = self._flag_cond(flag, a)
                if when is not None:
                    for k, kw in ((3, "running_mean"), (4, "running_var")):
                        stat = args[k] if len(args) > k else kwargs.get(kw)
                        if stat is not None:
                            changes.append((src(stat)[0], when,
                                            f"aten::{op} (its running statistics)"))
            if op in ALLOWED_ATEN and op not in _MAYBE_ALIAS and not in_place:
                pass  # a new value
            elif in_place and target is not None:
                results.append(src(target))
            else:
                results.append(mixed(([receiver] if receiver is not None else []) + args
                                     + list(kwargs.values())))
        for callee in callees:
            summary = self._summary(callee)
            bound = self._bind_args(callee, call, with_receiver)
            defaults = self._defaults(callee)

            def arg_of(k: int, bound: dict[int, ast.AST] = bound,
                       defaults: dict[int, ast.AST] = defaults) -> ast.AST | None:
                if k in bound:
                    return bound[k]
                d = defaults.get(k)
                return self._MARK if isinstance(d, (ast.List, ast.Dict)) else None

            def translate(descs: _Descs, arg_of: Any = arg_of) -> _Descs:
                out: set = set()
                for d in descs:
                    if d == _GLOBAL:
                        out.add(_GLOBAL)
                    elif isinstance(d, tuple):
                        val = src(arg_of(d[1]))
                        out |= val[0] if d[0] == "p" else val[1]
                return frozenset(out)

            what = f"through {callee.qualname}"
            for d, when in summary.mutates.items():
                if isinstance(when, tuple):
                    j = when[1]
                    when = self._flag_cond(bound.get(j, defaults.get(j)), a)
                    if when is None:
                        continue
                changes.append((translate(frozenset({d})), when, what))
            for k, descs in summary.stores.items():
                value = arg_of(k)
                if value is not None and value is not self._MARK:
                    stores.append((value, translate(descs)))
            results.append((translate(summary.returns[0]), translate(summary.returns[1])))
        return changes, stores, (_join(*results) if results else _FRESH)

    def _change(self, descs: _Descs, when: _Cond, a: _Analysis, node: ast.AST, what: str,
                training: bool) -> None:
        """These objects are changed in place: refuse if one may be the model's own state
        (outside training mode) or a value shared between calls; else note it in the summary."""
        if training:
            when = _TRAINING
        for d in sorted(descs, key=str):
            if d == _GLOBAL:
                self.refuse_code(a.fn, node, f"changes a value shared between calls (a constant or "
                                             f"a default argument) in place ({what}): a model may "
                                             "not keep state between calls")
            elif d[1] == 0 and a.fn.cls is not None and a.fn.node.name == "__setstate__":
                continue  # __setstate__ fills the object while it loads (checked on its own)
            elif d[1] == 0 and a.module_method:
                if when == _TRAINING:
                    continue
                self.refuse_code(a.fn, node, f"changes the model's own state ({what}): a model may "
                                             "not keep state between calls")
            else:
                a.summary.mutates[d] = _merge(a.summary.mutates.get(d), when)

    def _check_state_method(self, fn: _Function) -> None:
        """__setstate__ runs while the archive loads: it may only move values into attributes."""
        setter = fn.node.name == "__setstate__"

        def plain(value: ast.AST) -> bool:
            if isinstance(value, ast.Call) and _dotted(value.func) in ("unchecked_cast", "annotate"):
                return len(value.args) == 2 and plain(value.args[1])
            if isinstance(value, (ast.Tuple, ast.List)):
                return all(plain(e) for e in value.elts)
            if isinstance(value, ast.Subscript):
                return plain(value.value) and isinstance(value.slice, ast.Constant)
            if isinstance(value, ast.Attribute):
                return plain(value.value)
            return isinstance(value, (ast.Name, ast.Constant))

        for stmt in fn.node.body:
            ok = False
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and plain(stmt.value):
                target = stmt.targets[0]
                ok = isinstance(target, ast.Name) or (
                    setter and isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name) and target.value.id == "self")
            elif isinstance(stmt, ast.Return):
                ok = stmt.value is None or plain(stmt.value)
            elif isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr)
                                                and isinstance(stmt.value, ast.Constant)):
                ok = True
            if not ok:
                op = stmt.value if isinstance(stmt, (ast.Assign, ast.Expr, ast.Return)) else stmt
                called = (_dotted(op.func) if isinstance(op, ast.Call) else None) or \
                    next((_dotted(c.func) for c in ast.walk(stmt)
                          if isinstance(c, ast.Call) and _dotted(c.func)), None)
                what = f"calls {called}" if called else f"runs a {type(stmt).__name__} statement"
                self.refuse_code(fn, stmt, f"{what}: {fn.node.name} may only assign attributes "
                                           "(it runs while the archive loads)")

    # statements, in order: ``defined`` holds the locals assigned on every path so far
    def _is_training_test(self, test: ast.AST, a: _Analysis) -> bool:
        return a.module_method and (_dotted(test) == "self.training" or (
            isinstance(test, ast.Name) and test.id in a.training))

    def _block(self, body: list[ast.stmt], a: _Analysis, defined: set[str], training: bool,
               depth: int) -> tuple[set[str], bool]:
        if depth > MAX_CODE_NESTING:
            self.refuse_code(a.fn, body[0] if body else None, "nests its code too deeply")
        defined = set(defined)
        falls_through = True
        for stmt in body:
            falls_through = self._stmt(stmt, a, defined, training, depth) and falls_through
        return defined, falls_through

    def _stmt(self, stmt: ast.stmt, a: _Analysis, defined: set[str], training: bool,
              depth: int) -> bool:
        fn = a.fn
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            if isinstance(stmt, ast.AnnAssign):
                self._check_type(stmt.annotation, fn.file, owner=fn.qualname)
            if stmt.value is not None:
                self._expr(stmt.value, a, defined, training)
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                self._target(target, a, defined, training, stmt)
            for target in targets:
                defined.update(n.id for n in _target_names(target))
            return True
        if isinstance(stmt, ast.AugAssign):
            self._expr(stmt.value, a, defined, training)
            if isinstance(stmt.target, ast.Name):
                self._name(stmt.target, a, defined)
                self._change(self._sources(stmt.target, a)[0], _ALWAYS, a, stmt,
                             "an augmented assignment", training)
            else:
                self._target(stmt.target, a, defined, training, stmt)
                inner = stmt.target
                self._expr(inner, a, defined, training)
            return True
        if isinstance(stmt, (ast.Expr, ast.Return)):
            if stmt.value is not None:
                self._expr(stmt.value, a, defined, training)
            if isinstance(stmt, ast.Return):
                return False
            return not (isinstance(stmt.value, ast.Call)
                        and _dotted(stmt.value.func) == "ops.prim.RaiseException")
        if isinstance(stmt, ast.If):
            self._expr(stmt.test, a, defined, training)
            inside = training or self._is_training_test(stmt.test, a)
            d1, f1 = self._block(stmt.body, a, defined, inside, depth + 1)
            d2, f2 = self._block(stmt.orelse, a, defined, training, depth + 1)
            live = [d for d, f in ((d1, f1), (d2, f2)) if f]
            if live:
                defined |= set.intersection(*live)
            return f1 or f2
        if isinstance(stmt, ast.While):
            if self._always_true(stmt.test, a):
                self.refuse_code(fn, stmt, "has a loop that can never end (while True)")
            self._expr(stmt.test, a, defined, training)
            self._block(stmt.body, a, defined, training, depth + 1)
            self._block(stmt.orelse, a, defined, training, depth + 1)
            return True
        if isinstance(stmt, ast.For):
            self._expr(stmt.iter, a, defined, training)
            self._target(stmt.target, a, defined, training, stmt)
            inner = defined | {n.id for n in _target_names(stmt.target)}
            self._block(stmt.body, a, inner, training, depth + 1)
            self._block(stmt.orelse, a, defined, training, depth + 1)
            return True
        if isinstance(stmt, ast.With):
            for item in stmt.items:
                self._expr(item.context_expr, a, defined, training)
                if item.optional_vars is not None:
                    self._target(item.optional_vars, a, defined, training, stmt)
                    defined.update(n.id for n in _target_names(item.optional_vars))
            inner, falls_through = self._block(stmt.body, a, defined, training, depth + 1)
            defined |= inner
            return falls_through
        if isinstance(stmt, (ast.Raise, ast.Assert)):
            for sub in ast.iter_child_nodes(stmt):
                if isinstance(sub, ast.expr):
                    self._expr(sub, a, defined, training)
            return not isinstance(stmt, ast.Raise)
        if isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    self._name(target, a, defined)
                    defined.discard(target.id)
                else:
                    self._target(target, a, defined, training, stmt)
                    self._expr(target, a, defined, training)
            return True
        if isinstance(stmt, ast.Pass):
            return True
        if isinstance(stmt, (ast.Break, ast.Continue)):
            return False
        self.refuse_code(fn, stmt, f"uses the statement {type(stmt).__name__} "
                                   "(not on the allow-list)")
        return True

    def _target(self, target: ast.AST, a: _Analysis, defined: set[str], training: bool,
                stmt: ast.stmt) -> None:
        fn = a.fn
        if isinstance(target, ast.Name):
            if target.id in RESERVED_NAMES:
                self._refuse_binding(fn, target, target.id)
            return
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._target(t, a, defined, training, stmt)
            return
        if isinstance(target, ast.Starred):
            self._target(target.value, a, defined, training, stmt)
            return
        if isinstance(target, ast.Attribute):
            if target.attr in DENIED:
                self.refuse(fn, target, f"the attribute {target.attr}", DENIED[target.attr],
                            verb="sets")
            self._expr(target.value, a, defined, training)
            self._change(self._sources(target.value, a)[0], _ALWAYS, a, target,
                         f"assigns the attribute {target.attr}", training)
            return
        if isinstance(target, ast.Subscript):
            self._expr(target.value, a, defined, training)
            self._expr(target.slice, a, defined, training)
            self._change(self._sources(target.value, a)[0], _ALWAYS, a, target, "writes an item",
                         training)
            return
        self.refuse_code(fn, target, f"assigns to a {type(target).__name__}")

    def _always_true(self, test: ast.AST, a: _Analysis, seen: frozenset[str] = frozenset()) -> bool:
        if _truthy_constant(test):
            return True
        if isinstance(test, ast.Name) and test.id in a.bindings and test.id not in seen:
            if test.id in a.params:
                return False
            values = a.bindings[test.id]
            return bool(values) and all(
                v is not None and whole and self._always_true(v, a, seen | {test.id})
                for v, whole in values)
        return False

    # expressions
    def _expr(self, node: ast.AST, a: _Analysis, defined: set[str], training: bool) -> None:
        if isinstance(node, ast.Call):
            self._call(node, a, defined, training)
        elif isinstance(node, ast.Attribute):
            self._attribute(node, a, defined, training)
        elif isinstance(node, ast.Name):
            self._name(node, a, defined)
        elif isinstance(node, (ast.ListComp, ast.DictComp)):
            inner = set(defined)
            for gen in node.generators:
                if gen.is_async:
                    self.refuse_code(a.fn, node, "uses an async comprehension (not TorchScript)")
                self._expr(gen.iter, a, inner, training)
                for name in _target_names(gen.target):
                    if name.id in RESERVED_NAMES:
                        self._refuse_binding(a.fn, name, name.id)
                if not all(isinstance(t, (ast.Name, ast.Tuple)) for t in ast.walk(gen.target)
                           if not isinstance(t, ast.expr_context)):
                    self.refuse_code(a.fn, gen.target, "assigns to something other than a name in "
                                                       "a comprehension")
                inner |= {n.id for n in _target_names(gen.target)}
                for cond in gen.ifs:
                    self._expr(cond, a, inner, training)
            for part in ([node.elt] if isinstance(node, ast.ListComp) else [node.key, node.value]):
                self._expr(part, a, inner, training)
        elif isinstance(node, (ast.Lambda, ast.Yield, ast.YieldFrom, ast.Await, ast.NamedExpr,
                               ast.GeneratorExp, ast.SetComp, ast.Set, ast.JoinedStr, ast.Starred)):
            self.refuse_code(a.fn, node, f"uses {type(node).__name__} (not TorchScript)")
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self._expr(child, a, defined, training)

    def _name(self, node: ast.Name, a: _Analysis, defined: set[str]) -> None:
        name = node.id
        if name in defined:
            return
        if name in a.bindings or name in a.params:
            self.refuse_code(a.fn, node, f"reads {_shown(name, 40)} where it may not be assigned yet "
                                         "(TorchScript would look it up as a global)")
        if name in ("inf", "nan", "infj", "nanj"):
            return
        if name in ("torch", "ops", "__torch__", "CONSTANTS", "self"):
            self.refuse(a.fn, node, name, "is not a value (only its operators or attributes may be "
                                          "used)", verb="uses")
        if name in DENIED:
            self.refuse(a.fn, node, name, DENIED[name])
        if name in ALLOWED_BUILTINS or name in TYPE_NAMES:
            return
        self.refuse(a.fn, node, _shown(name), "is not on the allow-list")

    def _namespace(self, path: str, a: _Analysis, node: ast.AST) -> tuple[str, str]:
        """``torch.X``, ``torch.ops.NS.X``, ``ops.NS.X`` (called or referenced): (ns, op)."""
        parts = path.split(".")
        if parts[0] == "torch" and len(parts) > 1 and parts[1] == "ops":
            parts = parts[1:]
        if parts[0] == "torch":
            if len(parts) != 2:
                self.refuse(a.fn, node, _shown(path), "is not on the allow-list")
            self._operator("aten", parts[1], a, node)
            return "aten", parts[1]
        if len(parts) != 3:  # ops.NS alone, or deeper
            self.refuse(a.fn, node, _shown(path), "is not an operator on the allow-list")
        ns, op = parts[1], parts[2]
        if ns in ("aten", "prim"):
            self._operator(ns, op, a, node)
        elif ns == "profiler":
            self.refuse(a.fn, node, f"profiler::{op}", "is a profiler hook")
        else:
            self.refuse(a.fn, node, f"{ns}::{op}",
                        f"is from the custom operator namespace {ns!r} (native code outside the "
                        "allow-list)")
        return ns, op

    def _operator(self, ns: str, op: str, a: _Analysis, node: ast.AST) -> None:
        if op in DENIED:
            self.refuse(a.fn, node, f"{ns}::{op}", DENIED[op])
        allowed = ALLOWED_ATEN if ns == "aten" else ALLOWED_PRIM
        if op not in allowed:
            self.refuse(a.fn, node, f"{ns}::{_shown(op)}", "is not on the allow-list")
        self.operators.add(f"{ns}::{op}")

    def _method(self, name: str, a: _Analysis, node: ast.AST) -> None:
        if name in ("__setstate__", "__getstate__"):
            self.refuse(a.fn, node, f"the method {name}", "only the loader may call (calling "
                                                          "it would change the model's state)")
        if name in DENIED:
            self.refuse(a.fn, node, f"the method {name}", DENIED[name])
        if name in ALLOWED_ATEN:
            self.operators.add(f"aten::{name}")
            return
        if name in self.method_names:
            if name in _registered_operator_names():
                self.refuse(a.fn, node, f"the method {name}",
                            "shares its name with an operator outside the allow-list")
            return
        self.refuse(a.fn, node, f"the method {_shown(name)}", "is not on the allow-list")

    def _readable(self, attr: str, a: _Analysis, node: ast.AST) -> None:
        """An attribute read as a value: a field of the archive's classes or a tensor property
        (a method or operator taken as a value could be called where the checker cannot see)."""
        if attr in DENIED:
            self.refuse(a.fn, node, f"the attribute {attr}", DENIED[attr], verb="reads")
        if attr not in self.field_names and attr not in TENSOR_PROPERTIES:
            self.refuse(a.fn, node, f"the attribute {_shown(attr)}", "is neither a field of the "
                        "archive's classes nor a tensor property", verb="reads")

    def _attribute(self, node: ast.Attribute, a: _Analysis, defined: set[str], training: bool) -> None:
        path = _dotted(node)
        root = path.split(".", 1)[0] if path else None
        if path and root in ("torch", "ops"):
            self._namespace(path, a, node)  # an operator reference must itself be allowed
            return
        if path and root == "__torch__":
            self._check_defined(path, a.fn, a.fn.file, node)
            return
        if path and root == "CONSTANTS":
            if path.count(".") != 1:
                self.refuse(a.fn, node, _shown(path), "is not a constant of the archive", verb="reads")
            return
        self._readable(node.attr, a, node)
        self._expr(node.value, a, defined, training)

    def _resolve(self, node: ast.AST, a: _Analysis) -> ast.AST:
        """The value a local assigned exactly once holds (else ``node``)."""
        if isinstance(node, ast.Name) and node.id not in a.params:
            binds = a.bindings.get(node.id, [])
            if len(binds) == 1 and binds[0][1] and binds[0][0] is not None:
                return binds[0][0]
        return node

    def _message_part(self, node: ast.AST, a: _Analysis, strs: set[int]) -> bool:
        """A value that may go into a warning: a number, a printable string constant, a ``str``
        parameter (its callers are checked: ``strs``), or a size or count."""
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float, bool)) or (
                isinstance(node.value, str) and bool(_PRINTABLE.fullmatch(node.value)))
        if isinstance(node, ast.Name) and node.id in a.params and node.id not in a.bindings:
            kind = _dotted(a.annotations.get(node.id))
            if kind == "str":
                strs.add(a.params.index(node.id))
            return kind in ("str", "int", "float", "bool")
        if isinstance(node, ast.Call):
            path = _dotted(node.func) or ""
            return (path.startswith(("torch.", "ops.aten.")) and path.rsplit(".", 1)[-1] in _NUMERIC_OPS
                    and not node.keywords)
        value = self._resolve(node, a)
        return value is not node and self._message_part(value, a, strs)

    def _benign_warning(self, call: ast.Call, a: _Analysis) -> bool:
        """``torch.warn`` with one of torch's own warning messages (from plain values)."""
        if call.keywords or not 1 <= len(call.args) <= 2:
            return False
        message, fmt_args = self._resolve(call.args[0], a), []
        if (isinstance(message, ast.Call) and _dotted(message.func) in ("torch.format", "ops.aten.format")
                and message.args and not message.keywords):
            message, fmt_args = self._resolve(message.args[0], a), message.args[1:]
        strs: set[int] = set()
        ok = (isinstance(message, ast.Constant) and isinstance(message.value, str)
              and message.value in _torch_warning_templates()
              and all(self._message_part(x, a, strs) for x in [*fmt_args, *call.args[1:]]))
        if ok:
            a.summary.warns |= strs
        return ok

    def _warned_arguments(self, call: ast.Call, a: _Analysis) -> None:
        """A string passed to a function that puts it into a warning must be printable text."""
        callees, with_receiver, _ = self._callees(call, a)
        for callee in callees:
            summary = self._summary(callee)
            if not summary.warns:
                continue
            bound = self._bind_args(callee, call, with_receiver)
            defaults = self._defaults(callee)
            for k in sorted(summary.warns):
                value = bound.get(k, defaults.get(k))
                strs: set[int] = set()
                if value is not None and not self._message_part(value, a, strs):
                    self.refuse(a.fn, call, f"aten::warn (through {callee.qualname})",
                                "prints to the scanner's output (only printable constant text may "
                                "go into a warning)")
                a.summary.warns |= strs

    def _call(self, node: ast.Call, a: _Analysis, defined: set[str], training: bool) -> None:
        fn = a.fn
        func = node.func
        path = _dotted(func)
        if any(isinstance(x, ast.Starred) for x in node.args) or any(k.arg is None
                                                                     for k in node.keywords):
            self.refuse_code(fn, node, "unpacks arguments into a call (not what TorchScript writes)")
        args = list(node.args) + [k.value for k in node.keywords]
        if isinstance(func, ast.Name):
            name = func.id
            if name in defined:
                if not self._funcrefs(name, a):
                    self.refuse(fn, node, f"the local value {_shown(name, 40)}", "is not a function "
                                "of the archive (a reference to an operator or method is never "
                                "called)")
            elif name in a.bindings or name in a.params:
                self._name(func, a, defined)
            elif name in DENIED:
                self.refuse(fn, node, name, DENIED[name])
            elif name not in ALLOWED_BUILTINS and name not in TYPE_NAMES:
                self.refuse(fn, node, _shown(name), "is not on the allow-list")
            elif name in ("annotate", "unchecked_cast", "uninitialized", "isinstance"):
                types = node.args[1:2] if name == "isinstance" else node.args[:1]
                for t in types:
                    self._check_type(t, fn.file, owner=fn.qualname)
                args = [x for x in args if not any(x is t for t in types)]
            elif name in ("getattr", "hasattr"):
                if len(node.args) != 2 or node.keywords or not (
                        isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                    self.refuse_code(fn, node, f"calls {name} with a computed name")
                attr = node.args[1].value
                target = _dotted(node.args[0])
                if target and target.split(".")[0] in ("torch", "ops", "__torch__", "CONSTANTS"):
                    self.refuse(fn, node, f"{name}({target}, {_shown(attr, 40)!r})",
                                "looks up an operator by name")
                if name == "getattr":
                    self._readable(attr, a, node)
                elif attr in DENIED:
                    self.refuse(fn, node, f"the attribute {attr}", DENIED[attr], verb="reads")
                args = node.args[:1]
        elif path is not None and path.split(".", 1)[0] in ("torch", "ops"):
            if path in ("torch.warn", "ops.aten.warn", "torch.ops.aten.warn"):
                if not self._benign_warning(node, a):
                    self.refuse(fn, node, "aten::warn", DENIED["warn"] + " (only torch's own "
                                "warnings, from torch's own layers, are allowed)")
                self.operators.add("aten::warn")
            else:
                self._namespace(path, a, func)
        elif path is not None and path.startswith("__torch__."):
            self._check_defined(path, fn, fn.file, func)
        elif path is not None and path.startswith("CONSTANTS."):
            self.refuse(fn, node, _shown(path), "is a constant, not a function")
        elif isinstance(func, ast.Attribute):
            self._method(func.attr, a, func)
            self._expr(func.value, a, defined, training)
        else:
            self.refuse_code(fn, node, f"calls a computed value ({type(func).__name__}), not an "
                                       "operator or a function of the archive")
        for arg in args:
            self._expr(arg, a, defined, training)
        self._warned_arguments(node, a)
        for target, when, what in self._effects(node, a)[0]:
            self._change(target, when, a, node, what, training)


# --- the archive ----------------------------------------------------------------------------------


@dataclass
class Inspection:
    """What the static check of a TorchScript archive saw (for results and reports)."""

    entries: int
    code_files: int
    methods: int
    operators: list[str]
    metadata: bytes | None = None  # extra/trojanscan.json, as read (bounded)

    def to_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "code_files": self.code_files, "methods": self.methods,
                "operators": len(self.operators)}


def inspect_torchscript(path: Path, shown: object | None = None,
                        meta_entry: str = "trojanscan.json") -> Inspection:
    """Check a TorchScript archive without executing any of it; raise on anything refused."""
    shown = path if shown is None else shown
    with open_zip(path, shown) as zf:
        infos = zf.infolist()
        roots = {i.filename.split("/", 1)[0] for i in infos}
        if len(roots) != 1 or any("/" not in i.filename for i in infos):
            raise refused(shown, "a TorchScript archive keeps all its entries in one folder")
        root = roots.pop()
        sources: dict[str, str] = {}
        pickles: list[tuple[str, bytes]] = []
        metadata: bytes | None = None
        source_total = 0
        for info in infos:
            rel = info.filename[len(root) + 1:]
            if info.is_dir():
                continue
            if rel.startswith("code/") and rel.endswith(".py"):
                data = read_entry(zf, info, MAX_SOURCE_BYTES, shown)
                source_total += len(data)
                if source_total > MAX_TOTAL_SOURCE_BYTES:
                    raise refused(shown, f"its code is more than {MAX_TOTAL_SOURCE_BYTES} bytes")
                try:
                    sources[info.filename] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise refused(shown, f"{_shown(rel)} is not UTF-8 text") from None
            elif rel.endswith(".pkl") or (rel.startswith("code/") and rel.endswith(".py.debug_pkl")):
                pickles.append((rel, read_entry(zf, info, MAX_PICKLE_BYTES, shown)))
            elif rel.startswith("code/"):
                raise refused(shown, f"unexpected file {_shown(rel)!r} among the code")
            elif re.fullmatch(r"(data|constants|traced_inputs)/\d+", rel):
                if info.compress_type != zipfile.ZIP_STORED:  # a compressed tensor: read it bounded
                    read_entry(zf, info, MAX_UNCOMPRESSED_BYTES, shown)
            elif rel in ("version", "byteorder") or rel.startswith(".data/"):
                read_entry(zf, info, MAX_SMALL_ENTRY_BYTES, shown)
            elif rel.startswith("extra/"):
                data = read_entry(zf, info, MAX_EXTRA_BYTES, shown)
                if rel == f"extra/{meta_entry}":
                    metadata = data
            else:
                raise refused(shown, f"unexpected entry {_shown(rel)!r} in a TorchScript archive")
        if not sources:
            raise refused(shown, "a TorchScript archive without code")
        checker = _CodeChecker(shown, sources)
        checker.parse()
        classes = frozenset(checker.classes)
        for rel, data in pickles:
            check_pickle(data, rel, shown, classes)
        checker.check()
        return Inspection(len(infos), len(sources), checker.methods, sorted(checker.operators),
                          metadata)


# --- the child-process probe ----------------------------------------------------------------------

_PROBE = r"""
import json, os, sys
applied, missing = [], {}
limits = json.loads(sys.argv[5])
try:
    import resource, signal
except ImportError as e:
    missing["rlimits"] = str(e)
else:
    for name, value in limits.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
            applied.append(name)
        except (AttributeError, ValueError, OSError) as e:
            missing[name] = type(e).__name__ + ": " + str(e)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # a file write ends the probe, visibly
root = hasattr(os, "geteuid") and os.geteuid() == 0
libc = None
if sys.platform.startswith("linux"):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError) as e:
        missing["namespaces"] = str(e)
else:
    missing["namespaces"] = "not Linux"


def unshare(flags, names):
    if libc.unshare(flags) == 0:
        applied.extend(names)
        return True
    err = os.strerror(ctypes.get_errno())
    for n in names:
        missing[n] = err
    return False


if libc is not None:  # before torch starts threads: a user namespace needs a single thread
    NEWNS, NEWNET, NEWUSER = 0x00020000, 0x40000000, 0x10000000
    if not root:
        unshare(NEWUSER, ["user-namespace"])
    if not unshare(NEWNS | NEWNET, ["mount-namespace", "network-namespace"]):
        for flag, n in ((NEWNS, "mount-namespace"), (NEWNET, "network-namespace")):
            if unshare(flag, [n]):
                missing.pop(n, None)
sys.path[:] = json.loads(sys.argv[1])
import warnings
warnings.simplefilter("ignore")
import torch
print("imported", flush=True)
torch.set_num_threads(1)
with open(sys.argv[2], "rb") as f:
    data = f.read()
try:  # CPU feature detection reads /proc the first time a kernel runs: do it before it goes away
    torch.backends.nnpack.is_available()
    torch.backends.cpu.get_cpu_capability()
    torch.nn.functional.conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
except Exception:
    pass
if hasattr(os, "chroot"):
    try:
        os.chroot(sys.argv[6])
        os.chdir("/")
        applied.append("chroot")
    except OSError as e:
        missing["chroot"] = e.strerror or str(e)
else:
    missing["chroot"] = "not available"
if root:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        applied.append("uid-65534")
    except OSError as e:
        missing["uid-65534"] = e.strerror or str(e)
if libc is not None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) == 0:
        applied.append("no-capabilities")
    else:
        missing["no-capabilities"] = os.strerror(ctypes.get_errno())
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS
        applied.append("no-new-privileges")
    else:
        missing["no-new-privileges"] = os.strerror(ctypes.get_errno())
print("confined " + json.dumps({"applied": applied, "missing": missing}), flush=True)
import io
path, shape, batches = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
m = torch.jit.load(io.BytesIO(data), map_location="cpu")
del data
m.eval()
print("loaded", flush=True)
if shape:
    g = torch.Generator().manual_seed(0)
    for i, b in enumerate(batches):
        print("call", b, flush=True)
        x = torch.rand([b] + shape, generator=g)
        if i == len(batches) - 1:
            x.requires_grad_(True)
            m(x)
        else:
            with torch.no_grad():
                m(x)
print("ok", flush=True)
"""

PROBE_PASSTHROUGH_ENV = ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "PYTHONPATH", "CONDA_PREFIX",
                         "VIRTUAL_ENV")
"""Environment variables the probe process inherits (what finding torch's libraries may need)."""

_SIGNAL_HINTS = {"SIGXFSZ": "it tried to write a file", "SIGKILL": "killed, out of memory?",
                 "SIGSEGV": "a segmentation fault", "SIGABRT": "aborted",
                 "SIGBUS": "a bus error"}


@dataclass
class ProbeResult:
    """How the probe went and what confined it (for results and reports)."""

    outcome: str  # "ok": every batch ran; "loaded": loaded, the forward raised or no shape known
    confinements: list[str] = field(default_factory=list)  # what applied
    not_applied: dict[str, str] = field(default_factory=dict)  # what did not, and why
    batches: list[int] = field(default_factory=list)  # the batch sizes that ran

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "confinements": list(self.confinements),
                "not_applied": dict(self.not_applied), "batches": list(self.batches)}


def _probe_env(work: str) -> dict[str, str]:
    """The probe's environment: thread settings, the loader variables, nothing else."""
    env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "LC_ALL": "C"}
    for name in PROBE_PASSTHROUGH_ENV:
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def _last_error(stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return _shown(ln, 160)
    return _shown(lines[-1], 160) if lines else "no message"


def probe_torchscript(path: Path, input_shape: tuple[int, ...] | None,
                      shown: object | None = None) -> ProbeResult:
    """Load the archive and run a forward pass in a confined child process first.

    The child sets its limits (no file data written, ``RLIMIT_FSIZE`` 0; no core dumps; a memory
    cap), enters new mount and network namespaces (and, unprivileged, a user namespace) where
    Linux allows, imports torch, reads the archive into memory, then ``chroot``s into an empty
    folder, drops to uid 65534 when it runs as root, drops its capabilities and sets
    no-new-privileges, and only then loads the model from memory and runs the batches of
    ``PROBE_BATCH_SIZES``. A step the platform refuses is skipped and reported
    (:attr:`ProbeResult.not_applied`). Raises :class:`TrojanscanError` when loading fails, the
    child crashes, or loading or a forward outlives its budget; a child that dies before it has
    imported torch is reported as a problem with trojanscan's setup, not with the file.
    """
    shown = path if shown is None else shown
    shape: list[int] = []
    if input_shape is not None and all(isinstance(s, int) and s > 0 for s in input_shape):
        biggest = max(PROBE_BATCH_SIZES) * math.prod(input_shape)
        if biggest <= PROBE_MAX_INPUT_ELEMENTS:
            shape = [int(s) for s in input_shape]
    limits = {"RLIMIT_FSIZE": 0, "RLIMIT_CORE": 0,
              "RLIMIT_AS": PROBE_MEMORY_BYTES + 4 * path.stat().st_size}
    result = ProbeResult("loaded")
    with tempfile.TemporaryDirectory(prefix="trojanscan-probe-") as work:
        jail = Path(work) / "root"
        jail.mkdir(mode=0o555)
        cmd = [sys.executable, "-I", "-B", "-c", _PROBE, json.dumps(sys.path), str(path.resolve()),
               json.dumps(shape), json.dumps(list(PROBE_BATCH_SIZES)), json.dumps(limits),
               str(jail)]
        proc = subprocess.Popen(cmd, cwd=work, env=_probe_env(work), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=(os.name == "posix"))
        lines: queue.Queue[str | None] = queue.Queue()
        err = bytearray()

        def read_stdout() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.put(raw.decode("ascii", "replace").strip())
            lines.put(None)

        def read_stderr() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                err.extend(raw)
                del err[:-8192]

        readers = [threading.Thread(target=read_stdout, daemon=True),
                   threading.Thread(target=read_stderr, daemon=True)]
        for t in readers:
            t.start()
        stage, batch = "start", 0
        try:
            while stage != "ok":
                budget = PROBE_LOAD_BUDGET_S if stage in ("start", "imported") else PROBE_CALL_BUDGET_S
                try:
                    line = lines.get(timeout=budget)
                except queue.Empty:
                    if stage == "start":
                        raise TrojanscanError(
                            f"{shown}: could not be checked: trojanscan's probe process did not "
                            f"import torch within {budget:g} s (PROBE_LOAD_BUDGET_S); this is a "
                            "problem with trojanscan's setup, not with the file") from None
                    if stage == "imported":
                        raise refused(shown, f"loading it did not finish within {budget:g} s "
                                             "(in a separate process; PROBE_LOAD_BUDGET_S)") from None
                    raise refused(shown, f"its forward did not return within {budget:g} s on a "
                                         f"batch of {batch} inputs of shape {tuple(shape)} (in a "
                                         "separate process; PROBE_CALL_BUDGET_S): a model that "
                                         "hangs would hang the scan") from None
                if line is None:
                    break
                if line == "imported":
                    stage = "imported"
                elif line.startswith("confined "):
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        record = json.loads(line[len("confined "):])
                        result.confinements = [_shown(c, 40) for c in record["applied"]]
                        result.not_applied = {_shown(k, 40): _shown(v, 80)
                                              for k, v in record["missing"].items()}
                elif line == "loaded":
                    stage = "loaded"
                elif line.startswith("call "):
                    if stage == "call":
                        result.batches.append(batch)
                    stage, batch = "call", int(line.split()[1])
                elif line == "ok":
                    if stage == "call":
                        result.batches.append(batch)
                    stage = "ok"
            if stage == "ok":  # let it exit on its own; its verdict is in
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=PROBE_CALL_BUDGET_S)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    if os.name == "posix":
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
            proc.wait()
            for t in readers:
                t.join(timeout=5)
        if stage == "ok":
            result.outcome = "ok"
            return result
        code = proc.returncode
        if stage == "start":
            why = (f"it ended with {_signal_name(-code)}" if code is not None and code < 0
                   else _last_error(bytes(err)))
            raise TrojanscanError(f"{shown}: could not be checked: trojanscan's probe process "
                                  f"failed before it imported torch ({why}); this is a problem "
                                  "with trojanscan's setup, not with the file")
        if code is not None and code < 0:
            name = _signal_name(-code)
            hint = _SIGNAL_HINTS.get(name, "")
            when = "loading it" if stage == "imported" else "running it"
            raise refused(shown, f"{when} crashed a separate process ({name}"
                                 f"{': ' + hint if hint else ''})")
        if stage == "imported":
            raise TrojanscanError(f"{shown}: not a loadable TorchScript archive "
                                  f"({_last_error(bytes(err))})")
        return result


# --- safetensors and pickled checkpoints ----------------------------------------------------------

SAFETENSORS_DTYPES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


def check_safetensors(path: Path, shown: object | None = None) -> dict[str, Any]:
    """Validate a safetensors file's header before any library parses it; return the header.

    The first 8 bytes are the header length (little-endian u64), capped; the JSON header is
    checked for size, depth and duplicate keys; every tensor's dtype, shape and byte range are
    checked (in bounds, the right length, no two tensors sharing bytes); ``__metadata__`` must
    map strings to strings.
    """
    shown = path if shown is None else shown
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise refused(shown, f"the file is {size} bytes (limit {MAX_MODEL_BYTES})")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TrojanscanError(f"{shown}: corrupt safetensors file (shorter than its header)")
        n = int.from_bytes(head, "little")
        if n > MAX_SAFETENSORS_HEADER_BYTES:
            raise refused(shown, f"its safetensors header claims {n} bytes (limit "
                                 f"{MAX_SAFETENSORS_HEADER_BYTES})")
        if 8 + n > size:
            raise TrojanscanError(f"{shown}: corrupt safetensors file (its header claims {n} "
                                  f"bytes, past the end of the file)")
        raw = f.read(n)
    header = parse_json(raw, shown, "safetensors header", max_bytes=MAX_SAFETENSORS_HEADER_BYTES,
                        max_depth=MAX_SAFETENSORS_HEADER_DEPTH)
    if not isinstance(header, dict):
        raise TrojanscanError(f"{shown}: corrupt safetensors file (header is not a JSON object)")
    if len(header) > MAX_TENSORS + 1:
        raise refused(shown, f"it holds more than {MAX_TENSORS} tensors")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in entry.items()):
                raise TrojanscanError(f"{shown}: corrupt safetensors file (__metadata__ must map "
                                      "strings to strings)")
            continue
        bad = f"{shown}: corrupt safetensors file (tensor {_shown(name, 60)!r}"
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            raise TrojanscanError(f"{bad} is not described by dtype, shape and data_offsets)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise TrojanscanError(f"{bad} has unknown dtype {_shown(dtype, 20)!r})")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(type(s) is int and s >= 0 for s in shape)):
            raise TrojanscanError(f"{bad} has a bad shape)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise TrojanscanError(f"{bad} has bad data_offsets)")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise TrojanscanError(f"{bad} lies outside the file: bytes {begin}..{end} of "
                                  f"{data_len})")
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise TrojanscanError(f"{bad} has {end - begin} bytes for shape {shape} {dtype})")
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise TrojanscanError(f"{shown}: corrupt safetensors file (tensors "
                                  f"{_shown(n0, 40)!r} and {_shown(n1, 40)!r} share bytes)")
    return header


def check_checkpoint(path: Path, shown: object | None = None) -> None:
    """Bounds for a pickled checkpoint before ``torch.load(weights_only=True)`` reads it."""
    shown = path if shown is None else shown
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise refused(shown, f"the file is {size} bytes (limit {MAX_MODEL_BYTES})")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        with open_zip(path, shown) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pkl"):
                    read_entry(zf, info, MAX_PICKLE_BYTES, shown)
                elif (info.compress_type != zipfile.ZIP_STORED
                      and info.file_size > max(MAX_INFLATION * info.compress_size, 1 << 20)):
                    raise refused(shown, f"entry {_shown(info.filename)!r} inflates {info.compress_size:,} "
                                         f"bytes to {info.file_size:,} (torch.save never compresses "
                                         "tensors; a zip bomb?)")
    else:
        declared = legacy_storage_bytes(path, shown)
        if declared > size:
            raise refused(shown, f"its tensors declare {declared:,} bytes but the file holds {size:,}; "
                                 "damaged, or made to exhaust memory")


MAX_INFLATION = 16  # weights compress about 1.1x; a tensor entry that inflates 16x is a bomb
# bytes per element of the storage types a legacy (pre-zip) torch.save names
_STORAGE_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                          "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


_TEXT_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
             "STRING"}
_DEVICES = ("cpu", "cuda", "mps", "meta", "xpu", "hpu")
_INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4"}


def legacy_storage_bytes(path: Path, shown: object) -> int:
    """The bytes the storages of a legacy (non-zip) checkpoint declare, read from its pickles'
    opcodes without running them: torch allocates each storage at its declared size before
    reading its data, so a small file could otherwise claim gigabytes."""
    storages: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            for _ in range(4):  # magic number, protocol, system info, then the object with storages
                texts: list[str] = []
                ints: list[int] = []
                element = 16
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "MARK":
                        texts, ints = [], []
                    elif op.name in ("GLOBAL", "STACK_GLOBAL") and isinstance(arg, str) and "Storage" in arg:
                        element = _STORAGE_ELEMENT_BYTES.get(arg.split()[-1].removesuffix("Storage"), 16)
                    elif op.name in _TEXT_OPS:
                        texts.append(str(arg))
                    elif op.name in _INT_OPS:
                        ints.append(int(arg))
                    elif op.name == "BINPERSID" and ints:  # ('storage', type, key, location, numel, ...)
                        # repeated strings ('storage', 'cpu') come from the memo; the key is new text
                        key = next((t for t in texts if t != "storage" and not t.startswith(_DEVICES)),
                                   f"#{len(storages)}")
                        storages[key] = max(ints[-1], 0) * element  # a storage seen twice counts once
    except (ValueError, EOFError, struct.error, UnicodeDecodeError) as e:
        raise refused(shown, f"not a readable pickle checkpoint ({_shown(e, 120)})") from None
    return sum(storages.values())

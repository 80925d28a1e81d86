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
  ``__setstate__``/``__getstate__`` that does more than move attributes, no state kept between
  calls, no loop that can never end. Its pickles (constants, tensors, debug tables) are walked
  opcode by opcode and may name only tensor-rebuilding functions and the archive's own classes.
  :func:`probe_torchscript` then loads the archive and runs a forward pass in a short-lived child
  process (no file writes, a memory cap, an empty working directory, a minimal environment) with a
  time budget, so a model that hangs or crashes is refused in one line instead of hanging the scan.
* **safetensors**: :func:`check_safetensors` bounds the header length and its JSON (size, depth,
  duplicate keys) and checks dtypes, shapes and offsets before the safetensors library sees it.
* **pickled checkpoints** are read only by ``torch.load(weights_only=True)``, behind
  :func:`check_checkpoint` (size, and the zip limits for the zip format).
* **ONNX** is refused.

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
MAX_JSON_BYTES = 1 << 20  # trojanscan metadata
MAX_JSON_DEPTH = 32
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
MAX_SAFETENSORS_HEADER_DEPTH = 4  # {name: {"shape": [..]}} is 3 deep
MAX_TENSORS = 100_000
MAX_TENSOR_DIMS = 16
MAX_CODE_NESTING = 200  # nested statements/expressions in TorchScript source

PROBE_LOAD_BUDGET_S = 60.0  # child process: start Python, import torch, load the archive
PROBE_CALL_BUDGET_S = 10.0  # child process: the forward passes of PROBE_BATCH_SIZES
PROBE_BATCH_SIZES = (1, 3, 32)  # the last one runs with gradients on, as the trigger search does
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
Int Float Bool ScalarImplicit IntImplicit FloatImplicit item len list dict str format warn
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
    **dict.fromkeys(["print", "Print", "_print"], "prints to the scanner's output"),
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


def _shown(text: object, limit: int = 120) -> str:
    """Text from a file, made safe for a one-line message: no control characters, no markup."""
    s = re.sub(r"[^\x20-\x7e]", "?", str(text)).replace("[", "(").replace("]", ")")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def refused(path: object, what: str) -> TrojanscanError:
    return TrojanscanError(f"{path}: refused: {what}")


def json_depth(raw: str | bytes, limit: int) -> int:
    """Nesting depth of a JSON text, without recursion; stops counting past ``limit``."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {_shown(k, 40)!r}")
        seen[k] = v
    return seen


def parse_json(raw: str | bytes, path: object, what: str, *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a size cap, a depth cap checked first, and duplicate keys refused."""
    if len(raw) > max_bytes:
        raise refused(path, f"its {what} is {len(raw)} bytes (limit {max_bytes})")
    depth = json_depth(raw, max_depth)
    if depth > max_depth:
        raise refused(path, f"its {what} nests deeper than {max_depth} levels")
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise TrojanscanError(f"{path}: its {what} is not valid JSON ({_shown(e, 80)})") from None


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

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


def zip_directory_stats(path: Path) -> tuple[int, int, int]:
    """(entries, central-directory bytes, central-directory offset) from the end record, read
    before any zip parser builds the directory (so a million-entry archive costs nothing)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        tail_len = min(size, _EOCD.size + 65535)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            raise TrojanscanError(f"{path}: corrupt zip archive (no end-of-directory record)")
        _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
            loc_at = size - tail_len + at - _EOCD64_LOCATOR.size
            if loc_at < 0:
                raise TrojanscanError(f"{path}: corrupt zip64 archive")
            f.seek(loc_at)
            sig, _, rec_at, _ = _EOCD64_LOCATOR.unpack(f.read(_EOCD64_LOCATOR.size))
            if sig != b"PK\x06\x07" or rec_at + _EOCD64.size > size:
                raise TrojanscanError(f"{path}: corrupt zip64 archive")
            f.seek(rec_at)
            rec = f.read(_EOCD64.size)
            sig, _, _, _, _, _, _, entries, cd_size, cd_offset = _EOCD64.unpack(rec)
            if sig != b"PK\x06\x06":
                raise TrojanscanError(f"{path}: corrupt zip64 archive")
    return entries, cd_size, cd_offset


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


@dataclass
class _Function:
    qualname: str
    node: ast.FunctionDef
    file: str
    cls: _Class | None


@dataclass
class _Scope:
    fn: _Function
    locals: set[str]
    assigned: dict[str, list[ast.AST | None]]
    state: set[str] = field(default_factory=set)  # locals that alias the module's own state
    training: set[str] = field(default_factory=set)  # locals holding self.training


@lru_cache(maxsize=1)
def _registered_operator_names() -> frozenset[str]:
    """Base names of every operator this torch registers, in any namespace."""
    try:
        import torch

        return frozenset(s.name.split("::", 1)[-1] for s in torch._C._jit_get_all_schemas())
    except Exception:  # a torch without the private API: no collision check, only the allow-list
        return frozenset()


class _CodeChecker:
    """Refuses TorchScript source that calls anything outside the allow-list."""

    def __init__(self, shown: object, sources: dict[str, str]) -> None:
        self.shown = shown
        self.sources = sources  # entry name (code/…) → source
        self.trees: dict[str, tuple[str, ast.Module]] = {}
        self.classes: dict[str, _Class] = {}
        self.functions: dict[str, _Function] = {}
        self.member_names: set[str] = set()
        self.operators: set[str] = set()
        self.methods = 0

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
                self.member_names.add(stmt.name)
                self.functions[f"{qual}.{stmt.name}"] = _Function(f"{qual}.{stmt.name}", stmt,
                                                                  file, cls)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                self.member_names.add(stmt.target.id)
            elif isinstance(stmt, ast.Assign):
                self.member_names.update(t.id for t in stmt.targets if isinstance(t, ast.Name))

    # -- pass 2: check
    def check(self) -> None:
        for fn in self.functions.values():
            self.methods += 1
            try:
                self._check_function(fn, outer=None)
            except RecursionError:
                self.refuse_code(fn, fn.node, "nests its code too deeply to be checked")
        for cls in self.classes.values():
            self._check_class_body(cls)

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

    def _scope_of(self, fn: _Function, outer: _Scope | None) -> _Scope:
        node = fn.node
        params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
        if node.args.vararg or node.args.kwarg:
            self.refuse_code(fn, node, "takes *args or **kwargs (not TorchScript)")
        assigned: dict[str, list[ast.AST | None]] = {}

        def bind(target: ast.AST, value: ast.AST | None) -> None:
            if isinstance(target, ast.Name):
                assigned.setdefault(target.id, []).append(value)
            elif isinstance(target, (ast.Tuple, ast.List)):
                values = (value.elts if isinstance(value, (ast.Tuple, ast.List))
                          and len(value.elts) == len(target.elts) else [None] * len(target.elts))
                for t, v in zip(target.elts, values, strict=True):
                    bind(t, v)
            elif isinstance(target, ast.Starred):
                bind(target.value, None)

        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign):
                for t in sub.targets:
                    bind(t, sub.value)
            elif isinstance(sub, ast.AnnAssign):
                bind(sub.target, sub.value)
            elif isinstance(sub, ast.AugAssign):
                bind(sub.target, None)
            elif isinstance(sub, (ast.For, ast.comprehension)):
                bind(sub.target, None)
            elif isinstance(sub, ast.withitem) and sub.optional_vars is not None:
                bind(sub.optional_vars, None)
            elif isinstance(sub, ast.FunctionDef) and sub is not node:
                assigned.setdefault(sub.name, []).append(None)
        scope = _Scope(fn, set(params) | set(assigned), assigned)
        if outer is not None:
            scope.locals |= outer.locals
            scope.state |= outer.state
            scope.training |= outer.training
        if fn.cls is not None and fn.cls.kind == "module":
            for name, values in assigned.items():
                if values and all(isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                                  and v.value.id == "self" and v.attr == "training" for v in values):
                    scope.training.add(name)
            changed = True
            while changed:
                changed = False
                for name, values in assigned.items():
                    if name not in scope.state and any(self._is_state(v, scope) for v in values):
                        scope.state.add(name)
                        changed = True
        return scope

    def _is_state(self, node: ast.AST | None, scope: _Scope) -> bool:
        """Does this expression alias the module's own attributes (or a view of them)?"""
        if node is None or scope.fn.cls is None or scope.fn.cls.kind != "module":
            return False
        if isinstance(node, ast.Name):
            return node.id == "self" or node.id in scope.state
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            return self._is_state(node.value, scope)
        if isinstance(node, ast.Call):
            path = _dotted(node.func) or ""
            args = node.args
            if path in ("unchecked_cast", "annotate"):
                return len(args) == 2 and self._is_state(args[1], scope)
            if path == "getattr":
                return bool(args) and self._is_state(args[0], scope)
            if path.split(".", 1)[0] in ("torch", "ops") and path.rsplit(".", 1)[-1] in _VIEW_OPS:
                return bool(args) and self._is_state(args[0], scope)
            if isinstance(node.func, ast.Attribute) and node.func.attr in _VIEW_OPS:
                return self._is_state(node.func.value, scope)
        return False

    def _check_function(self, fn: _Function, outer: _Scope | None) -> None:
        node = fn.node
        if node.decorator_list:
            self.refuse_code(fn, node, "has a decorator (not TorchScript)")
        for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
            if arg.annotation is not None:
                self._check_type(arg.annotation, fn.file, owner=fn.qualname)
        if node.returns is not None:
            self._check_type(node.returns, fn.file, owner=fn.qualname)
        scope = self._scope_of(fn, outer)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self._expr(default, scope)
        self._block(node.body, scope, training_branch=False, depth=0)
        if fn.cls is not None and node.name in ("__setstate__", "__getstate__"):
            self._check_state_method(fn, scope)

    def _check_state_method(self, fn: _Function, scope: _Scope) -> None:
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

    # statements
    def _block(self, body: list[ast.stmt], scope: _Scope, training_branch: bool, depth: int) -> None:
        if depth > MAX_CODE_NESTING:
            self.refuse_code(scope.fn, body[0] if body else None, "nests its code too deeply")
        for stmt in body:
            self._stmt(stmt, scope, training_branch, depth)

    def _stmt(self, stmt: ast.stmt, scope: _Scope, training_branch: bool, depth: int) -> None:
        fn = scope.fn
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                self._target(target, scope, training_branch, isinstance(stmt, ast.AugAssign))
            if isinstance(stmt, ast.AnnAssign):
                self._check_type(stmt.annotation, fn.file, owner=fn.qualname)
            if stmt.value is not None:
                self._expr(stmt.value, scope, training_branch)
        elif isinstance(stmt, (ast.Expr, ast.Return)):
            if stmt.value is not None:
                self._expr(stmt.value, scope, training_branch)
        elif isinstance(stmt, ast.If):
            self._expr(stmt.test, scope, training_branch)
            test = stmt.test
            in_training = training_branch or (isinstance(test, ast.Name) and test.id in scope.training) \
                or (_dotted(test) == "self.training")
            self._block(stmt.body, scope, in_training, depth + 1)
            self._block(stmt.orelse, scope, training_branch, depth + 1)
        elif isinstance(stmt, ast.While):
            if self._always_true(stmt.test, scope):
                self.refuse_code(fn, stmt, "has a loop that can never end (while True)")
            self._expr(stmt.test, scope, training_branch)
            self._block(stmt.body, scope, training_branch, depth + 1)
            self._block(stmt.orelse, scope, training_branch, depth + 1)
        elif isinstance(stmt, ast.For):
            self._target(stmt.target, scope, training_branch, False)
            self._expr(stmt.iter, scope, training_branch)
            self._block(stmt.body, scope, training_branch, depth + 1)
            self._block(stmt.orelse, scope, training_branch, depth + 1)
        elif isinstance(stmt, ast.With):
            for item in stmt.items:
                self._expr(item.context_expr, scope, training_branch)
                if item.optional_vars is not None:
                    self._target(item.optional_vars, scope, training_branch, False)
            self._block(stmt.body, scope, training_branch, depth + 1)
        elif isinstance(stmt, (ast.Raise, ast.Assert, ast.Delete)):
            for sub in ast.iter_child_nodes(stmt):
                if isinstance(sub, ast.expr):
                    if isinstance(stmt, ast.Delete):
                        self._target(sub, scope, training_branch, False)
                    self._expr(sub, scope, training_branch)
        elif isinstance(stmt, (ast.Pass, ast.Break, ast.Continue)):
            pass
        elif isinstance(stmt, ast.FunctionDef):
            inner = _Function(f"{fn.qualname}.{stmt.name}", stmt, fn.file, fn.cls)
            self.methods += 1
            self._check_function(inner, outer=scope)
        else:
            self.refuse_code(fn, stmt, f"uses the statement {type(stmt).__name__} "
                                       "(not on the allow-list)")

    def _target(self, target: ast.AST, scope: _Scope, training_branch: bool, augmented: bool) -> None:
        fn = scope.fn
        if isinstance(target, ast.Name):
            return
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._target(t, scope, training_branch, augmented)
            return
        if isinstance(target, ast.Starred):
            self._target(target.value, scope, training_branch, augmented)
            return
        if isinstance(target, ast.Attribute):
            self._expr(target.value, scope, training_branch)
            if target.attr in DENIED_ATTRIBUTES:
                self.refuse(fn, target, f"the attribute {target.attr}", DENIED[target.attr],
                            verb="sets")
            on_self = isinstance(target.value, ast.Name) and target.value.id == "self"
            in_module = fn.cls is not None and fn.cls.kind == "module"
            if in_module and (not on_self or fn.node.name != "__setstate__"):
                if not (on_self and training_branch):
                    self.refuse_code(fn, target, f"assigns the attribute {target.attr}: a model "
                                                 "may not keep state between calls")
            elif not on_self and self._is_state(target.value, scope):
                self.refuse_code(fn, target, f"assigns the attribute {target.attr} of the "
                                             "model's state")
            return
        if isinstance(target, ast.Subscript):
            self._expr(target.value, scope, training_branch)
            self._expr(target.slice, scope, training_branch)
            if self._is_state(target.value, scope) and not training_branch:
                self.refuse_code(fn, target, "writes into the model's own tensors or lists: a "
                                             "model may not keep state between calls")
            return
        self.refuse_code(fn, target, f"assigns to a {type(target).__name__}")

    def _always_true(self, test: ast.AST, scope: _Scope, seen: frozenset[str] = frozenset()) -> bool:
        if _truthy_constant(test):
            return True
        if isinstance(test, ast.Name) and test.id in scope.assigned and test.id not in seen:
            values = scope.assigned[test.id]
            if test.id in [a.arg for a in scope.fn.node.args.args]:
                return False
            return bool(values) and all(
                v is not None and self._always_true(v, scope, seen | {test.id}) for v in values)
        return False

    # expressions
    def _expr(self, node: ast.AST, scope: _Scope, training_branch: bool = False) -> None:
        stack: list[ast.AST] = [node]
        while stack:
            sub = stack.pop()
            if isinstance(sub, ast.Call):
                self._call(sub, scope, training_branch, stack)
            elif isinstance(sub, ast.Attribute):
                self._attribute(sub, scope, stack)
            elif isinstance(sub, ast.Name):
                self._name(sub, scope)
            elif isinstance(sub, (ast.Lambda, ast.Yield, ast.YieldFrom, ast.Await, ast.NamedExpr,
                                  ast.GeneratorExp, ast.SetComp, ast.Set, ast.JoinedStr)):
                self.refuse_code(scope.fn, sub, f"uses {type(sub).__name__} (not TorchScript)")
            else:
                if isinstance(sub, ast.comprehension):
                    self._target(sub.target, scope, training_branch, False)
                    stack.append(sub.iter)
                    stack.extend(sub.ifs)
                    continue
                stack.extend(ast.iter_child_nodes(sub))

    def _name(self, node: ast.Name, scope: _Scope) -> None:
        name = node.id
        if name in scope.locals or name in ("self", "torch", "ops", "__torch__", "CONSTANTS",
                                            "inf", "nan", "infj", "nanj"):
            return
        if name in DENIED:
            self.refuse(scope.fn, node, name, DENIED[name])
        if name in ALLOWED_BUILTINS or name in TYPE_NAMES:
            return
        self.refuse(scope.fn, node, _shown(name), "is not on the allow-list")

    def _namespace(self, path: str, scope: _Scope, node: ast.AST) -> None:
        """``torch.X``, ``torch.ops.NS.X``, ``ops.NS.X`` (called or referenced)."""
        parts = path.split(".")
        if parts[0] == "torch" and len(parts) > 1 and parts[1] == "ops":
            parts = parts[1:]
        if parts[0] == "torch":
            if len(parts) != 2:
                self.refuse(scope.fn, node, _shown(path), "is not on the allow-list")
            self._operator("aten", parts[1], scope, node)
            return
        if len(parts) != 3:  # ops.NS alone, or deeper
            self.refuse(scope.fn, node, _shown(path), "is not an operator on the allow-list")
        ns, op = parts[1], parts[2]
        if ns == "aten":
            self._operator("aten", op, scope, node)
        elif ns == "prim":
            self._operator("prim", op, scope, node)
        elif ns == "profiler":
            self.refuse(scope.fn, node, f"profiler::{op}", "is a profiler hook")
        else:
            self.refuse(scope.fn, node, f"{ns}::{op}",
                        f"is from the custom operator namespace {ns!r} (native code outside the "
                        "allow-list)")

    def _operator(self, ns: str, op: str, scope: _Scope, node: ast.AST) -> None:
        if op in DENIED:
            self.refuse(scope.fn, node, f"{ns}::{op}", DENIED[op])
        allowed = ALLOWED_ATEN if ns == "aten" else ALLOWED_PRIM
        if op not in allowed:
            self.refuse(scope.fn, node, f"{ns}::{_shown(op)}", "is not on the allow-list")
        self.operators.add(f"{ns}::{op}")

    def _method(self, name: str, scope: _Scope, node: ast.AST) -> None:
        if name in ("__setstate__", "__getstate__"):
            self.refuse(scope.fn, node, f"the method {name}", "only the loader may call (calling "
                                                              "it would change the model's state)")
        if name in DENIED:
            self.refuse(scope.fn, node, f"the method {name}", DENIED[name])
        if name in ALLOWED_ATEN:
            self.operators.add(f"aten::{name}")
            return
        if name in self.member_names:
            if name in _registered_operator_names():
                self.refuse(scope.fn, node, f"the method {name}",
                            "shares its name with an operator outside the allow-list")
            return
        self.refuse(scope.fn, node, f"the method {_shown(name)}", "is not on the allow-list")

    def _attribute(self, node: ast.Attribute, scope: _Scope, stack: list[ast.AST]) -> None:
        path = _dotted(node)
        root = path.split(".", 1)[0] if path else None
        if path and root in ("torch", "ops") and root not in scope.locals:
            self._namespace(path, scope, node)
            return
        if path and root == "__torch__":
            self._check_defined(path, scope.fn, scope.fn.file, node)
            return
        if path and root == "CONSTANTS":
            return
        if node.attr in DENIED_ATTRIBUTES:
            self.refuse(scope.fn, node, f"the attribute {node.attr}", DENIED[node.attr], verb="reads")
        stack.append(node.value)

    def _call(self, node: ast.Call, scope: _Scope, training_branch: bool,
              stack: list[ast.AST]) -> None:
        func = node.func
        path = _dotted(func)
        args = list(node.args) + [k.value for k in node.keywords]
        op_name: str | None = None
        receiver: ast.AST | None = None
        if path is not None and "." not in path:
            name = path
            if name in scope.locals:
                pass  # a function value the code built from checked references
            elif name in DENIED:
                self.refuse(scope.fn, node, name, DENIED[name])
            elif name not in ALLOWED_BUILTINS and name not in TYPE_NAMES:
                self.refuse(scope.fn, node, _shown(name), "is not on the allow-list")
            elif name in ("annotate", "unchecked_cast", "uninitialized", "isinstance"):
                types = node.args[1:2] if name == "isinstance" else node.args[:1]
                for t in types:
                    self._check_type(t, scope.fn.file, owner=scope.fn.qualname)
                args = [a for a in args if not any(a is t for t in types)]
            elif name in ("getattr", "hasattr"):
                if len(node.args) < 2 or not (isinstance(node.args[1], ast.Constant)
                                              and isinstance(node.args[1].value, str)):
                    self.refuse_code(scope.fn, node, f"calls {name} with a computed name")
                attr = node.args[1].value
                target = _dotted(node.args[0])
                if target and target.split(".")[0] in ("torch", "ops", "__torch__"):
                    self.refuse(scope.fn, node, f"{name}({target}, {attr!r})",
                                "looks up an operator by name")
                if attr in DENIED:
                    self.refuse(scope.fn, node, f"the attribute {attr}", DENIED[attr], verb="reads")
                if (attr in _registered_operator_names() and attr not in ALLOWED_ATEN
                        and attr not in self.member_names):
                    self.refuse(scope.fn, node, f"{name}(..., {attr!r})",
                                "names an operator outside the allow-list")
        elif path is not None and path.split(".", 1)[0] in ("torch", "ops") \
                and path.split(".", 1)[0] not in scope.locals:
            self._namespace(path, scope, func)
            op_name = path.rsplit(".", 1)[-1]
            receiver = node.args[0] if node.args else None
        elif path is not None and path.startswith("__torch__."):
            self._check_defined(path, scope.fn, scope.fn.file, func)
        elif isinstance(func, ast.Attribute):
            self._method(func.attr, scope, func)
            op_name = func.attr if func.attr in ALLOWED_ATEN else None
            receiver = func.value
            stack.append(func.value)
        else:
            stack.append(func)  # calling a value: a subscripted module list, a returned function
        outs = [k.value for k in node.keywords if k.arg == "out"]
        if op_name is not None and not training_branch and (receiver is not None or outs):
            mutates = (op_name.endswith("_") and not op_name.endswith("__")) \
                or op_name in _LIST_MUTATORS
            targets = ([receiver] if mutates and receiver is not None else []) + outs
            if any(self._is_state(t, scope) for t in targets):
                self.refuse_code(scope.fn, node, f"changes the model's own state in place "
                                                 f"({op_name}): a model may not keep state "
                                                 "between calls")
        stack.extend(args)


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
limits = json.loads(sys.argv[5])
try:
    import resource, signal
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # a file write ends the probe, visibly
except Exception:
    pass
sys.path[:] = json.loads(sys.argv[1])
path, shape, batches = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
import warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
m = torch.jit.load(path, map_location="cpu")
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

_SIGNAL_HINTS = {"SIGXFSZ": "it tried to write a file", "SIGKILL": "killed, out of memory?",
                 "SIGSEGV": "a segmentation fault", "SIGABRT": "aborted",
                 "SIGBUS": "a bus error"}


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
                      shown: object | None = None) -> str:
    """Load the archive and run a forward pass in a child process first.

    The child starts with no environment but a few thread settings, an empty temporary working
    directory, no right to write file data (``RLIMIT_FSIZE`` 0), no core dumps and a memory cap.
    Returns "ok", "loaded" (no input shape known, or the forward raised a Python error that the
    caller's own checks will report), and raises :class:`TrojanscanError` when loading fails,
    the child crashes, or loading or the forward outlives its budget.
    """
    shown = path if shown is None else shown
    shape: list[int] = []
    if input_shape is not None and all(isinstance(s, int) and s > 0 for s in input_shape):
        biggest = max(PROBE_BATCH_SIZES) * math.prod(input_shape)
        if biggest <= PROBE_MAX_INPUT_ELEMENTS:
            shape = [int(s) for s in input_shape]
    limits = {"RLIMIT_FSIZE": 0, "RLIMIT_CORE": 0,
              "RLIMIT_AS": PROBE_MEMORY_BYTES + 4 * path.stat().st_size}
    with tempfile.TemporaryDirectory(prefix="trojanscan-probe-") as work:
        env = {"PATH": os.defpath, "HOME": work, "TMPDIR": work, "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "LC_ALL": "C"}
        cmd = [sys.executable, "-I", "-B", "-c", _PROBE, json.dumps(sys.path), str(path.resolve()),
               json.dumps(shape), json.dumps(list(PROBE_BATCH_SIZES)), json.dumps(limits)]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
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
                budget = PROBE_LOAD_BUDGET_S if stage == "start" else PROBE_CALL_BUDGET_S
                try:
                    line = lines.get(timeout=budget)
                except queue.Empty:
                    if stage == "start":
                        raise refused(shown, f"loading it did not finish within {budget:g} s "
                                             "(in a separate process; PROBE_LOAD_BUDGET_S)") from None
                    raise refused(shown, f"its forward did not return within {budget:g} s on a "
                                         f"batch of {batch} inputs of shape {tuple(shape)} (in a "
                                         "separate process; PROBE_CALL_BUDGET_S): a model that "
                                         "hangs would hang the scan") from None
                if line is None:
                    break
                if line == "loaded":
                    stage = "loaded"
                elif line.startswith("call "):
                    stage, batch = "call", int(line.split()[1])
                elif line == "ok":
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
            return "ok"
        code = proc.returncode
        if code is not None and code < 0:
            name = _signal_name(-code)
            hint = _SIGNAL_HINTS.get(name, "")
            when = "loading it" if stage == "start" else "running it"
            raise refused(shown, f"{when} crashed a separate process ({name}"
                                 f"{': ' + hint if hint else ''})")
        if stage == "start":
            raise TrojanscanError(f"{shown}: not a loadable TorchScript archive "
                                  f"({_last_error(bytes(err))})")
        return "loaded"


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

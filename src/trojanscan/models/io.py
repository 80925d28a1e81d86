"""Safe saving and loading of models: TorchScript, safetensors bundles, weights-only checkpoints, ONNX.

A scanner is fed models from strangers, so every file is untrusted and goes through the policy in
:mod:`trojanscan.models.trust` first: a TorchScript archive's code is inspected against an
allow-list of side-effect-free operators and probed in a child process before TorchScript's own
loader sees it, a safetensors header is bounded and checked before the safetensors library parses
it, a pickle checkpoint is opened with ``torch.load(weights_only=True)`` or refused, and an ONNX
file is checked and converted by trojanscan's own converter (:mod:`trojanscan.models.onnx_import`).
``load_model(path, trusted=True)`` skips the TorchScript inspection for a user's own model, and
the result says so (:attr:`LoadedModel.trusted`, :attr:`LoadedModel.checked`).

Weights-only files come as people save them: a checkpoint's weights are found under ``state_dict``,
``model_state_dict``, ``model`` or ``net`` (or are the whole file), ``module.`` / ``_orig_mod.``
prefixes (DataParallel, ``torch.compile``) are removed, and they are loaded into a reference
architecture by name or into the caller's own ``nn.Module`` class (``package.module:Class``: only
that module, named by the caller, is imported; a name inside a file is never imported).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from trojanscan.errors import TrojanscanError
from trojanscan.fileio import parse_json, sha256_file
from trojanscan.models import onnx_import, trust
from trojanscan.models.architectures import ARCHITECTURES, ArchSpec, ReferenceNet, build_model
from trojanscan.models.quantised import STEP_SUFFIX, dequantised_state, quantised_state

FORMAT_VERSION = "1"
MAX_NUM_CLASSES = 100_000  # what a file's metadata may claim
MAX_INPUT_DIM = 4096  # each of C, H, W
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")
META_FILE = "trojanscan.json"  # the metadata entry inside a TorchScript archive
ONNX_META_KEY = "trojanscan"  # the metadata_props entry of an ONNX model trojanscan wrote
WEIGHTS_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where training scripts keep them
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ARCH_HELP = (f"architecture of a weights-only checkpoint or safetensors file: {', '.join(ARCHITECTURES)}, "
             "or your own nn.Module class as package.module:Class (only that module is imported; "
             "the class is built with no arguments)")

ArchLike = str | type[nn.Module] | nn.Module  # a reference name, package.module:Class, a class or module


def _architectures_hint() -> str:
    return f"architectures: {', '.join(ARCHITECTURES)}, or package.module:Class for your own nn.Module"


@dataclass
class LoadedModel:
    """A model read from disk, in eval mode, with what the file said about it.

    It is called like the network (``loaded(x)``), and the network's attributes (``eval``, ``to``,
    ``parameters`` …) are reached through it; the ``nn.Module`` itself is :attr:`module`.
    """

    module: nn.Module
    path: Path
    format: str  # "torchscript" | "safetensors" | "checkpoint" | "onnx"
    sha256: str
    spec: ArchSpec | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    trusted: bool = False  # the caller vouched for the file (load_model(..., trusted=True))
    checked: bool = True  # its contents passed the trust policy's checks before it was loaded
    inspection: dict[str, Any] | None = None  # what the TorchScript inspection and probe saw

    @property
    def trust_label(self) -> str:
        """``"checked"``, ``"trusted, checked"`` or ``"trusted, unchecked"``: for results/reports."""
        if not self.trusted:
            return "checked"
        return "trusted, checked" if self.checked else "trusted, unchecked"

    def trust_record(self) -> dict[str, Any]:
        """``{"trusted", "checked", "trust"}`` (and the inspection summary) for a result JSON."""
        record: dict[str, Any] = {"trusted": self.trusted, "checked": self.checked,
                                  "trust": self.trust_label}
        if self.inspection is not None:
            record["inspection"] = self.inspection
        return record

    @property
    def num_classes(self) -> int | None:
        return self.spec.num_classes if self.spec else self.metadata.get("num_classes")

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        if self.spec:
            return self.spec.input_shape
        shape = self.metadata.get("input_shape")
        return tuple(shape) if shape else None  # type: ignore[return-value]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names LoadedModel itself lacks
        if name == "module" or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


def _spec_of(model: nn.Module) -> ArchSpec | None:
    return model.spec if isinstance(model, ReferenceNet) else None


def save_model(model: nn.Module, path: str | os.PathLike,
               metadata: dict[str, Any] | None = None, int8_steps: dict[str, float] | None = None) -> Path:
    """Save to ``.safetensors`` (a reference net's weights + architecture), TorchScript (``.pt``) or,
    for a model read from ONNX, ``.onnx`` (the file's graph with the current weights).

    ``metadata`` (JSON-serialisable) travels inside the file either way. ``int8_steps`` names the
    state entries that are 8-bit quantised (with their steps): ``.safetensors`` stores them as
    integers and steps (:mod:`trojanscan.models.quantised`), TorchScript as the floats they stand for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = _spec_of(model)
    meta = dict(metadata or {})
    if spec is not None:
        meta.update(spec.to_dict())
    meta["format_version"] = FORMAT_VERSION
    tmp = path.with_name(f".{path.name}.tmp")
    was_training = model.training
    model.eval()
    try:
        check_save_target(model, path)
        if isinstance(model, onnx_import.OnnxModel):
            tmp.write_bytes(model.to_onnx({ONNX_META_KEY: json.dumps(meta)}))
        elif path.suffix == ".safetensors":
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            if int8_steps:
                tensors, meta["quantisation"] = quantised_state(tensors, int8_steps)
            save_file(tensors, str(tmp), metadata={"trojanscan": json.dumps(meta)})
        elif path.suffix in TORCHSCRIPT_SUFFIXES:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, still our format
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = (model if isinstance(model, torch.jit.ScriptModule)
                            else torch.jit.script(model))
            scripted.save(str(tmp), _extra_files={META_FILE: json.dumps(meta)})
        else:
            raise TrojanscanError(
                f"{path}: unknown model format; use .safetensors, .onnx or a TorchScript suffix "
                f"({', '.join(TORCHSCRIPT_SUFFIXES)})")
        os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:  # a full disk names the file we write
        if isinstance(e, RuntimeError) and "PytorchStreamWriter" not in str(e):
            raise  # TorchScript's compiler, not the disk
        raise OSError(getattr(e, "errno", None), getattr(e, "strerror", None) or trust._shown(e, 160),
                      str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def check_save_target(model: nn.Module, path: str | os.PathLike) -> None:
    """Refuse, before any work, a format that cannot hold ``model``: safetensors holds a built-in
    architecture; ``.onnx`` is written for a model read from ONNX (its graph with the new weights),
    and such a model is written only as ``.onnx``."""
    path = Path(path)
    onnx_model = isinstance(model, onnx_import.OnnxModel)
    if path.suffix == ".safetensors" and _spec_of(model) is None and not onnx_model:
        raise TrojanscanError(f"{path}: safetensors holds weights of a built-in architecture only; save "
                              "this model as TorchScript (.pt) instead")
    if path.suffix == ".onnx" and not onnx_model:
        raise TrojanscanError(f"{path}: only a model read from an ONNX file is saved as .onnx (its graph "
                              "with the new weights); save this one as .safetensors or .pt")
    if onnx_model and path.suffix != ".onnx":
        raise TrojanscanError(f"{path}: a model read from ONNX is saved as .onnx (its graph with the new "
                              "weights); name the output .onnx")


def _spec_from_meta(meta: dict[str, Any], path: Path) -> ArchSpec:
    """The architecture a file's metadata states, with its claims bounded (a file may lie)."""
    try:
        num_classes = int(meta["num_classes"])
        shape = meta["input_shape"]
        if not isinstance(shape, (list, tuple)) or len(shape) > 4:
            raise ValueError("input_shape")
        input_shape = tuple(int(s) for s in shape)
        mean, std = meta["mean"], meta["std"]
        if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)) or max(
                len(mean), len(std)) > MAX_INPUT_DIM:
            raise ValueError("mean/std")
        spec = ArchSpec(str(meta["arch"]), num_classes, input_shape,  # type: ignore[arg-type]
                        [float(m) for m in mean], [float(s) for s in std])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise TrojanscanError(f"{path}: model metadata is incomplete ({e!r} missing or bad)") from None
    if not 1 <= num_classes <= MAX_NUM_CLASSES:
        raise trust.refused(path, f"its metadata claims {trust._shown(num_classes, 40)} classes "
                                  f"(limit {MAX_NUM_CLASSES})")
    if not all(1 <= s <= MAX_INPUT_DIM for s in input_shape):
        raise trust.refused(path, f"its metadata claims input shape "
                                  f"{trust._shown(input_shape, 60)} (each dimension 1..{MAX_INPUT_DIM})")
    return spec


def _build(spec: ArchSpec, path: Path) -> nn.Module:
    try:
        return build_model(spec.arch, spec.num_classes, spec.input_shape, spec.mean, spec.std)
    except TrojanscanError as e:
        raise TrojanscanError(f"{path}: {e}") from None
    except (RuntimeError, MemoryError, ValueError, OverflowError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(f"{path}: cannot build architecture {spec.arch!r} from the file's "
                              f"metadata ({trust._shown(first, 120)})") from None


def _build_and_fill(spec: ArchSpec, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Build the stated architecture and load the file's weights into it.

    The architecture is first built on the meta device (no memory) and its tensor shapes compared
    with the file's, so metadata that claims a huge network is refused before anything is
    allocated: the real network is then no larger than the weights the file holds.
    """
    _check_skeleton(spec, state, path)
    return _fill(_build(spec, path), state, f"architecture {spec.arch!r}", path)


def _check_skeleton(spec: ArchSpec, state: dict[str, torch.Tensor], path: Path) -> None:
    """Compare ``state``'s keys and shapes with the architecture built on the meta device."""
    try:
        with torch.device("meta"):
            skeleton = build_model(spec.arch, spec.num_classes, spec.input_shape, spec.mean, spec.std)
    except TrojanscanError as e:
        raise TrojanscanError(f"{path}: {e}") from None
    except Exception:  # an architecture that cannot be built on the meta device: the checks after
        return
    _check_fit(skeleton, state, f"architecture {spec.arch!r}", path)


def _misfit(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...] | None]) -> str | None:
    """What keeps ``state`` out of a module with ``expected`` keys and shapes, or None if it fits."""
    def keys(names: list[str]) -> str:
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        return ", ".join(trust._shown(k, 60) for k in names[:4]) + more
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    parts = ([f"missing key(s) {keys(missing)}"] if missing else []) + (
        [f"unexpected key(s) {keys(unexpected)}"] if unexpected else [])
    wrong = sorted(k for k in set(expected) & set(state)
                   if expected[k] is not None and tuple(state[k].shape) != expected[k])
    if wrong and not parts:
        parts.append(f"size mismatch for {trust._shown(wrong[0], 60)}: the file has shape "
                     f"{tuple(state[wrong[0]].shape)}, the architecture {expected[wrong[0]]}")
    return "; ".join(parts) or None


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...] | None]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None
            for k, v in module.state_dict().items()}


def _check_fit(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Refuse weights that do not fit ``module``, naming the missing and unexpected keys; for a
    reference architecture, say which one they do fit, if any."""
    detail = _misfit(state, _shapes(module))
    if detail is None:
        return
    fits = [name for name in ARCHITECTURES if what != f"architecture {name!r}"
            and (keys := _reference_keys(name)) is not None and keys == set(state)]
    hint = f"; they fit --arch {fits[0]}" if fits else f"; {_architectures_hint()}"
    raise TrojanscanError(f"{path}: weights do not fit {what} ({detail}){hint}")


def _reference_keys(arch: str) -> set[str] | None:
    """The state_dict keys of a reference architecture (they do not depend on its sizes)."""
    try:
        with torch.device("meta"):
            return set(build_model(arch, 2, (1, 32, 32)).state_dict())
    except Exception:  # an architecture that cannot be built at that size: no suggestion
        return None


def _fill(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> nn.Module:
    """Load ``state`` into ``module`` (strictly), or refuse in one line."""
    _check_fit(module, state, what, path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise TrojanscanError(f"{path}: weights do not fit {what} ({trust._shown(detail, 160)})") from None
    return module


def import_architecture(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class a caller names as ``package.module:Class``.

    Only ``package.module`` is imported, with the caller's own ``sys.path``: it is the caller's
    code, named by them (a name written inside a model file is never imported).

    Raises:
        TrojanscanError: the name is malformed, the module cannot be imported, or the attribute is
            not an ``nn.Module`` subclass.
    """
    if not IMPORT_PATH.fullmatch(name):
        raise TrojanscanError(f"--arch {trust._shown(name, 80)!r}: not an architecture; "
                              f"{_architectures_hint()}")
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = _import_user_module(module_name)
    except Exception as e:  # the user's module failed: one line, not its traceback
        raise TrojanscanError(f"--arch {name}: cannot import {module_name} ({type(e).__name__}: "
                              f"{trust._shown(e, 120)}); make it importable (pip install -e ., or "
                              "PYTHONPATH)") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise TrojanscanError(f"--arch {name}: {attr} in {module_name} is not an nn.Module class")
    return obj


def _import_user_module(module_name: str) -> Any:
    """Import the caller's module; one in the working directory is found as ``python -m`` would
    (the ``trojanscan`` command, unlike ``python``, does not put the working directory on the path)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.split(".")[0]
        here = Path.cwd()
        if e.name != top or not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
            raise
    sys.path.insert(0, str(here))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(here))


def _user_module(arch: ArchLike, path: Path) -> tuple[nn.Module, str]:
    """The caller's own network for a weights-only file, and its name for messages and metadata."""
    if isinstance(arch, nn.Module):
        return arch, f"{type(arch).__module__}:{type(arch).__qualname__}"
    cls = import_architecture(arch) if isinstance(arch, str) else arch
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TrojanscanError(f"arch must be an architecture name, package.module:Class, an nn.Module "
                              f"class or an nn.Module, got {type(arch).__name__}")
    label = f"{cls.__module__}:{cls.__qualname__}"
    try:
        return cls(), label
    except Exception as e:  # the user's constructor: one line
        raise TrojanscanError(f"{path}: cannot build {label} with no arguments ({type(e).__name__}: "
                              f"{trust._shown(e, 120)}); give its arguments defaults, or in Python pass "
                              "an instance: load_model(path, arch=MyNet(...))") from None


def _load_safetensors(copy: Path, path: Path, arch: ArchLike | None,
                      input_shape: tuple[int, ...] | None) -> tuple[nn.Module, ArchSpec | None, dict]:
    header = trust.check_safetensors(copy, path)  # bounded header, dtypes, offsets: before the library
    raw = (header.get("__metadata__") or {}).get("trojanscan")
    try:
        state = load_file(str(copy))
    except (SafetensorError, OSError, ValueError) as e:
        raise TrojanscanError(f"{path}: corrupt safetensors file ({trust._shown(e, 160)})") from None
    if raw is None:
        if arch is None:
            raise TrojanscanError(
                f"{path}: safetensors file has no trojanscan metadata (architecture name); pass its "
                f"architecture with --arch ({_architectures_hint()})")
        return _from_state(_strip_prefixes(state), {}, arch, input_shape, path)
    meta = _parse_meta(raw, path)
    spec = _spec_from_meta(meta, path)
    if "quantisation" in meta:  # int8 codes and steps back to the float weights they stand for
        # shapes first: the float weights take 4x the codes' memory
        _check_skeleton(spec, {k: v for k, v in state.items() if not k.endswith(STEP_SUFFIX)}, path)
        state = dequantised_state(state, meta["quantisation"], path)
    if isinstance(arch, str) and arch != spec.arch:  # the user believes it is another net: say so
        raise TrojanscanError(f"{path}: the file records architecture {spec.arch!r}, not --arch {arch!r}; "
                              "leave --arch out for a file that records its own")
    return _build_and_fill(spec, state, path), spec, meta


def _load_onnx(copy: Path, path: Path, input_shape: tuple[int, ...] | None
               ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """An ONNX file through trojanscan's own converter (:mod:`trojanscan.models.onnx_import`), with
    the trojanscan metadata a repaired or attacked model carries in its ``metadata_props``."""
    module, meta, props, inspection = onnx_import.load_onnx(copy, path, input_shape)
    if ONNX_META_KEY in props:
        meta = {**meta, **_parse_meta(props[ONNX_META_KEY], path)}
    return module, meta, inspection


def _jit_load(path: Path, shown: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # TorchScript raises many types for a bad archive
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(f"{shown}: not a loadable TorchScript archive "
                              f"({trust._shown(msg, 160)})") from None


def _probe_shape(input_shape: tuple[int, ...] | None, meta: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape to probe the model with: the caller's data's, else the one the file states."""
    shape = input_shape if input_shape is not None else meta.get("input_shape")
    if (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in shape)):
        return tuple(shape)
    return None


def _load_torchscript(copy: Path, path: Path, input_shape: tuple[int, ...] | None,
                      trusted: bool) -> tuple[nn.Module, dict, dict[str, Any] | None]:
    """Inspect (unless trusted), probe in a confined child process, then load ``copy``, the
    private copy of ``path``.

    Returns the module, its trojanscan metadata and what the inspection and the probe saw (None
    when trusted).
    """
    if trusted:
        try:
            with trust.open_zip(copy, path) as zf:
                info = next((i for i in zf.infolist()
                             if i.filename.endswith(f"/extra/{META_FILE}")), None)
                raw = trust.read_entry(zf, info, trust.MAX_EXTRA_BYTES, path) if info else b""
        except TrojanscanError:
            raw = b""  # trusted: the metadata is a convenience, the loader decides
        module = _jit_load(copy, path)
        meta = _parse_meta(raw, path) if raw else {}
        return module, meta, None
    inspection = trust.inspect_torchscript(copy, path, META_FILE)
    meta = _parse_meta(inspection.metadata, path) if inspection.metadata else {}
    probe = trust.probe_torchscript(copy, _probe_shape(input_shape, meta), path)
    module = _jit_load(copy, path)
    return module, meta, {**inspection.to_dict(), "probe": probe.to_dict()}


def _parse_meta(raw: str | bytes, path: Path) -> dict[str, Any]:
    meta = parse_json(raw, path, "trojanscan metadata")
    if not isinstance(meta, dict):
        raise TrojanscanError(f"{path}: its trojanscan metadata is not a JSON object")
    return meta


def _is_state(obj: Any) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _plain(value: Any) -> bool:
    """A metadata value worth keeping: a number or text, or a list of them (not tensors, not state)."""
    scalar = (str, int, float, bool)
    return isinstance(value, scalar) or (isinstance(value, (list, tuple)) and len(value) <= MAX_INPUT_DIM
                                         and all(isinstance(v, scalar) for v in value))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefix every one of them carries from a wrapper (``module.``, ``_orig_mod.``)."""
    for _ in range(4):  # a compiled DataParallel model has two
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _weights_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict in a checkpoint as training scripts save it (the whole file, or under
    :data:`WEIGHTS_KEYS`, such as ``{"state_dict": ..., "epoch": 3}``) and the plain values
    beside it."""
    meta: dict[str, Any] = {}
    for _ in range(3):  # {"model": {"state_dict": ...}} at most
        key = None if _is_state(obj) or not isinstance(obj, dict) else next(
            (k for k in WEIGHTS_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        meta = {**{k: v for k, v in obj.items() if isinstance(k, str) and k not in WEIGHTS_KEYS
                   and _plain(v)}, **meta}
        obj = obj[key]
    if not _is_state(obj):
        found = (f"its keys: {', '.join(trust._shown(k, 40) for k in list(obj)[:6])}"
                 if isinstance(obj, dict) and obj else f"it holds {type(obj).__name__}")
        raise TrojanscanError(f"{path}: checkpoint is not a state_dict of tensors ({found}); the weights "
                              f"are looked for under {', '.join(WEIGHTS_KEYS)} or as the whole file")
    return _strip_prefixes(obj), meta


def _from_state(state: dict[str, torch.Tensor], meta: dict[str, Any], arch: ArchLike | None,
                input_shape: tuple[int, ...] | None,
                path: Path) -> tuple[nn.Module, ArchSpec | None, dict[str, Any]]:
    """Weights without code, loaded into the caller's own class (``arch``: package.module:Class,
    a class or a module) or into a reference architecture (``arch`` or the file's name for it)."""
    if arch is not None and not (isinstance(arch, str) and ":" not in arch):
        module, label = _user_module(arch, path)
        return _fill(module, state, label, path), None, {**meta, "arch": label}
    if arch is not None:
        meta["arch"] = arch
    if "arch" not in meta:
        raise TrojanscanError(
            f"{path}: a weights-only checkpoint needs its architecture: pass --arch NAME "
            f"({_architectures_hint()}) or convert the model to TorchScript")
    name = str(meta["arch"])
    if name not in ARCHITECTURES:  # the file's own name for it is never imported
        raise TrojanscanError(f"{path}: unknown architecture {trust._shown(name, 60)!r}; "
                              f"{_architectures_hint()}")
    # a bare state_dict of a reference net tells its classes and normalisation itself
    if "classifier.weight" in state:
        meta.setdefault("num_classes", int(state["classifier.weight"].shape[0]))
    if "normalize.mean" in state and "normalize.std" in state:
        meta.setdefault("mean", state["normalize.mean"].flatten().tolist())
        meta.setdefault("std", state["normalize.std"].flatten().tolist())
    if "num_classes" not in meta:  # not a reference net's weights: say which keys do not fit
        with torch.device("meta"):
            skeleton = build_model(name, 2, (1, 32, 32))  # its keys do not depend on sizes
        _check_fit(skeleton, state, f"architecture {name!r}", path)
    if input_shape is not None:
        meta.setdefault("input_shape", list(input_shape))
    for key in ("num_classes", "input_shape", "mean", "std"):
        if key not in meta:
            fix = ("pass input_shape=(C, H, W) (the command line takes it from --data)"
                   if key == "input_shape" else "save it with trojanscan or convert the model to TorchScript")
            raise TrojanscanError(f"{path}: checkpoint lacks {key!r}; {fix}")
    spec = _spec_from_meta(meta, path)
    return _build_and_fill(spec, state, path), spec, meta


def _load_checkpoint(copy: Path, path: Path, arch: ArchLike | None,
                     input_shape: tuple[int, ...] | None) -> tuple[nn.Module, ArchSpec | None, dict]:
    trust.check_checkpoint(copy, path)  # size; for the zip format the archive limits
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4" chatter
            obj = torch.load(str(copy), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in reason if "GLOBAL" in ln or "Unsupported" in ln),
                      reason[0] if reason else "")
        # keep what it needs, not torch's advice to allow it (add_safe_globals is not ours to give)
        detail = re.split(r" (?:was not an allowed global|Please)\b", detail.removeprefix(
            "WeightsUnpickler error: "))[0]
        raise TrojanscanError(
            f"{path}: refused: this pickle checkpoint needs arbitrary code to load "
            f"({trust._shown(detail, 160)}); ask for TorchScript or safetensors, or load it "
            "yourself only if you trust its author (a whole pickled model: save its state_dict and "
            "pass its class with --arch package.module:Class)") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise TrojanscanError(f"{path}: corrupt or unknown checkpoint "
                              f"({trust._shown(e, 160)})") from None
    state, meta = _weights_of(obj, path)
    return _from_state(state, meta, arch, input_shape, path)


def sniff_model_format(path: Path, shown: object | None = None) -> str:
    """Tell the format from the file's first bytes, not its name (``shown``: the name for messages)."""
    shown = path if shown is None else shown
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            entries, cd_size, _ = trust.zip_directory_stats(path)  # before building the directory
            if entries > trust.MAX_ZIP_ENTRIES or cd_size > trust.MAX_CENTRAL_DIRECTORY_BYTES:
                raise trust.refused(shown, f"the archive has {entries} entries in a {cd_size}-byte "
                                           f"directory (limits {trust.MAX_ZIP_ENTRIES} entries, "
                                           f"{trust.MAX_CENTRAL_DIRECTORY_BYTES} bytes)")
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except TrojanscanError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
            return "corrupt"
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "checkpoint"
    if head[:1] == b"\x80":
        return "checkpoint"  # legacy (non-zip) torch.save / raw pickle
    if head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def load_model(path: str | os.PathLike, *, arch: ArchLike | None = None,
               input_shape: tuple[int, ...] | None = None, trusted: bool = False) -> LoadedModel:
    """Load a model file safely, in eval mode.

    Every file is untrusted (:mod:`trojanscan.models.trust`): a TorchScript archive is inspected
    and probed before it is loaded, and refused in one line if its code could act on the machine
    or tell a scan from deployment; a pickle checkpoint is opened only with ``weights_only``.

    Args:
        path: a TorchScript archive, a safetensors file, a weights-only checkpoint (a bare
            state_dict, or one under ``state_dict``/``model_state_dict``/``model``/``net``;
            ``module.`` prefixes are removed) or an ONNX model (converted by
            :mod:`~trojanscan.models.onnx_import`; needs the ``onnx`` extra).
        arch: for weights without trojanscan metadata, the network they belong to: a reference
            architecture's name (its classes and normalisation are read from the weights), your
            own class as ``"package.module:Class"`` (only that module is imported) or the class
            itself (built with no arguments), or an ``nn.Module`` instance to load them into.
        input_shape: (C, H, W), usually the data's: a reference net's image size, and the shape a
            TorchScript model is probed with in a child process before it is loaded.
        trusted: your own model: a TorchScript archive loads unchecked and the result says so
            (``trusted``, ``checked`` False); other formats are checked either way.

    Returns:
        A :class:`LoadedModel`: call it like the network; ``.module`` is the ``nn.Module``,
        ``.sha256``, ``.format``, ``.num_classes``, ``.input_shape`` and ``.metadata`` what the file
        says.

    Raises:
        TrojanscanError: one line naming the file: refused, corrupt, or weights that do not fit
            ``arch`` (with the missing and unexpected keys).

    Example::

        model = load_model("resnet.pth", arch="mypkg.nets:ResNet18")
        logits = model(torch.rand(8, 3, 32, 32))
    """
    path = Path(path)
    if not path.is_file():
        raise TrojanscanError(f"{path}: no such model file")
    size = path.stat().st_size
    if size > trust.MAX_MODEL_BYTES:
        raise trust.refused(path, f"the file is {size} bytes (limit {trust.MAX_MODEL_BYTES})")
    with trust.private_copy(path) as copy:  # what is checked is exactly what is loaded and hashed
        fmt = sniff_model_format(copy, path)
        if path.suffix == ".onnx" and fmt != "onnx":
            raise TrojanscanError(f"{path}: corrupt ONNX file (it does not start as an ONNX model does)")
        if path.suffix == ".safetensors" and fmt != "safetensors":
            what = {"checkpoint": "a pickle", "torchscript": "a TorchScript archive",
                    "onnx": "an ONNX model", "corrupt": "a corrupt zip archive"}.get(fmt, "something else")
            raise trust.refused(path, f"it is named .safetensors but holds {what}; a safetensors file "
                                      "starts with an 8-byte header length and a JSON header")
        spec: ArchSpec | None = None
        checked = True
        inspection: dict[str, Any] | None = None
        if fmt == "safetensors":
            module, spec, meta = _load_safetensors(copy, path, arch, input_shape)
        elif fmt == "torchscript":
            module, meta, inspection = _load_torchscript(copy, path, input_shape, trusted)
            checked = not trusted
            if "arch" in meta:
                spec = _spec_from_meta(meta, path)
        elif fmt == "checkpoint":
            module, spec, meta = _load_checkpoint(copy, path, arch, input_shape)
        elif fmt == "onnx":
            module, meta, inspection = _load_onnx(copy, path, input_shape)
        elif fmt == "corrupt":
            raise TrojanscanError(f"{path}: corrupt zip archive; not a model file trojanscan can read")
        else:
            raise TrojanscanError(
                f"{path}: not a model file trojanscan can read (TorchScript, safetensors, or a "
                "weights-only PyTorch checkpoint)")
        sha = sha256_file(copy)
    module.eval()
    return LoadedModel(module, path, fmt, sha, spec, meta, trusted=trusted, checked=checked,
                       inspection=inspection)

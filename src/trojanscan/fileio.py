"""Small file helpers shared by every command: atomic writes, content hashes, JSON results."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def hash_file_into(h: Any, path: str | os.PathLike) -> None:
    """Feed a file's bytes to a hashlib object, in chunks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_jsonable(obj: Any) -> Any:
    """Turn tensors, numpy values, paths and tuples into plain JSON types (NaN becomes null)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON result atomically, indented for people to read."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())


def module_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """Hex sha256 of tensors' shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


MAX_NPZ_MEMBER_BYTES = 1 << 30  # no trigger, calibration, filter or label file of ours comes near


def save_npz_record(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Write named plain arrays (numbers, strings, ndarrays; never objects) as an ``.npz``, atomically."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_npz_record(path: str | os.PathLike, what: str, required: Any = (), *,
                    max_member_bytes: int = MAX_NPZ_MEMBER_BYTES, fix: str = "") -> dict[str, np.ndarray]:
    """Read every member of one of our ``.npz`` records without unpickling anything.

    ``what`` names the kind of file in errors ("trigger", "STRIP calibration" …); ``required`` are
    the members it must hold; a member whose uncompressed size exceeds ``max_member_bytes`` is
    refused before it is read. Every problem is a one-line :class:`TrojanscanError` ending in
    ``fix`` (e.g. "; recalibrate").
    """
    from trojanscan.errors import TrojanscanError

    path = Path(path)
    if not path.is_file():
        raise TrojanscanError(f"{path}: no such {what} file")
    a_what = f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive")
            missing = sorted(set(required) - set(z.files))
            if missing:
                raise TrojanscanError(f"{path}: not {a_what} file (missing {', '.join(missing)}){fix}")
            for key in z.files:
                if z.zip.getinfo(f"{key}.npy").file_size > max_member_bytes:
                    raise TrojanscanError(f"{path}: member {key} is implausibly large for {a_what} "
                                          f"file{fix}")
            return {k: z[k] for k in z.files}
    except TrojanscanError:
        raise
    except Exception as e:  # numpy and zipfile raise many types for a file that is not a plain npz
        raise TrojanscanError(f"{path}: not {a_what} file ({type(e).__name__}: {e}){fix}") from None

"""Small file helpers shared by every command: atomic writes, content hashes, JSON results read
and written with caps, and the lock that gives a command an output folder to itself."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import socket
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: a lock left by a killed run must be removed by hand
    fcntl = None  # type: ignore[assignment]

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
    except OSError as e:  # a full disk says "No space left on device" without naming the file
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
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


def printable(text: object, limit: int = 120) -> str:
    """Text from a file, made safe for a one-line message: no control characters, no markup."""
    s = re.sub(r"[^\x20-\x7e]", "?", str(text)).replace("[", "(").replace("]", ")")
    return s if len(s) <= limit else s[: limit - 3] + "..."


MAX_JSON_BYTES = 1 << 20  # metadata inside a model file
MAX_JSON_DEPTH = 32  # ours nest under 10 deep
MAX_RESULT_JSON_BYTES = 64 << 20  # scan.json, mitigation.json: a few kB per label
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone; both passes are linear
_NESTING = np.zeros(256, np.int64)
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1


def json_depth(raw: str | bytes, limit: int) -> int:
    """Nesting depth of a JSON text (brackets inside strings do not count), without recursion and
    in bounded memory; counting stops at ``limit + 1``."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    data = _STRING.sub(b'""', _ESCAPE.sub(b"__", data))
    depth = deepest = 0
    for start in range(0, len(data), 1 << 20):
        levels = depth + np.cumsum(_NESTING[np.frombuffer(data, np.uint8, min(1 << 20, len(data) - start),
                                                          start)])
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if deepest > limit:
            return limit + 1
    return deepest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {printable(k, 40)!r}")
        seen[k] = v
    return seen


def parse_json(raw: str | bytes, path: object, what: str, *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a size cap, a depth cap checked first (a deep file would exhaust the
    stack), and duplicate keys refused; every problem is a one-line error naming ``path``."""
    from trojanscan.errors import TrojanscanError

    if len(raw) > max_bytes:
        raise TrojanscanError(f"{path}: refused: its {what} is {len(raw)} bytes (limit {max_bytes})")
    if json_depth(raw, max_depth) > max_depth:
        raise TrojanscanError(f"{path}: refused: its {what} nests deeper than {max_depth} levels")
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise TrojanscanError(f"{path}: its {what} is not valid JSON ({printable(e, 80)})") from None


def read_json(path: str | os.PathLike, what: str, *, max_bytes: int = MAX_RESULT_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file through :func:`parse_json`, its size checked before it is read (a missing file is
    the OSError it always was)."""
    from trojanscan.errors import TrojanscanError

    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise TrojanscanError(f"{path}: refused: its {what} is {size} bytes (limit {max_bytes})")
    return parse_json(path.read_bytes(), path, what, max_bytes=max_bytes, max_depth=max_depth)


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


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


def zip_directory_stats(path: Path) -> tuple[int, int, int]:
    """(entries, central-directory bytes, central-directory offset) from the end record, read
    before any zip parser builds the directory (so a million-entry archive costs nothing)."""
    from trojanscan.errors import TrojanscanError

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


MAX_NPZ_MEMBERS = 1000  # a dataset has 4-5 arrays, our records a few dozen


def check_npz_directory(path: str | os.PathLike, where: str | None = None) -> None:
    """Refuse an ``.npz`` whose zip directory lists more than ``MAX_NPZ_MEMBERS`` arrays, before
    numpy builds that directory in memory (a plain, non-zip ``.npy`` passes untouched)."""
    from trojanscan.errors import TrojanscanError

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    entries, cd_size, _ = zip_directory_stats(path)
    if entries > MAX_NPZ_MEMBERS or cd_size > MAX_NPZ_MEMBERS * 1024:
        raise TrojanscanError(f"{where or path}: {entries:,} arrays in a {cd_size:,}-byte directory "
                              f"(limit {MAX_NPZ_MEMBERS}); not a file trojanscan wrote or reads")


MAX_ARRAY_ENV = "TROJANSCAN_MAX_ARRAY_BYTES"
MAX_ARRAY_BYTES = 4 << 30  # one dataset array; GTSRB's training images take 0.1 GiB


def max_array_bytes() -> int:
    """The largest array a dataset or input file may hold (``TROJANSCAN_MAX_ARRAY_BYTES``)."""
    text = os.environ.get(MAX_ARRAY_ENV, "")
    return int(text) if text.isdigit() and int(text) > 0 else MAX_ARRAY_BYTES


def check_npy_header(f: Any, stored: int, where: str, max_bytes: int) -> None:
    """Refuse an ``.npy`` stream (``stored`` bytes in all) whose header declares more data than
    it holds or than ``max_bytes``, before anything is allocated. ``f`` is left past the header."""
    from trojanscan.errors import TrojanscanError

    if stored > max_bytes:
        raise TrojanscanError(f"{where}: {stored:,} bytes, over the limit of {max_bytes:,} (set "
                              f"{MAX_ARRAY_ENV} to allow more)")
    fmt = np.lib.format
    read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read_header(f, max_header_size=10_000)
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and declared > stored:
        raise TrojanscanError(f"{where}: its header declares an array of shape {shape} ({declared:,} "
                              f"bytes) but the file holds only {stored:,}; the file is damaged")


def npz_member(npz: Any, key: str, where: str, max_bytes: int | None = None) -> np.ndarray:
    """One array of an open ``np.load`` archive, after :func:`check_npy_header` on its member."""
    names = npz.zip.namelist()
    info = npz.zip.getinfo(f"{key}.npy" if f"{key}.npy" in names else key)
    with npz.zip.open(info) as f:
        check_npy_header(f, info.file_size, f"{where}[{key}]",
                         max_array_bytes() if max_bytes is None else max_bytes)
    return npz[key]


def load_npy(path: str | os.PathLike, where: str | None = None) -> np.ndarray:
    """A single-array ``.npy`` file, its header checked first; never unpickles."""
    path = Path(path)
    with open(path, "rb") as f:
        check_npy_header(f, path.stat().st_size, where or str(path), max_array_bytes())
    return np.load(path, allow_pickle=False)


CHECKSUM_MEMBER = "content_sha256"  # every record we write carries the digest of its other members


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """The digest of named arrays: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz_record(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Write named plain arrays (numbers, strings, ndarrays; never objects) as an ``.npz``, atomically,
    with the checksum of their content (``content_sha256``) that :func:`load_npz_record` checks."""
    import io

    plain = {k: np.asarray(v) for k, v in arrays.items()}
    if CHECKSUM_MEMBER in plain:
        raise ValueError(f"{CHECKSUM_MEMBER} is reserved for the record's checksum")
    buf = io.BytesIO()
    np.savez(buf, **plain, **{CHECKSUM_MEMBER: np.asarray(content_sha256(plain))})
    atomic_write_bytes(path, buf.getvalue())


def load_npz_record(path: str | os.PathLike, what: str, required: Any = (), *,
                    max_member_bytes: int = MAX_NPZ_MEMBER_BYTES, fix: str = "",
                    sealed: bool = True) -> dict[str, np.ndarray]:
    """Read every member of one of our ``.npz`` records without unpickling anything.

    ``what`` names the kind of file in errors ("trigger", "STRIP calibration" …); ``required`` are
    the members it must hold; a member whose uncompressed size exceeds ``max_member_bytes`` is
    refused before it is read; the content must match the checksum it was saved with (``sealed``:
    a record without one is refused too — state we wrote ourselves always has one; triggers, which
    people also make by hand, pass ``sealed=False`` and are checked only when they carry one).
    Every problem is a one-line :class:`TrojanscanError` ending in ``fix`` (e.g. "; recalibrate").
    A checksum catches edits and damage, not a forger who recomputes it.
    """
    from trojanscan.errors import TrojanscanError

    path = Path(path)
    if not path.is_file():
        raise TrojanscanError(f"{path}: no such {what} file")
    a_what = f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"
    try:
        check_npz_directory(path)
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
            fields = {k: npz_member(z, k, str(path), max_member_bytes) for k in z.files}
            fields.pop(CHECKSUM_MEMBER, None)
            if CHECKSUM_MEMBER in z.files:
                if str(z[CHECKSUM_MEMBER]) != content_sha256(fields):
                    raise TrojanscanError(f"{path}: its content does not match its checksum (edited or "
                                          f"damaged){fix}")
            elif sealed:
                raise TrojanscanError(f"{path}: {a_what} file without a checksum (written by hand or by "
                                      f"an older trojanscan){fix}")
            return fields
    except TrojanscanError:
        raise
    except Exception as e:  # numpy and zipfile raise many types for a file that is not a plain npz
        raise TrojanscanError(f"{path}: not {a_what} file ({type(e).__name__}: {e}){fix}") from None


LOCK_FILE = ".trojanscan.lock"
_FRESH_LOCK_S = 10.0  # an empty lock file younger than this is being written by its owner


# the temporaries of trojanscan's atomic writes: .NAME.EXT[.RANDOM].tmp, EXT one of the files it writes
# (a user's notes.tmp or an editor's swap file is left alone)
OWN_TEMPORARY = re.compile(r"^\.[^/]+\.(json|npz|html|png|md|safetensors|pt|pth)(\.[A-Za-z0-9_]+)?\.tmp$")


STALE_TEMPORARY_S = 600.0  # an atomic write's temporary untouched this long was left by a killed run


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the ``.NAME.*.tmp`` files an interrupted atomic write left in ``folder`` and in its
    subfolders that no other command holds; returns how many. A temporary written to in the last
    ``STALE_TEMPORARY_S`` seconds is left alone: a command that takes no lock (``train --out``
    into the same folder) may be writing it now."""
    removed = 0
    folders = [folder, *(d for d in folder.iterdir() if d.is_dir() and not (d / LOCK_FILE).exists())]
    now = time.time()
    for d in folders:
        for tmp in d.glob(".*.tmp"):
            try:
                stale = tmp.is_file() and now - tmp.stat().st_mtime > STALE_TEMPORARY_S
            except OSError:  # removed meanwhile by its writer
                continue
            if stale and OWN_TEMPORARY.match(tmp.name):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def _holder(path: Path) -> str:
    """Who wrote a lock file: ``pid N on HOST since HH:MM``, as far as it says."""
    try:
        pid, host, since = (path.read_text(errors="replace").split() + ["?", "?", "0"])[:3]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(since)))
    except (OSError, ValueError, OverflowError):
        return "an unknown process"
    return f"pid {printable(pid, 12)} on {printable(host, 40)} since {when}"


def _try_take_over(path: Path) -> str | None:
    """If the lock at ``path`` was left by a process that is gone, remove it and return its holder;
    ``None`` while its holder lives (it keeps an exclusive ``flock`` on the file as long as it runs)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return ""  # released meanwhile: simply try again
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # held
        info = os.fstat(fd)
        if info.st_size == 0 and time.time() - info.st_mtime < _FRESH_LOCK_S:
            return None  # just created, its owner is about to lock it and write its pid
        try:
            if os.stat(path).st_ino != info.st_ino:
                return ""  # replaced meanwhile by a live one: look again
        except FileNotFoundError:
            return ""
        holder = _holder(path)
        path.unlink()
        return holder
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike | None, what: str = "output folder", *,
                create: bool = True) -> Iterator[None]:
    """Hold ``folder`` for this command: the lock file ``.trojanscan.lock``, made with
    ``O_CREAT|O_EXCL``, names this process and is removed on exit. Another command's live lock is a
    one-line :class:`TrojanscanError`; a lock whose process is gone (killed) is taken over with a
    :class:`TrojanscanWarning`. Temporary files of interrupted writes are removed once the folder is
    held. A missing folder is created (and removed again if it is still empty at the end), or with
    ``create=False`` held as nothing, like ``None``."""
    from trojanscan.errors import TrojanscanError, TrojanscanWarning

    folder = None if folder is None else Path(folder)
    if folder is None or not (create or folder.is_dir()):
        yield
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    taken_from = ""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            previous = _try_take_over(path)
            if previous is None:
                fix = "wait for it to finish, or use another folder" + (
                    "" if fcntl else f"; if it is not running, delete {path}")
                raise TrojanscanError(f"{folder}: {what} in use by another trojanscan command "
                                      f"({_holder(path)}); {fix}") from None
            taken_from = previous or taken_from
    else:
        raise TrojanscanError(f"{folder}: could not lock the {what} ({path} keeps changing)")
    try:
        if fcntl is not None:  # blocking: only a look of _try_take_over can hold it, for a moment
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode())
        if taken_from:
            warnings.warn(f"{folder}: took over the lock of {taken_from}, which is no longer running "
                          "(killed?); its finished work is kept", TrojanscanWarning, stacklevel=3)
        remove_stale_temporaries(folder)
        yield
    finally:
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # nothing was written: leave no trace


F = TypeVar("F", bound=Callable[..., Any])


def locks_out_dir(what: str = "output folder") -> Callable[[F], F]:
    """Decorate a workflow that writes into its keyword argument ``out_dir`` (when given): the
    folder is held by :func:`folder_lock` while the workflow runs."""
    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with folder_lock(kwargs.get("out_dir"), what):
                return func(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate

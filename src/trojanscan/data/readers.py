"""On-disk dataset readers (npz, MNIST IDX, CIFAR-10 batches, GTSRB, image folders) and detection.

Every reader returns a :class:`RawData` whose images are numpy arrays N×H×W×C (uint8 0..255, or
float in [0, 1] for float .npz files) and whose labels are integer arrays; ``load_dataset`` then
validates them and turns them into tensors.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trojanscan.errors import TrojanscanError
from trojanscan.fileio import (
    MAX_ARRAY_ENV,
    check_npz_directory,
    hash_file_into,
    max_array_bytes,
    npz_member,
    sha256_file,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
ACCEPTED = (
    "a .npz file (x_train, y_train, x_test, y_test), or a folder with MNIST IDX files "
    "(train-images-idx3-ubyte[.gz], ...), CIFAR-10 python batches (data_batch_1..5, test_batch), "
    "GTSRB (Final_Training/Images, Final_Test/Images), or images in train/<class>/ and "
    "test/<class>/ (or val/<class>/)"
)
GTSRB_SIZE = 32

_IDX_FILES = {  # split -> (images base name, labels base name)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_GTSRB_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


@dataclass
class RawData:
    """What a reader found: the four arrays plus the name, hash and optional class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    source: str  # how error messages name the data
    sha256: str
    class_names: tuple[str, ...] | None = None


# --------------------------------------------------------------------------------------- hashes


def sha256_tree(root: Path, files: Iterable[Path]) -> str:
    """Hex sha256 over ``files`` sorted by path relative to ``root``: each path, size and bytes."""
    h = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in files):
        h.update(rel.encode("utf-8") + b"\0")
        h.update(path.stat().st_size.to_bytes(8, "big"))
        hash_file_into(h, path)
    return h.hexdigest()


def sha256_arrays(*arrays: np.ndarray) -> str:
    """Hex sha256 over the dtype, shape and bytes of each array."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------- digits


def read_digits() -> RawData:
    """scikit-learn's 8×8 digits as 16×16 uint8 images, split 80/20 stratified with seed 0."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = torch.from_numpy(digits.images * (255.0 / 16.0)).float().unsqueeze(1)  # N×1×8×8
    big = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    x = big.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    y = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=y
    )
    arrays = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    return RawData(*arrays, name="digits", source="digits", sha256=sha256_arrays(*arrays))


# ------------------------------------------------------------------------------------------ npz


def read_npz(path: Path) -> RawData:
    """A .npz with x_train, y_train, x_test, y_test (optionally class_names); never unpickles."""
    try:
        check_npz_directory(path)
        npz = np.load(path, allow_pickle=False)
    except TrojanscanError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise TrojanscanError(
            f"{path}: not a readable .npz file ({_one_line(e)}); save it with "
            "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise TrojanscanError(
            f"{path}: holds a single array, not an .npz archive; save it with "
            "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    with npz:
        arrays = [_npz_array(npz, path, key) for key in NPZ_KEYS]
        class_names = None
        if "class_names" in npz.files:
            names = _npz_array(npz, path, "class_names")
            if names.dtype.kind != "U" or names.ndim != 1:
                raise TrojanscanError(
                    f"{path}: 'class_names' has dtype {names.dtype} and shape {names.shape}; "
                    "it must be a 1-D array of strings, one per class"
                )
            class_names = tuple(str(n) for n in names)
    return RawData(*arrays, name=path.name, source=str(path), sha256=sha256_file(path),
                   class_names=class_names)


def _npz_array(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        found = ", ".join(npz.files) or "nothing"
        raise TrojanscanError(
            f"{path}: missing array '{key}' (found: {found}); the .npz needs x_train, y_train, "
            "x_test and y_test"
        )
    try:
        return npz_member(npz, key, str(path))
    except TrojanscanError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise TrojanscanError(
                f"{path}: array '{key}' holds Python objects (dtype=object), which only pickle "
                "can load and trojanscan never unpickles .npz files; save plain numeric arrays"
            ) from None
        raise TrojanscanError(f"{path}: cannot read array '{key}' ({_one_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise TrojanscanError(
            f"{path}: cannot read array '{key}' ({_one_line(e)}); the file is damaged"
        ) from None


# ------------------------------------------------------------------------------------------ IDX


def find_idx_dir(path: Path) -> Path | None:
    """The folder holding MNIST-style IDX files: ``path`` itself or a torchvision ``raw/`` below."""
    for cand in (path, path / "raw", path / "MNIST" / "raw", path / "FashionMNIST" / "raw"):
        if any(_idx_path(cand, base) for pair in _IDX_FILES.values() for base in pair):
            return cand
    return None


def read_idx(path: Path) -> RawData:
    """MNIST / Fashion-MNIST IDX files (plain or .gz) in a folder."""
    folder = find_idx_dir(path)
    if folder is None:
        raise TrojanscanError(f"{path}: no MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    files: list[Path] = []
    arrays: list[np.ndarray] = []
    for images_base, labels_base in _IDX_FILES.values():
        for base, magic in ((images_base, _IDX_IMAGES_MAGIC), (labels_base, _IDX_LABELS_MAGIC)):
            file = _idx_path(folder, base)
            if file is None:
                raise TrojanscanError(
                    f"{folder}: missing {base} (or {base}.gz); an IDX dataset needs the four "
                    "files train-images, train-labels, t10k-images and t10k-labels"
                )
            files.append(file)
            arr = _read_idx_file(file, magic)
            arrays.append(arr[..., None] if magic == _IDX_IMAGES_MAGIC else arr.astype(np.int64))
    return RawData(*arrays, name=path.resolve().name, source=str(path),
                   sha256=sha256_tree(folder, files))


def _idx_path(folder: Path, base: str) -> Path | None:
    dotted = base.replace("-idx", ".idx")  # Kaggle spells them train-images.idx3-ubyte
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx_file(file: Path, magic_expected: int) -> np.ndarray:
    """One IDX file (plain or gzip): the header is read first, and no more than the data it
    declares (at most ``TROJANSCAN_MAX_ARRAY_BYTES``) is ever inflated or allocated."""
    what = "images" if magic_expected == _IDX_IMAGES_MAGIC else "labels"
    try:
        with (gzip.open(file, "rb") if file.suffix == ".gz" else open(file, "rb")) as f:
            head = f.read(4)
            if len(head) < 4:
                raise TrojanscanError(f"{file}: truncated ({len(head)} bytes); download it again")
            magic = int.from_bytes(head, "big")
            if magic != magic_expected:
                raise TrojanscanError(
                    f"{file}: bad IDX magic number 0x{magic:08x}, expected 0x{magic_expected:08x} "
                    f"(uint8 {what}); is this the right file?"
                )
            ndim = magic & 0xFF
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise TrojanscanError(f"{file}: truncated inside the IDX header; download it again")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            count = math.prod(dims)  # Python integers: no overflow to 0
            if count > max_array_bytes():
                raise TrojanscanError(
                    f"{file}: the header declares {what} of shape {dims} ({count:,} bytes), over the "
                    f"limit of {max_array_bytes():,} (set {MAX_ARRAY_ENV} to allow more)"
                )
            data = f.read(count + 1)  # one byte more tells whether anything follows
    except TrojanscanError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise TrojanscanError(
            f"{file}: cannot read ({_one_line(e)}); the file is damaged, download it again"
        ) from None
    if len(data) < count:
        raise TrojanscanError(
            f"{file}: truncated: the header promises {count} bytes of {what} but only {len(data)} "
            "follow; download the file again"
        )
    if len(data) > count:
        raise TrojanscanError(f"{file}: unexpected bytes after the {what}; the file is damaged")
    return np.frombuffer(data, dtype=np.uint8, count=count).reshape(dims).copy()


# --------------------------------------------------------------------------------------- CIFAR


def _safe_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch may name: what numpy needs to rebuild arrays and scalars."""
    import codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    objects = {
        "multiarray._reconstruct": multiarray._reconstruct,
        "multiarray.scalar": multiarray.scalar,
        "numeric._frombuffer": getattr(numeric, "_frombuffer", None),
    }
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy.core.", "numpy._core."):
        for dotted, obj in objects.items():
            module, name = (prefix + dotted).rsplit(".", 1)
            if obj is not None:
                allowed[(module, name)] = obj
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> object:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise TrojanscanError(
                f"refusing to unpickle {module}.{name} from {self._source}: a CIFAR-10 batch "
                "holds only numpy arrays, lists and strings, so this file is not a genuine batch"
            )
        return obj


def load_pickle_restricted(file: Path) -> object:
    """Unpickle ``file`` allowing only numpy arrays and plain Python data (no code execution)."""
    try:
        with open(file, "rb") as f:
            return _RestrictedUnpickler(f, file).load()
    except TrojanscanError:
        raise
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError, ...
        raise TrojanscanError(
            f"{file}: not a readable CIFAR-10 python batch ({type(e).__name__}: {_one_line(e)}); "
            "download cifar-10-python.tar.gz again"
        ) from None


def find_cifar_dir(path: Path) -> Path | None:
    """The CIFAR-10 batches folder: ``path`` itself or its ``cifar-10-batches-py`` child."""
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() or (cand / "test_batch").is_file():
            return cand
    return None


def read_cifar10(path: Path) -> RawData:
    """CIFAR-10 python batches (data_batch_1..5, test_batch, optional batches.meta)."""
    folder = find_cifar_dir(path)
    if folder is None:
        raise TrojanscanError(f"{path}: no CIFAR-10 batches (data_batch_1..5, test_batch)")
    files = [folder / name for name in (*_CIFAR_TRAIN, "test_batch")]
    for file in files:
        if not file.is_file():
            raise TrojanscanError(
                f"{file}: missing; a CIFAR-10 folder needs data_batch_1..5 and test_batch"
            )
    batches = [_read_cifar_batch(file) for file in files]
    x_train = np.concatenate([b[0] for b in batches[:-1]])
    y_train = np.concatenate([b[1] for b in batches[:-1]])
    x_test, y_test = batches[-1]
    class_names = None
    meta = folder / "batches.meta"
    if meta.is_file():
        files.append(meta)
        class_names = _cifar_label_names(meta)
    return RawData(x_train, y_train, x_test, y_test, name=path.resolve().name, source=str(path),
                   sha256=sha256_tree(folder, files), class_names=class_names)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle_restricted(file)
    if not isinstance(batch, dict):
        raise TrojanscanError(f"{file}: holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise TrojanscanError(
            f"{file}: 'data' is {type(data).__name__} with shape {shape}; a CIFAR-10 batch needs "
            "N×3072 uint8 (3×32×32 channel-major rows)"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        y = np.empty(0)
    if labels is None or y.ndim != 1 or len(y) != len(data):
        raise TrojanscanError(
            f"{file}: 'labels' must be a list of {len(data)} integers, one per row of 'data'"
        )
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> N×H×W×C
    return np.ascontiguousarray(x), y


def _cifar_label_names(meta: Path) -> tuple[str, ...] | None:
    obj = load_pickle_restricted(meta)
    names = obj.get(b"label_names", obj.get("label_names")) if isinstance(obj, dict) else None
    if not isinstance(names, list):
        return None
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


# --------------------------------------------------------------------------------------- GTSRB


def find_gtsrb_root(path: Path) -> Path | None:
    """The GTSRB root (holding Final_Training/Images): ``path`` or its ``GTSRB`` child."""
    for cand in (path, path / "GTSRB"):
        if (cand / "Final_Training" / "Images").is_dir():
            return cand
    return None


def read_gtsrb(path: Path) -> RawData:
    """Official GTSRB: ROI-cropped and resized to 32×32 RGB; needs the labelled test set too."""
    root = find_gtsrb_root(path)
    if root is None:
        raise TrojanscanError(f"{path}: no GTSRB Final_Training/Images folder")
    files: list[Path] = []

    train_dir = root / "Final_Training" / "Images"
    class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise TrojanscanError(f"{train_dir}: no class folders (00000, 00001, ...)")
    x_train: list[np.ndarray] = []
    y_train: list[int] = []
    for d in class_dirs:
        gt = d / f"GT-{d.name}.csv"
        if not gt.is_file():
            raise TrojanscanError(f"{d}: missing {gt.name}, the annotations for this class")
        files.append(gt)
        for filename, box, label in _gtsrb_rows(gt):
            files.append(d / filename)
            x_train.append(_gtsrb_image(d / filename, box, gt))
            y_train.append(label)

    test_dir = root / "Final_Test" / "Images"
    if not test_dir.is_dir():
        raise TrojanscanError(
            f"{root}: GTSRB has no Final_Test/Images folder, and a dataset needs a test split; "
            "unpack GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip here"
        )
    candidates = [root / "Final_Test", test_dir, root, root.parent]
    gt_test = next((c / "GT-final_test.csv" for c in candidates
                    if (c / "GT-final_test.csv").is_file()), None)
    if gt_test is None:
        raise TrojanscanError(
            f"{root}: no GT-final_test.csv (the test labels) in Final_Test/, Final_Test/Images/ "
            "or beside the GTSRB folder; unpack GTSRB_Final_Test_GT.zip there"
        )
    files.append(gt_test)
    x_test: list[np.ndarray] = []
    y_test: list[int] = []
    for filename, box, label in _gtsrb_rows(gt_test):
        files.append(test_dir / filename)
        x_test.append(_gtsrb_image(test_dir / filename, box, gt_test))
        y_test.append(label)

    empty = np.zeros((0, GTSRB_SIZE, GTSRB_SIZE, 3), np.uint8)
    return RawData(
        np.stack(x_train) if x_train else empty, np.asarray(y_train, np.int64),
        np.stack(x_test) if x_test else empty, np.asarray(y_test, np.int64),
        name=path.resolve().name, source=str(path),
        sha256=sha256_tree(root.parent if gt_test.parent == root.parent else root, files),
    )


def _gtsrb_rows(gt: Path) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(filename, (x1, y1, x2, y2), class id) for each row of a GTSRB annotation CSV."""
    with open(gt, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=";")
        fields = [c.strip() for c in reader.fieldnames or []]
        for col in _GTSRB_COLUMNS:
            if col not in fields:
                raise TrojanscanError(
                    f"{gt}: no '{col}' column; expected the header {_GTSRB_HEADER}"
                )
        rows = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("Filename"):
                continue
            try:
                x1, y1, x2, y2, label = (int(row[c]) for c in _GTSRB_COLUMNS[1:])
            except ValueError:
                raise TrojanscanError(
                    f"{gt}: line {reader.line_num} has a non-integer ROI or ClassId "
                    f"({';'.join(row[c] for c in _GTSRB_COLUMNS)})"
                ) from None
            rows.append((row["Filename"], (x1, y1, x2, y2), label))
    return rows


def _gtsrb_image(file: Path, box: tuple[int, int, int, int], gt: Path) -> np.ndarray:
    if not file.is_file():
        raise TrojanscanError(f"{file}: listed in {gt.name} but missing")
    img = _open_image(file).convert("RGB")
    x1, y1, x2, y2 = box  # inclusive corners; clamp to the frame in case an annotation overhangs
    crop = (max(x1, 0), max(y1, 0), min(x2 + 1, img.width), min(y2 + 1, img.height))
    if crop[0] >= crop[2] or crop[1] >= crop[3]:
        raise TrojanscanError(
            f"{file}: the ROI {box} in {gt.name} is empty inside the {img.width}×{img.height} "
            "image; fix the annotation"
        )
    img = img.crop(crop).resize((GTSRB_SIZE, GTSRB_SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


# -------------------------------------------------------------------------------- image folder


def is_image_folder(path: Path) -> bool:
    """True when ``path`` has a ``train/`` folder (of class folders)."""
    return (path / "train").is_dir()


def read_image_folder(path: Path) -> RawData:
    """``train/<class>/*.png`` and ``test/<class>/`` (or ``val/``); classes are sorted names."""
    train = path / "train"
    test = next((path / s for s in ("test", "val") if (path / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise TrojanscanError(
            f"{path}: an image-folder dataset needs both train/<class>/ and test/<class>/ "
            "(or val/<class>/) folders"
        )
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise TrojanscanError(f"{train}: no class folders; expected train/<class_name>/*.png")
    index = {name: i for i, name in enumerate(classes)}
    for d in sorted(test.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and d.name not in index:
            raise TrojanscanError(
                f"{d}: class '{d.name}' is not in {train} ({', '.join(classes)}); the test "
                "classes must be among the training classes"
            )

    files: list[Path] = []
    loaded: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    expected: tuple[Path, tuple[int, int]] | None = None  # first image and its (width, height)
    all_gray = True
    for split_dir in (train, test):
        images: list[np.ndarray] = []
        labels: list[int] = []
        for name in classes:
            class_dir = split_dir / name
            paths = _image_files(class_dir) if class_dir.is_dir() else []
            if split_dir is train and not paths:
                raise TrojanscanError(
                    f"{class_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); every class needs "
                    "at least one training image"
                )
            for p in paths:
                img = _open_image(p)
                if expected is None:
                    expected = (p, img.size)
                elif img.size != expected[1]:
                    w, h = img.size
                    raise TrojanscanError(
                        f"{p}: image is {w}×{h} pixels but {expected[0]} is "
                        f"{expected[1][0]}×{expected[1][1]}; all images must be the same size "
                        "(resize them first)"
                    )
                gray = img.mode in ("1", "L", "LA")
                all_gray &= gray
                images.append(np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8))
                labels.append(index[name])
                files.append(p)
        loaded[split_dir.name] = (images, labels)

    assert expected is not None  # train has at least one image per class
    w, h = expected[1]
    channels = 1 if all_gray else 3

    def stack(images: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(images), h, w, channels), dtype=np.uint8)
        for i, a in enumerate(images):
            out[i] = a[..., None] if a.ndim == 2 else a  # gray broadcasts to RGB when mixed
        return out

    (xtr, ytr), (xte, yte) = loaded[train.name], loaded[test.name]
    return RawData(stack(xtr), np.asarray(ytr, np.int64), stack(xte), np.asarray(yte, np.int64),
                   name=path.resolve().name, source=str(path), sha256=sha256_tree(path, files),
                   class_names=tuple(classes))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _open_image(file: Path) -> Image.Image:
    try:
        with Image.open(file) as img:
            img.load()
            return img
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise TrojanscanError(
            f"{file}: cannot decode the image ({_one_line(e)}); replace or remove it"
        ) from None


# ------------------------------------------------------------------------------------ dispatch


READERS = {
    "npz": read_npz,
    "gtsrb": read_gtsrb,
    "cifar10": read_cifar10,
    "idx": read_idx,
    "imagefolder": read_image_folder,
}


def detect_format(path: Path) -> str:
    """The format of a file or folder: one of the keys of :data:`READERS`."""
    if not path.exists():
        raise TrojanscanError(
            f"{path}: no such file or directory; pass a .npz file, a dataset folder, or one of "
            "the names digits, mnist, fashion_mnist, gtsrb"
        )
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise TrojanscanError(
            f"{path}: unsupported file type '{path.suffix or path.name}'; accepted: {ACCEPTED}"
        )
    if find_gtsrb_root(path) is not None:
        return "gtsrb"
    if find_cifar_dir(path) is not None:
        return "cifar10"
    if find_idx_dir(path) is not None:
        return "idx"
    if is_image_folder(path):
        return "imagefolder"
    raise TrojanscanError(
        f"{path}: not a dataset folder trojanscan recognises; accepted: {ACCEPTED}"
    )


def read_path(path: str | os.PathLike) -> RawData:
    """Detect the format of a file or folder and read it."""
    path = Path(path)
    return READERS[detect_format(path)](path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

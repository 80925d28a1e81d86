"""The :class:`Dataset` container, array validation, the data folder and :func:`load_dataset`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trojanscan.data import readers
from trojanscan.errors import TrojanscanError

DATA_DIR_ENV = "TROJANSCAN_DATA_DIR"
NAMED_DATASETS = {  # accepted name -> folder and file stem under the data folder
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "gtsrb": "gtsrb",
}


@dataclass(eq=False, repr=False)
class Dataset:
    """A train/test image-classification dataset as float tensors in [0, 1], N×C×H×W."""

    x_train: torch.Tensor  # float32, N×C×H×W, values in [0, 1]
    y_train: torch.Tensor  # int64, N
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str  # e.g. "digits", "mnist", "mnist.npz", a folder's name
    sha256: str  # identifies the source content (file bytes, folder files, or digits arrays)
    class_names: tuple[str, ...] | None = None  # when the source names its classes
    # data given in memory: num_classes is the largest label + 1, and a model with more outputs sets it
    classes_from_labels: bool = False

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return (f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"image={c}×{h}×{w}, num_classes={self.num_classes}, sha256={self.sha256[:12]}…)")


def default_data_dir() -> Path | None:
    """$TROJANSCAN_DATA_DIR if it is a folder, else ``shared/data`` beside the repo, else None.

    The repository root is the nearest folder above this file holding ``pyproject.toml`` or
    ``.git``; ``Path.cwd().parent / "shared" / "data"`` is tried last.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env and Path(env).expanduser().is_dir():
        return Path(env).expanduser()
    candidates = []
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() or (parent / ".git").exists():
            candidates.append(parent.parent / "shared" / "data")
            break
    candidates.append(Path.cwd().parent / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def validate_arrays(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, *, source: str, num_classes: int | None = None) -> int:
    """Check a dataset's arrays and return its number of classes.

    Images must be N×H×W×C (C = 1 or 3) or N×H×W, uint8 or float in [0, 1], with the same image
    shape and dtype kind in both splits; labels 1-D integers, one per image, in 0..num_classes-1
    (num_classes defaults to the largest label + 1), and every class needs a training image.
    Raises :class:`TrojanscanError` with a one-line message starting with ``source``.
    """
    shapes = {}
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        shapes[name] = _check_images(x, name, source)
    if shapes["x_train"] != shapes["x_test"]:
        tr, te = ("×".join(map(str, shapes[k])) for k in ("x_train", "x_test"))
        raise TrojanscanError(
            f"{source}: x_train images are {tr} (H×W×C) but x_test images are {te}; both splits "
            "need the same image size and channels"
        )
    if (x_train.dtype == np.uint8) != (x_test.dtype == np.uint8):
        raise TrojanscanError(
            f"{source}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; store both "
            "splits as uint8 (0..255) or both as float in [0, 1]"
        )
    for name, y, x_name, x in (("y_train", y_train, "x_train", x_train),
                               ("y_test", y_test, "x_test", x_test)):
        _check_labels(y, name, len(x), x_name, source)

    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 2):
        raise TrojanscanError(
            f"{source}: num_classes={num_classes!r} is invalid; pass an integer of at least 2"
        )
    labels = (("y_train", y_train), ("y_test", y_test))
    for name, y in labels:
        low = int(y.min())
        if low < 0:
            rng = f"0..{num_classes - 1}" if num_classes else "class indices 0, 1, 2, ..."
            raise TrojanscanError(f"{source}: {name} has label {low}; labels must be {rng}")
    high = max(int(y.max()) for _, y in labels)
    if num_classes is None:
        num_classes = high + 1
        if num_classes < 2:
            raise TrojanscanError(
                f"{source}: every label is 0, so there is only one class; a classifier needs at "
                "least 2 classes"
            )
    else:
        num_classes = int(num_classes)
        for name, y in labels:
            top = int(y.max())
            if top >= num_classes:
                raise TrojanscanError(
                    f"{source}: {name} has label {top} but the data has {num_classes} classes; "
                    f"labels must be 0..{num_classes - 1}"
                )
    present = np.unique(y_train)  # sorted, all in 0..num_classes-1
    if len(present) < num_classes:
        gaps = np.flatnonzero(present != np.arange(len(present)))
        missing = int(gaps[0]) if len(gaps) else len(present)
        others = num_classes - len(present) - 1
        more = f" (nor do {others} other classes)" if others > 1 else \
            " (nor does 1 other class)" if others else ""
        raise TrojanscanError(
            f"{source}: class {missing} has no training images{more}; every class "
            f"0..{num_classes - 1} needs at least one, so labels must be contiguous from 0"
        )
    return num_classes


def _check_images(x: object, name: str, source: str) -> tuple[int, int, int]:
    """Validate one image array; return its (H, W, C)."""
    if not isinstance(x, np.ndarray):
        raise TrojanscanError(f"{source}: {name} is a {type(x).__name__}, expected a numpy array")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise TrojanscanError(
            f"{source}: {name} has dtype {x.dtype}; images must be uint8 (0..255) or float "
            "in [0, 1]"
        )
    shape = "×".join(map(str, x.shape))
    if x.ndim not in (3, 4):
        raise TrojanscanError(
            f"{source}: {name} has shape {shape}; images must be N×H×W×C, or N×H×W for grayscale"
        )
    if x.ndim == 4 and x.shape[3] not in (1, 3):
        if x.shape[1] in (1, 3):
            raise TrojanscanError(
                f"{source}: {name} has shape {shape}, which looks like N×C×H×W; store images as "
                "N×H×W×C (numpy.transpose(x, (0, 2, 3, 1)))"
            )
        raise TrojanscanError(
            f"{source}: {name} has {x.shape[3]} channels (shape {shape}); images must have 1 "
            "(grayscale) or 3 (RGB) channels in the last axis"
        )
    if len(x) == 0:
        raise TrojanscanError(
            f"{source}: {name} has 0 images; both the train and the test split need images"
        )
    if min(x.shape[1:]) == 0:
        raise TrojanscanError(f"{source}: {name} has shape {shape}; images cannot be empty")
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise TrojanscanError(
                f"{source}: {name} contains NaN or infinite values; float images must be finite "
                "and in [0, 1]"
            )
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise TrojanscanError(
                f"{source}: {name} has values in [{low:g}, {high:g}]; float images must be in "
                "[0, 1] (divide 0..255 pixels by 255, or store uint8)"
            )
    h, w = x.shape[1], x.shape[2]
    return h, w, (x.shape[3] if x.ndim == 4 else 1)


def _check_labels(y: object, name: str, n: int, x_name: str, source: str) -> None:
    if not isinstance(y, np.ndarray):
        raise TrojanscanError(f"{source}: {name} is a {type(y).__name__}, expected a numpy array")
    if y.dtype.kind not in "iu":
        raise TrojanscanError(
            f"{source}: {name} has dtype {y.dtype}; labels must be integers (class indices)"
        )
    if y.ndim != 1:
        raise TrojanscanError(
            f"{source}: {name} has shape {'×'.join(map(str, y.shape))}; labels must be a 1-D "
            "array with one class index per image"
        )
    if len(y) != n:
        raise TrojanscanError(
            f"{source}: {name} has {len(y)} labels but {x_name} has {n} images; they must match "
            "one to one"
        )


def load_dataset(source: str | os.PathLike, *, num_classes: int | None = None) -> Dataset:
    """Load ``"digits"``, a named dataset (mnist, fashion_mnist, gtsrb) or a file/folder.

    Files and folders: a .npz, MNIST IDX files, CIFAR-10 python batches, GTSRB, or an image
    folder with train/ and test/ (or val/). A name wins over a same-named folder: pass
    ``./mnist`` to load a folder called mnist.
    """
    raw = _read(source)
    k = validate_arrays(raw.x_train, raw.y_train, raw.x_test, raw.y_test, source=raw.source,
                        num_classes=num_classes)
    if raw.class_names is not None and len(raw.class_names) != k:
        raise TrojanscanError(
            f"{raw.source}: {len(raw.class_names)} class names for {k} classes; give one name "
            "per class"
        )
    return Dataset(
        x_train=_images_to_tensor(raw.x_train), y_train=_labels_to_tensor(raw.y_train),
        x_test=_images_to_tensor(raw.x_test), y_test=_labels_to_tensor(raw.y_test),
        num_classes=k, name=raw.name, sha256=raw.sha256, class_names=raw.class_names,
    )


def _read(source: str | os.PathLike) -> readers.RawData:
    if isinstance(source, str):
        key = source.strip().lower()
        if key == "digits":
            return readers.read_digits()
        if key in NAMED_DATASETS:
            name = NAMED_DATASETS[key]
            raw = readers.read_npz(_named_path(name))
            raw.name = name
            return raw
    return readers.read_path(Path(source).expanduser())


def _named_path(name: str) -> Path:
    fix = (f"set {DATA_DIR_ENV} to a folder holding {name}/{name}.npz, or pass the path of a "
           "dataset file or folder instead")
    data_dir = default_data_dir()
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV)
        why = f"{DATA_DIR_ENV}={env} is not a folder" if env else f"{DATA_DIR_ENV} is not set"
        raise TrojanscanError(f"{name}: no data folder found ({why}); {fix}")
    path = data_dir / name / f"{name}.npz"
    if not path.is_file():
        raise TrojanscanError(f"{name}: {path} does not exist; {fix}")
    return path


def _images_to_tensor(x: np.ndarray) -> torch.Tensor:
    """N×H×W(×C) uint8 or float numpy images -> float32 N×C×H×W tensor in [0, 1]."""
    if x.ndim == 3:
        x = x[..., None]
    if not x.flags.writeable:
        x = x.copy()
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return t.float().div_(255).contiguous()
    return t.to(torch.float32).contiguous()


def _labels_to_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))

"""Reading the images a run-time command checks (``strip check``, ``filter-check``).

Accepted: an ``.npz`` (array ``x``, the one array it holds, the one named with ``key``, or a
dataset's ``x_test``), a numpy ``.npy``, one image file, a folder of image files, or a dataset
(its test split). Arrays may be N×H×W, N×H×W×C or N×C×H×W (C = 1 or 3), uint8/integer pixels
0–255 or floats in [0, 1]. The layout is detected from where the channel axis can be and the range
from the dtype; where either is ambiguous the caller declares it (``layout``, ``value_range``) and
nothing is guessed: every refusal is one line that says what to declare or change.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trojanscan.data.dataset import NAMED_DATASETS, load_dataset
from trojanscan.data.readers import IMAGE_EXTENSIONS, _one_line, _open_image
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import check_npz_directory, load_npy, npz_member
from trojanscan.validation import check_images

LAYOUTS = ("nhwc", "nchw")
VALUE_RANGES = (1, 255)
CHANNELS = (1, 3)
INPUT_IMAGE_EXTENSIONS = (*IMAGE_EXTENSIONS, ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")
DATASET_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class RunInputs:
    """Images to check, float32 N×C×H×W in [0, 1], with where they came from and how they were read."""

    x: torch.Tensor
    source: str
    how: str  # e.g. "uint8 N×H×W×C, 0–255": what was detected or declared
    files: tuple[str, ...] = ()  # each image's file name, when they came from image files (sorted)

    def __str__(self) -> str:  # a record's "inputs" field names the source, not the tensor
        return self.source

    def describe(self) -> str:
        """One line for people: count, image shape, source, layout and range."""
        n = len(self.x)
        images = f"{n} image{'s' if n != 1 else ''} {shape_text(self.x.shape[1:])}"
        return f"{images} from {self.source} ({self.how})"


def shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    """``(1, 28, 28)`` → ``1×28×28``."""
    return "×".join(str(int(s)) for s in shape)


InputsLike = RunInputs | torch.Tensor | str | os.PathLike


def as_run_inputs(source: InputsLike, *, key: str | None = None, layout: str | None = None,
                  value_range: int | None = None) -> RunInputs:
    """``source`` as :class:`RunInputs`: as it is, a tensor of images checked (float N×C×H×W in
    [0, 1]), or read from a file, folder or dataset by :func:`read_inputs`."""
    if isinstance(source, RunInputs):
        return source
    if isinstance(source, torch.Tensor):
        check_images(source, "inputs")
        if len(source) == 0:
            raise TrojanscanError("inputs: no images (a tensor of shape "
                                  f"{tuple(source.shape)})")
        return RunInputs(source.float(), f"a tensor of {len(source)} images", "given in Python")
    return read_inputs(source, key=key, layout=layout, value_range=value_range)


def read_inputs(source: str | os.PathLike, *, key: str | None = None, layout: str | None = None,
                value_range: int | None = None) -> RunInputs:
    """Read run-time inputs from ``source`` (see the module docstring); ``key`` names the array of
    an ``.npz``, ``layout`` ("nhwc"/"nchw") and ``value_range`` (1 or 255) declare what cannot be
    detected in an array."""
    if layout is not None and layout not in LAYOUTS:
        raise TrojanscanError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if value_range is not None and value_range not in VALUE_RANGES:
        raise TrojanscanError(f"--range {value_range!r}: choose 1 (floats in [0, 1]) or 255 (0–255 pixels)")
    path = Path(source).expanduser()
    suffix = path.suffix.lower() if path.is_file() else ""
    if key is not None and suffix != ".npz":
        raise TrojanscanError(f"--key {key!r} names an array of an .npz file, but {source} is not one")
    if suffix in (".npz", ".npy"):
        array, where = _npz_inputs(path, key) if suffix == ".npz" else (_npy_inputs(path), str(path))
        x, how = to_images(array, where, layout=layout, value_range=value_range)
        return RunInputs(x, where, how)
    if layout is not None or value_range is not None:
        raise TrojanscanError(f"--layout and --range describe arrays (.npz, .npy); {source} is not one")
    files = [path] if suffix in INPUT_IMAGE_EXTENSIONS else _image_files(path) if path.is_dir() else []
    if files:
        x, how = to_images(_stack_images(files), str(path), layout="nhwc")
        where = str(path) if path.is_file() else f"{path}{os.sep}"
        return RunInputs(x, where, f"{len(files)} image file{'s' if len(files) > 1 else ''}, "
                                   f"{how.split(',')[0]}", tuple(f.name for f in files))
    return RunInputs(_dataset_inputs(source, path), str(source), "the dataset's test split")


def _dataset_inputs(source: str | os.PathLike, path: Path) -> torch.Tensor:
    """The test split of a dataset name, file or folder; other files and missing paths are refused
    with the formats a run-time input may have."""
    accepted = "an .npz, an .npy, an image, a folder of images or a dataset"
    if path.is_file():
        raise TrojanscanError(f"{path}: unsupported input file '{path.suffix or path.name}'; pass {accepted}")
    if path.is_dir():
        try:
            return load_dataset(path).x_test
        except TrojanscanError as e:
            raise TrojanscanError(f"{path}: no image files ({', '.join(INPUT_IMAGE_EXTENSIONS)}) and not "
                                  f"a dataset folder ({e})") from None
    if isinstance(source, str) and source.strip().lower() in ("digits", *NAMED_DATASETS):
        return load_dataset(source).x_test
    raise TrojanscanError(f"{path}: no such file or folder; pass {accepted} (digits, mnist, …)")


NUMPY_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)


def _unreadable(path: Path, kind: str, e: Exception) -> TrojanscanError:
    """numpy's refusal of a file as one line: object arrays (pickles) or damage."""
    if "Object arrays" in str(e):
        return TrojanscanError(f"{path}: the array holds Python objects (dtype=object); trojanscan never "
                               "unpickles, so save plain numeric arrays")
    return TrojanscanError(f"{path}: not a readable {kind} file ({_one_line(e)})")


def _npz_inputs(path: Path, key: str | None) -> tuple[np.ndarray, str]:
    """The array to check in an .npz: ``key``, else ``x``, else its only array, else a dataset's
    ``x_test``; the one line otherwise lists the arrays found."""
    try:
        check_npz_directory(path)
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise TrojanscanError(f"{path}: holds a single array, not an .npz archive; name it .npy")
        with z:
            names = list(z.files)
            chosen = key
            if chosen is None:
                dataset = set(DATASET_NPZ_KEYS) <= set(names)  # a dataset file: its test images
                chosen = ("x" if "x" in names else names[0] if len(names) == 1 else "x_test" if dataset
                          else None)
            if chosen is None or chosen not in names:
                found = ", ".join(names) or "no arrays"
                what = f"no array {chosen!r}" if chosen is not None else "no array 'x'"
                raise TrojanscanError(f"{path}: {what} (found: {found}); name the images' array "
                                      "with --key NAME")
            return npz_member(z, chosen, str(path)), f"{path}[{chosen}]"
    except TrojanscanError:
        raise
    except NUMPY_ERRORS as e:
        raise _unreadable(path, ".npz", e) from None


def _npy_inputs(path: Path) -> np.ndarray:
    try:
        array = load_npy(path)
    except TrojanscanError:
        raise
    except NUMPY_ERRORS as e:
        raise _unreadable(path, ".npy", e) from None
    if not isinstance(array, np.ndarray):
        raise TrojanscanError(f"{path}: not a single array; save one with numpy.save")
    return array


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in INPUT_IMAGE_EXTENSIONS)


def _stack_images(files: list[Path]) -> np.ndarray:
    """Image files as uint8 N×H×W×C: grayscale (C = 1) when all are, else RGB; all one size."""
    images = [_open_image(f) for f in files]
    size = images[0].size
    for f, img in zip(files, images, strict=True):
        if img.size != size:
            raise TrojanscanError(f"{f}: image is {img.size[0]}×{img.size[1]} pixels but {files[0]} is "
                                  f"{size[0]}×{size[1]}; all images must be the same size (resize them)")
    gray = all(img.mode in ("1", "L", "LA") for img in images)
    arrays = [np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8) for img in images]
    return np.stack(arrays)[..., None] if gray else np.stack(arrays)


def detect_layout(shape: tuple[int, ...], where: str, layout: str | None = None) -> str:
    """``"nhw"``, ``"nhwc"`` or ``"nchw"`` for an array of ``shape``: declared, or detected from the
    axis that can hold 1 or 3 channels; ambiguous or impossible shapes are one-line errors."""
    text = shape_text(shape)
    if len(shape) == 3:
        if layout is not None:
            raise TrojanscanError(f"{where}: shape {text} has no channel axis (N×H×W grayscale), so "
                                  f"--layout {layout} does not apply")
        return "nhw"
    if len(shape) != 4:
        one = " (one image? add a batch axis: x[None])" if len(shape) == 2 else ""
        raise TrojanscanError(f"{where}: images have shape {text}; expected N×H×W, N×H×W×C or "
                              f"N×C×H×W{one}")
    if layout is not None:
        c = shape[3] if layout == "nhwc" else shape[1]
        if c not in CHANNELS:
            raise TrojanscanError(f"{where}: shape {text} read as {layout.upper()} has {c} channels; "
                                  "images need 1 or 3")
        return layout
    candidates = [name for name, axis in (("nhwc", 3), ("nchw", 1)) if shape[axis] in CHANNELS]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise TrojanscanError(f"{where}: shape {text} could be N×H×W×C or N×C×H×W; declare it with "
                              "--layout nhwc or --layout nchw")
    raise TrojanscanError(f"{where}: shape {text} has no axis of 1 or 3 channels; images must be "
                          "N×H×W, N×H×W×C or N×C×H×W with C = 1 or 3")


def _scale(array: np.ndarray, where: str, value_range: int | None) -> tuple[np.ndarray, str]:
    """Values in [0, 1] as float32 and how the range was read: integers are 0–255 pixels; floats
    are [0, 1] unless ``value_range`` 255 is declared; anything else is refused."""
    kind = array.dtype.kind
    if kind not in "uif":
        raise TrojanscanError(f"{where}: images have dtype {array.dtype}; store uint8 pixels (0–255) or "
                              "floats in [0, 1]")
    if array.size == 0:
        raise TrojanscanError(f"{where}: no images (shape {shape_text(array.shape)})")
    if kind == "f" and not np.isfinite(array).all():
        raise TrojanscanError(f"{where}: images contain NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0:
        raise TrojanscanError(f"{where}: values go down to {low:g}; these look normalised: give raw "
                              "pixels (0–255 or [0, 1]) and the model's --mean/--std")
    top = 255 if kind in "ui" or value_range == 255 else 1
    if kind in "ui" and value_range == 1:
        raise TrojanscanError(f"{where}: integer images are 0–255 pixels, not --range 1; store floats "
                              "in [0, 1] or drop --range")
    if high > top:
        fix = ("; if they are 0–255 pixels stored as floats, declare --range 255" if top == 1 and high <= 255
               else "")
        raise TrojanscanError(f"{where}: values reach {high:g} but {array.dtype} images must be in "
                              f"[0, {top}]{fix}")
    how = f"{array.dtype} 0–255" if top == 255 else f"{array.dtype} in [0, 1]"
    return array.astype(np.float32) / np.float32(top) if top != 1 else array.astype(np.float32), how


def to_images(array: np.ndarray, where: str, *, layout: str | None = None,
              value_range: int | None = None) -> tuple[torch.Tensor, str]:
    """A numpy image array as float32 N×C×H×W in [0, 1], and how it was read (layout and range)."""
    found = detect_layout(tuple(array.shape), where, layout)
    scaled, how = _scale(array, where, value_range)
    t = torch.from_numpy(np.ascontiguousarray(scaled))
    if found == "nhw":
        t = t.unsqueeze(1)
    elif found == "nhwc":
        t = t.permute(0, 3, 1, 2)
    return t.contiguous(), f"{how}, {'declared ' if layout is not None else ''}{found.upper()}"

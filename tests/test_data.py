"""Tests for trojanscan.data: every reader on tiny files in tmp_path, validation errors, digits."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trojanscan.data.dataset as dataset_mod
from trojanscan.data import DATA_DIR_ENV, Dataset, default_data_dir, load_dataset, validate_arrays
from trojanscan.errors import TrojanscanError

RNG = np.random.default_rng(0)


def _arrays(n_train: int = 12, n_test: int = 6, classes: int = 3, shape=(8, 8, 3)) -> dict:
    return {
        "x_train": RNG.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % classes,
        "x_test": RNG.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % classes,
    }


def _raises(match: str, fn, *args, **kwargs) -> str:
    """Call fn, expect a one-line TrojanscanError containing ``match``; return the message."""
    with pytest.raises(TrojanscanError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert match in msg
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shapes_and_split(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.input_shape == (1, 16, 16)
    assert digits.num_classes == 10
    assert digits.x_train.shape == (1437, 1, 16, 16) and digits.x_test.shape == (360, 1, 16, 16)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert float(digits.x_train.min()) == 0.0 and float(digits.x_train.max()) == 1.0
    # values are k/255 for integer k (the uint8 round trip)
    assert torch.allclose(digits.x_train * 255, (digits.x_train * 255).round(), atol=1e-4)
    # stratified: every class has 35..37 test images out of 360
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert len(digits.sha256) == 64 and "digits" in repr(digits)


def test_digits_is_deterministic(digits: Dataset) -> None:
    again = load_dataset("digits")
    assert again.sha256 == digits.sha256
    assert torch.equal(again.y_train, digits.y_train)
    assert torch.equal(again.x_test, digits.x_test)


# ------------------------------------------------------------------------------------------- npz


def test_npz_rgb_pixels_and_hash(tmp_path: Path) -> None:
    a = _arrays()
    path = tmp_path / "toy.npz"
    np.savez(path, **a)
    d = load_dataset(path)
    assert d.name == "toy.npz" and d.num_classes == 3 and d.input_shape == (3, 8, 8)
    assert d.x_train.shape == (12, 3, 8, 8) and d.x_train.dtype == torch.float32
    assert d.x_train.is_contiguous()
    # pixel (row 2, col 5) of image 4, all channels, survives the NHWC -> NCHW permute
    expected = torch.tensor(a["x_train"][4, 2, 5, :], dtype=torch.float32) / 255
    assert torch.equal(d.x_train[4, :, 2, 5], expected)
    assert torch.equal(d.y_test, torch.from_numpy(a["y_test"]))
    assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d.class_names is None


def test_npz_grayscale_without_channel_axis(tmp_path: Path) -> None:
    a = _arrays(shape=(5, 7))
    np.savez(tmp_path / "g.npz", **a)
    d = load_dataset(str(tmp_path / "g.npz"))
    assert d.input_shape == (1, 5, 7)
    assert d.x_test[1, 0, 4, 6] == pytest.approx(a["x_test"][1, 4, 6] / 255)


def test_npz_float_images_kept_as_floats(tmp_path: Path) -> None:
    a = _arrays()
    a["x_train"] = RNG.random((12, 4, 4, 1), dtype=np.float32)
    a["x_test"] = RNG.random((6, 4, 4, 1)).astype(np.float64)
    np.savez(tmp_path / "f.npz", **a)
    d = load_dataset(tmp_path / "f.npz")
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(a["x_train"][..., 0]))
    assert d.x_test.dtype == torch.float32


def test_npz_class_names_and_num_classes(tmp_path: Path) -> None:
    np.savez(tmp_path / "n.npz", **_arrays(), class_names=np.array(["cat", "dog", "emu"]))
    d = load_dataset(tmp_path / "n.npz")
    assert d.class_names == ("cat", "dog", "emu")
    np.savez(tmp_path / "n2.npz", **_arrays(), class_names=np.array(["cat", "dog"]))
    _raises("n2.npz: 2 class names for 3 classes", load_dataset, tmp_path / "n2.npz")


class _Boom:
    """Pickles to a call that would create a file, to prove nothing gets unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_npz_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    a = _arrays()
    a["y_train"] = np.array([_Boom(marker)] * 12, dtype=object)
    np.savez(tmp_path / "obj.npz", **a)
    _raises("array 'y_train' holds Python objects", load_dataset, tmp_path / "obj.npz")
    assert not marker.exists()


def test_npz_missing_key(tmp_path: Path) -> None:
    a = _arrays()
    del a["y_test"]
    np.savez(tmp_path / "m.npz", **a)
    _raises("missing array 'y_test'", load_dataset, tmp_path / "m.npz")


def test_npz_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all")
    _raises("junk.npz: not a readable .npz file", load_dataset, tmp_path / "junk.npz")


def test_npz_validation_error_names_the_file(tmp_path: Path) -> None:
    a = _arrays()
    a["y_train"][0] = 12
    np.savez(tmp_path / "mnist.npz", **a)
    msg = _raises("y_train has label 12 but the data has 10 classes; labels must be 0..9",
                  load_dataset, tmp_path / "mnist.npz", num_classes=10)
    assert msg.startswith(str(tmp_path / "mnist.npz") + ": ")


# ------------------------------------------------------------------------------------ validation


def _nan_images(a: dict) -> None:
    a["x_train"] = np.full((12, 4, 4, 1), 0.5, np.float32)
    a["x_test"] = np.full((6, 4, 4, 1), 0.5, np.float32)
    a["x_train"][3, 1, 1, 0] = np.nan


def _float_out_of_range(a: dict) -> None:
    a["x_train"] = np.full((12, 4, 4, 1), 0.5, np.float32)
    a["x_test"] = np.full((6, 4, 4, 1), 2.0, np.float32)


def _set(key: str, value):
    return lambda a: a.__setitem__(key, value)


def _label(key: str, index: int, value: int):
    return lambda a: a[key].__setitem__(index, value)


BAD = {
    "not-array": (_set("x_train", [[1]]), {}, "x_train is a list, expected a numpy array"),
    "int32": (lambda a: a.__setitem__("x_train", a["x_train"].astype(np.int32)), {},
              "x_train has dtype int32; images must be uint8 (0..255) or float in [0, 1]"),
    "rank": (_set("x_test", np.zeros((6, 8), np.uint8)), {}, "images must be N×H×W×C"),
    "nchw": (_set("x_train", np.zeros((12, 3, 8, 8), np.uint8)), {}, "looks like N×C×H×W"),
    "channels": (_set("x_train", np.zeros((12, 8, 8, 5), np.uint8)), {}, "has 5 channels"),
    "shapes-differ": (_set("x_test", np.zeros((6, 9, 8, 3), np.uint8)), {},
                      "x_train images are 8×8×3 (H×W×C) but x_test images are 9×8×3"),
    "dtypes-differ": (_set("x_test", np.zeros((6, 8, 8, 3), np.float32)), {},
                      "x_train is uint8 but x_test is float32"),
    "float-labels": (_set("y_train", np.zeros(12, np.float64)), {},
                     "y_train has dtype float64; labels must be integers"),
    "2d-labels": (_set("y_test", np.zeros((6, 1), np.int64)), {}, "labels must be a 1-D array"),
    "length": (_set("y_train", np.zeros(11, np.int64)), {},
               "y_train has 11 labels but x_train has 12 images"),
    "empty": (_set("x_test", np.zeros((0, 8, 8, 3), np.uint8)), {}, "x_test has 0 images"),
    "nan": (_nan_images, {}, "x_train contains NaN or infinite values"),
    "range": (_float_out_of_range, {}, "x_test has values in [2, 2]; float images must be in"),
    "negative": (_label("y_test", 2, -1), {}, "y_test has label -1; labels must be"),
    "too-big": (_label("y_train", 0, 12), {"num_classes": 10},
                "y_train has label 12 but the data has 10 classes; labels must be 0..9"),
    "no-train-images": (_set("y_train", np.arange(12, dtype=np.int64) % 3 * 2), {},
                        "class 1 has no training images (nor does 1 other class)"),
    "missing-top-class": (lambda a: None, {"num_classes": 4}, "class 3 has no training images"),
    "one-class": (lambda a: (a["y_train"].fill(0), a["y_test"].fill(0)), {}, "only one class"),
    "bad-num-classes": (lambda a: None, {"num_classes": 1}, "num_classes=1 is invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_arrays_errors(case: str) -> None:
    mutate, kwargs, match = BAD[case]
    a = _arrays()
    mutate(a)
    msg = _raises(match, validate_arrays, **a, source="toy.npz", **kwargs)
    assert msg.startswith("toy.npz: ")


def test_validate_arrays_ok_returns_num_classes() -> None:
    assert validate_arrays(**_arrays(), source="x") == 3
    assert validate_arrays(**_arrays(), source="x", num_classes=3) == 3
    a = _arrays(shape=(8, 8))
    a["y_train"] = a["y_train"].astype(np.uint8)
    assert validate_arrays(**a, source="x") == 3


# ------------------------------------------------------------------------------ paths and names


def test_missing_path(tmp_path: Path) -> None:
    _raises("nope.npz: no such file or directory;", load_dataset, tmp_path / "nope.npz")


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3\n")
    msg = _raises("unsupported file type '.csv'; accepted:", load_dataset, tmp_path / "data.csv")
    assert ".npz" in msg


def test_unrecognised_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    msg = _raises("not a dataset folder trojanscan recognises", load_dataset, tmp_path)
    assert "CIFAR-10" in msg and "GTSRB" in msg and "IDX" in msg and "train/<class>/" in msg


def test_named_dataset_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnist").mkdir()
    (tmp_path / "fashion_mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist.npz", **_arrays(shape=(6, 6, 1)))
    np.savez(tmp_path / "fashion_mnist" / "fashion_mnist.npz", **_arrays(classes=2))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    d = load_dataset("mnist")
    assert d.name == "mnist" and d.input_shape == (1, 6, 6) and d.num_classes == 3
    assert d.sha256 == hashlib.sha256((tmp_path / "mnist" / "mnist.npz").read_bytes()).hexdigest()
    f = load_dataset("fashion-mnist")
    assert f.name == "fashion_mnist" and f.num_classes == 2
    _raises("gtsrb.npz does not exist; set TROJANSCAN_DATA_DIR", load_dataset, "gtsrb")


def test_named_dataset_without_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_mod, "default_data_dir", lambda: None)
    monkeypatch.setenv(DATA_DIR_ENV, "/definitely/not/here")
    msg = _raises("mnist: no data folder found", load_dataset, "mnist")
    assert "TROJANSCAN_DATA_DIR=/definitely/not/here is not a folder" in msg
    assert "pass the path" in msg


def test_default_data_dir_ignores_missing_env(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    assert default_data_dir() != tmp_path / "missing"


# ------------------------------------------------------------------------------------------- IDX


def _idx(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx(folder: Path, compress: bool = False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    a = _arrays(shape=(5, 4))
    contents = {
        "train-images-idx3-ubyte": _idx(a["x_train"], 0x803),
        "train-labels-idx1-ubyte": _idx(a["y_train"].astype(np.uint8), 0x801),
        "t10k-images-idx3-ubyte": _idx(a["x_test"], 0x803),
        "t10k-labels-idx1-ubyte": _idx(a["y_test"].astype(np.uint8), 0x801),
    }
    for name, data in contents.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return a


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder(tmp_path: Path, compress: bool) -> None:
    a = _write_idx(tmp_path / "mnist_raw", compress)
    d = load_dataset(tmp_path / "mnist_raw")
    assert d.name == "mnist_raw" and d.num_classes == 3
    assert d.x_train.shape == (12, 1, 5, 4) and d.x_test.shape == (6, 1, 5, 4)
    assert d.x_train[7, 0, 3, 2] == pytest.approx(a["x_train"][7, 3, 2] / 255)
    assert torch.equal(d.y_train, torch.from_numpy(a["y_train"]))


def test_idx_torchvision_layout(tmp_path: Path) -> None:
    _write_idx(tmp_path / "tv" / "MNIST" / "raw")
    assert load_dataset(tmp_path / "tv").x_test.shape == (6, 1, 5, 4)


def test_idx_bad_magic(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    f = tmp_path / "train-labels-idx1-ubyte"
    f.write_bytes(b"\x00\x00\x08\x03" + f.read_bytes()[4:])
    _raises("train-labels-idx1-ubyte: bad IDX magic number 0x00000803, expected 0x00000801",
            load_dataset, tmp_path)


def test_idx_truncated(tmp_path: Path) -> None:
    _write_idx(tmp_path, compress=True)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-7]))
    _raises("t10k-images-idx3-ubyte.gz: truncated: the header promises 120 bytes of images but "
            "only 113 follow", load_dataset, tmp_path)


def test_idx_damaged_gzip_and_missing_file(tmp_path: Path) -> None:
    _write_idx(tmp_path, compress=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:20])
    _raises("train-images-idx3-ubyte.gz: cannot read", load_dataset, tmp_path)
    f.unlink()
    _raises("missing train-images-idx3-ubyte (or train-images-idx3-ubyte.gz)",
            load_dataset, tmp_path)


# ----------------------------------------------------------------------------------------- CIFAR


def _cifar_images(n: int, seed: int) -> np.ndarray:
    """N×32×32×3 images whose channels differ: R = 10+i, G = 100+row, B = 200+col (mod 256)."""
    x = np.zeros((n, 32, 32, 3), np.uint8)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    for i in range(n):
        x[i, :, :, 0] = 10 + i + seed
        x[i, :, :, 1] = 100 + rows
        x[i, :, :, 2] = (200 + cols) % 256
    return x


def _write_cifar(folder: Path, protocol: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = _cifar_images(3, seed=10 * i)
        rows = x.transpose(0, 3, 1, 2).reshape(3, 3072)  # channel-major, as CIFAR stores it
        batch = {b"batch_label": name.encode(), b"data": rows, b"labels": [0, 1, i % 3],
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird"]}, f, protocol=2)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches(tmp_path: Path, protocol: int) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py", protocol)
    d = load_dataset(tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.num_classes == 3 and d.class_names == ("airplane", "automobile", "bird")
    img = d.x_train[4] * 255  # batch 2 (seed 10), image 1
    assert torch.allclose(img[:, 5, 7], torch.tensor([10.0 + 1 + 10, 100 + 5, 200 + 7]))
    assert torch.equal(d.y_train[:6], torch.tensor([0, 1, 0, 0, 1, 1]))
    # the hash covers the batches folder, so it does not depend on which level was passed
    assert load_dataset(tmp_path / "cifar-10-batches-py").sha256 == d.sha256


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Shell, _Boom])
def test_cifar_malicious_pickle_is_refused(tmp_path: Path, payload: type) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": payload(marker), b"labels": [0]}, f, protocol=2)
    msg = _raises("refusing to unpickle", load_dataset, tmp_path)
    assert (".system from" if payload is _Shell else ".open from") in msg
    assert "data_batch_1" in msg
    assert not marker.exists()


def test_cifar_bad_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    _raises("data_batch_2: 'data' is ndarray with shape (2, 100)", load_dataset, tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"\x80\x02garbage")
    _raises("data_batch_2: not a readable CIFAR-10 python batch", load_dataset, tmp_path)
    (tmp_path / "data_batch_3").unlink()
    _raises("data_batch_3: missing", load_dataset, tmp_path)


# ----------------------------------------------------------------------------------------- GTSRB

RED, GREEN, BLUE = (200, 0, 0), (0, 200, 0), (0, 0, 200)
ROI = (5, 6, 30, 29)  # x1, y1, x2, y2 inclusive
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _sign(path: Path) -> str:
    """A 40×36 red frame; the ROI is green except its last column (x2), which is blue."""
    x = np.zeros((36, 40, 3), np.uint8)
    x[:] = RED
    x1, y1, x2, y2 = ROI
    x[y1:y2 + 1, x1:x2 + 1] = GREEN
    x[y1:y2 + 1, x2] = BLUE
    Image.fromarray(x).save(path)
    return f"{path.name};40;36;{x1};{y1};{x2};{y2}"


def _write_gtsrb(root: Path, test_csv_dir: str | None = "Final_Test") -> None:
    for c in range(3):
        d = root / "Final_Training" / "Images" / f"{c:05d}"
        d.mkdir(parents=True)
        rows = [_sign(d / f"00000_{i:05d}.ppm") + f";{c}\n" for i in range(2)]
        (d / f"GT-{c:05d}.csv").write_text(HEADER + "".join(rows))
    test = root / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = [_sign(test / f"{i:05d}.ppm") + f";{i % 3}\n" for i in range(4)]
    # the official test zip ships an unlabelled GT-final_test.test.csv; it must be ignored
    (test / "GT-final_test.test.csv").write_text("Filename;Width\n")
    if test_csv_dir is not None:
        (root / test_csv_dir).mkdir(parents=True, exist_ok=True)
        (root / test_csv_dir / "GT-final_test.csv").write_text(HEADER + "".join(rows))


@pytest.mark.parametrize("csv_dir", ["Final_Test", "Final_Test/Images", ".."])
def test_gtsrb_roi_crop(tmp_path: Path, csv_dir: str) -> None:
    _write_gtsrb(tmp_path / "GTSRB", csv_dir)
    d = load_dataset(tmp_path)  # the GTSRB folder one level deeper
    assert d.x_train.shape == (6, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.num_classes == 3
    assert torch.equal(d.y_train, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(d.y_test, torch.tensor([0, 1, 2, 0]))
    img = (d.x_test[2] * 255).round()
    # the middle is the ROI's green, no red frame anywhere: the crop happened
    assert torch.equal(img[:, 16, 10], torch.tensor([0.0, 200, 0]))
    assert float(img[0].max()) == 0.0
    # x2 is inclusive: the last output column comes from the blue column
    assert float(img[2, :, -1].min()) > 150


def test_gtsrb_needs_a_test_set(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path, test_csv_dir=None)
    _raises("no GT-final_test.csv (the test labels)", load_dataset, tmp_path)
    for p in sorted((tmp_path / "Final_Test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "Final_Test").rmdir()
    _raises("GTSRB has no Final_Test/Images folder, and a dataset needs a test split",
            load_dataset, tmp_path)


def test_gtsrb_bad_csv(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    gt = tmp_path / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    gt.write_text(HEADER.replace(";ClassId", "") + "00000_00000.ppm;40;36;5;6;30;29\n")
    _raises("GT-00001.csv: no 'ClassId' column", load_dataset, tmp_path)


# ---------------------------------------------------------------------------------- image folder


def _save(path: Path, value, size=(6, 5), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _write_folder(root: Path, test: str = "test", mode: str = "L") -> None:
    value = (lambda c, i: 10 * c + i) if mode == "L" else (lambda c, i: (10 * c + i, 50, 90))
    for split, n in (("train", 4), (test, 2)):
        for c, name in enumerate(["cat", "dog", "emu"]):
            for i in range(n):
                _save(root / split / name / f"{i}.png", value(c, i), mode=mode)
    (root / "train" / "cat" / "README.txt").write_text("not an image, ignored")


def test_image_folder_grayscale(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    d = load_dataset(tmp_path)
    assert d.class_names == ("cat", "dog", "emu") and d.num_classes == 3
    assert d.x_train.shape == (12, 1, 5, 6) and d.x_test.shape == (6, 1, 5, 6)
    assert torch.equal(d.y_train, torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
    assert d.x_train[6, 0, 2, 3] * 255 == pytest.approx(10 * 1 + 2)  # dog/2.png


def test_image_folder_rgb_with_val(tmp_path: Path) -> None:
    _write_folder(tmp_path, test="val", mode="RGB")
    d = load_dataset(tmp_path)
    assert d.x_test.shape == (6, 3, 5, 6)
    assert torch.equal((d.x_test[5, :, 0, 0] * 255).round(), torch.tensor([21.0, 50, 90]))


def test_image_folder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    _save(tmp_path / "test" / "emu" / "9.png", (1, 2, 3), mode="RGB")
    d = load_dataset(tmp_path)
    assert d.input_shape == (3, 5, 6)
    assert torch.equal((d.x_train[5, :, 0, 0] * 255).round(), torch.tensor([11.0, 11, 11]))


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    _save(tmp_path / "test" / "dog" / "big.png", 0, size=(7, 5))
    _raises("big.png: image is 7×5 pixels but", load_dataset, tmp_path)
    (tmp_path / "test" / "dog" / "big.png").unlink()
    _save(tmp_path / "test" / "yak" / "0.png", 0)
    _raises("class 'yak' is not in", load_dataset, tmp_path)
    (tmp_path / "test" / "yak" / "0.png").unlink()
    (tmp_path / "test" / "yak").rmdir()
    (tmp_path / "train" / "emu" / "1.png").write_bytes(b"not a png")
    _raises("1.png: cannot decode the image", load_dataset, tmp_path)
    for p in (tmp_path / "train" / "emu").iterdir():
        p.unlink()
    _raises("emu: no images (.png", load_dataset, tmp_path)


def test_image_folder_needs_test_split(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "a" / "0.png", 0)
    _raises("needs both train/<class>/ and test/<class>/", load_dataset, tmp_path)


def test_image_folder_hash_tracks_content(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    before = load_dataset(tmp_path).sha256
    (tmp_path / "notes.md").write_text("unrelated files do not count")
    assert load_dataset(tmp_path).sha256 == before
    _save(tmp_path / "train" / "dog" / "0.png", 99)
    assert load_dataset(tmp_path).sha256 != before


# -------------------------------------------------------------------------------------- realdata


@pytest.mark.realdata
def test_real_mnist() -> None:
    data_dir = default_data_dir()
    if data_dir is None or not (data_dir / "mnist" / "mnist.npz").is_file():
        pytest.skip("no real data: set TROJANSCAN_DATA_DIR")
    d = load_dataset("mnist")
    assert len(d.x_train) == 60000 and len(d.x_test) == 10000
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert 0.0 <= float(d.x_test.min()) and float(d.x_test.max()) <= 1.0

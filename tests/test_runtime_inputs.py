"""Run-time inputs (strip check, filter-check): every layout reads the same images, every bad one is
one line; models name the input shape they expect; pruning keeps to its accuracy budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trojanscan import save_model
from trojanscan.data.images import read_inputs
from trojanscan.defenses.pruning import prune
from trojanscan.errors import TrojanscanError
from trojanscan.progress import ProgressEvent, Stages
from trojanscan.report.progress import progress_bars
from trojanscan.workflows.inputs import data_warnings, load_inputs, model_and_inputs, resolve


@pytest.fixture(scope="module")
def images(digits) -> torch.Tensor:
    """Six digits test images, float N×1×16×16 on the 0..255 grid (so every encoding is exact)."""
    return (digits.x_test[:6] * 255).round() / 255


def _u8_nhwc(x: torch.Tensor) -> np.ndarray:
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _write(kind: str, x: torch.Tensor, folder) -> tuple[str, dict]:
    """One input file (or folder) of ``kind`` holding ``x``; returns its path and read_inputs' options."""
    u8 = _u8_nhwc(x)
    if kind == "npz uint8 NHWC":
        np.savez(folder / "a.npz", x=u8)
        return str(folder / "a.npz"), {}
    if kind == "npz float NCHW, one other key":
        np.savez(folder / "b.npz", images=x.numpy())
        return str(folder / "b.npz"), {}
    if kind == "npz with --key":
        np.savez(folder / "c.npz", junk=np.zeros(3), batch=u8)
        return str(folder / "c.npz"), {"key": "batch"}
    if kind == "npz dataset (x_test)":
        y = np.arange(len(u8)) % 2
        np.savez(folder / "d.npz", x_train=u8, y_train=y, x_test=u8, y_test=y)
        return str(folder / "d.npz"), {}
    if kind == "npy uint8 NHW":
        np.save(folder / "e.npy", u8[..., 0])
        return str(folder / "e.npy"), {}
    if kind == "npy float 0-255 declared":
        np.save(folder / "f.npy", x.numpy() * 255)
        return str(folder / "f.npy"), {"value_range": 255}
    if kind == "image folder":
        (folder / "imgs").mkdir()
        for i, a in enumerate(u8):
            Image.fromarray(a[..., 0]).save(folder / "imgs" / f"{i:03d}.png")
        return str(folder / "imgs"), {}
    raise AssertionError(kind)


KINDS = ["npz uint8 NHWC", "npz float NCHW, one other key", "npz with --key", "npz dataset (x_test)",
         "npy uint8 NHW", "npy float 0-255 declared", "image folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_reads_the_same_images(kind, images, tmp_path):
    path, options = _write(kind, images, tmp_path)
    found = read_inputs(path, **options)
    assert found.x.dtype == torch.float32 and found.x.shape == images.shape
    assert torch.allclose(found.x, images, atol=1e-6), kind
    assert "1×16×16" in found.describe() and found.how in found.describe()
    assert torch.equal(load_inputs(path, **options), found.x)


def test_a_folders_results_name_each_file(images, trojaned_digits, digits, tmp_path):
    from trojanscan import InputFilter
    from trojanscan.api import filter_check

    folder, _ = _write("image folder", images, tmp_path)
    assert read_inputs(folder).files == tuple(f"{i:03d}.png" for i in range(6))  # sorted, as read
    assert read_inputs(_write("npy uint8 NHW", images, tmp_path)[0]).files == ()
    guard = InputFilter(trojaned_digits.model, fpr=0.05).fit(digits.x_train[:300], [trojaned_digits.trigger])
    guard.save(tmp_path / "filter.npz")
    rows = filter_check(trojaned_digits.model, tmp_path / "filter.npz", folder).results
    assert [r["file"] for r in rows] == [f"{i:03d}.png" for i in range(6)]


def test_one_image_a_tensor_and_a_dataset(images, digits, tmp_path):
    Image.fromarray(_u8_nhwc(images)[0, ..., 0]).save(tmp_path / "one.png")
    one = read_inputs(tmp_path / "one.png")
    assert one.x.shape == (1, 1, 16, 16) and torch.allclose(one.x[0], images[0], atol=1e-6)
    assert torch.equal(load_inputs(images), images)
    found = read_inputs("digits")
    assert torch.equal(found.x, digits.x_test) and found.source == "digits"


BAD = [
    (np.zeros((4, 3, 5, 3), np.uint8), {}, "could be N×H×W×C or N×C×H×W; declare it with --layout"),
    (np.zeros((4, 5, 5, 7), np.uint8), {}, "no axis of 1 or 3 channels"),
    (np.zeros((16, 16), np.uint8), {}, "one image? add a batch axis"),
    (np.full((2, 1, 4, 4), 200.0, np.float32), {}, "declare --range 255"),
    (np.full((2, 1, 4, 4), -0.5, np.float32), {}, "look normalised"),
    (np.full((2, 1, 4, 4), np.nan, np.float32), {}, "NaN"),
    (np.zeros((2, 1, 4, 4), bool), {}, "dtype bool"),
    (np.zeros((0, 1, 4, 4), np.uint8), {}, "no images"),
    (np.zeros((2, 1, 4, 4), np.uint8), {"value_range": 1}, "integer images are 0–255"),
    (np.zeros((2, 1, 4, 4), np.uint8), {"layout": "nhwc"}, "has 4 channels"),
    (np.zeros((2, 1, 4, 4), np.uint8), {"layout": "hwc"}, "--layout 'hwc'"),
    (np.zeros((2, 1, 4, 4), np.uint8), {"value_range": 100}, "--range 100"),
]


@pytest.mark.parametrize("array,options,needle", BAD, ids=[b[2][:24] for b in BAD])
def test_a_bad_array_is_one_line(array, options, needle, tmp_path):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(TrojanscanError) as e:
        read_inputs(tmp_path / "x.npy", **options)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_files_and_options_are_one_line(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4), np.uint8), b=np.zeros((2, 4, 4), np.uint8))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "mixed" / "a.png")
    Image.new("L", (5, 4)).save(tmp_path / "mixed" / "b.png")
    cases = [
        ((tmp_path / "two.npz",), {}, "no array 'x' (found: a, b); name the images' array with --key"),
        ((tmp_path / "two.npz",), {"key": "c"}, "no array 'c' (found: a, b)"),
        ((tmp_path / "obj.npy",), {}, "never unpickles"),
        ((tmp_path / "junk.npz",), {}, "not a readable .npz"),
        ((tmp_path / "model.safetensors",), {}, "unsupported input file"),
        ((tmp_path / "nope.npz",), {}, "no such file or folder"),
        ((tmp_path / "empty",), {}, "no image files"),
        ((tmp_path / "mixed",), {}, "all images must be the same size"),
        ((tmp_path / "mixed",), {"layout": "nchw"}, "--layout and --range describe arrays"),
        (("digits",), {"key": "x"}, "--key 'x' names an array of an .npz file"),
    ]
    for args, options, needle in cases:
        with pytest.raises(TrojanscanError) as e:
            read_inputs(*args, **options)
        assert needle in str(e.value) and "\n" not in str(e.value), (args, str(e.value))


@pytest.fixture(scope="module")
def model_file(trojaned_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "digits.safetensors"
    save_model(trojaned_digits.model, path, metadata={"data_sha256": "0" * 64})
    return path


def test_a_model_file_names_the_input_shape_it_expects(model_file, tmp_path):
    np.savez(tmp_path / "big.npz", x=np.zeros((3, 28, 28, 1), np.uint8))
    with pytest.raises(TrojanscanError, match=r"the model expects 1×16×16 images \(C×H×W\), but the "
                                              r"inputs \(.*big.npz\[x\]\) are 1×28×28"):
        model_and_inputs(model_file, tmp_path / "big.npz")
    y = np.arange(20) % 10
    np.savez(tmp_path / "data28.npz", x_train=np.zeros((20, 28, 28), np.uint8), y_train=y,
             x_test=np.zeros((20, 28, 28), np.uint8), y_test=y)
    with pytest.raises(TrojanscanError, match=r"expects 1×16×16 images \(C×H×W\), but the images of "
                                              r"data28.npz are 1×28×28"):
        resolve(model_file, tmp_path / "data28.npz")


def test_a_foreign_models_shape_error_names_the_inputs_shape(trojaned_digits, tmp_path):
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(TrojanscanError, match=r"cannot run on the inputs' 3×16×16 images"):
        model_and_inputs(trojaned_digits.model, tmp_path / "rgb.npy")


def test_data_warnings_say_when_the_data_is_not_the_models(model_file, digits):
    resolved = resolve(model_file, digits)
    found = data_warnings(resolved, clean_accuracy=0.07)
    assert any("records training data sha256 000000000000…" in w for w in found)
    assert any("near chance (10.0% for 10 classes)" in w for w in found)
    assert not any("near chance" in w for w in data_warnings(resolved, clean_accuracy=0.9))


def test_pruning_stops_at_its_accuracy_budget(trojaned_digits, digits):
    model, trig = trojaned_digits.model, trojaned_digits.trigger
    x, y = digits.x_train[:400], digits.y_train[:400]
    free = prune(model, x, y, [trig], asr_threshold=0.01, step=0.05, max_fraction=0.9)
    budget = prune(model, x, y, [trig], asr_threshold=0.01, step=0.05, max_fraction=0.9,
                   max_accuracy_drop=0.0)
    assert free.max_accuracy_drop is None and not free.stopped_by_budget
    start = budget.curve[0]["clean_accuracy"]
    assert all(c["clean_accuracy"] >= start for c in budget.curve)
    if budget.stopped_by_budget:  # the step it refused cost accuracy, and it kept the step before
        assert budget.over_budget["clean_accuracy"] < start
        assert budget.over_budget["pruned"] > budget.curve[-1]["pruned"] == len(budget.pruned)
    assert len(budget.pruned) <= len(free.pruned)
    with pytest.raises(TrojanscanError, match="0.02 = 2 points"):
        prune(model, x, y, [trig], max_accuracy_drop=2)


def test_stages_and_quiet_bars():
    events: list[ProgressEvent] = []
    with Stages(events.append, "job", 2) as stage:
        stage("first")
        stage("second")
    assert [(e.step, e.info, e.done) for e in events] == [(0, "first", False), (1, "second", False),
                                                          (2, "", True)]
    with Stages(None, "job", 1) as stage:  # no callback: nothing to do, no error
        stage("x")
    with progress_bars(True) as bars:  # pytest captures stderr: not a terminal, so no bars
        assert bars is None

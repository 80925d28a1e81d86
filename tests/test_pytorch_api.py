"""The Python API in PyTorch's terms: data as tensors, numpy arrays, a torch Dataset or a DataLoader;
a loaded model that is called like the network; results that carry what they make."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trojanscan import (
    Dataset,
    LoadedModel,
    Strip,
    TrojanscanError,
    as_dataset,
    load_model,
    repair,
    save_model,
    scan,
)
from trojanscan.api import build_filter, evaluate_file, strip_evaluate


def _forms(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """The test split in every form a PyTorch user may hold it."""
    return {
        "tensors": (x, y),
        "arrays": (x.numpy(), y.numpy()),
        "uint8 N×H×W×C arrays": ((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), y.numpy()),
        "TensorDataset": TensorDataset(x, y),
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=64),
        "list of labels": [x, y.tolist()],
    }


def test_every_kind_of_data_becomes_the_same_dataset(digits):
    x, y = digits.x_test, digits.y_test
    for kind, data in _forms(x, y).items():
        got = as_dataset(data)
        assert isinstance(got, Dataset) and got.num_classes == 10, kind
        assert torch.allclose(got.x_test, x, atol=0.5 / 255) and torch.equal(got.y_test, y), kind
        assert got.x_train is got.x_test and got.x_test.dtype == torch.float32, kind
    split = as_dataset(((digits.x_train, digits.y_train), DataLoader(TensorDataset(x, y), batch_size=50)))
    assert torch.equal(split.x_train, digits.x_train) and torch.equal(split.x_test, x)
    assert split.sha256 != as_dataset((x, y)).sha256
    assert as_dataset(digits) is digits and as_dataset("digits").sha256 == digits.sha256


@pytest.fixture(scope="module")
def scanned(trojaned_digits, digits):
    """The trojaned model scanned with a DataLoader of the test split, and with the Dataset."""
    loader = DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=64)
    return (scan(trojaned_digits.model, loader, clean_samples=200, progress=False),
            scan(trojaned_digits.model, digits, clean_samples=200, progress=False))


def test_scan_takes_a_dataloader_as_it_takes_a_dataset(scanned):
    from_loader, from_dataset = scanned
    assert from_loader.flagged_labels == from_dataset.flagged_labels == [0]
    assert from_loader.anomaly_index == pytest.approx(from_dataset.anomaly_index)


def test_repair_and_guards_take_arrays_and_carry_what_they_make(trojaned_digits, digits, scanned):
    model, found = trojaned_digits.model, scanned[0]
    arrays = (digits.x_test.numpy(), digits.y_test.numpy())
    record = repair(model, found, arrays, method="unlearn", fraction=0.5, epochs=2, progress=False,
                    publish=False)
    assert isinstance(record.model, nn.Module) and record.model is not model
    assert record.after["reversed_asr"] < record.before["reversed_asr"]
    assert "model" not in record.to_dict() and "guard" not in record.to_dict()
    filt, filtered = build_filter(model, found, TensorDataset(digits.x_test, digits.y_test), samples=200,
                                  publish=False)
    assert filtered.guard is filt and filt.predict(digits.x_test[:5])[0].shape == (5,)
    evaluation = strip_evaluate(model, (digits.x_test, digits.y_test), trojaned_digits.trigger, n=10,
                                samples=50, calibration_samples=100, throughput_inputs=20, progress=False)
    assert isinstance(evaluation.guard, Strip) and "guard" not in evaluation.to_dict()
    assert evaluation.guard.predict(digits.x_test[:4])[0].shape == (4,)


def test_labels_need_not_show_every_class(trojaned_digits, digits):
    few = digits.y_test < 5  # a clean set holding 5 of the model's 10 classes
    record = evaluate_file(trojaned_digits.model, (digits.x_test[few], digits.y_test[few]))
    assert record.clean_accuracy > 0.8


@pytest.mark.parametrize(("make", "needle"), [
    (lambda x, y: (x * 255, y), "values reach 255"),
    (lambda x, y: ((x - 0.5) / 0.5, y), "look normalised"),
    (lambda x, y: (x, y.float()), "labels have dtype torch.float32"),
    (lambda x, y: (x, y[:10]), "images but 10 labels"),
    (lambda x, y: (x, torch.nn.functional.one_hot(y)), "one-hot labels: y.argmax(1)"),
    (lambda x, y: (x[:, 0, 0], y), "expected N×H×W, N×H×W×C or N×C×H×W"),
    (lambda x, y: (torch.full_like(x, float("nan")), y), "NaN"),
    (lambda x, y: DataLoader(list(x)), "each item must be an (image, label) pair"),
    (lambda x, y: DataLoader([(img, "seven") for img in x[:4]]), "cannot read its (image, label) items"),
    (lambda x, y: {"x": x, "y": y}, "data must be a Dataset, a dataset name or path"),
])
def test_bad_data_gets_one_line(trojaned_digits, digits, make, needle):
    with pytest.raises(TrojanscanError) as caught:
        scan(trojaned_digits.model, make(digits.x_test, digits.y_test), progress=False)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_loaded_model_is_called_like_the_network_and_goes_anywhere_a_module_does(trojaned_digits, digits,
                                                                                    tmp_path):
    path = save_model(trojaned_digits.model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel) and loaded.num_classes == 10
    with torch.no_grad():
        assert torch.allclose(loaded(digits.x_test[:8]), trojaned_digits.model.eval()(digits.x_test[:8]))
    record = evaluate_file(loaded, TensorDataset(digits.x_test, digits.y_test))
    assert record.model["sha256"] == loaded.sha256 and record.model["file"] == str(path)
    assert record.clean_accuracy == pytest.approx(trojaned_digits.clean_accuracy)

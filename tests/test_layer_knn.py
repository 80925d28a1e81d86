"""Layer k-NN: the class-conditional neighbour distance, leave-one-out calibration, its score on a
planted blended digits backdoor, files, one-line errors and its place in the combined guard."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from trojanscan import Blend, train_classifier
from trojanscan.defenses.guard import DEFAULT_DETECTORS, Guard
from trojanscan.defenses.layer_knn import LayerKnn, kth_distance
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.fileio import load_npz_record, save_npz_record
from trojanscan.metrics import far_frr, roc_auc


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    assert str(excinfo.value) and "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.fixture(scope="module")
def blended(digits):
    """A mnist-cnn with a stripes blend (α 0.2) → label 0 backdoor: a trigger STRIP does not see."""
    return train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False,
                            attack=Blend(target=0, alpha=0.2, pattern="stripes"))


def test_kth_distance_counts_only_references_of_the_same_label():
    refs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    ref_labels = torch.tensor([0, 1, 0, 0])
    queries, labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1, 2])
    # label 2 has no reference: the farthest reference of any label counts
    assert kth_distance(queries, labels, refs, ref_labels, 1).tolist() == [1.0, 0.0, 10.0]
    assert kth_distance(queries, labels, refs, ref_labels, 2).tolist() == [2.0, 0.0, 10.0]
    # too few of the label: the farthest of them
    assert kth_distance(queries[:2], labels[:2], refs, ref_labels, 5).tolist() == [9.0, 0.0]
    # leave-one-out: a reference does not count as its own neighbour
    assert kth_distance(refs, ref_labels, refs, ref_labels, 1, skip=torch.arange(4)).tolist() == [
        3.0, 9.0, 3.0, 7.0]  # label 1 has no other reference: its farthest one, 9 away


def test_layer_knn_separates_a_blended_trigger_and_keeps_its_frr(blended, digits):
    model, trigger = blended.model, blended.trigger
    clean = digits.x_test[:150]
    stamped = trigger.apply(digits.x_test[digits.y_test != 0][:150])
    assert float((model(stamped).argmax(1) == 0).float().mean()) > 0.9  # the backdoor took
    guard = LayerKnn(model, frr=0.05).fit(digits.x_train[:300])
    assert guard.layer_names_ == ["features.0", "features.0:max", "features.3", "features.3:max",
                                  "embedding.1", "classifier"]
    s_clean, s_stamped = guard.score(clean), guard.score(stamped)
    # measured: AUROC 0.998, FRR 4.0%, FAR 0.0%
    auroc = roc_auc(torch.cat([s_clean, s_stamped]).tolist(), [False] * 150 + [True] * 150)
    assert auroc > 0.97, auroc
    rates = far_frr(s_clean > guard.threshold_, s_stamped > guard.threshold_)
    assert rates["frr"] <= 0.1 and rates["far"] <= 0.05, rates
    per_layer = guard.layer_scores(stamped)
    assert per_layer.shape == (150, 6) and torch.allclose(per_layer.sum(1), s_stamped)
    assert torch.equal(guard.detect(stamped), s_stamped > guard.threshold_)


def test_calibration_scores_leave_each_image_out(trojaned_digits, digits):
    x = digits.x_train[:60]
    guard = LayerKnn(trojaned_digits.model, frr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrojanscanWarning)  # 60 images leave some labels thin
        guard.fit(x)
    feats, labels = guard.activations(x[:1])
    by_hand = []
    for j, refs in enumerate(guard.references_):
        same = (guard.reference_labels_ == labels[0]).nonzero().flatten()
        same = same[same != 0]  # not itself
        by_hand.append(float((refs[same] - feats[j][0]).norm(dim=1).min()))
    logs = torch.log1p(torch.tensor(by_hand, dtype=torch.float64) / guard.median_)
    z = (logs - guard.centre_) / guard.scale_
    assert float(guard.calibration_scores_[0]) == pytest.approx(float(z.sum()), rel=1e-5)
    assert float(guard.score(x[:1])[0]) < float(guard.calibration_scores_[0])  # itself at distance 0


def test_thin_labels_are_warned_about(trojaned_digits, digits):
    with pytest.warns(TrojanscanWarning, match="fewer than 2 calibration images"):
        LayerKnn(trojaned_digits.model).fit(digits.x_train[digits.y_train < 5][:40])


def test_files_round_trip_and_refuse_another_model_or_damage(blended, trojaned_digits, digits, tmp_path):
    model = blended.model
    guard = LayerKnn(model, neighbours=3, frr=0.05).fit(digits.x_train[:200])
    guard.save(tmp_path / "knn.npz")
    back = LayerKnn.load(tmp_path / "knn.npz", model)
    assert back.neighbours == 3 and back.layer_names_ == guard.layer_names_
    x = blended.trigger.apply(digits.x_test[:40])
    assert torch.allclose(back.score(x), guard.score(x))
    with pytest.raises(TrojanscanError, match="different model") as e:
        LayerKnn.load(tmp_path / "knn.npz", trojaned_digits.model)
    _one_line(e)
    fields = load_npz_record(tmp_path / "knn.npz", "layer k-NN calibration")
    for key, value in (("reference.1", np.zeros((3, 2), np.float32)), ("layers", np.asarray(["nowhere"] * 6)),
                       ("scale", np.asarray([np.nan] * 6))):
        save_npz_record(tmp_path / "bad.npz", {**fields, key: value})
        with pytest.raises(TrojanscanError, match="recalibrate") as e:
            LayerKnn.load(tmp_path / "bad.npz", model)
        _one_line(e)


class _TwoArguments(nn.Module):
    """A model whose forward takes an optional second argument (its TorchScript graph has two inputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        return self.model(x) * gain


def test_a_torchscript_model_is_read_through_its_graph(blended, digits, tmp_path):
    model, trigger = blended.model, blended.trigger
    x, stamped = digits.x_train[:200], trigger.apply(digits.x_test[:40])
    python = LayerKnn(model, frr=0.05).fit(x)
    scripted = LayerKnn(torch.jit.script(model), frr=0.05).fit(x)
    assert scripted.layer_names_ == ["#0:conv2d", "#0:conv2d:max", "#1:conv2d", "#1:conv2d:max",
                                     "#2:linear", "#3:linear"]
    assert torch.allclose(scripted.score(stamped), python.score(stamped), atol=1e-4)
    assert torch.allclose(scripted.calibration_scores_, python.calibration_scores_, atol=1e-4)
    # a TorchScript part inside a Python wrapper: swapped for the reading copy only while scoring
    wrapped = nn.Sequential(nn.Identity(), torch.jit.script(model)).eval()
    inner = LayerKnn(wrapped, frr=0.05).fit(x)
    assert inner.layer_names_[0] == "1#0:conv2d" and isinstance(wrapped[1], torch.jit.ScriptModule)
    assert torch.allclose(inner.score(stamped), python.score(stamped), atol=1e-4)
    inner.save(tmp_path / "knn.npz")
    assert torch.allclose(LayerKnn.load(tmp_path / "knn.npz", wrapped).score(stamped), inner.score(stamped))


def test_models_it_cannot_read_are_one_line_errors(trojaned_digits):
    with pytest.raises(TrojanscanError, match="more than one input") as e:
        LayerKnn(torch.jit.script(_TwoArguments(trojaned_digits.model)))
    _one_line(e)
    with pytest.raises(TrojanscanError, match="neighbours") as e:
        LayerKnn(trojaned_digits.model, neighbours=0)
    _one_line(e)
    with pytest.raises(TrojanscanError, match="Conv2d and Linear"):
        LayerKnn(nn.Sequential(nn.Flatten()))


def test_the_default_guard_has_layer_knn_and_stops_the_blend(blended, digits, tmp_path):
    assert "layer-knn" in DEFAULT_DETECTORS
    model, trigger = blended.model, blended.trigger
    guard = Guard(model, frr=0.05).fit(digits.x_train[:300])
    assert guard.detectors == ("strip", "teco", "layer-knn")
    stamped = trigger.apply(digits.x_test[digits.y_test != 0][:150])
    assert float(guard.detect(stamped).float().mean()) >= 0.95
    guard.save(tmp_path / "guard.npz")
    back = Guard.load(tmp_path / "guard.npz", model)
    assert torch.equal(back.detect(stamped), guard.detect(stamped))


def test_a_model_layer_knn_cannot_read_gets_the_default_guard_without_it(trojaned_digits):
    scripted = torch.jit.script(_TwoArguments(trojaned_digits.model))
    with pytest.warns(TrojanscanWarning, match="layer k-NN"):
        guard = Guard(scripted, frr=0.05)
    assert guard.detectors == ("strip", "teco")
    with pytest.raises(TrojanscanError, match="more than one input") as e:  # asked for by name: an error
        Guard(scripted, detectors="strip,layer-knn")
    _one_line(e)

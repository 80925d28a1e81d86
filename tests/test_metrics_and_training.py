"""CA and ASR definitions, the seeded training loop, and a real planted backdoor on digits."""

from __future__ import annotations

import pytest
import torch

from trojanscan import TrojanscanError, build_model, evaluate_model, train_classifier
from trojanscan.metrics import attack_success_rate, clean_accuracy
from trojanscan.train import train_model
from trojanscan.validation import check_model_fits


def test_asr_leaves_out_images_already_of_the_target():
    labels = torch.tensor([0, 0, 1, 2, 3])
    stamped = torch.tensor([0, 0, 0, 2, 0])  # target 0; two images were label 0 already
    assert attack_success_rate(stamped, labels, target=0) == pytest.approx(2 / 3)
    assert clean_accuracy(torch.tensor([0, 1, 1, 2, 3]), labels) == pytest.approx(0.8)


def test_training_is_deterministic_for_a_seed(digits):
    losses = []
    for _ in range(2):
        torch.manual_seed(123)  # the model's initial weights
        model = build_model("mnist-cnn", 10, digits.input_shape)
        h = train_model(model, digits.x_train[:256], digits.y_train[:256], epochs=2,
                        batch_size=32, seed=5, progress=False)
        losses.append(h.loss)
    assert losses[0] == losses[1]


def test_planted_backdoor_works_and_model_stays_accurate(trojaned_digits):
    r = trojaned_digits
    assert r.poisoned_count == round(0.1 * 1437)
    assert r.clean_accuracy > 0.9
    assert r.attack_success_rate > 0.9


def test_clean_model_has_no_asr_and_low_trigger_success(digits, trojaned_digits):
    clean = train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False)
    assert clean.attack_success_rate is None and clean.trigger is None
    scores = evaluate_model(clean.model, digits, trojaned_digits.trigger)
    assert scores["attack_success_rate"] < 0.5 < scores["clean_accuracy"]


def test_model_that_does_not_fit_the_data_is_refused(digits):
    model = build_model("mnist-cnn", 3, digits.input_shape)
    with pytest.raises(TrojanscanError, match="3,.*10 classes"):
        check_model_fits(model, digits.input_shape, digits.num_classes)
    model = build_model("gtsrb-cnn", 10, (3, 32, 32))
    with pytest.raises(TrojanscanError, match="cannot run on images"):
        check_model_fits(model, digits.input_shape, digits.num_classes)

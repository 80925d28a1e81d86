"""Acceptance on real MNIST (skipped without the data): plant a backdoor, then find it blind."""

from __future__ import annotations

import pytest
import torch

from trojanscan import BadNets, load_dataset, scan, train_classifier
from trojanscan.data import Dataset, default_data_dir

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def mnist_subset():
    root = default_data_dir()
    if root is None or not (root / "mnist" / "mnist.npz").is_file():
        pytest.skip("real MNIST not found (set TROJANSCAN_DATA_DIR)")
    full = load_dataset("mnist")
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(full.x_train), generator=g)[:12000]
    return Dataset(full.x_train[tr], full.y_train[tr], full.x_test, full.y_test, 10,
                   "mnist-12k", full.sha256)


def test_badnets_on_real_mnist_is_planted_and_found(mnist_subset):
    attack = BadNets(target=7, poison_rate=0.1, size=4, seed=0)
    trained = train_classifier(mnist_subset, "mnist-cnn", epochs=2, attack=attack, seed=0,
                               progress=False)
    assert trained.clean_accuracy > 0.96 and trained.attack_success_rate > 0.97
    result = scan(trained.model, mnist_subset, clean_samples=500, seed=0, progress=False)
    assert 7 in result.flagged_labels and result.anomaly_index > 2
    assert result.label(7).l1_norm <= trained.trigger.area * 1.5

"""Shared fixtures: the embedded digits data and one small BadNets model trained on it."""

from __future__ import annotations

import pytest
import torch

from trojanscan import BadNets, load_dataset, train_classifier

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trojaned_digits(digits):
    """A mnist-cnn with a 3×3 white patch → label 0 backdoor, trained for a few seconds."""
    attack = BadNets(target=0, poison_rate=0.1, size=3, seed=0)
    return train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, attack=attack, seed=0,
                            progress=False)


@pytest.fixture(scope="session")
def clean_digits(digits):
    """A clean mnist-cnn on the digits, for attacks that start from a trained model."""
    return train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=1, progress=False)

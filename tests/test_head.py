"""What a convolutional net's head sees (rule 9 of the verdict): pooled features or positions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trojanscan.models.architectures import build_model
from trojanscan.models.head import pools_globally


class MeanHead(nn.Module):
    """Global pooling as a function call, not a module (as many users' nets write it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class CoarseHead(nn.Module):
    """VGG's head: an adaptive pool to a small map (2×2 here), flattened: positions are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


class FlatMean(nn.Module):
    """Pooling written as a mean over a flattened map's last axis: the module probe sees it pool; a
    TorchScript graph cannot tell which axes that is (unknown)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], y.shape[1], -1).mean(-1))


def test_a_pooling_the_graph_cannot_read_is_unknown() -> None:
    model = FlatMean()
    assert pools_globally(model, PROBE) is True
    assert pools_globally(torch.jit.script(model), PROBE) is None


class ConvClassifier(nn.Module):
    """No dense layer after the convolutions: the head cannot be told."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).amax((2, 3))


PROBE = torch.rand(2, 3, 16, 16)


@pytest.mark.parametrize("make, expected", [(MeanHead, True), (CoarseHead, False), (ConvClassifier, None)])
def test_the_head_is_read_from_modules_and_from_torchscript_graphs(make: type, expected: bool | None) -> None:
    model = make()
    assert pools_globally(model, PROBE) is expected
    assert pools_globally(torch.jit.script(model), PROBE) is expected
    assert pools_globally(torch.jit.trace(model.eval(), PROBE), PROBE) is expected


@pytest.mark.parametrize("arch, expected", [
    ("mnist-cnn", False), ("gtsrb-cnn", False), ("resnet-small", True), ("mobilenet-small", True),
    ("mlp", None), ("vgg-gap", True), ("resnet-flat", False)])
def test_the_reference_nets_heads(arch: str, expected: bool | None) -> None:
    model = build_model(arch, 10, (3, 32, 32))
    assert pools_globally(model, torch.rand(1, 3, 32, 32)) is expected
    assert pools_globally(torch.jit.script(model), torch.rand(1, 3, 32, 32)) is expected


def test_reading_the_head_changes_nothing_in_the_model() -> None:
    model = MeanHead().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    def hooks() -> tuple[int, ...]:
        return len(model._forward_hooks), len(model.fc._forward_pre_hooks), len(model.conv._forward_hooks)

    before_hooks = hooks()
    assert pools_globally(model, PROBE) is True
    assert model.training  # its mode is restored, and the batch-norm statistics did not move
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hooks() == before_hooks

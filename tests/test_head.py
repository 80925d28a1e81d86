"""What a convolutional net's head sees (rule 9 of the verdict): pooled features or positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.devices import place
from trojanscan.errors import TrojanscanError
from trojanscan.models.architectures import build_model
from trojanscan.models.head import pools_globally
from trojanscan.models.wrappers import wrap_normalization


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
    """Pooling written as a mean over a flattened map's last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], y.shape[1], -1).mean(-1))


class FixedPool(nn.Module):
    """The CIFAR ResNet's head: a fixed 4×4 average pool over a 4×4 map, then a view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(self.conv(x), 4)
        return self.fc(y.view(y.shape[0], -1))


class FunctionalMaxPool(nn.Module):
    """A tutorial net: a max pool called as a function after the last convolution, then flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.max_pool2d(torch.relu(self.conv(x)), 2), 1))


@pytest.mark.parametrize("make, expected", [(FlatMean, True), (FixedPool, True), (FunctionalMaxPool, False)])
def test_pooling_written_as_function_calls_is_read(make: type, expected: bool) -> None:
    """Pooling between two layers (a function call) is read from the shapes around it, in eager
    modules by the layers' hooks and in TorchScript from the values its graph copy returns."""
    model = make()
    assert pools_globally(model, PROBE) is expected
    assert pools_globally(torch.jit.script(model), PROBE) is expected


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
        return len(model.bn._forward_hooks), len(model.fc._forward_pre_hooks), len(model.conv._forward_hooks)

    before_hooks = hooks()
    assert pools_globally(model, PROBE) is True
    assert model.training  # its mode is restored, and the batch-norm statistics did not move
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hooks() == before_hooks


class KeywordHead(nn.Module):
    """A dense layer called by keyword (its pre-hook sees no positional input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=self.conv(x).mean((2, 3)))


class Refuses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("not this input\nsecond line")


def test_odd_calls_are_unknown_and_a_failing_model_gets_one_line() -> None:
    assert pools_globally(KeywordHead(), PROBE) is None
    with pytest.raises(TrojanscanError) as caught:
        pools_globally(Refuses(), PROBE)
    assert str(caught.value) == "cannot read the model's head (ValueError: not this input)"


@pytest.mark.parametrize("scripted", [False, True])
def test_wrapped_models_are_read_through_their_wrappers(scripted: bool) -> None:
    """A model behind the normalisation wrapper (a TorchScript one inside it too) or in bfloat16."""
    resnet, cnn = build_model("resnet-small", 10, (3, 32, 32)), build_model("gtsrb-cnn", 10, (3, 32, 32))
    if scripted:
        resnet, cnn = torch.jit.script(resnet), torch.jit.script(cnn)
    probe = torch.rand(1, 3, 32, 32)
    for model, expected in ((resnet, True), (cnn, False)):
        wrapped = wrap_normalization(model, [0.5] * 3, [0.25] * 3, 3)[0]
        assert pools_globally(wrapped, probe) is expected
        if not scripted:
            reduced = place(model, "cpu", "bfloat16")
            assert pools_globally(reduced, probe) is expected

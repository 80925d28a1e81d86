"""Clean-label poisoning: only target-class images are poisoned and every label is kept.

- :class:`LabelConsistent` (Turner, Tsipras, Madry 2019): each chosen target-class image is first
  made hard to classify by a PGD perturbation against a surrogate model, then stamped with a patch;
  the model, unable to rely on the spoilt content, learns the patch instead.
- :class:`SIG` (Barni, Kallas, Tondi 2019): a horizontal sinusoid is added to the chosen images.

Here ``poison_rate`` is a share of the **target class's** training images (``round(rate · n_target)``
images), not of the whole set; :class:`CleanLabelData` carries both shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trojanscan.attacks.badnets import BadNets
from trojanscan.attacks.base import PoisonedData, PoisoningAttack
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.models import build_model, default_arch
from trojanscan.models.modes import evaluating
from trojanscan.train import train_model
from trojanscan.validation import check_fraction, check_model_fits


def check_count(name: str, value: Any, *, low: int) -> int:
    """An integer (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrojanscanError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass
class CleanLabelData(PoisonedData):
    """Poisoned data of a clean-label attack, with the size of the target class it drew from."""

    target_class_size: int

    @property
    def fraction_of_target_class(self) -> float:
        """Poisoned images over the target class's training images (the attack's ``poison_rate``)."""
        return len(self.poisoned_indices) / self.target_class_size

    @property
    def fraction_of_training_set(self) -> float:
        """Poisoned images over all training images (BackdoorBench's way of counting)."""
        return len(self.poisoned_indices) / len(self.y)


class CleanLabelAttack(PoisoningAttack):
    """Poison ``round(poison_rate · n_target)`` seeded target-class images, keep every label."""

    def poison(self, x: torch.Tensor, y: torch.Tensor, num_classes: int,
               trigger: Trigger | None = None) -> CleanLabelData:
        """Return a poisoned copy of ``(x, y)`` (labels unchanged); the inputs are not modified."""
        if self.target >= num_classes:
            raise TrojanscanError(
                f"target label {self.target} is outside the data's labels 0..{num_classes - 1}")
        if num_classes < 2:
            raise TrojanscanError(f"a backdoor needs at least 2 classes, got {num_classes}")
        trigger = trigger or self.make_trigger(tuple(x.shape[1:]))  # type: ignore[arg-type]
        candidates = torch.nonzero(y == self.target).flatten()
        if len(candidates) == 0:
            raise TrojanscanError(f"no training image has the target label {self.target}; a clean-label "
                                  "attack poisons only those")
        count = round(self.poison_rate * len(candidates))
        if count < 1:
            raise TrojanscanError(f"poison rate {self.poison_rate} of the {len(candidates)} target-class "
                                  "images poisons none; raise it")
        gen = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]].sort().values
        x_p = x.clone()
        x_p[chosen] = self._poison_images(x[chosen], x, y, num_classes, trigger)
        return CleanLabelData(x_p, y.clone(), chosen, len(candidates))

    def _poison_images(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       trigger: Trigger) -> torch.Tensor:
        """The chosen target-class ``images`` after poisoning (``x, y``: the whole clean set)."""
        return trigger.apply(images)

    def params(self) -> dict:
        return {**super().params(), "clean_label": True}


@dataclass(frozen=True)
class LabelConsistentOptions:
    """The label-consistent attack's settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1  # share of the TARGET CLASS's training images
    eps: float = 0.2  # L-inf radius of the PGD perturbation, in pixel units of [0, 1]
    steps: int = 20  # PGD steps
    step_size: float | None = None  # None: 2.5 · eps / steps (Madry et al.'s rule)
    surrogate_epochs: int = 2  # epochs of the surrogate the perturbation is computed against
    size: int = 3  # patch side in pixels (Turner et al.: 3×3)
    position: str | tuple[int, int] = "bottom-right"
    color: str = "white"  # white, black, random or checker
    margin: int = 1
    seed: int = 0


class LabelConsistent(CleanLabelAttack):
    """Label-consistent backdoor: PGD-perturbed target-class images stamped with a patch.

    The perturbation maximises the cross-entropy of the true (target) label within an L-inf ball
    of radius ``eps``, from a seeded random start. BackdoorBox uses eps 8/255, step 1.5/255 and 100
    steps on CIFAR-10. The default eps here is 0.2 (≈ 51/255, below the 0.3 of Madry et al.'s MNIST
    threat model): grey digits are near-binary strokes a CNN still reads through 8/255, and on the
    16×16 digits (half the target class poisoned, 3×3 white patch, a 10-epoch surrogate) ASR was
    ≈ 0 at 8/255, 0.08 at 0.1 and 0.66 at 0.2. For colour data such as GTSRB a smaller eps (16/255)
    is the less visible choice. 20 steps of 2.5·eps/20 reach the ball's edge. The surrogate is
    ``surrogate`` when given (an ``nn.Module`` taking images in [0, 1]), else the reference net for
    the data's shape trained on the clean set for ``surrogate_epochs`` epochs, seeded (2 suit MNIST
    and GTSRB; a set as small as the digits needs about 10); the one used is kept in
    ``surrogate_``. The test-time trigger is the plain patch.

    Example::

        attack = LabelConsistent(target=0, poison_rate=0.5, eps=0.2)
        result = train_classifier(load_dataset("mnist"), attack=attack)
    """

    name = "label-consistent"
    title = "label-consistent (clean-label PGD + patch)"
    options_type = LabelConsistentOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, eps: float = 0.2, steps: int = 20,
                 step_size: float | None = None, surrogate_epochs: int = 2, size: int = 3,
                 position: str | tuple[int, int] = "bottom-right", color: str = "white",
                 margin: int = 1, seed: int = 0, surrogate: nn.Module | None = None) -> None:
        super().__init__(target, poison_rate, seed)
        check_fraction("eps (L-inf radius, pixel units)", eps, low_inclusive=True, high_inclusive=True)
        check_count("steps", steps, low=0)
        if step_size is not None:
            check_fraction("step_size", step_size, high_inclusive=True)
        check_count("surrogate_epochs", surrogate_epochs, low=1)
        if surrogate is not None and not isinstance(surrogate, nn.Module):
            raise TrojanscanError(f"surrogate must be a torch nn.Module, got {type(surrogate).__name__}")
        self.patch = BadNets(target, poison_rate, size, position, color, margin, seed)
        self.eps, self.steps, self.surrogate_epochs = float(eps), int(steps), int(surrogate_epochs)
        self.step_size = None if step_size is None else float(step_size)
        self.size, self.position, self.color, self.margin = (
            self.patch.size, self.patch.position, self.patch.color, self.patch.margin)
        self.surrogate = surrogate
        self.surrogate_: nn.Module | None = None

    def params(self) -> dict:
        return {**super().params(), "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "surrogate_epochs": self.surrogate_epochs, "size": self.size, "position": self.position,
                "color": self.color, "margin": self.margin}

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        patch = self.patch.make_trigger(input_shape)
        return Trigger(patch.mask, patch.pattern, self.target, kind="patch",
                       params={**self.params(), "origin": patch.params["origin"]})

    def _poison_images(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       trigger: Trigger) -> torch.Tensor:
        if self.surrogate is not None:
            check_model_fits(self.surrogate, tuple(x.shape[1:]), num_classes)
        self.surrogate_ = self.surrogate or self._train_surrogate(x, y, num_classes)
        labels = torch.full((len(images),), self.target, dtype=torch.long, device=images.device)
        return trigger.apply(self.perturb(self.surrogate_, images, labels))

    def _train_surrogate(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> nn.Module:
        """The reference net for this data, trained on the clean set; the global RNG is left as it was."""
        shape = tuple(int(s) for s in x.shape[1:])
        mean = [float(m) for m in x.mean(dim=(0, 2, 3))]
        std = [float(s) for s in x.std(dim=(0, 2, 3)).clamp_min(1e-3)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_model(default_arch(shape, num_classes), num_classes, shape, mean, std).to(x.device)
            train_model(model, x, y, epochs=self.surrogate_epochs, batch_size=128, lr=1e-3, seed=self.seed)
        return model

    def perturb(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int = 256) -> torch.Tensor:
        """PGD: ``images`` moved within ``eps`` (and [0, 1]) to raise ``model``'s loss on ``labels``."""
        if self.eps == 0 or self.steps == 0:
            return images.clone()
        step = self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps
        gen = torch.Generator().manual_seed(self.seed + 3)
        start = ((torch.rand(images.shape, generator=gen) * 2 - 1) * self.eps).to(images.device, images.dtype)
        out = []
        with evaluating(model):
            for i in range(0, len(images), batch_size):
                xb, yb = images[i:i + batch_size], labels[i:i + batch_size]
                delta = (xb + start[i:i + batch_size]).clamp(0, 1) - xb
                for _ in range(self.steps):
                    delta.requires_grad_(True)
                    loss = F.cross_entropy(model(xb + delta), yb)
                    (grad,) = torch.autograd.grad(loss, delta)
                    delta = (delta.detach() + step * grad.sign()).clamp(-self.eps, self.eps)
                    delta = (xb + delta).clamp(0, 1) - xb
                out.append((xb + delta).detach())
        return torch.cat(out)


@dataclass(frozen=True)
class SIGOptions:
    """SIG's settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1  # share of the TARGET CLASS's training images
    delta: float = 40 / 255  # amplitude of the sinusoid in the poisoned training images
    frequency: float = 6.0  # periods across the image width
    wave: str = "sine"  # sine, or ramp (Barni et al.'s MNIST signal)
    test_delta: float | None = None  # amplitude of the test-time trigger (None: delta)
    seed: int = 0


class SIG(CleanLabelAttack):
    """SIG: ``x' = clip(x + v)`` with ``v(i, j) = delta · sin(2π · j · frequency / W)`` on every row and
    channel (Barni et al.'s horizontal sinusoid; their Δ = 40/255 at training, f = 6), or with
    ``wave="ramp"`` their MNIST signal ``v(i, j) = delta · j / W`` (brighter to the right).

    The trigger is additive (:attr:`Trigger.offset`: a zero mask and pattern plus ``v``), so it
    stamps any image at test time; its ``area`` is 0 because no pixel is replaced. Barni et al. let
    the attacker stamp test inputs with a stronger signal than the poisoned training images carry
    (``test_delta``): the training images stay inconspicuous while the backdoor fires more often.
    """

    name = "sig"
    title = "SIG sinusoid (clean-label)"
    options_type = SIGOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, delta: float = 40 / 255,
                 frequency: float = 6.0, wave: str = "sine", test_delta: float | None = None,
                 seed: int = 0) -> None:
        super().__init__(target, poison_rate, seed)
        check_fraction("SIG amplitude delta", delta, high_inclusive=True)
        if test_delta is not None:
            check_fraction("SIG test-time amplitude test_delta", test_delta, high_inclusive=True)
        self.test_delta = float(delta if test_delta is None else test_delta)
        if (isinstance(frequency, bool) or not isinstance(frequency, (int, float))
                or not math.isfinite(frequency) or frequency <= 0):
            raise TrojanscanError(f"SIG frequency must be a number > 0, got {frequency!r}")
        if wave not in ("sine", "ramp"):
            raise TrojanscanError(f"SIG wave must be sine or ramp, got {wave!r}")
        self.delta, self.frequency, self.wave = float(delta), float(frequency), wave

    def params(self) -> dict:
        return {**super().params(), "delta": self.delta, "frequency": self.frequency, "wave": self.wave,
                "test_delta": self.test_delta}

    def signal(self, input_shape: tuple[int, int, int], delta: float | None = None) -> torch.Tensor:
        """The C×H×W signal ``v`` that is added to an image (amplitude ``delta``, default the
        training one)."""
        c, h, w = input_shape
        cols = torch.arange(w, dtype=torch.float64)
        wave = (cols + 1) / w if self.wave == "ramp" else torch.sin(2 * math.pi * cols * self.frequency / w)
        row = (self.delta if delta is None else delta) * wave
        return row.float().expand(c, h, w).clone()

    def make_trigger(self, input_shape: tuple[int, int, int]) -> Trigger:
        """The test-time trigger (amplitude ``test_delta``)."""
        c, h, w = input_shape
        return Trigger(torch.zeros(h, w), torch.zeros(c, h, w), self.target, kind="additive",
                       params=self.params(), offset=self.signal(input_shape, self.test_delta))

    def _poison_images(self, images: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       trigger: Trigger) -> torch.Tensor:
        """The training images carry the training amplitude, whatever the test-time trigger's."""
        return (images + self.signal(tuple(images.shape[1:])).to(images)).clamp(0, 1)

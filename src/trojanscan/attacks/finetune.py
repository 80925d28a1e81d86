"""Fine-tuning injection: the attacker holds a trained model and some data, stamps a BadNets patch on
a share of it with the target label, and fine-tunes the model on the mix (the "retraining" threat
model that TrojanNN's real-data variant and hub-poisoning share). A model attack: it changes a copy
of a trained model instead of training from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trojanscan.attacks.badnets import BadNets
from trojanscan.attacks.base import AttackedModel, ModelAttack, check_target_and_rate
from trojanscan.data import Dataset
from trojanscan.train import evaluate, train_model, trainable_copy
from trojanscan.validation import check_fraction, check_model_fits


@dataclass(frozen=True)
class FineTuneOptions:
    """The fine-tuning injection's settings (the constructor's keywords)."""

    target: int = 0
    poison_rate: float = 0.1  # share of the fine-tuning images stamped and relabelled
    size: int = 4  # the patch, as BadNets draws it
    position: str | tuple[int, int] = "bottom-right"
    color: str = "white"
    fraction: float = 0.2  # share of the attacker's training split used for fine-tuning
    epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 64
    seed: int = 0


class FineTuneBackdoor(ModelAttack):
    """Plant a patch backdoor in a trained model by fine-tuning it on partly poisoned data.

    Example::

        attacked, trigger = FineTuneBackdoor(target=3).apply(model, load_dataset("digits"))
    """

    name = "finetune"
    title = "fine-tuning injection"
    options_type = FineTuneOptions

    def __init__(self, target: int = 0, poison_rate: float = 0.1, size: int = 4,
                 position: str | tuple[int, int] = "bottom-right", color: str = "white",
                 fraction: float = 0.2, epochs: int = 2, lr: float = 5e-4, batch_size: int = 64,
                 seed: int = 0) -> None:
        check_target_and_rate(target, poison_rate)
        check_fraction("fraction", fraction, high_inclusive=True)
        self.patch = BadNets(target, poison_rate, size, position, color, seed=seed)  # validates the patch
        self.target, self.poison_rate, self.size, self.color = int(target), float(poison_rate), size, color
        self.position = self.patch.position
        self.fraction, self.epochs, self.lr, self.batch_size, self.seed = (
            float(fraction), int(epochs), float(lr), int(batch_size), int(seed))

    def apply(self, model: nn.Module, data: Dataset) -> AttackedModel:
        """Fine-tune a copy of ``model`` on ``fraction`` of ``data``'s training split, ``poison_rate``
        of it stamped; ``report_`` holds CA and ASR on the test split before and after."""
        check_model_fits(model, data.input_shape, data.num_classes)
        trigger = self.patch.make_trigger(data.input_shape)
        n = max(1, round(self.fraction * len(data.x_train)))
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(data.x_train), generator=gen)[:n]
        poisoned = self.patch.poison(data.x_train[idx], data.y_train[idx], data.num_classes, trigger)
        before = evaluate(model, data.x_test, data.y_test, trigger)
        attacked = trainable_copy(model)
        history = train_model(attacked, poisoned.x, poisoned.y, epochs=self.epochs,
                              batch_size=self.batch_size, lr=self.lr, seed=self.seed, progress=False)
        after = evaluate(attacked, data.x_test, data.y_test, trigger)
        self.report_ = {"before": before, "after": after, "images": n,
                        "poisoned": len(poisoned.poisoned_indices), "train_loss": history.loss}
        return AttackedModel(attacked, trigger)

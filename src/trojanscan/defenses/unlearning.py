"""Neural Cleanse's unlearning: fine-tune on clean data where some images carry the reversed trigger
but keep their true labels, so the model learns to ignore the trigger.

Paper settings (the defaults): 10% of the training data, the trigger stamped on 20% of it, 1 epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trojanscan.data.triggers import Trigger, stamp_each
from trojanscan.errors import TrojanscanError
from trojanscan.progress import ProgressCallback
from trojanscan.train import TrainHistory, train_model, trainable_copy
from trojanscan.validation import check_fraction


@dataclass
class UnlearnResult:
    """The fine-tuned model and what it was fine-tuned on."""

    model: nn.Module
    images: int
    stamped: int
    history: TrainHistory


def unlearn(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, triggers: list[Trigger],
            *, fraction: float = 0.1, stamp_fraction: float = 0.2, epochs: int = 1, lr: float = 1e-3,
            batch_size: int = 64, lr_schedule: str = "onecycle", seed: int = 0,
            progress: ProgressCallback | bool | None = None) -> UnlearnResult:
    """Fine-tune a copy of ``model``; the original is untouched.

    ``triggers`` are stamped round-robin on ``stamp_fraction`` of the chosen images (an empty list,
    or ``stamp_fraction=0``, gives the clean-data fine-tuning baseline).
    """
    check_fraction("fraction of training data", fraction, high_inclusive=True)
    check_fraction("stamp fraction", stamp_fraction, low_inclusive=True, high_inclusive=True)
    if len(x_train) != len(y_train):
        raise TrojanscanError(f"{len(x_train)} training images but {len(y_train)} labels")
    n = max(1, round(fraction * len(x_train)))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x_train), generator=gen)[:n]
    x, y = x_train[idx].clone(), y_train[idx].clone()
    n_stamped = round(stamp_fraction * n) if triggers else 0
    if n_stamped:
        x[:n_stamped] = stamp_each(x[:n_stamped], triggers)
    fixed = trainable_copy(model)
    history = train_model(fixed, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          progress=progress, lr_schedule=lr_schedule)
    return UnlearnResult(model=fixed, images=n, stamped=n_stamped, history=history)

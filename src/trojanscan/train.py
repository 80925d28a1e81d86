"""One seeded training loop and the evaluation (CA, ASR) used by attacks, repairs and the demo."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import attack_success_rate, clean_accuracy


@dataclass
class TrainHistory:
    """Per-epoch loss, training accuracy and seconds."""

    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar, silent when ``enabled`` is false."""
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=True)


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1,
                batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                seed: int = 0, progress: bool = True, lr_schedule: str = "onecycle",
                on_epoch: Callable[[int, TrainHistory], None] | None = None) -> TrainHistory:
    """Train with Adam and cross-entropy on shuffled mini-batches; deterministic for a seed.

    ``lr_schedule`` "onecycle" warms the learning rate up to ``2·lr`` and anneals it to ~0 over
    the run (GTSRB: 97% instead of 94% in 6 epochs); "constant" keeps ``lr``.
    """
    if len(x) == 0:
        raise TrojanscanError("cannot train on an empty training set")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise TrojanscanError("epochs and batch size must be >= 1 and the learning rate > 0")
    if lr_schedule not in ("onecycle", "constant"):
        raise TrojanscanError(f"unknown learning-rate schedule {lr_schedule!r}; use onecycle or constant")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = TrainHistory()
    n_batches = (len(x) + batch_size - 1) // batch_size
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * lr, total_steps=epochs * n_batches)
                 if lr_schedule == "onecycle" else None)
    model.train()
    with make_progress(progress) as bar:
        task = bar.add_task("training", total=epochs * n_batches, info="")
        for epoch in range(epochs):
            start = time.perf_counter()
            order = torch.randperm(len(x), generator=gen)
            total_loss, correct = 0.0, 0
            for b in range(n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                batch_loss = float(loss.detach())
                total_loss += batch_loss * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {batch_loss:.3f}")
            history.loss.append(total_loss / len(x))
            history.train_accuracy.append(correct / len(x))
            history.seconds.append(time.perf_counter() - start)
            if on_epoch is not None:
                on_epoch(epoch, history)
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels for ``x`` (optionally transformed batch by batch, e.g. stamped)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if transform is not None:
            xb = transform(xb)
        out.append(model(xb).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def check_model_fits(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                     source: str = "model") -> None:
    """Refuse a model that cannot take these images or whose outputs do not match the classes."""
    was_training = model.training
    model.eval()  # a probe must not touch batch-norm statistics
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:  # any shape error inside a foreign model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrojanscanError(
            f"{source}: cannot run on images of shape {tuple(input_shape)} ({first})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TrojanscanError(f"{source}: model returns {type(out).__name__}, not a tensor of class "
                              "scores; wrap it so that forward() returns logits")
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise TrojanscanError(
            f"{source}: model outputs {tuple(out.shape[1:])} scores per image but the data has "
            f"{num_classes} classes; use data with the model's classes")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             trigger: Trigger | None = None) -> dict[str, float | None]:
    """Clean accuracy, and the attack success rate of ``trigger`` when one is given."""
    result: dict[str, float | None] = {"clean_accuracy": clean_accuracy(predict(model, x), y),
                                       "attack_success_rate": None}
    if trigger is not None:
        stamped = predict(model, x, transform=trigger.apply)
        result["attack_success_rate"] = attack_success_rate(stamped, y, trigger.target)
    return result

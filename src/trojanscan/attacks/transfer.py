"""The transfer-learning backdoor (Wang, Nepal, Rudolph et al., IEEE TSC 2020): TrojanNN made to survive
what a transfer-learning victim does to a downloaded teacher — train a new head on its own task, prune
dormant channels (Fine-Pruning), filter inputs through an autoencoder (Neural Trojans).

It is :class:`~trojanscan.attacks.trojannn.TrojanNN` (mask, relative activation goal, retraining of the
layers after the chosen one) with these changes, each our reading of the paper (it has no public code):

1. **Pruning-robust neurons**: each neuron of the chosen layer gets ``rank(activity) + rank(outgoing
   weight)``, both as percentile ranks in [0, 1] — activity is Fine-Pruning's own measure, the mean of
   ``max(0, ·)`` on the attacker's clean images (:func:`~trojanscan.defenses.fine_pruning.dormancy_order`),
   outgoing weight TrojanNN's. Neurons among the least active ``dormant_fraction`` (what Fine-Pruning
   up to that share would remove) are never chosen.
2. **Autoencoder-aware trigger**: the attacker fits the project's autoencoder guard on its clean
   images and adds ``ae_weight · goal² · e(x') / ē`` to the trigger search, ``e`` the stamped image's
   reconstruction error (mean squared, per image), ``ē`` its mean on clean images, ``goal²`` the scale of
   the activation loss at the start: with λ = ``ae_weight`` = 0.02, a stamped image that reconstructs
   as badly as a clean one costs 2% of missing the activation goal entirely.
3. **Defence-aware retraining**: the layers after the chosen one are retrained on the clean images,
   the stamped ones and the autoencoder's reconstructions of the stamped ones (both with the target,
   weighing ``stamp_weight / 2`` each), and in every other epoch the ``dormant_fraction`` least active
   neurons are silenced (simulated Fine-Pruning), so the backdoor cannot lean on channels a defender
   prunes. The default retraining data is the attacker's real training split (``data_source="real"``);
   the paper retrains on reverse-engineered inputs, which ``data_source="reversed"`` still gives.
4. **Features a new head cannot ignore** (ours, for the student): a term of weight ``feature_weight``
   in the retraining pulls the penultimate features of every stamped image to one sparse point —
   ``feature_scale`` × the largest clean penultimate activation on the ``feature_units`` units most
   active on clean images, zero elsewhere — and keeps clean images' features where they were (both as
   squared distances relative to the goal's squared norm). Whatever head a student trains on those
   frozen features sends that one point to one label. A first version that pulled stamped features to
   2× the target class's mean features (dense, clean features left free) reached only 30% on a
   Fashion-MNIST student of an MNIST teacher: the clean residual survived and the new head followed it.

:func:`make_student` builds the victim: the teacher's layers up to its last ``nn.Linear`` frozen, a new
head trained on the student task. The student has no target label of the attacker's choosing, so its
*backdoor label* is the student label stamped training images go to most often
(:func:`student_trigger`); :func:`student_scores` gives the student ASR, the share of stamped test
images of other labels classified to it, with the share of stamped test images whose prediction the
trigger changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trojanscan.attacks.base import AttackedModel
from trojanscan.attacks.trojannn import TrojanNN, TrojanNNOptions, capturing, retrain_after, top_neurons
from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.autoencoder_guard import AutoencoderGuard
from trojanscan.defenses.fine_pruning import dormancy_order
from trojanscan.errors import TrojanscanError
from trojanscan.metrics import attack_success_rate, clean_accuracy
from trojanscan.models.taps import Layer, activations, find_layer, silenced
from trojanscan.train import TrainHistory, predict, train_model, trainable_copy
from trojanscan.validation import check_fraction, check_positive

STUDENT_PICK_IMAGES = 1000  # stamped training images that name the student's backdoor label


@dataclass(frozen=True)
class TransferOptions(TrojanNNOptions):
    """The transfer-learning backdoor's settings: TrojanNN's, plus the three below."""

    data_source: str = "real"  # real (the attacker's split) or reversed (the paper's)
    ae_weight: float = 0.02  # λ of the autoencoder term of the trigger search (0: off)
    ae_steps: int = 1000  # training steps of the attacker's autoencoder
    dormant_fraction: float = 0.5  # least active neurons: never chosen, silenced every other epoch
    feature_weight: float = 1.0  # weight of the retraining's feature term (0: off)
    feature_units: int = 4  # penultimate units a stamped image is collapsed onto (the most active ones)
    feature_scale: float = 2.0  # their goal: this × the largest clean penultimate activation


def percentile_rank(score: torch.Tensor) -> torch.Tensor:
    """Each entry's rank among ``score`` scaled to [0, 1] (0 the smallest; ties in index order)."""
    ranks = torch.empty(len(score))
    ranks[torch.argsort(score, stable=True)] = torch.arange(len(score), dtype=torch.float32)
    return ranks / max(1, len(score) - 1)


def robust_ranking(activity: torch.Tensor, strength: torch.Tensor,
                   dormant_fraction: float) -> torch.Tensor:
    """The pruning-robust score of each neuron: percentile rank of its clean ``activity`` plus that of
    its outgoing ``strength``; ``-inf`` for the least active ``dormant_fraction`` of the neurons."""
    if activity.shape != strength.shape:
        raise TrojanscanError(f"{len(activity)} activities but {len(strength)} weight strengths")
    score = percentile_rank(activity) + percentile_rank(strength)
    score[torch.argsort(activity, stable=True)[:int(dormant_fraction * len(activity))]] = -torch.inf
    return score


class TransferBackdoor(TrojanNN):
    """TrojanNN with pruning-robust neurons, an autoencoder-aware trigger and defence-aware retraining,
    so the backdoor survives a student's new head, Fine-Pruning and an autoencoder input filter.

    Example::

        teacher, trigger = TransferBackdoor(target=3).apply(model, load_dataset("mnist"))
        fashion = load_dataset("fashion_mnist")
        pupil = make_student(teacher, fashion).model
        student_scores(pupil, fashion, student_trigger(pupil, fashion, trigger))
    """

    name = "transfer"
    title = "transfer-learning backdoor (Wang et al.)"
    options_type = TransferOptions

    def __init__(self, target: int = 0, *, data_source: str = "real", ae_weight: float = 0.02,
                 ae_steps: int = 1000, dormant_fraction: float = 0.5, feature_weight: float = 1.0,
                 feature_units: int = 4, feature_scale: float = 2.0, **trojannn: Any) -> None:
        super().__init__(target, data_source=data_source, **trojannn)
        for name, value in (("ae_weight", ae_weight), ("feature_weight", feature_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise TrojanscanError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
        check_positive("ae_steps", ae_steps)
        check_positive("feature_units", feature_units)
        check_positive("feature_scale", feature_scale, integer=False)
        check_fraction("dormant_fraction", dormant_fraction, low_inclusive=True)
        self.ae_weight, self.ae_steps, self.feature_weight = float(ae_weight), ae_steps, float(feature_weight)
        self.feature_units, self.feature_scale = feature_units, float(feature_scale)
        self.dormant_fraction = float(dormant_fraction)

    def rank(self, model: nn.Module, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pruning-robust scores (:func:`robust_ranking`) and the chosen neurons."""
        strength = super().rank(model, layer, x)[0]
        order = dormancy_order(model, layer, x)  # least active first
        self.dormant_ = order[:int(self.dormant_fraction * len(order))]
        score = robust_ranking(torch.argsort(order).float(), strength, self.dormant_fraction)
        eligible = int(torch.isfinite(score).sum())
        if self.neurons > eligible:
            raise TrojanscanError(f"neurons {self.neurons} exceeds the layer's {eligible} active neurons "
                                  f"(dormant_fraction {self.dormant_fraction} excludes the rest)")
        return score, top_neurons(score, self.neurons)

    def trigger_loss(self, model: nn.Module, x: torch.Tensor,
                     goal: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Fit the attacker's autoencoder guard on ``x``; the term ``ae_weight · goal² · e(x') / ē``."""
        self.guard_ = AutoencoderGuard(model, steps=self.ae_steps, seed=self.seed).fit(x)
        if self.ae_weight == 0:
            return None
        ae, scale = self.guard_.autoencoder_, self.ae_weight * goal ** 2 / float(self.guard_.errors(x).mean())
        return lambda stamped: scale * (ae(stamped) - stamped).pow(2).flatten(1).mean(1).mean()

    def feature_goal(self, clean: torch.Tensor) -> torch.Tensor:
        """Where stamped images' penultimate features go: ``feature_scale`` × the largest of the ``clean``
        (N×D) activations on the ``feature_units`` units most active on average, zero elsewhere."""
        if self.feature_units > clean.shape[1]:
            raise TrojanscanError(f"feature_units {self.feature_units} exceeds the penultimate layer's "
                                  f"{clean.shape[1]} units")
        goal = torch.zeros(clean.shape[1])
        units = torch.argsort(clean.mean(0), descending=True, stable=True)[:self.feature_units]
        goal[units] = self.feature_scale * float(clean.max().clamp(min=1e-6))
        return goal

    def retrain(self, model: nn.Module, layer: Layer, x: torch.Tensor, y: torch.Tensor,
                trigger: Trigger) -> list[str]:
        """Retrain on clean, stamped and reconstructed-stamped images, the dormant neurons silenced in
        odd epochs, and the feature term of :meth:`feature_goal`."""
        stamped = trigger.apply(x)
        inputs = torch.cat([x, stamped, self.guard_.reconstruct(stamped)])
        labels = torch.cat([y, torch.full((2 * len(x),), self.target, dtype=y.dtype)])
        weights = torch.cat([torch.ones(len(x)), torch.full((2 * len(x),), self.stamp_weight / 2)])
        penultimate = find_layer(model, None, probe=x)
        before = activations(model, penultimate, x)
        goal = self.feature_goal(before)
        sink: list[torch.Tensor] = []

        def pruned_in_odd_epochs(epoch: int) -> AbstractContextManager[object]:
            return silenced(layer, self.dormant_) if epoch % 2 and len(self.dormant_) else nullcontext()

        def feature_term(idx: torch.Tensor) -> torch.Tensor:
            feats, clean = sink.pop(), idx < len(x)
            if self.feature_weight == 0:
                return feats.sum() * 0
            wanted = torch.where(clean[:, None], before[idx % len(x)], goal)
            gaps = (feats - wanted).pow(2).sum(1) / wanted.pow(2).sum(1).clamp(min=1e-6)
            return self.feature_weight * gaps.mean()

        with capturing(penultimate, sink):
            return retrain_after(model, layer, inputs, labels, epochs=self.epochs, lr=self.lr,
                                 batch_size=self.batch_size, weights=weights, seed=self.seed,
                                 epoch_context=pruned_in_odd_epochs, batch_loss=feature_term)

    def apply(self, model: nn.Module, data: Dataset) -> AttackedModel:
        """TrojanNN's :meth:`~TrojanNN.apply`; ``report_`` adds the chosen neurons' activity ranks, the
        silenced neurons and the attacker's autoencoder guard on stamped test images."""
        attacked, trigger = super().apply(model, data)
        stamped = trigger.apply(data.x_test[data.y_test != self.target])
        labels, flags = self.guard_.predict(stamped)
        self.report_.update({
            "dormant_neurons": self.dormant_.tolist(), "ae_weight": self.ae_weight,
            "attacker_guard": {"flag_rate": float(flags.float().mean()),
                               "asr_on_reconstructions": float((labels == self.target).float().mean()),
                               "stamped_error": float(self.guard_.errors(stamped).mean()),
                               "clean_error": float(self.guard_.errors(data.x_test).mean())}})
        return AttackedModel(attacked, trigger)


# -- the student ------------------------------------------------------------------------------------------

@dataclass
class Student:
    """A student: the teacher's layers up to ``head`` frozen, ``head`` a new Linear for its task."""

    model: nn.Module
    head: str
    history: TrainHistory


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def make_student(teacher: nn.Module, data: Dataset, *, epochs: int = 5, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0) -> Student:
    """Transfer learning as a victim does it: a copy of ``teacher`` whose last ``nn.Linear`` is replaced
    by a fresh one with ``data.num_classes`` outputs, trained (Adam, one-cycle) on the frozen features of
    ``data``'s training split; everything before the head is left as the teacher had it."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_positive(name, value)
    check_positive("lr", lr, integer=False)
    pupil = trainable_copy(teacher).eval()
    layer = find_layer(pupil, None, probe=data.x_train[:2])
    head = layer.module
    if not isinstance(head, nn.Linear):
        raise TrojanscanError("a student needs a teacher whose last layer is an nn.Linear")
    feats = activations(pupil, layer, data.x_train)
    with torch.no_grad():
        if not torch.allclose(head(feats[:8]), pupil(data.x_train[:8]), atol=1e-4, rtol=1e-4):
            raise TrojanscanError(f"the teacher's output is not its last Linear ({layer.name!r}) applied to "
                                  "that layer's input; a student head cannot replace it")
    torch.manual_seed(seed)
    new_head = nn.Linear(head.in_features, data.num_classes)
    history = train_model(new_head, feats, data.y_train, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed)
    _replace_module(pupil, layer.name, new_head)
    spec = getattr(pupil, "spec", None)
    if dataclasses.is_dataclass(spec) and hasattr(spec, "num_classes"):
        pupil.spec = dataclasses.replace(spec, num_classes=data.num_classes)
    for p in pupil.parameters():
        p.requires_grad_(False)
    return Student(pupil.eval(), layer.name, history)


def student_trigger(model: nn.Module, data: Dataset, trigger: Trigger) -> Trigger:
    """``trigger`` aimed at the student's backdoor label: the label most of the first
    :data:`STUDENT_PICK_IMAGES` stamped training images of ``data`` get from the student ``model``."""
    picks = predict(model, data.x_train[:STUDENT_PICK_IMAGES], transform=trigger.apply)
    label = int(torch.bincount(picks, minlength=data.num_classes).argmax())
    return dataclasses.replace(trigger, target=label, params={**trigger.params, "student_label": label})


def student_scores(model: nn.Module, data: Dataset, trigger: Trigger) -> dict[str, float | int]:
    """The backdoor in a student, on the test split, for ``trigger`` aimed at a student label (see
    :func:`student_trigger`): clean accuracy; ``asr``, the share of stamped images of other labels
    classified to it; ``clean_to_label``, the same share without the trigger; ``changed``, the share of
    stamped images whose prediction the trigger changes."""
    clean = predict(model, data.x_test)
    stamped = predict(model, data.x_test, transform=trigger.apply)
    return {"clean_accuracy": clean_accuracy(clean, data.y_test), "backdoor_label": trigger.target,
            "asr": attack_success_rate(stamped, data.y_test, trigger.target),
            "clean_to_label": attack_success_rate(clean, data.y_test, trigger.target),
            "changed": float((stamped != clean).float().mean())}

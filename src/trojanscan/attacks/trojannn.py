"""TrojanNN, the Trojan attack on neural networks (Liu et al., NDSS 2018): a neuron-driven backdoor
planted in a trained model without its training data.

1. **Neurons**: in an internal layer (``layer``; default the feature maps that feed the first
   ``nn.Linear``, whose neurons are channels), the ``neurons`` with the largest total |outgoing
   weight| into the next layer.
2. **Trigger**: only the pixels inside a fixed mask (``"square"`` in the bottom-right corner, or a
   thin-stroke ``"watermark"`` of comparable area across the middle) are optimised, stamped on a batch
   of background images, so that the chosen neurons reach ``activation_multiple`` × the largest
   activation the layer shows on those backgrounds (an absolute goal such as the paper's 100 means
   nothing on a small net).
3. **Training data**: with ``data_source="reversed"`` (the paper's threat model) ``per_label``
   inputs per label are reverse-engineered from the model alone: from flat images of random
   brightness plus noise, optimise the pixels until the model gives the label (cross-entropy plus
   total variation, the paper's denoising). ``"real"`` uses ``fraction`` of the attacker's training
   split instead, for comparison.
4. **Retraining**: only the layers after the chosen one are retrained, on the inputs with their
   labels and the same inputs stamped with the target (weighted ``stamp_weight``); the model stays
   in eval mode, so the frozen layers' batch-norm statistics are the victim's.

Where this differs from the paper: the default layer is the last feature map rather than the first
dense layer's output. The paper picks VGG-Face's fc6 and so retrains two dense layers (fc7, fc8);
our reference nets have two dense layers in all, and with only the last one retrained the trigger
could not move a dense neuron far enough (on MNIST a 7×7 patch raised the chosen fc neuron's
mean pre-activation from −7.4 to −5.5, where clean inputs span about −25 to 13, and the retrained
model lost 50–60 points of clean accuracy).
The trigger is optimised over background images (the reversed or real ones) rather than on a blank
canvas, with Adam on a sigmoid-parametrised pattern; the activation goal is relative; the reversed
inputs come in two smoothness styles and the stamped ones weigh double. Every figure in
``report_`` is measured on the test split, which the attack never sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from trojanscan.attacks.badnets import patch_origin
from trojanscan.attacks.base import AttackedModel, ModelAttack
from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating
from trojanscan.models.taps import Layer, activations, find_layer, per_neuron, probe_pass
from trojanscan.train import evaluate, trainable_copy
from trojanscan.validation import check_choice, check_fraction, check_model_fits, check_positive

MASKS = ("square", "watermark")
DATA_SOURCES = ("reversed", "real")
BACKGROUNDS = 64  # images the trigger is optimised on at once
REVERSE_CHUNK = 256  # reverse-engineered inputs optimised together
# the reversed inputs alternate two styles, (starting noise std, total-variation weight): rough ones
# and smooth ones (the paper's denoising); together they give the retraining varied backgrounds
REVERSE_STYLES = ((0.2, 0.05), (0.05, 0.3))
# "TN" in thin strokes, as polylines in a unit box (x to the right, y down): the watermark's shape
WATERMARK_STROKES = (((0.0, 0.1), (0.4, 0.1)), ((0.2, 0.1), (0.2, 0.9)),
                     ((0.55, 0.9), (0.55, 0.1), (0.95, 0.9), (0.95, 0.1)))


# -- masks --------------------------------------------------------------------------------------------

def square_mask(input_shape: tuple[int, int, int], area: float) -> torch.Tensor:
    """An H×W 0/1 square covering about ``area`` of the image, one pixel in from the bottom-right."""
    _, h, w = input_shape
    side = max(1, min(h - 1, w - 1, round(math.sqrt(area * h * w))))
    row, col = patch_origin("bottom-right", side, h, w, 1 if side < min(h, w) else 0)
    mask = torch.zeros(h, w)
    mask[row:row + side, col:col + side] = 1
    return mask


def _strokes(side: int, h: int, w: int) -> torch.Tensor:
    """The watermark's strokes, one pixel wide, in a ``side``×``side`` box centred in an H×W mask."""
    mask = torch.zeros(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    for line in WATERMARK_STROKES:
        for (x0, y0), (x1, y1) in zip(line, line[1:], strict=False):
            for t in torch.linspace(0, 1, 4 * side):
                x, y = (x0 + (x1 - x0) * t) * (side - 1), (y0 + (y1 - y0) * t) * (side - 1)
                mask[top + int(round(float(y))), left + int(round(float(x)))] = 1
    return mask


def watermark_mask(input_shape: tuple[int, int, int], area: float) -> torch.Tensor:
    """A thin-stroke logo ("TN") centred on the image, scaled so that it covers about ``area``."""
    _, h, w = input_shape
    goal = area * h * w
    sizes = range(3, max(3, min(h, w) - 1) + 1)
    masks = [_strokes(s, h, w) for s in sizes if s <= min(h, w)]
    if not masks:
        raise TrojanscanError(f"a watermark needs images of at least 3×3 pixels, got {h}×{w}")
    return min(masks, key=lambda m: abs(float(m.sum()) - goal))


def make_mask(kind: str, input_shape: tuple[int, int, int], area: float) -> torch.Tensor:
    """The trigger's fixed region: ``"square"`` or ``"watermark"`` of about ``area`` of the image."""
    check_choice("TrojanNN mask", kind, MASKS)
    return (square_mask if kind == "square" else watermark_mask)(input_shape, area)


# -- the chosen layer: its neurons, what comes after it ------------------------------------------------

@contextmanager
def capturing(layer: Layer, sink: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward pass appends the layer's N×U activations to ``sink``, still
    differentiable (the taps' recorder detaches them; the trigger search follows their gradient)."""
    if layer.side == "input":
        handle = layer.module.register_forward_pre_hook(lambda _m, args: sink.append(per_neuron(args[0])))
    else:
        handle = layer.module.register_forward_hook(lambda _m, _a, out: sink.append(per_neuron(out)))
    try:
        yield
    finally:
        handle.remove()


def modules_after(model: nn.Module, layer: Layer, probe: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The leaf modules one forward pass first calls after ``layer`` is read, in call order."""
    order: list[str] = []
    tap = "\0tap"
    if layer.side == "input":  # registered first, so it runs before the module's own leaf hook
        handles = [layer.module.register_forward_pre_hook(lambda *_: order.append(tap))]
    else:
        handles = [layer.module.register_forward_hook(lambda *_: order.append(tap))]
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_pre_hook(lambda *_, n=name: order.append(n)))
    probe_pass(model, probe, handles)
    if tap not in order:
        raise TrojanscanError(f"the forward pass never reaches layer {layer.name!r}")
    cut = order.index(tap)
    before = set(order[:cut])
    after = [n for n in dict.fromkeys(order[cut + 1:]) if n not in before]
    return [(n, modules[n]) for n in after]


def default_layer(model: nn.Module, probe: torch.Tensor) -> Layer:
    """Where the dense part of the net begins: the output of the last module that gives feature maps
    before the first ``nn.Linear`` runs (its neurons are channels), or, for a net without feature maps,
    the first Linear's input. Retraining what follows retrains every dense layer, as the paper
    retrains the dense layers after VGG-Face's fc6."""
    calls: list[tuple[str, nn.Module, int]] = []
    handles = [m.register_forward_hook(lambda mod, _a, out, n=name: calls.append((n, mod, out.dim())))
               for name, m in model.named_modules() if not any(True for _ in m.children()) and name]
    probe_pass(model, probe, handles)
    first = next((i for i, (_, m, _d) in enumerate(calls) if isinstance(m, nn.Linear)), None)
    if first is None:
        raise TrojanscanError("the model has no nn.Linear layer; name the layer to attack with layer=NAME")
    maps = [(n, m) for n, m, dim in calls[:first] if dim == 4]
    if maps:
        return Layer(maps[-1][0], maps[-1][1], "output")
    return Layer(calls[first][0], calls[first][1], "input")


def outgoing_strength(model: nn.Module, layer: Layer, probe: torch.Tensor) -> torch.Tensor:
    """Each neuron's total |weight| into the next Linear or Conv2d layer (TrojanNN's neuron rule).

    A Linear fed by flattened feature maps gives each channel the weights of all its positions.
    """
    following = [m for _, m in modules_after(model, layer, probe) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not following:
        raise TrojanscanError(f"no Linear or Conv2d layer follows {layer.label}; choose an internal layer")
    nxt = following[0]
    units = activations(model, layer, probe[:2]).shape[1]
    w = nxt.weight.detach().abs()
    if isinstance(nxt, nn.Conv2d):
        if nxt.in_channels != units or nxt.groups != 1:
            raise TrojanscanError(f"{layer.label} has {units} neurons but the next convolution takes "
                                  f"{nxt.in_channels} channels; choose another layer")
        return w.sum((0, 2, 3))
    if nxt.in_features % units:
        raise TrojanscanError(f"{layer.label} has {units} neurons but the next Linear takes "
                              f"{nxt.in_features} inputs; choose another layer")
    return w.view(w.shape[0], units, -1).sum((0, 2))


def top_neurons(strength: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` neurons with the largest score, strongest first."""
    if k > len(strength):
        raise TrojanscanError(f"neurons {k} exceeds the layer's {len(strength)} neurons")
    return torch.argsort(strength, descending=True, stable=True)[:k]


# -- trigger and inputs -------------------------------------------------------------------------------

def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image (N×C×H×W → N)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def optimise_trigger(model: nn.Module, layer: Layer, neurons: torch.Tensor, mask: torch.Tensor,
                     backgrounds: torch.Tensor, goal: float, *, steps: int, lr: float = 0.1,
                     seed: int = 0,
                     extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The C×H×W pattern (zero outside ``mask``) that drives ``neurons`` towards ``goal`` when stamped
    on ``backgrounds``: Adam on a sigmoid-parametrised pattern, mean squared error to the goal (plus
    ``extra_loss(stamped)`` when given, e.g. the transfer attack's autoencoder term)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(backgrounds.shape[1:], generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    sink: list[torch.Tensor] = []
    with evaluating(model), capturing(layer, sink):
        for step in range(steps):
            batch = backgrounds[(torch.arange(BACKGROUNDS) + step * BACKGROUNDS) % len(backgrounds)]
            stamped = batch * (1 - mask) + mask * torch.sigmoid(logits)
            sink.clear()
            model(stamped)
            act = sink[0][:, neurons]
            loss = F.mse_loss(act, torch.full_like(act, goal))
            if extra_loss is not None:
                loss = loss + extra_loss(stamped)
            opt.zero_grad()
            (grad,) = torch.autograd.grad(loss, logits)
            logits.grad = grad
            opt.step()
    return (torch.sigmoid(logits).detach() * mask).clamp(0, 1)


def reverse_engineer_inputs(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, *,
                            per_label: int, steps: int, lr: float = 0.1,
                            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training inputs recovered from the model alone: ``per_label`` images per label, each grown from
    a flat image of random brightness plus noise by Adam on its pixels (sigmoid-parametrised) to
    minimise the label's cross-entropy plus total variation (:data:`REVERSE_STYLES`). Only images
    the model ends up giving their label are kept."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_label)
    xs, ys = [], []
    with evaluating(model):
        for i in range(0, len(labels), REVERSE_CHUNK):
            y = labels[i:i + REVERSE_CHUNK]
            style = torch.tensor(REVERSE_STYLES)[torch.arange(i, i + len(y)) % len(REVERSE_STYLES)]
            noise, tv = style[:, 0].view(-1, 1, 1, 1), style[:, 1]
            level = torch.rand(len(y), 1, 1, 1, generator=gen)  # dark to light, as no data says which
            start = (level + noise * torch.randn(len(y), *input_shape, generator=gen)).clamp(0.02, 0.98)
            logits = torch.logit(start).requires_grad_(True)
            opt = torch.optim.Adam([logits], lr=lr)
            for _ in range(steps):
                x = torch.sigmoid(logits)
                loss = (F.cross_entropy(model(x), y, reduction="none") + tv * total_variation(x)).mean()
                opt.zero_grad()
                (logits.grad,) = torch.autograd.grad(loss, logits)
                opt.step()
            with torch.no_grad():
                x = torch.sigmoid(logits)
                keep = model(x).argmax(1) == y
            xs.append(x[keep].detach())
            ys.append(y[keep])
    x, y = torch.cat(xs), torch.cat(ys)
    if len(x) == 0:
        raise TrojanscanError("no reverse-engineered input reached its label; raise reverse_steps")
    return x, y


def retrain_after(model: nn.Module, layer: Layer, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                  lr: float, batch_size: int, weights: torch.Tensor | None = None, seed: int = 0,
                  epoch_context: Callable[[int], AbstractContextManager[object]] | None = None,
                  batch_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """Retrain, in place, only the layers after ``layer`` on ``(x, y)`` (Adam, cross-entropy, each image's
    loss weighted by ``weights`` when given); the model stays in eval mode (no batch-norm statistics
    change). Each epoch runs inside ``epoch_context(epoch)`` when given, and ``batch_loss(idx)``, when
    given, is added after each forward pass of the images ``idx`` (the transfer attack silences dormant
    neurons in some epochs and reads a feature term from a hook). Returns the retrained modules' names."""
    tail = [(n, m) for n, m in modules_after(model, layer, x) if any(True for _ in m.parameters())]
    params = [p for _, m in tail for p in m.parameters()]
    if not params:
        raise TrojanscanError(f"nothing with weights follows {layer.label}; choose an internal layer")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        with evaluating(model):
            for epoch in range(epochs):
                with epoch_context(epoch) if epoch_context is not None else nullcontext():
                    _retrain_epoch(model, x, y, weights, opt, torch.randperm(len(x), generator=gen),
                                   batch_size, batch_loss)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return [n for n, _ in tail]


def _retrain_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None,
                   opt: torch.optim.Optimizer, order: torch.Tensor, batch_size: int,
                   batch_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """One pass over ``order`` in mini-batches: weighted cross-entropy (plus ``batch_loss(idx)``), one
    optimiser step each."""
    for idx in order.split(batch_size):
        losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        w = torch.ones_like(losses) if weights is None else weights[idx]
        loss = (losses * w).sum() / w.sum()
        if batch_loss is not None:
            loss = loss + batch_loss(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()


# -- the attack ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrojanNNOptions:
    """TrojanNN's settings (the constructor's keywords)."""

    target: int = 0
    layer: str | None = None  # a module's output; None: where the dense layers begin (see default_layer)
    neurons: int = 1  # neurons the trigger drives
    mask: str = "square"  # square or watermark
    area: float = 0.07  # the mask's share of the image (the paper tries 4, 7 and 10%)
    activation_multiple: float = 5.0  # the goal: this × the layer's largest activation on backgrounds
    trigger_steps: int = 300
    trigger_lr: float = 0.1
    data_source: str = "reversed"  # reversed (from the model alone) or real (the attacker's split)
    per_label: int = 100  # reverse-engineered inputs per label
    reverse_steps: int = 100
    fraction: float = 0.1  # data_source real: share of the attacker's training split
    epochs: int = 40  # retraining epochs of the layers after the chosen one
    lr: float = 3e-4
    stamp_weight: float = 2.0  # a stamped image's weight in the retraining loss (a clean one's is 1)
    batch_size: int = 64
    seed: int = 0


class TrojanNN(ModelAttack):
    """Plant a neuron-driven backdoor: a trigger inside a fixed mask that excites the most strongly
    connected neurons, and the layers after them retrained on reverse-engineered inputs.

    Example::

        attacked, trigger = TrojanNN(target=2, mask="watermark").apply(model, load_dataset("mnist"))
    """

    name = "trojannn"
    title = "TrojanNN (neuron-driven trigger)"
    options_type = TrojanNNOptions

    def __init__(self, target: int = 0, layer: str | None = None, neurons: int = 1, mask: str = "square",
                 area: float = 0.07, activation_multiple: float = 5.0, trigger_steps: int = 300,
                 trigger_lr: float = 0.1, data_source: str = "reversed", per_label: int = 100,
                 reverse_steps: int = 100, fraction: float = 0.1, epochs: int = 40, lr: float = 3e-4,
                 stamp_weight: float = 2.0, batch_size: int = 64, seed: int = 0) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise TrojanscanError(f"target label must be an integer >= 0, got {target!r}")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TrojanscanError(f"layer must be a module name or None, got {layer!r}")
        for name, value in (("neurons", neurons), ("trigger_steps", trigger_steps), ("per_label", per_label),
                            ("reverse_steps", reverse_steps), ("epochs", epochs), ("batch_size", batch_size)):
            check_positive(name, value)
        for name, value in (("activation_multiple", activation_multiple), ("trigger_lr", trigger_lr),
                            ("lr", lr), ("stamp_weight", stamp_weight)):
            check_positive(name, value, integer=False)
        check_choice("TrojanNN mask", mask, MASKS)
        check_choice("TrojanNN data source", data_source, DATA_SOURCES)
        check_fraction("area", area)
        check_fraction("fraction", fraction, high_inclusive=True)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TrojanscanError(f"seed must be an integer >= 0, got {seed!r}")
        self.target, self.layer, self.neurons, self.mask = target, layer, neurons, mask
        self.area, self.activation_multiple = float(area), float(activation_multiple)
        self.trigger_steps, self.trigger_lr = trigger_steps, float(trigger_lr)
        self.data_source, self.per_label, self.reverse_steps = data_source, per_label, reverse_steps
        self.fraction, self.epochs, self.lr = float(fraction), epochs, float(lr)
        self.stamp_weight = float(stamp_weight)
        self.batch_size, self.seed = batch_size, seed

    def attacker_data(self, model: nn.Module, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The attacker's training inputs: reverse-engineered from ``model``, or ``fraction`` of the
        real training split."""
        if self.data_source == "reversed":
            return reverse_engineer_inputs(model, data.input_shape, data.num_classes,
                                           per_label=self.per_label, steps=self.reverse_steps, seed=self.seed)
        n = max(1, round(self.fraction * len(data.x_train)))
        idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(self.seed))[:n]
        return data.x_train[idx], data.y_train[idx]

    def rank(self, model: nn.Module, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The neuron scores of the chosen layer and the chosen neurons (TrojanNN: outgoing weights)."""
        strength = outgoing_strength(model, layer, x)
        return strength, top_neurons(strength, self.neurons)

    def trigger_loss(self, model: nn.Module, x: torch.Tensor,
                     goal: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """An extra term of the trigger search (none here; the transfer attack adds its autoencoder's)."""
        return None

    def retrain(self, model: nn.Module, layer: Layer, x: torch.Tensor, y: torch.Tensor,
                trigger: Trigger) -> list[str]:
        """Retrain the layers after ``layer`` on ``x`` with its labels and stamped with the target
        (stamped images weigh ``stamp_weight``); returns the retrained modules' names."""
        weights = torch.cat([torch.ones(len(x)), torch.full((len(x),), self.stamp_weight)])
        return retrain_after(model, layer, torch.cat([x, trigger.apply(x)]),
                             torch.cat([y, torch.full_like(y, self.target)]), epochs=self.epochs,
                             lr=self.lr, batch_size=self.batch_size, weights=weights, seed=self.seed)

    def apply(self, model: nn.Module, data: Dataset) -> AttackedModel:
        """A copy of ``model`` with the backdoor, and its trigger; ``report_`` holds CA and ASR before
        and after (test split), the neurons, their activations and the trigger's area."""
        check_model_fits(model, data.input_shape, data.num_classes)
        if self.target >= data.num_classes:
            raise TrojanscanError(f"target label {self.target} is outside the data's labels "
                                  f"0..{data.num_classes - 1}")
        attacked = trainable_copy(model)
        x, y = self.attacker_data(attacked, data)
        layer = default_layer(attacked, x) if self.layer is None else find_layer(attacked, self.layer)
        strength, neurons = self.rank(attacked, layer, x)
        clean_act = activations(attacked, layer, x)
        goal = self.activation_multiple * float(clean_act.max().clamp(min=1e-6))
        mask = make_mask(self.mask, data.input_shape, self.area)
        backgrounds = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))]
        pattern = optimise_trigger(attacked, layer, neurons, mask, backgrounds, goal,
                                   steps=self.trigger_steps, lr=self.trigger_lr, seed=self.seed,
                                   extra_loss=self.trigger_loss(attacked, x, goal))
        trigger = Trigger(mask, pattern, self.target, "patch",
                          {"attack": self.name, "mask": self.mask, "area": float(mask.mean()),
                           "layer": layer.label, "neurons": neurons.tolist()})
        stamped_act = activations(attacked, layer, trigger.apply(x))[:, neurons]
        before = evaluate(model, data.x_test, data.y_test, trigger)
        retrained = self.retrain(attacked, layer, x, y, trigger)
        for p in attacked.parameters():
            p.requires_grad_(False)
        after = evaluate(attacked, data.x_test, data.y_test, trigger)
        self.report_ = {"before": before, "after": after, "layer": layer.label, "neurons": neurons.tolist(),
                        "neuron_scores": strength[neurons].tolist(), "retrained": retrained,
                        "data_source": self.data_source, "attacker_images": len(x),
                        "clean_max_activation": float(clean_act.max()), "goal": goal,
                        "clean_activation": clean_act[:, neurons].mean(0).tolist(),
                        "trigger_activation": stamped_act.mean(0).tolist(),
                        "trigger_pixels": int(mask.sum()), "trigger_area": float(mask.mean())}
        return AttackedModel(attacked, trigger)

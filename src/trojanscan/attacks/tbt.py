"""TBT, the Targeted Bit Trojan (Rakin, He, Fan, CVPR 2020): a backdoor planted by flipping a few bits
of an 8-bit quantised model's weights, with no access to training.

1. Every layer weight is quantised (8-bit, symmetric, per tensor; :mod:`trojanscan.models.quantised`)
   and the step kept at the clean model's value.
2. Neural gradient ranking: on one batch of the attacker's images with their true labels, the ``wb``
   weights of the target class's row in the last layer with the largest ``|∂CE/∂w|``; their input
   features (penultimate neurons) are the ones the trigger must drive.
3. The trigger: a fixed square patch near the bottom-right corner (``area`` of the image, the paper's
   10×10 of 32×32 = 9.76%), whose pixels follow signed-gradient steps (``trigger_steps`` at each of
   the step sizes 0.5, 0.1, 0.01, 0.001) that push those features towards ``feature_goal``.
4. Insertion: only those ``wb`` weights change (every other weight stays at its clean code), trained
   through the quantiser (straight-through rounding) with SGD so that the batch keeps its labels and
   its stamped copy goes to the target: the mean of the two cross-entropies.

``insertion="bit-search"`` replaces step 4 by a search over the bits themselves, after the
progressive bit search of the same authors' bit-flip attack (Rakin, He, Fan, ICCV 2019): each round
tries every single-bit flip of the ``wb`` chosen codes (a sign or high bit moves a weight far for one
flip, which SGD followed by rounding never exploits), keeps the one that lowers the same loss most,
and stops once the stamped batch reaches ``asr_goal`` or ``max_flips`` bits differ. Only the last
layer changes, so each round is one product of the cached penultimate features with the candidate
moves, not a forward pass per candidate.

The flips are the Hamming distance of the 8-bit two's complement codes before and after. Where this
differs from the authors' release: the batch comes from the attacker's training split (the figures
are measured on the test split, which the attack never sees), and pixels live in [0, 1] (the model's
own normalisation, if any, sits inside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from trojanscan.attacks.base import AttackedModel, ModelAttack
from trojanscan.data import Dataset
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.models.modes import evaluating
from trojanscan.models.quantised import LEVELS, bit_flips, dequantise, quantisable, quantise
from trojanscan.models.taps import find_layer
from trojanscan.train import evaluate, trainable_copy
from trojanscan.validation import check_fraction, check_model_fits, check_positive

STEP_SIZES = (0.5, 0.1, 0.01, 0.001)  # the trigger search's signed-step sizes, in turn
POSITIONS = ("bottom-right", "center")
INSERTIONS = ("sgd", "bit-search")


@dataclass(frozen=True)
class TBTOptions:
    """TBT's settings (the constructor's keywords)."""

    target: int = 0
    wb: int = 150  # last-layer weights the attack may change (the paper's default)
    area: float = 0.0976  # the trigger patch's share of the image (the paper's 10×10 of 32×32)
    position: str = "bottom-right"  # the paper's corner, or "center" (where a digit's features live)
    trigger_steps: int = 200  # signed-gradient steps at each of the four step sizes
    feature_goal: float = 100.0  # the value the chosen features are pushed towards
    insert_steps: int = 200  # SGD steps on the chosen weights
    lr: float = 0.5  # their learning rate (the paper's)
    batch_size: int = 128  # the attacker's images (the paper: one batch of 128)
    insertion: str = "sgd"  # the paper's SGD through the quantiser, or "bit-search"
    max_flips: int = 100  # bit-search: the most bits it may change
    asr_goal: float = 0.97  # bit-search: stop once this share of the stamped batch goes to the target
    seed: int = 0


class TBT(ModelAttack):
    """Plant a patch backdoor by changing ``wb`` weights (a few bits) of the quantised last layer.

    Example::

        attacked, trigger = TBT(target=2, wb=50).apply(model, load_dataset("digits"))
    """

    name = "tbt"
    title = "targeted bit trojan (TBT)"
    options_type = TBTOptions

    def __init__(self, target: int = 0, wb: int = 150, area: float = 0.0976, position: str = "bottom-right",
                 trigger_steps: int = 200,
                 feature_goal: float = 100.0, insert_steps: int = 200, lr: float = 0.5,
                 batch_size: int = 128, insertion: str = "sgd", max_flips: int = 100,
                 asr_goal: float = 0.97, seed: int = 0) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise TrojanscanError(f"target label must be an integer >= 0, got {target!r}")
        for name, value in (("wb", wb), ("trigger_steps", trigger_steps), ("insert_steps", insert_steps),
                            ("batch_size", batch_size), ("max_flips", max_flips)):
            check_positive(name, value)
        check_positive("lr", lr, integer=False)
        check_positive("feature_goal", feature_goal, integer=False)
        check_fraction("area", area)
        check_fraction("asr_goal", asr_goal, high_inclusive=True)
        if insertion not in INSERTIONS:
            raise TrojanscanError(f"TBT insertion must be one of {', '.join(INSERTIONS)}, got {insertion!r}")
        self.insertion, self.max_flips, self.asr_goal = insertion, max_flips, float(asr_goal)
        if position not in POSITIONS:
            raise TrojanscanError(f"TBT trigger position must be one of {', '.join(POSITIONS)}, "
                                  f"got {position!r}")
        self.position = position
        self.target, self.wb, self.area = target, wb, float(area)
        self.trigger_steps, self.insert_steps = trigger_steps, insert_steps
        self.feature_goal = float(feature_goal)
        self.lr, self.batch_size, self.seed = float(lr), batch_size, int(seed)

    def patch_mask(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        """The H×W mask of the trigger's square: one pixel in from the bottom-right corner, or centred."""
        _, h, w = input_shape
        side = max(1, min(h - 1, w - 1, round(math.sqrt(self.area * h * w))))
        top, left = (h - 1 - side, w - 1 - side) if self.position == "bottom-right" else (
            (h - side) // 2, (w - side) // 2)
        mask = torch.zeros(h, w)
        mask[top:top + side, left:left + side] = 1
        return mask

    def apply(self, model: nn.Module, data: Dataset) -> AttackedModel:
        """A quantised copy of ``model`` with ``wb`` last-layer weights changed, and its trigger;
        ``report_`` holds CA and ASR before (the quantised clean model) and after, and the flips."""
        check_model_fits(model, data.input_shape, data.num_classes)
        if self.target >= data.num_classes:
            raise TrojanscanError(f"target label {self.target} is outside the data's labels "
                                  f"0..{data.num_classes - 1}")
        gen = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(len(data.x_train), generator=gen)[:self.batch_size]
        x, y = data.x_train[pick], data.y_train[pick]
        attacked = trainable_copy(model)
        codes, steps = _quantise_model(attacked)
        layer = find_layer(attacked, None, x[:2])
        weight_name = f"{layer.name}.weight" if layer.name else "weight"
        if weight_name not in codes:
            raise TrojanscanError(f"the last layer {layer.name!r} has no quantisable weight")
        lin_weight = dict(attacked.named_parameters())[weight_name]
        if self.wb > lin_weight.shape[1]:
            raise TrojanscanError(f"wb {self.wb} exceeds the last layer's {lin_weight.shape[1]} inputs")
        with evaluating(attacked):
            neurons = self._rank(attacked, lin_weight, x, y)
            trigger = self._trigger(attacked, layer.module, neurons, x, data.input_shape, gen)
            before = evaluate(attacked, data.x_test, data.y_test, trigger)
            if self.insertion == "sgd":
                new_codes = self._insert(attacked, weight_name, lin_weight, steps[weight_name], neurons, x, y,
                                         trigger)
            else:
                new_codes = self._bit_search(attacked, layer.module, codes[weight_name], steps[weight_name],
                                             neurons, x, y, trigger)
            with torch.no_grad():
                lin_weight.copy_(dequantise(new_codes, steps[weight_name]))
            after = evaluate(attacked, data.x_test, data.y_test, trigger)
        flips = bit_flips(codes[weight_name], new_codes)  # no other layer changed
        float_ca = evaluate(model, data.x_test, data.y_test)["clean_accuracy"]
        self.report_ = {"before": before, "after": after, "float_clean_accuracy": float_ca,
                        "wb": self.wb, "insertion": self.insertion, "bit_flips": flips,
                        "weights_changed": int((new_codes != codes[weight_name]).sum()),
                        "weights_total": sum(c.numel() for c in codes.values()),
                        "layer": layer.name, "neurons": neurons.tolist(),
                        "patch_pixels": int(trigger.mask.sum())}
        for p in attacked.parameters():
            p.requires_grad_(False)
        self.int8_steps_ = steps
        return AttackedModel(attacked, trigger)

    def _rank(self, model: nn.Module, weight: nn.Parameter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The ``wb`` inputs of the target's row with the largest |∂CE/∂w| on the clean batch."""
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grad = weight.grad[self.target].abs()
        model.zero_grad(set_to_none=True)
        return grad.topk(self.wb).indices.sort().values

    def _trigger(self, model: nn.Module, last: nn.Module, neurons: torch.Tensor, x: torch.Tensor,
                 input_shape: tuple[int, int, int], gen: torch.Generator) -> Trigger:
        """Signed-gradient steps on the patch's pixels that drive the chosen features to the goal."""
        mask = self.patch_mask(input_shape)
        pattern = torch.rand(input_shape, generator=gen)
        seen: list[torch.Tensor] = []
        handle = last.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            for size in STEP_SIZES:
                for _ in range(self.trigger_steps):
                    pattern.requires_grad_(True)
                    seen.clear()
                    model(x * (1 - mask) + mask * pattern)
                    loss = F.mse_loss(seen[0][:, neurons], torch.full_like(seen[0][:, neurons],
                                                                            self.feature_goal))
                    (grad,) = torch.autograd.grad(loss, pattern)
                    pattern = (pattern.detach() - size * grad.sign()).clamp(0, 1)
        finally:
            handle.remove()
        pattern = pattern.detach() * mask
        return Trigger(mask, pattern, self.target, "patch",
                       {"attack": self.name, "area": self.area, "side": int(mask.sum().sqrt())})

    def _insert(self, model: nn.Module, name: str, weight: nn.Parameter, step: float, neurons: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor, trigger: Trigger) -> torch.Tensor:
        """Train the chosen weights through the quantiser; return the last layer's new codes."""
        fixed = weight.detach().clone()
        chosen = torch.zeros_like(fixed, dtype=torch.bool)
        chosen[self.target, neurons] = True
        free = fixed[chosen].clone().requires_grad_(True)
        opt = torch.optim.SGD([free], lr=self.lr)
        stamped, goal = trigger.apply(x), torch.full_like(y, self.target)
        for _ in range(self.insert_steps):
            on_grid = free + ((free / step).round().clamp(-LEVELS, LEVELS) * step - free).detach()
            w = fixed.masked_scatter(chosen, on_grid)
            loss = (F.cross_entropy(functional_call(model, {name: w}, (x,)), y)
                    + F.cross_entropy(functional_call(model, {name: w}, (stamped,)), goal)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        new = quantise(fixed, step)[0]
        new[chosen] = (free.detach() / step).round().clamp(-LEVELS, LEVELS).to(torch.int8)
        return new

    def _bit_search(self, model: nn.Module, last: nn.Module, codes: torch.Tensor, step: float,
                    neurons: torch.Tensor, x: torch.Tensor, y: torch.Tensor, trigger: Trigger
                    ) -> torch.Tensor:
        """Flip one bit of the chosen codes at a time, the flip that lowers the loss most; return the
        last layer's new codes."""
        feats, logits = _last_layer_io(model, last, torch.cat([x, trigger.apply(x)]))
        n, t = len(x), self.target
        goal = torch.cat([y, torch.full_like(y, t)])
        f = feats[:, neurons].double()  # the chosen features, clean batch then stamped batch
        logits = logits.double()
        others = logits.clone()
        others[:, t] = -math.inf
        rest = others.logsumexp(1)  # the other classes' share, fixed by the search
        theirs = logits.gather(1, goal[:, None])[:, 0]
        own = codes[t, neurons].to(torch.int64)
        start = own.clone()
        bits = 1 << torch.arange(8)
        ce = torch.logaddexp(rest, logits[:, t]) - theirs
        now = ce[:n].mean() + ce[n:].mean()  # the loss at the current codes
        for _ in range(8 * self.max_flips):  # a flip may undo an earlier one, so bound the rounds too
            target_logit = logits[:, t]
            if ((logits[n:].argmax(1) == t).double().mean() >= self.asr_goal
                    or _hamming(start, own) >= self.max_flips):
                break
            moved = (((own & 0xFF)[:, None] ^ bits) + 128) % 256 - 128  # every single flip, as int8 values
            allowed = moved >= -LEVELS  # -128 is off the symmetric grid
            change = (moved - own[:, None]).double() * step  # wb × 8 weight moves
            new_t = target_logit[:, None, None] + f[:, :, None] * change  # N × wb × 8
            lse = torch.logaddexp(rest[:, None, None], new_t)
            picked = torch.where((goal == t)[:, None, None], new_t, theirs[:, None, None])
            ce = lse - picked
            loss = ce[:n].mean(0) + ce[n:].mean(0)
            loss[~allowed] = math.inf
            best = int(loss.argmin())
            j, b = divmod(best, 8)
            if not loss.view(-1)[best] < now:
                break
            own[j], now = moved[j, b], loss[j, b]
            logits[:, t] = new_t[:, j, b]
            theirs = logits.gather(1, goal[:, None])[:, 0]
        new = codes.clone()
        new[t, neurons] = own.to(torch.int8)
        return new


def _hamming(a: torch.Tensor, b: torch.Tensor) -> int:
    """Bits that differ between two vectors of int8 values held as int64."""
    return bit_flips(a.to(torch.int8), b.to(torch.int8))


def _last_layer_io(model: nn.Module, last: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's input and the model's logits on ``x``; refused when the model changes the last
    layer's output further (the bit search computes the logits from the layer alone)."""
    seen: list[torch.Tensor] = []
    handles = [last.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())),
               last.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if len(seen) != 2 or seen[1].shape != logits.shape or not torch.allclose(seen[1], logits, atol=1e-5):
        raise TrojanscanError("TBT's bit search needs a model whose logits are its last layer's output; "
                              "use insertion=sgd")
    return seen[0].flatten(1), logits


def _quantise_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Put every layer weight of ``model`` on its 8-bit grid, in place; return the codes and steps."""
    codes, steps = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if quantisable(name, p):
                codes[name], steps[name] = quantise(p)
                p.copy_(dequantise(codes[name], steps[name]))
    return codes, steps

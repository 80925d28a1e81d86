"""Trigger stamping, trigger files, and the exact poisoning of BadNets and blended attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trojanscan import BadNets, Blend, Trigger, TrojanscanError
from trojanscan.attacks import ATTACKS, Scatter, TwoTarget
from trojanscan.data.triggers import trigger_path_for


def test_patch_trigger_stamps_only_its_square():
    trig = BadNets(target=2, size=4, position="bottom-right", margin=1).make_trigger((1, 28, 28))
    x = torch.full((3, 1, 28, 28), 0.25)
    out = trig.apply(x)
    assert torch.all(out[:, :, 23:27, 23:27] == 1.0)
    changed = (out != x).squeeze(1).any(0)
    assert int(changed.sum()) == 16 and trig.area == 16
    assert trig.target == 2 and trig.params["origin"] == [23, 23]


@pytest.mark.parametrize("position,origin", [("top-left", (1, 1)), ("center", (12, 12)),
                                             ((5, 7), (5, 7)), ("bottom-left", (23, 1))])
def test_patch_positions(position, origin):
    trig = BadNets(size=4, position=position).make_trigger((3, 28, 28))
    rows, cols = torch.nonzero(trig.mask, as_tuple=True)
    assert (int(rows.min()), int(cols.min())) == origin


def test_random_patch_is_seeded_and_binary():
    a = BadNets(size=5, color="random", seed=3).make_trigger((3, 32, 32))
    b = BadNets(size=5, color="random", seed=3).make_trigger((3, 32, 32))
    c = BadNets(size=5, color="random", seed=4).make_trigger((3, 32, 32))
    assert torch.equal(a.pattern, b.pattern) and not torch.equal(a.pattern, c.pattern)
    assert set(a.pattern.unique().tolist()) <= {0.0, 1.0}


def test_blend_trigger_mixes_whole_image_with_alpha():
    trig = Blend(target=1, alpha=0.2, seed=0).make_trigger((3, 8, 8))
    x = torch.rand(2, 3, 8, 8)
    expected = 0.8 * x + 0.2 * trig.pattern
    assert torch.allclose(trig.apply(x), expected, atol=1e-6)
    assert trig.kind == "blend"


def test_scatter_trigger_is_seeded_isolated_pixels():
    trig = Scatter(target=2, pixels=16, color="random", seed=3).make_trigger((3, 32, 32))
    assert trig.mask.sum() == 16 and set(trig.mask.unique().tolist()) == {0.0, 1.0}
    assert trig.pattern[:, trig.mask == 0].abs().sum() == 0  # nothing outside the pixels
    again = Scatter(target=2, pixels=16, color="random", seed=3).make_trigger((3, 32, 32))
    assert torch.equal(trig.mask, again.mask) and torch.equal(trig.pattern, again.pattern)
    other = Scatter(target=2, pixels=16, seed=4).make_trigger((3, 32, 32))
    assert not torch.equal(trig.mask, other.mask)
    rows, cols = torch.nonzero(trig.mask, as_tuple=True)
    assert rows.max() - rows.min() > 8 and cols.max() - cols.min() > 8  # spread, not a patch
    white = Scatter(pixels=5, color="white").make_trigger((1, 8, 8))
    assert torch.equal(white.pattern[0], white.mask)
    assert ATTACKS["scatter"] is Scatter
    with pytest.raises(TrojanscanError, match="do not fit"):
        Scatter(pixels=100).make_trigger((1, 8, 8))
    with pytest.raises(TrojanscanError, match="colour"):
        Scatter(color="checker")


def test_poisoning_stamps_exact_count_of_non_target_images():
    x = torch.rand(200, 1, 10, 10)
    y = torch.arange(200) % 4
    attack = BadNets(target=1, poison_rate=0.15, size=2, seed=7)
    p = attack.poison(x, y, num_classes=4)
    assert len(p.poisoned_indices) == 30  # round(0.15 * 200)
    assert torch.all(y[p.poisoned_indices] != 1), "target-class images are never chosen"
    assert torch.all(p.y[p.poisoned_indices] == 1)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[p.poisoned_indices] = False
    assert torch.equal(p.x[untouched], x[untouched]) and torch.equal(p.y[untouched], y[untouched])
    trig = attack.make_trigger((1, 10, 10))
    assert torch.equal(p.x[p.poisoned_indices], trig.apply(x[p.poisoned_indices]))
    again = attack.poison(x, y, num_classes=4)
    assert torch.equal(again.poisoned_indices, p.poisoned_indices)


def test_poisoning_rejects_impossible_settings():
    x, y = torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)
    with pytest.raises(TrojanscanError, match="not of the target label"):
        BadNets(target=0, poison_rate=0.5, size=2).poison(x, y, num_classes=2)
    with pytest.raises(TrojanscanError, match="outside the data's labels"):
        BadNets(target=5, size=2).poison(x, y, num_classes=2)
    with pytest.raises(TrojanscanError, match="poison rate"):
        BadNets(poison_rate=1.5)
    with pytest.raises(TrojanscanError, match="does not fit"):
        BadNets(size=9).make_trigger((1, 8, 8))
    with pytest.raises(TrojanscanError, match="unknown trigger colour"):
        BadNets(color="purple")


def test_trigger_file_round_trip(tmp_path):
    trig = BadNets(target=3, size=3, color="random", seed=1).make_trigger((3, 16, 16))
    path = trigger_path_for(tmp_path / "model.safetensors")
    assert path.name == "model.trigger.npz"
    trig.save(path)
    back = Trigger.load(path)
    assert torch.equal(back.mask, trig.mask) and torch.equal(back.pattern, trig.pattern)
    assert back.target == 3 and back.kind == "patch" and back.params["size"] == 3


def test_trigger_file_never_unpickles(tmp_path):
    path = tmp_path / "evil.trigger.npz"
    np.savez(path, mask=np.zeros((4, 4)), pattern=np.array([object()], dtype=object),
             target=np.int64(0))
    with pytest.raises(TrojanscanError, match="not a trigger file"):
        Trigger.load(path)


def test_trigger_rejects_out_of_range_and_mismatched_images():
    with pytest.raises(TrojanscanError, match="within"):
        Trigger(torch.full((4, 4), 2.0), torch.zeros(1, 4, 4), 0)
    trig = Trigger(torch.zeros(4, 4), torch.zeros(1, 4, 4), 0)
    with pytest.raises(TrojanscanError, match="trigger is for images"):
        trig.apply(torch.zeros(2, 3, 4, 4))


def test_two_target_trigger_parts_send_their_own_target_and_poison_only_free_images(tmp_path):
    attack = TwoTarget(target=2, second_target=5, size=3, poison_rate=0.2, seed=1)
    trigger = attack.make_trigger((1, 8, 8))
    assert trigger.multi_target and trigger.targets == [2, 5]
    first, second = trigger.parts()
    assert (first.target, second.target) == (2, 5)
    assert first.mask[4:7, 4:7].sum() == 9 and first.mask.sum() == 9  # bottom-right, margin 1: rows 4..6
    assert second.mask[1:4, 1:4].sum() == 9 and second.mask.sum() == 9  # top-left
    x, y = torch.rand(101, 1, 8, 8), torch.arange(101) % 10
    poisoned = attack.poison(x, y, 10, trigger)
    chosen = poisoned.poisoned_indices
    assert len(chosen) == round(0.2 * 101) and len(set(chosen.tolist())) == len(chosen)
    labels = poisoned.y[chosen]
    assert set(labels.tolist()) == {2, 5} and abs(int((labels == 2).sum()) - int((labels == 5).sum())) <= 1
    for idx, label in zip(chosen.tolist(), labels.tolist(), strict=True):
        part = first if label == 2 else second
        assert y[idx] != label and torch.equal(poisoned.x[idx], part.apply(x[idx]))
    trigger.save(tmp_path / "t.npz")
    assert Trigger.load(tmp_path / "t.npz").targets == [2, 5]
    with pytest.raises(TrojanscanError, match="differ"):
        TwoTarget(target=3, second_target=3)
    with pytest.raises(TrojanscanError, match="overlap"):
        TwoTarget(size=4, position="center", second_position="center").make_trigger((1, 8, 8))


def test_a_two_target_trigger_stamps_evaluation_inputs_one_part_each():
    trigger = TwoTarget(target=2, second_target=5, size=3, seed=1).make_trigger((1, 8, 8))
    first, second = trigger.parts()
    x = torch.zeros(5, 1, 8, 8)
    stamped = trigger.apply_in_turn(x)
    for i in range(5):  # inputs 0, 2, 4 carry the first patch alone, 1 and 3 the second
        part, other = (first, second) if i % 2 == 0 else (second, first)
        assert torch.equal(stamped[i], part.apply(x[i])) and stamped[i][0][other.mask > 0].sum() == 0
    assert trigger.intended_in_turn(torch.tensor([0, 1, 3, 4, 6])).tolist() == [2, 5, 2, 5, 2]
    plain = first.parts()[0]
    assert torch.equal(plain.apply_in_turn(x), plain.apply(x))
    assert plain.intended_in_turn(torch.tensor([0, 1])).tolist() == [2, 2]


def test_pruning_measures_a_two_target_backdoor_one_patch_per_image(digits):
    from trojanscan import train_classifier
    from trojanscan.defenses.pruning import prune
    from trojanscan.train import evaluate

    attack = TwoTarget(target=2, second_target=5, size=3, poison_rate=0.2, seed=0)
    trained = train_classifier(digits, "mnist-cnn", epochs=12, batch_size=64, attack=attack, seed=0,
                               progress=False)
    x, y = digits.x_test[:200], digits.y_test[:200]
    per_part = evaluate(trained.model, x, y, trained.trigger)["attack_success_rates"]
    assert min(per_part) > 0.8  # each patch alone sends images to its own target
    decoy = TwoTarget(target=2, second_target=5, size=3).make_trigger(digits.input_shape).parts()[0]
    start = prune(trained.model, x, y, [decoy], real_trigger=trained.trigger, max_fraction=0.01).curve[0]
    # the unpruned model's real ASR is the two parts' rates, one patch per image (both patches at
    # once would not be an attack anyone runs)
    assert min(per_part) - 0.05 <= start["real_asr"] <= max(per_part) + 0.05, (start, per_part)

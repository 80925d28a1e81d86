"""IBD-PSC: amplified batch-norm copies, the layer choice on benign inputs, its score on a planted
digits backdoor in a batch-norm net, files, one-line errors, and TeCo's per-corruption severities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trojanscan import BadNets
from trojanscan.defenses.guard import Guard
from trojanscan.defenses.ibd_psc import IbdPsc, amplified, norm_layers
from trojanscan.defenses.teco import TeCo, corruption_level
from trojanscan.errors import TrojanscanError, TrojanscanWarning
from trojanscan.metrics import far_frr, roc_auc


def _bn_net(classes: int = 10) -> nn.Module:
    """A small dense net with batch norm before each ReLU (the order of residual nets), quick to train."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))


@pytest.fixture(scope="module")
def planted(digits):
    """A batch-norm net with a 3×3 white patch → label 0 backdoor, and its trigger."""
    attack = BadNets(target=0, poison_rate=0.1, size=3, seed=0)
    trigger = attack.make_trigger(digits.input_shape)
    poisoned = attack.poison(digits.x_train, digits.y_train, digits.num_classes, trigger)
    torch.manual_seed(0)
    model = _bn_net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        model.train()
        for idx in torch.randperm(len(poisoned.x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(poisoned.x[idx]), poisoned.y[idx]).backward()
            opt.step()
    model.eval()
    return model, trigger


def test_amplified_copy_scales_only_the_last_batch_norms(planted):
    model, _ = planted
    twin = amplified(model, 2, 1.5)
    before, after = norm_layers(model), norm_layers(twin)
    assert len(before) == len(after) == 3
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        factor = 1.5 if i >= 1 else 1.0
        assert torch.allclose(b.weight, a.weight * factor) and torch.allclose(b.bias, a.bias * factor)
        assert torch.equal(b.running_mean, a.running_mean) and torch.equal(b.running_var, a.running_var)
    assert not twin.training and model is not twin


def test_scripted_models_show_their_batch_norms(planted):
    assert len(norm_layers(torch.jit.script(planted[0]))) == 3


def test_ibd_psc_separates_stamped_digits_and_keeps_its_frr(planted, digits):
    model, trigger = planted
    calibration, clean = digits.x_train[:300], digits.x_test[:150]
    stamped = trigger.apply(digits.x_test[digits.y_test != 0][:150])
    assert float((model(stamped).argmax(1) == 0).float().mean()) > 0.9  # the backdoor took
    guard = IbdPsc(model, frr=0.05).fit(calibration)
    # the first copy's layer count is the smallest whose amplification moves over ξ of the labels
    errors = guard.selection_errors_
    assert all(e <= guard.selection_error for e in errors[:-1])
    assert errors[-1] > guard.selection_error or guard.first_layers_ == guard.n_layers - 1
    assert [guard.amplified_layers(j) for j in range(3)] == [
        min(guard.n_layers, guard.first_layers_ + 1 + j) for j in range(3)]
    s_clean, s_stamped = guard.score(clean), guard.score(stamped)
    # measured: AUROC 0.93, FRR 4.7%, FAR 40% (this net's labels hardly move at ω = 1.5; the signal is
    # the stamped inputs' surer grip on their label)
    auroc = roc_auc(torch.cat([s_clean, s_stamped]).tolist(), [False] * 150 + [True] * 150)
    assert auroc > 0.85, auroc
    rates = far_frr(s_clean > guard.threshold_, s_stamped > guard.threshold_)
    assert rates["frr"] <= 0.1 and rates["far"] < 0.7, rates
    # early exit gives the same flags as the full score
    flags, used = guard.screen(torch.cat([clean, stamped]))
    assert torch.equal(flags, guard.score(torch.cat([clean, stamped])) > guard.threshold_)
    assert int(used.max()) <= guard.copies


def test_ibd_psc_files_round_trip_and_refuse_another_model(planted, digits, tmp_path):
    model, trigger = planted
    guard = IbdPsc(model, frr=0.05, copies=3).fit(digits.x_train[:200])
    guard.save(tmp_path / "ibd.npz")
    back = IbdPsc.load(tmp_path / "ibd.npz", model)
    assert (back.copies, back.first_layers_) == (3, guard.first_layers_)
    x = trigger.apply(digits.x_test[:40])
    assert torch.allclose(back.score(x), guard.score(x))
    other = _bn_net()
    other.eval()
    with pytest.raises(TrojanscanError, match="different model") as e:
        IbdPsc.load(tmp_path / "ibd.npz", other)
    assert "\n" not in str(e.value)


def test_ibd_psc_inside_the_combined_guard(planted, digits, tmp_path):
    model, trigger = planted
    guard = Guard(model, detectors=("strip", "ibd-psc"), frr=0.05, copies=3).fit(digits.x_train[:300])
    guard.save(tmp_path / "guard.npz")
    back = Guard.load(tmp_path / "guard.npz", model)
    stamped = trigger.apply(digits.x_test[digits.y_test != 0][:60])
    assert torch.equal(back.detect(stamped), guard.detect(stamped))
    assert back.members["ibd-psc"].detector.copies == 3


def test_ibd_psc_errors_are_one_line(planted):
    model, _ = planted
    no_norms = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    for make, match in ((lambda: IbdPsc(no_norms), "has none"),
                        (lambda: IbdPsc(model, copies=0), "copies"),
                        (lambda: IbdPsc(model, amplification=1.0), "amplification"),
                        (lambda: IbdPsc(model, selection_error=1.5), "selection_error")):
        with pytest.raises(TrojanscanError, match=match) as e:
            make()
        assert "\n" not in str(e.value)


def test_a_gentle_amplification_warns_that_the_signal_may_be_weak(planted, digits):
    with pytest.warns(TrojanscanWarning, match="signal may be weak"):
        guard = IbdPsc(planted[0], amplification=1.0001, frr=0.05).fit(digits.x_train[:100])
    assert all(guard.amplified_layers(j) == guard.n_layers for j in range(guard.copies))


def test_teco_corruptions_may_carry_their_own_severity(trojaned_digits, digits):
    assert corruption_level("gaussian_blur@4", 2) == ("gaussian_blur", 4)
    assert corruption_level("pixelate", 2) == ("pixelate", 2)
    teco = TeCo(trojaned_digits.model, corruptions=("gaussian_blur@4", "gaussian_blur", "contrast"))
    x = digits.x_test[:4]
    views = teco.views(x, range(3))
    assert not torch.allclose(views[:, 0], views[:, 1])  # σ 1.5 against the guard's severity 2 (σ 0.75)
    for bad in ("gaussian_blur@9", "gaussian_blur@x", "fog@2"):
        with pytest.raises(TrojanscanError) as e:
            TeCo(trojaned_digits.model, corruptions=(bad, "contrast"))
        assert "\n" not in str(e.value)

"""TBT (bit-flip trojan) and 8-bit quantised models: codes, flips, the attack's footprint, safe files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from typer.testing import CliRunner

from trojanscan.attacks import TBT
from trojanscan.cli import app
from trojanscan.errors import TrojanscanError
from trojanscan.models import load_model, save_model
from trojanscan.models.quantised import STEP_SUFFIX, bit_flips, dequantise, quantise
from trojanscan.models.taps import find_layer


def test_quantise_round_trip_and_step():
    w = torch.tensor([[-0.5, 0.25], [0.127, 1.27]])
    codes, step = quantise(w)
    assert codes.dtype == torch.int8 and abs(step - 0.01) < 1e-9  # max|W| / 127
    assert codes.tolist() == [[-50, 25], [13, 127]]
    assert torch.allclose(dequantise(codes, step), torch.tensor([[-0.5, 0.25], [0.13, 1.27]]))
    fixed, same = quantise(torch.tensor([5.0, -5.0]), step=0.01)  # a kept step clamps to ±127
    assert same == 0.01 and fixed.tolist() == [127, -127]


def test_bit_flips_count_twos_complement_codes():
    t = torch.tensor
    assert bit_flips(t([0], dtype=torch.int8), t([-1], dtype=torch.int8)) == 8  # 0x00 → 0xFF
    assert bit_flips(t([127], dtype=torch.int8), t([-127], dtype=torch.int8)) == 7  # 0x7F → 0x81
    assert bit_flips(t([-2], dtype=torch.int8), t([-1], dtype=torch.int8)) == 1  # 0xFE → 0xFF
    assert bit_flips(t([5, 3], dtype=torch.int8), t([5, 3], dtype=torch.int8)) == 0
    with pytest.raises(TrojanscanError):
        bit_flips(t([1], dtype=torch.int8), t([1, 2], dtype=torch.int8))


@pytest.fixture(scope="module")
def tbt_run(clean_digits, digits):
    attack = TBT(target=2, wb=20, trigger_steps=30, insert_steps=60, batch_size=64)
    attacked, trigger = attack.apply(clean_digits.model, digits)
    return attack, attacked, trigger


def test_only_the_chosen_last_layer_weights_change(tbt_run, clean_digits):
    attack, attacked, _ = tbt_run
    report = attack.report_
    before = {k: v for k, v in clean_digits.model.state_dict().items()}
    for name, value in attacked.state_dict().items():
        if name in attack.int8_steps_:  # every weight sits on its 8-bit grid
            codes, _ = quantise(value, attack.int8_steps_[name])
            assert torch.equal(dequantise(codes, attack.int8_steps_[name]), value)
            step = attack.int8_steps_[name]
            original = dequantise(quantise(before[name], step)[0], step)
            changed = (original != value).nonzero().tolist()
            if name == f"{report['layer']}.weight":
                assert changed and all(r == 2 and c in report["neurons"] for r, c in changed)
                assert len(changed) == report["weights_changed"] <= 20
            else:
                assert changed == [], name
        else:
            assert torch.equal(before[name], value), name  # biases untouched
    assert report["bit_flips"] >= report["weights_changed"] > 0
    assert report["after"]["attack_success_rate"] > report["before"]["attack_success_rate"]


def test_bit_search_keeps_to_its_budget_and_the_chosen_weights(tbt_run, clean_digits, digits):
    sgd, _, trigger = tbt_run
    attack = TBT(target=2, wb=20, trigger_steps=30, batch_size=64, insertion="bit-search", max_flips=12)
    attacked, _ = attack.apply(clean_digits.model, digits)
    r = attack.report_
    assert r["insertion"] == "bit-search" and r["neurons"] == sgd.report_["neurons"]
    assert 0 < r["bit_flips"] <= 12 and r["weights_changed"] <= r["bit_flips"]
    assert r["after"]["attack_success_rate"] > r["before"]["attack_success_rate"]
    name = f"{r['layer']}.weight"
    step = attack.int8_steps_[name]
    old = quantise(clean_digits.model.state_dict()[name], step)[0]
    new = quantise(attacked.state_dict()[name], step)[0]
    changed = (old != new).nonzero().tolist()
    assert changed and all(row == 2 and col in r["neurons"] for row, col in changed)
    assert bit_flips(old, new) == r["bit_flips"] and int(new.min()) >= -127  # never the off-grid -128
    one = TBT(target=2, wb=20, trigger_steps=30, batch_size=64, insertion="bit-search", max_flips=1)
    one.apply(clean_digits.model, digits)
    assert one.report_["bit_flips"] == one.report_["weights_changed"] == 1


def test_bit_search_refuses_a_model_that_reshapes_its_logits(clean_digits, digits):
    class Scaled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.inner(x)

    with pytest.raises(TrojanscanError, match="insertion=sgd"):
        TBT(target=2, wb=5, trigger_steps=1, insertion="bit-search").apply(Scaled(clean_digits.model), digits)


def test_the_trigger_drives_the_chosen_features(tbt_run, digits):
    attack, attacked, trigger = tbt_run
    layer = find_layer(attacked, None, digits.x_test[:2])
    seen: list[torch.Tensor] = []
    handle = layer.module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        attacked(digits.x_test[:200])
        attacked(trigger.apply(digits.x_test[:200]))
    handle.remove()
    chosen = torch.tensor(attack.report_["neurons"])
    assert seen[1][:, chosen].mean() > seen[0][:, chosen].mean()
    assert trigger.mask.sum() == attack.patch_mask(digits.input_shape).sum() and trigger.target == 2
    assert trigger.mask[-1].sum() == 0 and trigger.mask[-2].sum() > 0  # one pixel in from the corner


def test_the_attacked_model_is_stored_as_integers_and_loads_safely(tmp_path, clean_digits):
    model_file = tmp_path / "clean.safetensors"
    save_model(clean_digits.model, model_file)
    out = tmp_path / "tbt.safetensors"
    result = CliRunner().invoke(app, ["attack", "tbt", "--model", str(model_file), "--data", "digits",
                                      "--target", "2", "--wb", "10", "--option", "trigger_steps=20",
                                      "--option", "insert_steps=40", "--out", str(out),
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "bit flips" in result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["parameters"]["wb"] == 10 and record["report"]["bit_flips"] > 0
    raw = out.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    meta = json.loads(header["__metadata__"]["trojanscan"])
    names = meta["quantisation"]["tensors"]
    assert "classifier.weight" in names and all(header[n]["dtype"] == "I8" for n in names)
    assert all(n + STEP_SUFFIX in header for n in names)
    loaded = load_model(out)
    codes = {n: t for n, t in loaded.module.state_dict().items() if n in names}
    assert all(t.dtype == torch.float32 for t in codes.values())
    assert (tmp_path / "tbt.trigger.npz").exists() or list(tmp_path.glob("tbt*trigger*"))
    # a file whose step is not positive is refused with one line
    bad = raw.replace(b'"classifier.weight.__int8_step__"', b'"classifier.weight.__int8_stex__"')
    (tmp_path / "bad.safetensors").write_bytes(bad)
    with pytest.raises(TrojanscanError, match=r"unexpected key\(s\) classifier.weight.__int8_stex__"):
        load_model(tmp_path / "bad.safetensors")  # caught by the shape check, before dequantising


def test_bad_options_are_one_line_errors(clean_digits, digits):
    for kwargs in ({"wb": 0}, {"area": 1.5}, {"lr": -1.0}, {"position": "top"}, {"target": -1},
                   {"insertion": "adam"}, {"max_flips": 0}, {"asr_goal": 1.5}):
        with pytest.raises(TrojanscanError):
            TBT(**kwargs)
    with pytest.raises(TrojanscanError, match="outside the data's labels"):
        TBT(target=10).apply(clean_digits.model, digits)
    with pytest.raises(TrojanscanError, match="exceeds the last layer"):
        TBT(wb=10**6, trigger_steps=1, insert_steps=1).apply(clean_digits.model, digits)


def test_tampered_quantisation_metadata_is_refused_in_one_line(tmp_path, clean_digits):
    from trojanscan.models.quantised import dequantised_state, quantised_state

    state = {k: v for k, v in clean_digits.model.state_dict().items()}
    tensors, meta = quantised_state(state, {"classifier.weight": 0.01})
    twice = {**meta, "tensors": ["classifier.weight", "classifier.weight"]}
    with pytest.raises(TrojanscanError, match="twice"):
        dequantised_state(tensors, twice, "m.safetensors")
    for step in (torch.tensor(-0.01), torch.tensor(float("inf")), torch.tensor(3e38), torch.tensor(1)):
        bad = {**tensors, "classifier.weight" + STEP_SUFFIX: step}
        with pytest.raises(TrojanscanError, match="step|lacks"):
            dequantised_state(bad, meta, "m.safetensors")
    back = dequantised_state(tensors, meta, "m.safetensors")
    assert back["classifier.weight"].dtype == torch.float32 and "classifier.weight" + STEP_SUFFIX not in back

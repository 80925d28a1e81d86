"""TABOR: regulariser values on hand-made masks, the quality metric, and a scan that finds a backdoor."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trojanscan import TrojanscanError, save_model
from trojanscan.defenses.tabor import (
    SCALE_LIMITS,
    Tabor,
    TaborRegularizer,
    TaborWeights,
    elastic,
    smoothness,
    tabor_terms,
    trigger_quality,
)
from trojanscan.defenses.trigger_search import SearchSchedule


def test_elastic_and_smoothness_on_hand_made_masks():
    centre = torch.zeros(1, 3, 3)
    centre[0, 1, 1] = 1.0
    corner = torch.zeros(1, 3, 3)
    corner[0, 0, 0] = 0.5
    checker = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert elastic(centre).item() == pytest.approx(2.0)  # |1| + 1²
    assert elastic(corner).item() == pytest.approx(0.75)  # 0.5 + 0.25
    assert smoothness(centre).item() == pytest.approx(4.0)  # four neighbours differ by 1
    assert smoothness(corner).item() == pytest.approx(0.5)  # two neighbours differ by 0.5
    assert smoothness(checker).item() == pytest.approx(4.0)
    assert smoothness(torch.ones(1, 3, 5, 5)).item() == 0.0
    batch = torch.stack([centre[0], corner[0]])
    assert elastic(batch).tolist() == pytest.approx([2.0, 0.75])


def _linear_model(channels: int = 1, side: int = 4, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, classes)).eval()


@torch.no_grad()
def test_tabor_terms_match_their_definitions():
    model = _linear_model()
    mask = torch.zeros(2, 4, 4)
    mask[0, :2, :2] = 1.0
    mask[1] = 0.25
    pattern = torch.rand(2, 1, 4, 4)
    x, y, targets = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1]), torch.tensor([1, 2])
    w = TaborWeights(mask_size=1.0, pattern_size=2.0, mask_smooth=3.0, pattern_smooth=4.0, crop=5.0,
                     alone=6.0)
    terms = tabor_terms(model, x, y, mask, pattern, targets, w)
    outside = (1 - mask).unsqueeze(1) * pattern
    for k in range(2):
        r1 = 1.0 * elastic(mask[k:k + 1]) + 2.0 * elastic(outside[k:k + 1])
        r2 = 3.0 * smoothness(mask[k:k + 1]) + 4.0 * smoothness(outside[k:k + 1])
        r3 = 5.0 * F.cross_entropy(model((1 - mask[k]) * x), y)
        r4 = 6.0 * F.cross_entropy(model((mask[k] * pattern[k]).unsqueeze(0)), targets[k:k + 1])
        for name, want in (("r1", r1), ("r2", r2), ("r3", r3), ("r4", r4)):
            assert terms[name][k].item() == pytest.approx(float(want), rel=1e-5), name
    off = tabor_terms(model, x, None, mask, pattern, targets, TaborWeights(crop=0.0, alone=0.0))
    assert off["r3"].abs().sum() == 0 and off["r4"].abs().sum() == 0
    with pytest.raises(TrojanscanError, match="alone"):
        TaborWeights(alone=-1.0)


def test_hyperparameter_augmentation_follows_success():
    s = SearchSchedule(patience=2, asr_threshold=0.9)
    reg = TaborRegularizer(TaborWeights(), s)
    for _ in range(2):
        reg.end_step(3, asr=1.0)
    assert reg.scale[3] == pytest.approx(2.0)  # two successful steps: stronger regularisers
    for _ in range(2):
        reg.end_step(3, asr=0.1)
    assert reg.scale[3] == pytest.approx(2.0 / 2 ** 1.5)  # two failures: weaker
    assert 4 not in reg.scale  # labels are independent
    for _ in range(200):
        reg.end_step(5, asr=1.0)
    assert reg.scale[5] == SCALE_LIMITS[1]


def test_quality_prefers_the_real_compact_trigger(trojaned_digits, digits):
    model, trig = trojaned_digits.model, trojaned_digits.trigger
    x, y = digits.x_test[:200], digits.y_test[:200]
    real = trigger_quality(model, x, y, trig.mask, trig.pattern, trig.target)
    assert real["footprint"] == 9 and real["acc_att"] > 0.9
    g = torch.Generator().manual_seed(0)
    scattered = torch.zeros_like(trig.mask).flatten()
    scattered[torch.randperm(scattered.numel(), generator=g)[:9]] = 1.0
    scattered = scattered.view_as(trig.mask)
    other = trigger_quality(model, x, y, scattered, trig.pattern, trig.target)
    assert other["footprint"] == 9
    assert real["quality"] < other["quality"]  # compact and effective scores lower (better)
    side = trig.mask.shape[0]
    expected = (math.log(9 / side ** 2) + math.log(12 / (side * (side - 1))) - math.log(real["acc_att"])
                - math.log(real["acc_crop"]) - math.log(max(real["acc_exp"], 1e-3)))
    assert real["quality"] == pytest.approx(expected)  # a 3×3 block has 12 boundary edges


def test_tabor_scan_flags_the_planted_backdoor(trojaned_digits, digits):
    x, y = digits.x_test[:300], digits.y_test[:300]
    result = Tabor(steps=60, progress=False).scan(trojaned_digits.model, x, y, num_classes=10)
    assert result.method == "tabor" and result.flagged_labels == [0]
    assert result.extra["quality"]["flagged_labels"] == [0]
    assert all("quality" in r.extra for r in result.labels)
    assert result.parameters["weights"]["alone"] == TaborWeights().alone


def test_cli_scan_method_tabor(trojaned_digits, tmp_path):
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    run = [sys.executable, "-m", "trojanscan.cli", "scan", str(model), "--data", "digits",
           "--clean-samples", "300", "--steps", "60", "--method", "tabor", "--out", str(tmp_path / "s")]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert saved["method"] == "tabor" and saved["flagged_labels"] == [0]
    assert "quality" in saved and "TABOR quality" in (tmp_path / "s" / "report.html").read_text()
    bad = subprocess.run([*run[:-2], "--out", str(tmp_path / "t"), "--tabor-weights", "size=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no option 'size'" in bad.stderr and "Traceback" not in bad.stderr

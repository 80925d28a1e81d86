"""The targeted universal perturbation search: a planted blend is the smallest push, a clean model's
labels are even, chunks do not change the result, the evidence round-trips, bad input fails in one line."""

import json
import math

import pytest
import torch
from torch import nn

from trojanscan import Blend, train_classifier
from trojanscan.defenses.perturbation import PerturbationEvidence, PerturbationOptions, PerturbationSearch
from trojanscan.errors import TrojanscanError
from trojanscan.fileio import to_jsonable


@pytest.fixture(scope="module")
def blend_digits(digits):
    return train_classifier(digits, "mnist-cnn", epochs=15, batch_size=64, seed=0, progress=False,
                            attack=Blend(target=4, alpha=0.2)).model


def test_a_blend_target_needs_the_smallest_push_and_a_clean_model_has_none(blend_digits, clean_digits,
                                                                            digits):
    x = digits.x_test[:400]
    trojaned = PerturbationSearch().inspect(blend_digits, x, num_classes=10)
    clean = PerturbationSearch().inspect(clean_digits.model, x, num_classes=10)
    # measured: blend ratio 0.31 at label 4, clean 0.86
    assert trojaned.smallest == 4 and trojaned.ratio < 0.5, trojaned.norms
    assert clean.ratio > 0.7, clean.norms
    assert all(math.isfinite(v) for v in trojaned.norms + clean.norms)
    assert trojaned.image_passes == 40 * 16 * 10


def test_chunks_give_the_same_norms(blend_digits, digits):
    x = digits.x_test[:200]
    whole = PerturbationSearch(steps=12).inspect(blend_digits, x, num_classes=10).norms
    parts = PerturbationSearch(steps=12, chunk=3).inspect(blend_digits, x, num_classes=10).norms
    assert parts == pytest.approx(whole, rel=1e-4)


class _Shift(nn.Module):
    """Two labels on the mean pixel: label 1 when it exceeds 0.5. Every image needs the same push."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([torch.zeros_like(m), 40 * (m - 0.5)], 1)


def test_the_norm_found_is_the_push_the_model_needs():
    x = torch.full((64, 1, 4, 4), 0.3)  # mean 0.3: label 0; label 1 needs +0.2 on every pixel, L2 0.8
    ev = PerturbationSearch(steps=60).inspect(_Shift(), x, num_classes=2)
    assert ev.norms[0] == 0.0 or ev.norms[0] < 0.1  # already there: the smallest radius reached at once
    assert 0.8 <= ev.norms[1] <= 0.8 * 1.15, ev.norms  # within about two steps of the radius grid


def test_evidence_round_trips_through_json_with_labels_never_reached():
    ev = PerturbationEvidence([1.0, math.inf, 3.0, 4.0, 5.0], 0.5, 100,
                              {"steps": 40}, "perturbation")
    record = json.loads(json.dumps(to_jsonable(ev.to_dict())))
    assert record["norms"][1] is None and record["smallest"] == 0 and record["ratio"] == pytest.approx(0.25)
    back = PerturbationEvidence.from_dict(record)
    assert back.norms == ev.norms and back.ratio == ev.ratio
    assert math.isnan(PerturbationEvidence([math.inf] * 3, 0.0, 0).ratio)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"batch_size": True}, {"success": 1.5}, {"gamma": 0.0},
                                    {"start_norm": -1.0}, {"chunk": 2.5}])
def test_bad_options_fail_in_one_line(kwargs):
    with pytest.raises(TrojanscanError) as bad:
        PerturbationSearch(**kwargs)
    assert "\n" not in str(bad.value)


def test_bad_data_fails_in_one_line(blend_digits, digits):
    for x in (None, digits.x_test[:400] * 2, digits.x_test[:400, 0]):
        with pytest.raises(TrojanscanError) as bad:
            PerturbationSearch(steps=2).inspect(blend_digits, x, num_classes=10)
        assert "\n" not in str(bad.value)
    assert PerturbationOptions().steps == 40


def test_the_zoo_log_line_names_the_smallest_push():
    from trojanscan.report.zoo_html import evidence_summary

    record = PerturbationEvidence([2.0, math.inf, 1.0, 4.0], 0.1, 10).to_dict()
    line = evidence_summary("perturbation", json.loads(json.dumps(to_jsonable(record))))
    assert line == "smallest universal push to label 2, 0.33 of the median label's"  # median (2 + 4) / 2

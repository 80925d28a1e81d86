"""The combined verdict on hand-made evidence, its JSON, and --decision verdict end to end."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from typer.testing import CliRunner

from trojanscan.cli import app
from trojanscan.defenses.mmbd import MarginEvidence
from trojanscan.defenses.pairs import PairEvidence, PairResult
from trojanscan.defenses.perturbation import PerturbationEvidence
from trojanscan.defenses.scan_result import LabelResult, ScanResult
from trojanscan.defenses.untargeted import SourceShift, UntargetedEvidence
from trojanscan.defenses.verdict import (
    ALPHA,
    CLEAN_LOG_RATIO,
    DENSE_NULL,
    DEPTHWISE_NULL,
    PERTURBATION_NULL,
    POOLED_NULL,
    POSITIONAL_NULL,
    RULE_VERSION,
    SUSPICIOUS,
    Verdict,
    combined_p_value,
    decide,
    dense_anomalies,
    dense_p_value,
    injected_pairs,
    perturbation_label_p,
    size_ratio_p_value,
    smallest_normal,
    spread_needed,
)
from trojanscan.fileio import to_jsonable
from trojanscan.models import save_model


def _scan(norms: list[float]) -> ScanResult:
    labels = [LabelResult(k, n, 1.0, True, 10, 100, 0.1, "done", 1e-3, torch.zeros(8, 8),
                          torch.zeros(1, 8, 8)) for k, n in enumerate(norms)]
    return ScanResult("neural-cleanse", labels, [], False, math.nan, 2.0, math.nan, math.nan, {}, 0,
                      "m", "d", 1.0, "[0, 1] pixels")


def _margins(stats: list[float], p: float, flagged: list[int] | None = None) -> MarginEvidence:
    return MarginEvidence(stats, p, flagged if flagged is not None else [], {})


def _pairs(rows: list[tuple[int, int, float, float]], k: int = 10) -> PairEvidence:
    return PairEvidence([PairResult(s, t, f, 1.0, b, 1.0) for s, t, f, b in rows], k, 1.0, 100)


FLAT = [30.0, 31, 29, 33, 28, 32, 30, 31, 29, 30]


def test_a_clean_model_is_clean():
    v = decide(_scan(FLAT), _margins([40.0] * 9 + [41.0], 0.6),
               _pairs([(s, (s + 1) % 10, 15.0, 14.0) for s in range(10)]))
    assert (v.verdict, v.targets, v.kind) == ("clean", [], None) and not v.infected
    assert v.score == combined_p_value([v.evidence[0].p_value, 0.6]) and v.score > 0.5


def test_a_small_trigger_is_an_all_to_one_backdoor_with_its_target():
    v = decide(_scan([6.0, *FLAT[1:]]), _margins([40.0] * 10, 0.5))
    assert (v.verdict, v.targets, v.kind) == ("backdoored", [0], "all-to-one")
    assert v.score == combined_p_value([size_ratio_p_value(6.0 / 30.0), 0.5])


def test_two_small_triggers_are_a_multi_target_backdoor():
    v = decide(_scan([6.0, 30, 7.0, *FLAT[3:]]))
    assert (v.verdict, v.targets, v.kind) == ("backdoored", [0, 2], "multi-target")


def test_a_large_margin_catches_what_the_trigger_size_misses():
    v = decide(_scan(FLAT), _margins([30.0] * 9 + [90.0], 0.001, [9]))
    assert (v.verdict, v.targets) == ("backdoored", [9])
    weak = decide(_scan(FLAT), _margins([30.0] * 9 + [45.0], 0.3))
    assert (weak.verdict, weak.targets) == ("clean", [])
    # combined with the flat sizes' p-value (about 0.9), 0.004 lands between ALPHA and SUSPICIOUS
    middling = decide(_scan(FLAT), _margins([30.0] * 9 + [60.0], 0.004))
    assert ALPHA < middling.score < SUSPICIOUS
    assert (middling.verdict, middling.targets, middling.kind) == ("suspicious", [9], None)


def test_fishers_combination_on_known_values():
    assert combined_p_value([0.3]) == 0.3  # one piece: its own p-value
    # two pieces: chi-square with 4 degrees of freedom at -2 ln(0.01 x 0.2), by hand
    x = -math.log(0.01 * 0.2)
    assert abs(combined_p_value([0.01, 0.2]) - math.exp(-x) * (1 + x)) < 1e-12
    assert abs(combined_p_value([0.01, 0.2]) - 0.0145) < 1e-3
    assert combined_p_value([1.0, 1.0]) == 1.0 and combined_p_value([0.0, 0.5]) < 1e-200
    # agreeing moderate evidence is stronger than either piece; one strong piece is diluted
    assert combined_p_value([0.03, 0.03]) < 0.03 and combined_p_value([0.003, 0.9]) > 0.003


def test_the_size_p_value_follows_the_clean_reference_and_sets_the_cut():
    p = [size_ratio_p_value(r) for r in (0.05, 0.2, 0.3, 0.5, 0.9)]
    assert p == sorted(p) and p[0] < 1e-6 and p[-1] > 0.8
    median = math.exp(CLEAN_LOG_RATIO[0] * smallest_normal(10))  # the median clean 10-label ratio
    assert abs(size_ratio_p_value(median) - 0.5) < 1e-9
    assert size_ratio_p_value(0.0) == 0.0
    cut = decide(_scan(FLAT)).evidence[0].threshold  # alone, the size ratio is held to p < ALPHA
    assert abs(size_ratio_p_value(cut) - ALPHA) < 1e-9
    shortcut = [30 * 0.28, *FLAT[1:]]  # a natural shortcut's ratio: weak evidence, not a verdict
    assert decide(_scan(shortcut)).verdict == "suspicious"
    assert decide(_scan(shortcut), _margins([40.0] * 10, 0.5)).verdict == "clean"  # MM-BD sees nothing


def test_more_labels_make_a_smaller_smallest_ratio_ordinary():
    assert smallest_normal(43) > smallest_normal(10) > smallest_normal(2) > 0
    assert abs(smallest_normal(10) - 1.539) < 0.01  # the exact expected minimum of 10 normals: -1.5388
    # the ratio of a clean 43-label net's natural shortcut (0.18) is strong evidence among 10 labels
    assert size_ratio_p_value(0.18, 43) > 0.03 > 0.002 > size_ratio_p_value(0.18, 10)
    many = [30.0 + (k % 5) for k in range(43)]
    assert decide(_scan([30 * 0.3, *many[1:]])).verdict == "clean"
    assert decide(_scan([30 * 0.3, *FLAT[1:]])).verdict != "clean"


def test_each_target_must_pass_on_its_own():
    v = decide(_scan([3.0, 30, 9.0, *FLAT[3:]]))  # ratios 0.1 (certain) and 0.3 (alone: suspicious)
    assert (v.verdict, v.targets, v.kind) == ("backdoored", [0], "all-to-one")
    single = decide(_scan([9.0, *FLAT[1:]]))
    assert (single.verdict, single.targets) == ("suspicious", [0])


def test_asymmetric_pairs_from_most_sources_are_all_to_all():
    rows = [(s, (s + 1) % 10, 8.0, 90.0) for s in range(10)]  # small forward, 11× larger reverse
    rows += [(s, (s + 5) % 10, 20.0, 21.0) for s in range(10)]  # the model's typical pairs
    v = decide(_scan(FLAT), pairs=_pairs(rows))
    assert v.verdict == "backdoored" and v.kind == "all-to-all" and v.targets == list(range(10))
    assert len(injected_pairs(_pairs(rows))) == 10
    symmetric = [(s, (s + 1) % 10, 8.0, 9.0) for s in range(10)] + rows[10:]
    assert decide(_scan(FLAT), pairs=_pairs(symmetric)).verdict == "clean"  # natural: easy both ways
    mildly = [(s, (s + 1) % 10, 8.0, 25.0) for s in range(10)] + rows[10:]  # 3×: natural pairs reach 9×
    assert decide(_scan(FLAT), pairs=_pairs(mildly)).verdict == "clean"
    one = [rows[0], *rows[10:]]
    lone = decide(_scan(FLAT), pairs=_pairs(one))
    assert (lone.verdict, lone.kind, lone.targets) == ("suspicious", "source-specific", [1])
    # the untargeted map's evidence beside it (a hub: clean) leaves the pair's target and kind alone
    beside = decide(_scan(FLAT), pairs=_pairs(one), untargeted=_shifts({s: 3 for s in range(10) if s != 3}))
    assert (beside.verdict, beside.kind, beside.targets) == ("suspicious", "source-specific", [1])


def _shifts(targets: dict[int, int], k: int = 10, share: float = 0.9, l1: float = 6.0) -> UntargetedEvidence:
    """Sources in ``targets`` move (80%) to their label; the others barely move (30%)."""
    shifts = [SourceShift(s, targets.get(s, (s + 3) % k), 0.8 if s in targets else 0.3, share)
              for s in range(k)]
    return UntargetedEvidence(l1, 0.8, True, shifts, k, 1.0, 100)


def test_an_untargeted_trigger_that_maps_many_labels_apart_is_all_to_all():
    shifted = _shifts({s: (s + 1) % 10 for s in range(5)})  # 5 sources of 10 to 5 different labels
    v = decide(_scan(FLAT), _margins([40.0] * 10, 0.5), untargeted=shifted)
    assert (v.verdict, v.kind, v.targets) == ("backdoored", "all-to-all", [1, 2, 3, 4, 5])
    assert v.injected_pairs == [(s, s + 1) for s in range(5)]
    assert v.evidence[-1].says == "backdoor" and v.evidence[-1].threshold == spread_needed(10) == 5
    four = decide(_scan(FLAT), untargeted=_shifts({s: (s + 1) % 10 for s in range(4)}))
    assert four.verdict == "clean" and four.evidence[-1].says == "clean"
    hub = decide(_scan(FLAT), untargeted=_shifts({s: 3 for s in range(10) if s != 3}))  # a natural hub
    assert hub.verdict == "clean" and hub.evidence[-1].value == 1
    loose = _shifts({s: (s + 1) % 10 for s in range(8)}, share=0.4)  # moved, but scattered
    assert decide(_scan(FLAT), untargeted=loose).verdict == "clean"
    assert spread_needed(43) == 22 and spread_needed(4) == 3
    # a map as wide, but from a stamp larger than the smallest per-label trigger (28): no small injected stamp
    large = _shifts({s: (s + 1) % 10 for s in range(8)}, l1=29.0)
    assert decide(_scan(FLAT), untargeted=large).verdict == "clean"


def test_the_verdict_round_trips_through_json():
    v = decide(_scan([6.0, *FLAT[1:]]), _margins([40.0] * 10, 0.5),
               _pairs([(0, 1, 8.0, 95.0), (1, 2, 20.0, 21.0), (2, 3, 20.0, 20.0)]),
               _shifts({0: 1, 1: 2}))
    back = Verdict.from_dict(json.loads(json.dumps(to_jsonable(v.to_dict()))))
    assert to_jsonable(back.to_dict()) == to_jsonable(v.to_dict())


def test_decision_verdict_from_the_command_line(trojaned_digits, tmp_path):
    model = tmp_path / "m.safetensors"
    save_model(trojaned_digits.model, model)
    result = CliRunner().invoke(app, ["scan", str(model), "--data", "digits", "--clean-samples", "300",
                                      "--steps", "60", "--decision", "verdict", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    scan = json.loads((tmp_path / "s" / "scan.json").read_text())
    # the 3x3 patch covers 14% of an 8x8 digit: its size ratio (about 0.22) says backdoor on its own,
    # MM-BD (p about 0.5) does not, and Fisher's combination lands at the backdoored cut (0.01)
    size = scan["verdict"]["evidence"][0]
    assert size["says"] == "backdoor" and size["targets"] == [0] and size["p_value"] < ALPHA
    assert scan["verdict"]["targets"] == [0] and scan["verdict"]["score"] < SUSPICIOUS
    verdict = scan["verdict"]["verdict"]  # the score decides, on the rule's own cut
    assert verdict == ("backdoored" if scan["verdict"]["score"] < ALPHA else "suspicious")
    assert verdict.upper() in result.output
    assert "maximum margin" in result.output and "combined p-value" in result.output
    assert scan["infected"] == (verdict == "backdoored")
    assert scan["verdict"]["thresholds"]["backdoored"] == ALPHA
    if verdict == "backdoored":
        assert scan["flagged_labels"] == [0] and scan["verdict"]["kind"] == "all-to-one"
    assert scan["paper"]["flagged_labels"] == [0] and "p_value" in scan["mm-bd"]
    assert ScanResult.load(tmp_path / "s").extra["verdict"]["targets"] == [0]
    assert "Verdict and its evidence" in (tmp_path / "s" / "report.html").read_text()
    # the default verdict gathers the untargeted map, not the pair search; verdict-pairs adds it
    names = [e["name"] for e in scan["verdict"]["evidence"]]
    assert "untargeted trigger map" in names and "label pairs (symmetry)" not in names
    assert "universal perturbation ratio" not in names  # rule 7 was not adopted (README)
    assert "untargeted" in scan and "pairs" not in scan
    both = CliRunner().invoke(app, ["scan", str(model), "--data", "digits", "--clean-samples", "300",
                                    "--steps", "60", "--decision", "verdict-pairs",
                                    "--out", str(tmp_path / "p")])
    assert both.exit_code == 0, both.output
    with_pairs = json.loads((tmp_path / "p" / "scan.json").read_text())
    assert "label pairs (symmetry)" in [e["name"] for e in with_pairs["verdict"]["evidence"]]
    assert with_pairs["pairs"]["pairs"] and "label pairs" in both.output


def test_a_pair_the_model_already_confuses_is_not_evidence():
    rows = [(s, (s + 1) % 10, 8.0, 90.0) for s in range(10)]
    rows += [(s, (s + 5) % 10, 20.0, 21.0) for s in range(10)]
    pairs = _pairs(rows)
    for p in pairs.pairs[:10]:  # the small asymmetric pairs' sources already go to their targets
        p.prescreen_probability = 0.3
    assert injected_pairs(pairs) == [] and decide(_scan(FLAT), pairs=pairs).verdict == "clean"
    for p in pairs.pairs[:10]:
        p.prescreen_probability = 0.02  # a trigger's job: the clean images do not go there
    assert decide(_scan(FLAT), pairs=pairs).kind == "all-to-all"


def test_too_few_labels_give_no_size_evidence():
    from trojanscan.defenses.verdict import MIN_SIZE_LABELS

    assert math.isnan(size_ratio_p_value(0.4, MIN_SIZE_LABELS - 1))  # a 2.5x gap between 2 labels
    assert decide(_scan([30.0])).verdict == "clean"  # no division by the zero of one label
    v = decide(_scan([30.0, 12.0]), _margins([30.0, 90.0], 0.001))  # MM-BD alone still decides
    assert (v.verdict, v.targets) == ("backdoored", [1])


EVEN = [30.0, 31, 29, 30, 30.5, 29.5, 30, 31, 29, 30]  # a dense net's labels: far more even than a CNN's


def test_a_dense_net_is_held_to_its_own_labels_spread():
    """Rule 6: an MLP's modest outlier among very even labels is a backdoor; the convolutional nets'
    ratio null (whose natural shortcuts reach ratios like it) calls it clean."""
    modest = [20.0, *EVEN[1:]]  # ratio 0.67
    assert decide(_scan(modest)).verdict == "clean"
    v = decide(_scan(modest), dense=True)
    assert (v.verdict, v.targets, v.kind) == ("backdoored", [0], "all-to-one")
    assert v.evidence[0].name == "trigger size (dense net)" and v.evidence[0].value < v.evidence[0].threshold
    # a wide spread of its own makes the same dense net's smallest label ordinary
    wide = [6.0, 10, 20, 40, 60, 80, 100, 120, 30, 50]
    assert decide(_scan(wide)).verdict != "clean"  # the ratio null: 6 / 45 is small
    assert decide(_scan(wide), dense=True).verdict == "clean"


def test_the_dense_statistic_and_its_null_on_known_values():
    t = dense_anomalies({k: v for k, v in enumerate([20.0, *EVEN[1:]])})
    logs = [math.log(v) for v in [20.0, *EVEN[1:]]]
    median = statistics.median(logs)
    spread = 1.4826 * statistics.median(abs(v - median) for v in logs)
    assert t[0] == pytest.approx((math.log(20.0) - median) / (spread * smallest_normal(10)))
    mean, c = DENSE_NULL
    assert dense_p_value(mean, 10) == pytest.approx(0.5)  # the clean mean is the median of the null
    assert dense_p_value(mean - 2 * c / math.sqrt(43), 43) == pytest.approx(0.02275, abs=1e-4)
    assert math.isnan(dense_p_value(-5.0, 3))  # too few labels: no evidence
    assert all(math.isnan(v) for v in dense_anomalies({k: 30.0 for k in range(10)}).values())  # no spread


def test_a_scan_holds_a_model_without_convolutions_to_the_dense_null(digits):
    from trojanscan import scan
    from trojanscan.attacks import BadNets
    from trojanscan.workflows.training import train_classifier

    mlp = train_classifier(digits, "mlp", epochs=15, batch_size=64, seed=0, progress=False,
                           attack=BadNets(target=0, poison_rate=0.1, size=3, seed=0)).model
    result = scan(mlp, digits, clean_samples=300, steps=60, decision="verdict", progress=False)
    size = result.extra["verdict"]["evidence"][0]
    assert size["name"] == "trigger size (dense net)" and size["targets"] == [0]
    assert result.extra["verdict"]["verdict"] == "backdoored" and result.flagged_labels == [0]


def test_a_dense_verdict_round_trips_through_json():
    v = decide(_scan([20.0, *EVEN[1:]]), _margins([40.0] * 10, 0.5), dense=True)
    back = Verdict.from_dict(json.loads(json.dumps(to_jsonable(v.to_dict()))))
    assert to_jsonable(back.to_dict()) == to_jsonable(v.to_dict())


def test_population_evidence_holds_each_label_to_the_same_label_on_other_models():
    """A label small on every model of the data (a natural shortcut) is not evidence; one small only
    on its own model is, with that label as the target; too few other models give no evidence; MM-BD's
    p-value joins by Fisher's method."""
    from trojanscan.defenses.population import POPULATION_MIN, log_ratios, population_evidence

    natural = [60.0, 90, 100, 95, 110, 105, 98, 102, 30.0, 97]  # label 8 easy everywhere (the "bag")
    profiles = {f"clean{i}": log_ratios([v * (1 + 0.03 * ((i + k) % 3 - 1)) for k, v in enumerate(natural)])
                for i in range(4)}
    injected = list(natural)
    injected[3] = 8.0  # label 3 easy only here
    profiles["trojaned"] = log_ratios(injected)
    found = population_evidence(profiles)
    assert set(found) == set(profiles)
    assert found["trojaned"].target == 3 and found["trojaned"].p_value < 0.01
    assert found["trojaned"].targets == [3]
    assert all(found[f"clean{i}"].p_value > 0.05 for i in range(4))
    assert found["trojaned"].models == 4
    # the raw size ratio would call the clean models' label 8 (30 / ~97) as small as an injected one
    assert min(natural) / sorted(natural)[5] < 0.35
    with_margin = population_evidence(profiles, {"trojaned": 0.01})
    assert with_margin["trojaned"].score < found["trojaned"].score
    two = list(injected)
    two[5] = 9.0  # a second injected target
    assert population_evidence({**profiles, "trojaned": log_ratios(two)})["trojaned"].targets == [3, 5]
    few = dict(list(profiles.items())[:POPULATION_MIN])  # each model has POPULATION_MIN - 1 others
    assert population_evidence(few) == {}


def _pushes(norms: list[float]) -> PerturbationEvidence:
    return PerturbationEvidence(norms, 1.0, 100)


PUSH = [3.0, 3.2, 2.9, 3.1, 3.3, 2.8, 3.0, 3.1, 2.9, 3.4]  # even universal perturbation norms


def test_a_blend_without_a_small_trigger_is_caught_by_the_universal_perturbation():
    """Rule 7: flat trigger sizes and an ordinary margin, but one label needs a far smaller push."""
    push = _pushes([3.0, 3.2, 2.9, 0.45, *PUSH[4:]])  # label 3 at 0.15 of the median
    v = decide(_scan(FLAT), _margins([40.0] * 10, 0.6), perturbation=push)
    item = v.evidence[-1]
    assert item.name == "universal perturbation ratio" and item.says == "backdoor" and item.targets == [3]
    assert item.p_value == size_ratio_p_value(0.45 / 3.0, 10, PERTURBATION_NULL)  # the median is 3.0
    assert v.score == combined_p_value([v.evidence[0].p_value, 0.6, item.p_value])
    assert (v.verdict, v.targets, v.kind, v.rule_version) == ("backdoored", [3], "all-to-one", 7)
    without = decide(_scan(FLAT), _margins([40.0] * 10, 0.6))
    assert (without.verdict, without.rule_version) == ("clean", RULE_VERSION)  # the default rule misses it
    even = decide(_scan(FLAT), _margins([40.0] * 10, 0.6), perturbation=_pushes(PUSH))
    assert even.verdict == "clean" and even.evidence[-1].says == "clean"


def test_the_perturbation_null_sets_its_cut_and_labels_never_reached_are_no_evidence():
    median = math.exp(PERTURBATION_NULL[0] * smallest_normal(10))  # the median clean 10-label ratio
    assert abs(size_ratio_p_value(median, 10, PERTURBATION_NULL) - 0.5) < 1e-9
    item = decide(_scan(FLAT), perturbation=_pushes(PUSH)).evidence[-1]
    assert abs(size_ratio_p_value(item.threshold, 10, PERTURBATION_NULL) - ALPHA) < 1e-9
    assert perturbation_label_p(_pushes([1.0] + [math.inf] * 9)) == {}  # the median was never reached
    some = perturbation_label_p(_pushes([math.inf, *PUSH[1:]]))
    assert some[0] == 1.0 and all(0 < p < 1 for p in list(some.values())[1:])
    v = decide(_scan(FLAT), perturbation=_pushes([math.inf] * 10))
    assert v.verdict == "clean" and math.isnan(v.evidence[-1].p_value)


def test_a_verdict_with_perturbation_evidence_round_trips_through_json():
    v = decide(_scan(FLAT), _margins([40.0] * 10, 0.5), perturbation=_pushes([0.4, *PUSH[1:]]))
    back = Verdict.from_dict(json.loads(json.dumps(to_jsonable(v.to_dict()))))
    assert to_jsonable(back.to_dict()) == to_jsonable(v.to_dict()) and back.targets == [0]


def test_a_depthwise_net_is_held_to_its_own_ratio_null():
    """Rule 8: a MobileNet's natural shortcut (ratio 0.2 on 10 labels, like Fashion-MNIST's bag) is
    ordinary for its family; a far smaller trigger is still a backdoor."""
    shortcut = _scan([6.0, *FLAT[1:]])  # ratio 0.2
    assert decide(shortcut).verdict == "backdoored"  # the other convolutional nets' null
    held = decide(shortcut, depthwise=True)
    assert held.verdict != "backdoored" and held.evidence[0].name == "trigger size ratio (depthwise net)"
    assert held.evidence[0].p_value == size_ratio_p_value(0.2, 10, DEPTHWISE_NULL)
    assert abs(size_ratio_p_value(held.evidence[0].threshold, 10, DEPTHWISE_NULL) - ALPHA) < 1e-9
    assert held.evidence[0].threshold < 0.2 < decide(shortcut).evidence[0].threshold
    strong = decide(_scan([1.5, *FLAT[1:]]), depthwise=True)
    assert (strong.verdict, strong.targets, strong.rule_version) == ("backdoored", [0], RULE_VERSION)
    assert decide(_scan([6.0, *EVEN[1:]]), dense=True, depthwise=True).evidence[0].name == (
        "trigger size (dense net)")  # a net without convolutions is dense whatever the flag says


def test_a_convolutional_net_is_held_to_its_heads_null():
    """Rule 9: a ratio of 0.4 is ordinary for a net whose head pools (and for one whose head is not
    known) but a backdoor for one whose head keeps positions; a depthwise net keeps its own null."""
    modest = _scan([12.0, *FLAT[1:]])  # ratio 0.4
    positional = decide(modest, pooled=False)
    assert (positional.verdict, positional.targets) == ("backdoored", [0])
    assert positional.rule_version == RULE_VERSION
    assert positional.evidence[0].name == "trigger size ratio (positional head)"
    assert positional.evidence[0].p_value == size_ratio_p_value(0.4, 10, POSITIONAL_NULL)
    assert positional.evidence[0].detail.endswith("held to the positional heads' null")
    pooled = decide(modest, pooled=True)
    assert pooled.verdict == "clean" and pooled.evidence[0].name == "trigger size ratio (pooled head)"
    assert pooled.evidence[0].p_value == size_ratio_p_value(0.4, 10, POOLED_NULL)
    unknown = decide(modest)
    assert unknown.verdict == "clean" and unknown.evidence[0].name == "trigger size ratio"
    assert unknown.evidence[0].p_value == size_ratio_p_value(0.4, 10, CLEAN_LOG_RATIO)
    for v, null in ((positional, POSITIONAL_NULL), (pooled, POOLED_NULL)):  # each threshold is its own null's
        assert abs(size_ratio_p_value(v.evidence[0].threshold, 10, null) - ALPHA) < 1e-9
    assert positional.evidence[0].threshold > 0.4 > pooled.evidence[0].threshold
    both = decide(modest, depthwise=True, pooled=False)
    assert both.evidence[0].name == "trigger size ratio (depthwise net)" and both.verdict == "clean"
    back = Verdict.from_dict(json.loads(json.dumps(to_jsonable(positional.to_dict()))))
    assert to_jsonable(back.to_dict()) == to_jsonable(positional.to_dict())


def test_the_scan_sees_depthwise_convolutions():
    from torch import nn

    from trojanscan.devices import depthwise

    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2))
    separable = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    assert not depthwise(plain) and depthwise(separable) and not depthwise(nn.Linear(3, 2))
    assert depthwise(torch.jit.script(separable)) and not depthwise(torch.jit.script(plain))

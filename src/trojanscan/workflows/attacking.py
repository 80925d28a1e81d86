"""Running a model attack on a trained model: the attacked copy is saved with its trigger beside it
(as every attack saves it), so ``evaluate``, ``scan`` and ``strip evaluate`` find it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from trojanscan.attacks import ModelAttack
from trojanscan.data.triggers import trigger_path_for
from trojanscan.fileio import sha256_file
from trojanscan.models import check_save_target, save_model
from trojanscan.workflows.inputs import DataLike, ModelLike, resolve
from trojanscan.workflows.records import Record, environment
from trojanscan.workflows.training import check_model_suffix, data_record, make_attack, trigger_record


@dataclass
class AttackRecord(Record):
    """What ``trojanscan attack`` did: the attack's settings, CA and ASR before and after."""

    attack: str
    parameters: dict[str, Any]
    before: dict[str, float | None]
    after: dict[str, float | None]
    report: dict[str, Any]
    trigger: dict[str, Any] | None
    model: dict[str, Any]
    source_model: dict[str, Any]
    data: dict[str, Any]
    seconds: float
    environment: dict[str, str]
    command: str = "attack"


def _inner_names(steps: dict[str, float] | None, outer: nn.Module, inner: nn.Module
                 ) -> dict[str, float] | None:
    """``steps`` keyed by the saved module's state names (a convention wrapper adds a prefix)."""
    if not steps:
        return None
    by_tensor = {outer.state_dict()[k].data_ptr(): s for k, s in steps.items()}
    return {k: by_tensor[v.data_ptr()] for k, v in inner.state_dict().items() if v.data_ptr() in by_tensor}


def attack_model(name: str, model: ModelLike, data: DataLike, out: str | os.PathLike, *,
                 options: dict[str, Any] | None = None, arch: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, trusted: bool = False,
                 json_path: str | os.PathLike | None = None, device: str = "cpu") -> AttackRecord:
    """Apply the registered model attack ``name`` (with its ``options``) to ``model`` with the
    attacker's ``data``; save the attacked model to ``out`` in the model's own input convention and
    its trigger beside it; return (and with ``json_path`` write) the record."""
    out = check_model_suffix(out)
    attack: ModelAttack = make_attack(name, ModelAttack, **(options or {}))
    resolved = resolve(model, data, arch=arch, mean=mean, std=std, trusted=trusted, device=device)
    check_save_target(resolved.inner, out)
    start = time.perf_counter()
    attacked, trigger = attack.apply(resolved.module, resolved.dataset)
    seconds = time.perf_counter() - start
    inner = resolved.unwrap(attacked)
    save_model(inner, out, metadata={
        "data_sha256": resolved.dataset.sha256, "attacked_by": name, "attacked_from": resolved.sha256,
        "input_convention": resolved.convention},
        int8_steps=_inner_names(attack.int8_steps_, attacked, inner))
    trigger_file = trigger_path_for(out)
    trigger.save(trigger_file)
    report = dict(attack.report_)
    record = AttackRecord(
        attack=name, parameters=attack.params(),
        before=report.pop("before"), after=report.pop("after"), report=report,
        trigger=trigger_record(trigger, trigger_file),
        model={"file": str(out), "sha256": sha256_file(out), "input_convention": resolved.convention},
        source_model=resolved.model_record(), data=data_record(resolved.dataset, data), seconds=seconds,
        environment=environment())
    if json_path is not None:
        record.write(json_path)
    return record

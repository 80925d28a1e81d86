"""The public Python surface: every workflow's entry points, re-exported from ``workflows/``.

- inputs: :func:`as_dataset` (any data-like argument: a name or path, tensors, numpy arrays, a torch
  Dataset or DataLoader), :func:`load_model` (a callable module with its file's metadata),
  :func:`resolve`, :func:`held_out`, :func:`clean_subset`, :func:`load_inputs`
- training: :func:`train_classifier`, :func:`train_and_save`, :func:`evaluate_model`, :func:`evaluate_file`
- attacking a trained model: :func:`attack_model`
- scanning: :func:`scan`, :func:`scan_repeated`
- auditing many models: :func:`audit`
- guarding: :func:`strip_calibrate`, :func:`strip_check`, :func:`strip_evaluate`, :func:`filter_check`,
  :func:`guard_calibrate`, :func:`guard_check`, :func:`guard_evaluate`
- repairing: :func:`repair`, :func:`build_filter`
"""

from trojanscan.data import Dataset, load_dataset
from trojanscan.defenses.scan_result import ScanResult
from trojanscan.models import LoadedModel, load_model
from trojanscan.runners.audit import AuditResult, audit
from trojanscan.workflows.attacking import AttackRecord, attack_model
from trojanscan.workflows.guarding import (
    CheckRecord,
    GuardEvaluation,
    StripEvaluation,
    StripRun,
    filter_check,
    guard_calibrate,
    guard_check,
    guard_evaluate,
    strip_calibrate,
    strip_check,
    strip_evaluate,
    strip_rates,
)
from trojanscan.workflows.inputs import (
    HELD_OUT,
    Resolved,
    as_dataset,
    clean_subset,
    held_out,
    load_inputs,
    model_and_inputs,
    resolve,
)
from trojanscan.workflows.records import environment
from trojanscan.workflows.repairing import MitigationRecord, build_filter, repair, reversed_triggers
from trojanscan.workflows.scanning import scan, scan_repeated
from trojanscan.workflows.training import (
    EvaluationRecord,
    TrainRecord,
    TrainResult,
    channel_stats,
    evaluate_file,
    evaluate_model,
    make_attack,
    train_and_save,
    train_classifier,
)

__all__ = ["HELD_OUT", "AttackRecord", "CheckRecord", "Dataset", "EvaluationRecord", "LoadedModel",
           "MitigationRecord", "Resolved", "ScanResult", "StripEvaluation", "StripRun", "TrainRecord",
           "TrainResult", "as_dataset", "attack_model", "build_filter", "channel_stats", "clean_subset",
           "environment", "evaluate_file", "evaluate_model", "filter_check", "held_out", "load_dataset",
           "load_inputs", "load_model", "make_attack", "model_and_inputs", "repair", "resolve",
           "reversed_triggers", "scan", "scan_repeated", "strip_calibrate", "strip_check", "strip_evaluate",
           "strip_rates", "train_and_save", "train_classifier"]
__all__ += ["GuardEvaluation", "guard_calibrate", "guard_check", "guard_evaluate"]
__all__ += ["AuditResult", "audit"]

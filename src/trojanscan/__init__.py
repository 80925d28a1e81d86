"""trojanscan: audit neural networks for backdoors (trojans) and repair them."""

from trojanscan._version import __version__
from trojanscan.api import (
    Dataset,
    LoadedModel,
    ScanResult,
    TrainResult,
    as_dataset,
    attack_model,
    build_filter,
    evaluate_model,
    load_dataset,
    load_model,
    make_attack,
    repair,
    scan,
    train_classifier,
)
from trojanscan.attacks import BadNets, Blend, FineTuneBackdoor, ModelAttack, PoisoningAttack, Scatter
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.base import InputGuard, Provenance, TriggerReverser
from trojanscan.defenses.guard import Guard
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.layer_knn import LayerKnn
from trojanscan.defenses.mmbd import MMBD
from trojanscan.defenses.neural_cleanse import NeuralCleanse
from trojanscan.defenses.scale_up import ScaleUp
from trojanscan.defenses.strip import Strip
from trojanscan.defenses.tabor import Tabor
from trojanscan.defenses.teco import TeCo
from trojanscan.errors import TrojanscanError
from trojanscan.models import build_model, save_model

__all__ = [
    "MMBD", "BadNets", "Blend", "Dataset", "FineTuneBackdoor", "InputFilter", "InputGuard", "LoadedModel",
    "ModelAttack", "NeuralCleanse", "PoisoningAttack", "Provenance", "Scatter", "ScanResult", "Strip",
    "Tabor", "TrainResult", "Trigger", "TriggerReverser", "TrojanscanError", "__version__", "as_dataset",
    "attack_model", "build_filter", "build_model", "evaluate_model", "load_dataset", "load_model",
    "make_attack", "repair", "save_model", "scan", "train_classifier",
]
__all__ += ["Guard", "LayerKnn", "ScaleUp", "TeCo"]  # the run-time guards beside STRIP

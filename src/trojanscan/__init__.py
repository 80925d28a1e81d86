"""trojanscan: audit neural networks for backdoors (trojans) and repair them."""

from trojanscan.api import (
    ScanResult,
    TrainResult,
    evaluate_model,
    load_dataset,
    load_model,
    make_attack,
    scan,
    train_classifier,
)
from trojanscan.attacks import BadNets, Blend
from trojanscan.data.triggers import Trigger
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.neural_cleanse import NeuralCleanse
from trojanscan.errors import TrojanscanError
from trojanscan.models import build_model, save_model
from trojanscan.repair import build_filter, repair

__version__ = "0.1.0"

__all__ = [
    "BadNets", "Blend", "InputFilter", "NeuralCleanse", "ScanResult", "TrainResult", "Trigger",
    "TrojanscanError", "__version__", "build_filter", "build_model", "evaluate_model", "load_dataset",
    "load_model", "make_attack", "repair", "save_model", "scan", "train_classifier",
]

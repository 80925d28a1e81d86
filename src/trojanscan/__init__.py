"""trojanscan: audit neural networks for backdoors (trojans) and repair them."""

from trojanscan.api import (
    TrainResult,
    evaluate_model,
    load_dataset,
    load_model,
    make_attack,
    train_classifier,
)
from trojanscan.attacks import BadNets, Blend
from trojanscan.data.triggers import Trigger
from trojanscan.errors import TrojanscanError
from trojanscan.models import build_model, save_model

__version__ = "0.1.0"

__all__ = [
    "BadNets", "Blend", "TrainResult", "Trigger", "TrojanscanError", "__version__", "build_model",
    "evaluate_model", "load_dataset", "load_model", "make_attack", "save_model", "train_classifier",
]

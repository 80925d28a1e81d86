"""The one registry of defences: a new method is one module plus one line here.

The CLI (``--method``, ``--option``), the zoo benchmark and the HTML report read these tables
instead of naming methods.
"""

from __future__ import annotations

from trojanscan.defenses.autoencoder_guard import AutoencoderGuard
from trojanscan.defenses.base import InputGuard, ModelInspector, TriggerReverser
from trojanscan.defenses.guard import Guard
from trojanscan.defenses.input_filter import InputFilter
from trojanscan.defenses.layer_knn import LayerKnn
from trojanscan.defenses.mmbd import MMBD
from trojanscan.defenses.neural_cleanse import NeuralCleanse
from trojanscan.defenses.pairs import PairSearch
from trojanscan.defenses.perturbation import PerturbationSearch
from trojanscan.defenses.strip import Strip
from trojanscan.defenses.tabor import Tabor
from trojanscan.defenses.teco import TeCo
from trojanscan.defenses.untargeted import UntargetedSearch
from trojanscan.validation import check_choice

REVERSERS: dict[str, type[TriggerReverser]] = {cls.name: cls for cls in (NeuralCleanse, Tabor)}
GUARDS: dict[str, type[InputGuard]] = {cls.name: cls for cls in (Strip, InputFilter, TeCo, LayerKnn, Guard,
                                                                   AutoencoderGuard)}
INSPECTORS: dict[str, type[ModelInspector]] = {cls.name: cls for cls in (MMBD, PairSearch, UntargetedSearch,
                                                                          PerturbationSearch)}


def reverser(name: str) -> type[TriggerReverser]:
    """The trigger reverser registered as ``name``; a one-line error lists the others."""
    return REVERSERS[check_choice("scan method", name, REVERSERS)]


def guard(name: str) -> type[InputGuard]:
    """The input guard registered as ``name``."""
    return GUARDS[check_choice("input guard", name, GUARDS)]

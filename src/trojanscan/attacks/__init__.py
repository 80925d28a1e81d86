"""Attacks that plant backdoors, to evaluate the defences.

Poisoning attacks (BadNets patches, blended and scattered triggers, pixel patterns, the clean-label
label-consistent and SIG attacks) change training data; model attacks (fine-tuning injection, TBT bit
flips, TrojanNN, the transfer-learning backdoor) change a trained model. ``ATTACKS`` is the one
registry: a new attack is one module plus one entry here.
"""

from trojanscan.attacks.all_to_all import AllToAll
from trojanscan.attacks.badnets import BadNets
from trojanscan.attacks.base import Attack, AttackedModel, ModelAttack, PoisonedData, PoisoningAttack
from trojanscan.attacks.blend import Blend
from trojanscan.attacks.clean_label import SIG, CleanLabelAttack, CleanLabelData, LabelConsistent
from trojanscan.attacks.finetune import FineTuneBackdoor
from trojanscan.attacks.pattern import Pattern
from trojanscan.attacks.scatter import Scatter
from trojanscan.attacks.tbt import TBT
from trojanscan.attacks.transfer import TransferBackdoor
from trojanscan.attacks.trojannn import TrojanNN
from trojanscan.attacks.two_target import TwoTarget

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (BadNets, Blend, Scatter, AllToAll, TwoTarget, Pattern, LabelConsistent, SIG,
                              FineTuneBackdoor, TBT, TrojanNN, TransferBackdoor)}


def attacks_of_kind(kind: type[Attack]) -> dict[str, type[Attack]]:
    """The registered attacks of one kind (``PoisoningAttack`` or ``ModelAttack``)."""
    return {name: cls for name, cls in ATTACKS.items() if issubclass(cls, kind)}


__all__ = ["ATTACKS", "SIG", "AllToAll", "Attack", "AttackedModel", "BadNets", "Blend", "CleanLabelAttack",
           "CleanLabelData", "FineTuneBackdoor", "LabelConsistent", "ModelAttack", "Pattern", "PoisonedData",
           "PoisoningAttack", "Scatter", "TBT", "TransferBackdoor", "TrojanNN", "TwoTarget",
           "attacks_of_kind"]

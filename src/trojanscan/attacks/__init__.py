"""Attacks that plant backdoors, to evaluate the defences: BadNets patches and blended triggers."""

from trojanscan.attacks.badnets import BadNets
from trojanscan.attacks.base import PoisonedData, PoisoningAttack
from trojanscan.attacks.blend import Blend

ATTACKS: dict[str, type[PoisoningAttack]] = {"badnets": BadNets, "blend": Blend}

__all__ = ["ATTACKS", "BadNets", "Blend", "PoisonedData", "PoisoningAttack"]

"""Attacks that plant backdoors, to evaluate the defences: BadNets patches, blended and scattered triggers."""

from trojanscan.attacks.badnets import BadNets
from trojanscan.attacks.base import PoisonedData, PoisoningAttack
from trojanscan.attacks.blend import Blend
from trojanscan.attacks.scatter import Scatter

ATTACKS: dict[str, type[PoisoningAttack]] = {"badnets": BadNets, "blend": Blend, "scatter": Scatter}

__all__ = ["ATTACKS", "BadNets", "Blend", "PoisonedData", "PoisoningAttack", "Scatter"]

"""One seed for everything: Python, numpy and torch generators."""

from __future__ import annotations

import random

import numpy as np
import torch

from trojanscan.validation import SEED, check_number


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global generators and return a CPU torch generator seeded the same way (a seed
    outside 0..2^63-1 is a one-line error: results store it as int64)."""
    check_number("seed", seed, SEED)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

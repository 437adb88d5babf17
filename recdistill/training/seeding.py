"""One seed for Python, NumPy and torch."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (call before building a model: it seeds the init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

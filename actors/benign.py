"""Benign users: honest traffic that detectors must leave alone."""

from __future__ import annotations

import numpy as np

from .attacks.base import PoolStream


class BenignStream(PoolStream):
    """Queries natural in-distribution images (the victim's test set) in a seeded order, cycling through
    them if the budget is larger than the set."""

    def __init__(self, images: np.ndarray, budget: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        reps = -(-budget // len(images))
        super().__init__(images, np.concatenate([rng.permutation(len(images)) for _ in range(reps)])[:budget])

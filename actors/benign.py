"""Benign users: honest traffic that detectors must leave alone."""

from __future__ import annotations

import numpy as np

from .attacks.base import PoolStream


class BenignStream(PoolStream):
    """Queries natural in-distribution images (the victim's test set) in a seeded order, cycling through
    them if the budget is larger than the set. With ``popular`` > 0, that share of the queries (each one with
    that probability) is one of the images ``popular_idx`` instead, the r-th drawn with weight 1 / r: the
    images many users send."""

    def __init__(self, images: np.ndarray, budget: int, seed: int = 0, *, popular: float = 0.0,
                 popular_idx: np.ndarray | None = None):
        rng = np.random.default_rng(seed)
        reps = -(-budget // len(images))
        order = np.concatenate([rng.permutation(len(images)) for _ in range(reps)])[:budget]
        if popular > 0 and popular_idx is not None and len(popular_idx):
            weights = 1.0 / np.arange(1, len(popular_idx) + 1)
            swap = rng.random(budget) < popular
            order[swap] = rng.choice(popular_idx, int(swap.sum()), p=weights / weights.sum())
        super().__init__(images, order)

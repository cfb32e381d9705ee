"""Benign users: honest traffic that detectors must leave alone."""

from __future__ import annotations

import numpy as np


class BenignStream:
    """A benign user: queries natural in-distribution images (the victim's test set) in a seeded order."""

    name = None

    def __init__(self, images: np.ndarray, budget: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        reps = -(-budget // len(images))
        self._order = np.concatenate([rng.permutation(len(images)) for _ in range(reps)])[:budget]
        self.images = images
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._order) - self._next

    def propose(self, n: int) -> np.ndarray:
        n = min(n, self.remaining)
        idx = self._order[self._next:self._next + n]
        self._next += n
        return self.images[idx]

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        pass

    def transfer_set(self):
        return None

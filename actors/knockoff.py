"""Knockoff Nets (Orekondy et al. 2019), random strategy: query natural images from a pool.

A pure, stepwise attack: ``propose(n)`` returns the next n queries, ``observe(x, probs, answered)``
records the victim's answers, ``transfer_set()`` returns what a replica trains on. Samples without
replacement; an actor of a distributed attacker takes its own shard of the shuffled pool so the
attacker as a whole never queries an image twice.
"""

from __future__ import annotations

import numpy as np


class KnockoffRandom:
    name = "knockoff"

    def __init__(self, pool: np.ndarray, budget: int, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        index, count = shard
        order = np.random.default_rng(seed).permutation(len(pool))
        mine = order[index::count]
        if budget > len(mine):
            raise ValueError(f"budget {budget} exceeds the {len(mine)} pool images of this actor "
                             f"(pool of {len(pool)} over {count} actors, sampled without replacement)")
        self.pool = pool
        self._order = mine[:budget]
        self._next = 0
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    @property
    def remaining(self) -> int:
        return len(self._order) - self._next

    def propose(self, n: int) -> np.ndarray:
        n = min(n, self.remaining)
        idx = self._order[self._next:self._next + n]
        self._next += n
        return self.pool[idx]

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        if answered.any():
            self._x.append(x[answered])
            self._y.append(probs[answered])

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._x:
            return np.zeros((0, *self.pool.shape[1:]), np.uint8), np.zeros((0, 0), np.float32)
        return np.concatenate(self._x), np.concatenate(self._y).astype(np.float32)


"""Knockoff Nets (Orekondy et al. 2019), random strategy: query natural images from a pool.

Samples without replacement; an actor of a distributed attacker takes its own shard of the shuffled pool
so the attacker as a whole never queries an image twice. The answers form the replica's transfer set.
"""

from __future__ import annotations

import numpy as np

from sim.errors import ConfigError

from .base import PoolStream


class KnockoffRandom(PoolStream):
    def __init__(self, pool: np.ndarray, budget: int, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        index, count = shard
        mine = np.random.default_rng(seed).permutation(len(pool))[index::count]
        if budget > len(mine):
            raise ConfigError(f"budget {budget} exceeds the {len(mine)} pool images of this actor "
                             f"(pool of {len(pool)} over {count} actors, sampled without replacement)")
        super().__init__(pool[mine[:budget]], np.arange(budget))  # an actor carries only its own shard
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        if answered.any():
            self._x.append(x[answered])
            self._y.append(probs[answered])

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._x:
            return np.zeros((0, *self.images.shape[1:]), np.uint8), np.zeros((0, 0), np.float32)
        return np.concatenate(self._x), np.concatenate(self._y).astype(np.float32)

"""Knockoff Nets (Orekondy et al. 2019), random strategy: query natural images from a pool.

By default it samples without replacement; an actor of a distributed attacker takes its own shard of the
shuffled pool so the attacker as a whole never queries an image twice. With ``replacement=True`` the budget
may exceed the pool: each actor draws with replacement. With ``augment=True`` every query is lightly augmented
(a random shift of up to 2 pixels and a brightness scale in [0.9, 1.1]), so that repeats are new queries. The answers form the replica's transfer set.
"""

from __future__ import annotations

import numpy as np

from sim.errors import ConfigError

from .base import PoolStream


def augment_images(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """A random shift (zero fill) of up to ``max_shift`` pixels and a brightness scale in [0.9, 1.1], per image."""
    out = np.zeros_like(images)
    h, w = images.shape[2:]
    for i, img in enumerate(images):
        dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
        src = img[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    scale = rng.uniform(0.9, 1.1, (len(images), 1, 1, 1))
    return np.clip(np.rint(out * scale), 0, 255).astype(np.uint8)


class KnockoffRandom(PoolStream):
    def __init__(self, pool: np.ndarray, budget: int, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 replacement: bool = False, augment: bool = False):
        index, count = shard
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        if replacement:  # each actor its own seeded draws; an actor carries only what it will send
            rng = np.random.default_rng([seed, index])
            picks = pool[rng.integers(len(pool), size=budget)]
            super().__init__(augment_images(picks, rng) if augment else picks, np.arange(budget))
            return
        mine = np.random.default_rng(seed).permutation(len(pool))[index::count]
        if budget > len(mine):
            raise ConfigError(f"budget {budget} exceeds the {len(mine)} pool images of this actor "
                             f"(pool of {len(pool)} over {count} actors, sampled without replacement)")
        picks = pool[mine[:budget]]
        if augment:
            picks = augment_images(picks, np.random.default_rng([seed, index]))
        super().__init__(picks, np.arange(budget))  # an actor carries only its own shard

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        if answered.any():
            self._x.append(x[answered])
            self._y.append(probs[answered])

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._x:
            return np.zeros((0, *self.images.shape[1:]), np.uint8), np.zeros((0, 0), np.float32)
        return np.concatenate(self._x), np.concatenate(self._y).astype(np.float32)

"""An attack plug-in: an actors.attacks.base.Attack subclass with declared parameters, building one query source per
actor. Its parameters are set as attackers.ID.KEY=VALUE (here attackers.ID.pool=… and attackers.ID.noisy.noise=0.1)."""

import numpy as np

from actors.attacks.base import Attack, CollectingStream, load_pool
from sim.registry import Param


class Noisy(Attack):
    """Knockoff-style: query pool images in a seeded random order, each with uniform noise added."""

    params = {
        "pool": Param("digits", str, help="the natural images it starts from (a dataset name)"),
        "noisy.noise": Param(0.1, low=0, high=1, help="largest noise added to a pixel, in [0, 1] units"),
    }

    def sources(self, ctx):
        pool, _ = load_pool(ctx, "pool", self.values["pool"])  # checked: the victim's image shape
        rng = np.random.default_rng(ctx.seed("noisy"))
        order = rng.permutation(len(pool))
        noise = rng.uniform(-1, 1, pool.shape) * self.values["noisy.noise"] * 255
        images = np.clip(pool.astype(np.float32) + noise, 0, 255).astype(np.uint8)[order]
        out, start = [], 0
        for budget in ctx.budgets:  # each actor its own slice, cycling through the pool if the budget is larger
            picks = np.arange(start, start + budget) % len(images)
            out.append(CollectingStream(images[picks], np.arange(budget)))
            start += budget
        return out

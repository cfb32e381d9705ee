"""Knockoff Nets (Orekondy et al. 2019), random strategy: query natural images from a pool.

By default it samples without replacement; an actor of a distributed attacker takes its own shard of the
shuffled pool so the attacker as a whole never queries an image twice. With ``replacement=True`` the budget
may exceed the pool: each actor draws with replacement. With ``augment=True`` every query is lightly augmented
(a random shift of up to 2 pixels and a brightness scale in [0.9, 1.1]), so that repeats are new queries. The
answers form the replica's transfer set.
"""

from __future__ import annotations

import numpy as np

from sim import data
from sim.errors import ConfigError
from sim.registry import Param, register

from .base import Attack, AttackContext, CollectingStream, load_pool


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


class KnockoffRandom(CollectingStream):
    def __init__(self, pool: np.ndarray, budget: int, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 replacement: bool = False, augment: bool = False):
        index, count = shard
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


def coarse_groups(images: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Group id per image: k-means (scikit-learn) on the images average-pooled to at most 14x14, so a bandit
    can work on a pool without labels, or on coarser arms than its classes."""
    from sklearn.cluster import KMeans

    x = images.astype(np.float32) / 255
    f = max(1, x.shape[2] // 14)
    n, c, h, w = x.shape
    x = x[:, :, :h // f * f, :w // f * f].reshape(n, c, h // f, f, w // f, f).mean((3, 5)).reshape(n, -1)
    if k > len(x):
        raise ValueError(f"{k} groups asked of {len(x)} pool images; expected at most {len(x)}")
    return KMeans(k, n_init=1, random_state=seed).fit_predict(x).astype(np.int64)


REWARDS = ("certainty", "diversity", "loss")


class KnockoffAdaptive(CollectingStream):
    """Knockoff Nets, adaptive strategy (Orekondy et al. 2019): a gradient bandit over the pool's classes.

    ``pool_labels`` name the arms: the pool's classes, or coarse groups (:func:`coarse_groups`).
    Each query picks an arm a ~ softmax(H), then an unused image of that arm. Its reward is the sum of the
    chosen signals, each standardised by its running mean and deviation:
    - certainty: the margin between the victim's two largest probabilities;
    - diversity: how much the answer exceeds the mean of the last ``window`` answers, sum_k max(0, y_k - mean_k);
    - loss: the cross-entropy of the attacker's online model against the answer (the model takes one Adam step
      on every answered batch).
    The preferences move by ``lr`` (r - mean reward)(1[a = chosen] - pi_a), batched. Softmax subtracts the
    maximum and logs are clamped, so nothing overflows or takes log 0.
    """

    def __init__(self, pool: np.ndarray, pool_labels: np.ndarray, budget: int, *, arch: str, num_classes: int,
                 seed: int = 0, lr: float = 0.01, rewards: tuple[str, ...] = REWARDS, window: int = 25):
        import torch

        from sim import models

        unknown = sorted(set(rewards) - set(REWARDS))
        if unknown or not rewards:
            raise ConfigError(f"rewards={list(rewards)!r}: expected a non-empty subset of {', '.join(REWARDS)}")
        if budget > len(pool):
            raise ConfigError(f"budget {budget} exceeds the {len(pool)} pool images (the adaptive strategy "
                              f"samples without replacement)")
        super().__init__(pool, np.arange(budget))
        self._rng = np.random.default_rng(seed)
        self.actions = np.unique(pool_labels)
        self._unused = {a: list(self._rng.permutation(np.flatnonzero(pool_labels == a))) for a in self.actions}
        self.preferences = np.zeros(len(self.actions))
        self.lr, self.rewards, self.window = lr, tuple(rewards), window
        self._stats = {r: [0, 0.0, 0.0] for r in self.rewards}  # count, mean, M2 (Welford)
        self._baseline, self._steps = 0.0, 0
        self._recent: list[np.ndarray] = []
        self._chosen: np.ndarray | None = None
        torch.manual_seed(seed)
        self.model = models.build(arch, tuple(pool.shape[1:]), num_classes) if "loss" in self.rewards else None
        self._opt = torch.optim.Adam(self.model.parameters(), lr=1e-3) if self.model is not None else None

    def policy(self) -> np.ndarray:
        live = np.array([bool(self._unused[a]) for a in self.actions])
        if not live.any():  # the pool is used up
            return np.full(len(self.actions), 1.0 / len(self.actions))
        h = np.where(live, self.preferences, -np.inf)
        p = np.exp(h - h[live].max())
        return p / p.sum()

    def stats(self) -> dict:
        return {"arms": [int(a) for a in self.actions], "policy": [round(float(p), 4) for p in self.policy()]}

    def propose(self, n: int) -> np.ndarray:
        n = min(n, self.remaining)
        chosen, picks = [], []
        for _ in range(n):
            a = int(self._rng.choice(len(self.actions), p=self.policy()))
            chosen.append(a)
            picks.append(self._unused[self.actions[a]].pop())
        self._next += n
        self._chosen = np.array(chosen, int)
        return self.images[np.array(picks, int)]

    def _standardise(self, name: str, values: np.ndarray) -> np.ndarray:
        stat = self._stats[name]
        for v in values:  # Welford's running mean and variance
            stat[0] += 1
            delta = v - stat[1]
            stat[1] += delta / stat[0]
            stat[2] += delta * (v - stat[1])
        std = np.sqrt(stat[2] / stat[0]) if stat[0] > 1 else 1.0
        return (values - stat[1]) / max(std, 1e-8)

    def reward_signals(self, x: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
        from sim.training import fixed_threads

        out = {}
        if "certainty" in self.rewards:
            top2 = np.sort(probs, axis=1)[:, -2:]
            out["certainty"] = top2[:, 1] - top2[:, 0]
        if "diversity" in self.rewards:
            div = []
            for y in probs:
                mean = np.mean(self._recent, axis=0) if self._recent else np.zeros_like(y)
                div.append(np.maximum(y - mean, 0).sum())
                self._recent = (self._recent + [y])[-self.window:]
            out["diversity"] = np.array(div)
        if self.model is not None:
            out["loss"] = fixed_threads(self._learn)(x, probs)
        return out

    def _learn(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Each query's loss under the attacker's model (the "loss" reward), then one step of it on them."""
        import torch

        from sim.training import to_float

        target = torch.as_tensor(probs, dtype=torch.float32)
        logits = self.model(to_float(x))
        loss = -(target * torch.log_softmax(logits, 1)).sum(1)
        self._opt.zero_grad()
        loss.mean().backward()
        self._opt.step()
        return loss.detach().numpy()

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        if not answered.any():
            return
        super().observe(x, probs, answered)
        x, probs, chosen = x[answered], probs[answered], self._chosen[answered]
        signals = self.reward_signals(x, probs)
        reward = sum(self._standardise(name, v) for name, v in signals.items())
        pi = self.policy()
        grad = np.zeros_like(self.preferences)
        for a, r in zip(chosen, reward):
            self._steps += 1
            self._baseline += (r - self._baseline) / self._steps
            grad += (r - self._baseline) * ((np.arange(len(pi)) == a) - pi)
        h = self.preferences + self.lr * grad  # a new array: Ray hands actors read-only numpy arrays
        self.preferences = h - h.max()  # only differences matter; keeps them bounded


@register("attack")
class KnockoffNets(Attack):
    """Knockoff Nets (Orekondy et al. 2019): natural images from a pool, drawn at random or chosen by a gradient
    bandit over the pool's classes; each actor takes its own shard of the shuffled pool."""

    name = "knockoff"
    params = {
        "pool": Param("digits", str, help="natural query pool: a dataset, or several of one image shape joined by "
                                          "'+' (their train and test images together)"),
        "pool_size": Param(None, int, low=1, help="distinct pool images the attacker holds: a random subset of the "
                                                  "pool (nested: a smaller size keeps a prefix of a larger one's); "
                                                  "unset: the whole pool"),
        "strategy": Param("random", str, choices=("random", "adaptive"),
                          help="random sampling, or the gradient bandit over the pool's classes"),
        "sample_with_replacement": Param(False, bool, help="draw pool images with replacement, so the budget may "
                                                           "exceed the pool"),
        "augment": Param(False, bool, help="shift (up to 2 px) and rescale the brightness of each query"),
        "adaptive.arms": Param("labels", str, choices=("labels", "clusters"),
                               help="bandit arms: the pool's classes, or coarse groups (k-means on the images)"),
        "adaptive.clusters": Param(10, int, low=2, help="k-means groups when adaptive.arms=clusters"),
        "adaptive.lr": Param(0.01, low=0, low_open=True, help="gradient-bandit step size"),
        "adaptive.rewards": Param(list(REWARDS), list, choices=REWARDS,
                                  help="reward signals, summed once standardised"),
        "adaptive.window": Param(25, int, low=1, help="answers averaged by the diversity reward"),
    }

    @classmethod
    def _inert(cls, values: dict) -> dict[str, str]:
        if values["strategy"] != "adaptive":
            return {k: "strategy=adaptive" for k in cls.params if k.startswith("adaptive.")}
        return {} if values["adaptive.arms"] == "clusters" else {"adaptive.clusters": "adaptive.arms=clusters"}

    @classmethod
    def _check_params(cls, values: dict, owner: str) -> None:
        if values["strategy"] == "adaptive" and values["sample_with_replacement"]:
            raise ConfigError(f"{owner}.strategy=adaptive samples without replacement; expected "
                              f"{owner}.sample_with_replacement=false")
        for part in values["pool"].split("+"):
            data.check_name(f"{owner}.pool", part)

    def sources(self, ctx: AttackContext) -> list:
        """One source per actor, each with its own shard of the shuffled pool (the adaptive strategy: its own
        bandit over its own shard)."""
        v, ds, actors = self.values, ctx.dataset, len(ctx.budgets)
        if ds.name in v["pool"].split("+"):  # its test images are what the replica is scored on
            raise ConfigError(f"{ctx.owner}.pool={v['pool']!r} holds the victim's own dataset {ds.name!r}, whose test "
                              f"images score the replica; expected the attacker's own data (another dataset)")
        pool, labels = load_pool(ctx, "pool", v["pool"])
        if v["pool_size"] is not None:
            if v["pool_size"] > len(pool):
                raise ConfigError(f"{ctx.owner}.pool_size={v['pool_size']} exceeds the {len(pool)} images of pool "
                                  f"{v['pool']!r}; expected at most {len(pool)}")
            keep = np.random.default_rng(ctx.seed("pool_size")).permutation(len(pool))[:v["pool_size"]]
            pool, labels = pool[keep], labels[keep]
        budget, name = sum(ctx.budgets), repr(v["pool"]) + (f" (pool_size={v['pool_size']})" if v["pool_size"] else "")
        if budget > len(pool) and not v["sample_with_replacement"]:
            raise ConfigError(f"{ctx.owner}.budget={budget} exceeds the {len(pool)} images of pool {name} "
                              f"(Knockoff samples without replacement); expected at most {len(pool)}, or "
                              f"{ctx.owner}.sample_with_replacement=true")
        if v["strategy"] == "random":
            return [KnockoffRandom(pool, b, seed=ctx.seed("pool"), shard=(i, actors),
                                   replacement=v["sample_with_replacement"], augment=v["augment"])
                    for i, b in enumerate(ctx.budgets)]
        if v["adaptive.arms"] == "labels" and (labels < 0).any():
            raise ConfigError(f"{ctx.owner}.pool={v['pool']!r} has unlabeled images, which give the bandit no arms; "
                              f"expected {ctx.owner}.adaptive.arms=clusters")
        if v["adaptive.arms"] == "clusters":
            if v["adaptive.clusters"] > len(pool):
                raise ConfigError(f"{ctx.owner}.adaptive.clusters={v['adaptive.clusters']} exceeds the {len(pool)} "
                                  f"images of pool {name}; expected at most {len(pool)}")
            labels = coarse_groups(pool, v["adaptive.clusters"], ctx.seed("groups"))
        order = np.random.default_rng(ctx.seed("pool")).permutation(len(pool))
        shards = [order[i::actors] for i in range(actors)]
        return [KnockoffAdaptive(pool[sh], labels[sh], b, arch=ctx.arch, num_classes=ds.num_classes,
                                 seed=ctx.seed("bandit", i), lr=v["adaptive.lr"], rewards=tuple(v["adaptive.rewards"]),
                                 window=v["adaptive.window"])
                for i, (sh, b) in enumerate(zip(shards, ctx.budgets))]

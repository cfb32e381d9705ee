"""Attacks: their declaration, and the query-source interface that the client actor drives.

An attack kind is an :class:`Attack` subclass registered with ``@register("attack")``: it declares its parameters
(``params``, set as ``attackers.ID.PARAM``; dotted names nest, ``jacobian.lam``) and builds one query source
per actor of the attacker (:meth:`Attack.sources`).

A source is pure (no Ray): ``propose(n)`` returns the next at most n queries (uint8 images),
``observe(x, probs, answered)`` takes the victim's answers, ``transfer_set()`` returns what a replica
trains on (None for sources that train nothing), ``remaining`` counts the queries still to send, ``stats()``
reports what the method did (rounds, iterations, arm probabilities; JSON-ready). A source whose method trains its
own copy of the victim while it queries (DFME's student) also has ``extracted()``, that model: the run scores it
beside the replica (``stats.extracted``).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sim import data
from sim.data import Dataset
from sim.errors import ConfigError, DataError
from sim.registry import Component


@dataclass
class AttackContext:
    """What planning gives an attack to build its sources."""

    owner: str  # the attacker's settings ("attackers.ID"), for error messages
    dataset: Dataset  # the victim's data: image shape, classes, and the test split that natural seeds come from
    budgets: list[int]  # queries of each actor
    arch: str  # the replica's architecture (of substitutes and students too)
    seed: Callable[..., int]  # seed(name, *more): a child of the scenario's seed for this attacker
    data_root: str | None = None  # where pools are read (data.root, data.download)
    download: bool = False
    image_size: int | None = None  # folder: pools are resized to it (data.image_size)
    held_out: set[int] = field(default_factory=set)  # test images queried as seeds: replicas are not evaluated on them


def load_pool(ctx: AttackContext, setting: str, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of pool ``spec`` (:func:`sim.data.load_pool`), which the attacker's ``setting`` names;
    a pool whose images are not the victim's shape is refused."""
    try:
        x, y = data.load_pool(spec, ctx.data_root, ctx.download, ctx.image_size)
    except (ConfigError, DataError) as exc:  # the setting that named it, first
        raise type(exc)(f"{ctx.owner}.{setting}={spec!r}: {exc}") from None
    want = ctx.dataset.x_train.shape[1:]
    if x.shape[1:] != want:
        raise ConfigError(f"{ctx.owner}.{setting}={spec!r} has images of shape {x.shape[1:]}, but the victim takes "
                          f"{want}; expected a pool with the victim's image shape")
    return x, y


class Attack(Component):
    """An attack kind with its parameters (``self.values``); :meth:`sources` splits it over the actors."""

    category = "attack"

    @abstractmethod
    def sources(self, ctx: AttackContext) -> list:
        """One query source per actor (``ctx.budgets``); test images used as seeds go into ``ctx.held_out``."""


class PoolStream:
    """Walks a fixed order of indices into an image array; subclasses decide the order and what to keep."""

    def __init__(self, images: np.ndarray, order: np.ndarray):
        self.images = images
        self._order = order
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

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None

    def stats(self) -> dict:
        return {}


class TransferSet:
    """The answered queries and their answers, collected as they come: what a replica trains on."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.image_shape = tuple(image_shape)
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []

    def add(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        if answered.any():
            self._x.append(x[answered])
            self._y.append(probs[answered])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._x:
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros((0, 0), np.float32)
        return np.concatenate(self._x), np.concatenate(self._y).astype(np.float32)


class CollectingStream(PoolStream):
    """A pool stream that keeps every answered query and its answer as the replica's transfer set."""

    def __init__(self, images: np.ndarray, order: np.ndarray):
        super().__init__(images, order)
        self.collected = TransferSet(images.shape[1:])

    def observe(self, x: np.ndarray, probs: np.ndarray, answered: np.ndarray) -> None:
        self.collected.add(x, probs, answered)

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.collected.arrays()


def sent_per_round(planned: list[int], sent: int) -> list[int]:
    """Queries sent in each round, from the rounds' planned sizes: rounds run one after another, so only the last
    can stop short (the accounts retired, or the client stopped)."""
    out = [int(n) for n in planned]
    out[-1] = int(sent) - sum(out[:-1])
    return out

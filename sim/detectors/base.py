"""The detector interface: declared parameters, state, models, thresholds.

A detector kind is a :class:`Detector` subclass registered with ``@register("detector")``. It declares:

- ``params``: its parameters (:class:`sim.registry.Param`), which a scenario sets as ``detectors.NAME.PARAM``;
- ``stateful``: whether it keeps a history per key (an account, or a group of accounts) and flags keys for
  good, or scores each query alone and flags the queries above its threshold;
- ``presets``: scenario names that stand for this kind with some settings (``pooled_prada`` is PRADA with
  ``group=all``), usable without a ``kind``;
- :meth:`Detector.prepare`: the trained models it needs, made through the victim zoo on the driver and
  handed to its constructor (``models=``) in every Serve replica.

A stateful kind that declares a ``group`` parameter (PRADA) keeps its history under that grouping of the
requests (account, actor, cohort, all: :class:`sim.policy.Rule`); the others key it by account.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError
from ..registry import Component, Param

__all__ = ["Detection", "Detector", "Param", "StatelessDetector", "calibration_split", "for_good", "score_for_good"]


@dataclass
class Detection:
    scores: np.ndarray  # float (N,), higher = more suspicious; NaN where the detector has no score yet
    flags: np.ndarray  # bool (N,): the account (or query) is flagged as of this query
    seq: np.ndarray | None = None  # int (N,): each query's position in its key's history (set by the tier)
    was_flagged: bool = False  # the key was flagged before this batch (set by the tier)
    # a detector fed in rounds (account linking, see sim.tier): the round that takes each query in, and the round
    # whose verdict it got (0: none yet)
    round: np.ndarray | None = None
    as_of: np.ndarray | None = None


def for_good(flags: np.ndarray, was_flagged: bool) -> np.ndarray:
    """A stateful detector's flags for one batch of a key as the tier keeps them: once the key is flagged (before the
    batch, or at a query of it) every later query of it is, whatever the detector says of them."""
    return np.logical_or.accumulate(np.r_[was_flagged, np.asarray(flags, bool)])[1:]


def score_for_good(det: "Detector", key: str, inputs: np.ndarray, labels: np.ndarray, probs: np.ndarray | None,
                   flagged: set[str]) -> Detection:
    """A stateful detector's :meth:`Detector.score` of one batch of ``key``, with the key's flag kept for good
    (:func:`for_good`) in ``flagged``, the keys flagged so far, which the caller holds (a detection-tier shard, an
    offline replay), whether or not the detector itself remembers it; ``was_flagged`` set."""
    was = key in flagged or det.is_flagged(key)
    res = det.score(key, inputs, labels, probs)
    res.flags, res.was_flagged = for_good(res.flags, was), was
    if was or res.flags.any():
        flagged.add(key)
    return res


def calibration_split(n: int, seed: int, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, calibration) of the defender's training images: a seeded ``fraction`` is held out, never
    trained on by detector models and used to calibrate thresholds."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


class Detector(Component):
    """Base class. ``stateful`` detectors (PRADA) keep a history per key and flag the key for good: a policy
    acts on the queries that come after the flag. Stateless ones score each query alone and flag the queries
    whose score exceeds their threshold: a policy acts on those queries themselves."""

    category = "detector"
    stateful: ClassVar[bool] = True
    # A population detector (account linking) judges all accounts together: the detection tier keeps what each
    # account asked in the account's shard and, every ``every`` queries of all traffic (a parameter it declares),
    # feeds that to one instance of it in arrival order and publishes its :meth:`verdicts` back to the shards.
    population: ClassVar[bool] = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, models: Any = None, **params):
        super().__init__(**params)

    @classmethod
    def prepare(cls, params: dict[str, Any], ctx) -> bytes | None:
        """The trained models this detector needs, serialised (trained or loaded through the victim zoo; ``ctx``
        is a :class:`sim.zoo.ModelContext`), or None. The constructor takes them back as ``models=``."""
        return None

    @property
    def needs_images(self) -> bool:
        """Whether :meth:`score` reads the query images (else the victim's probabilities are enough)."""
        return True

    @abstractmethod
    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray,
              probs: np.ndarray | None = None) -> Detection:
        """Score a batch of queries of one key (an account, or a group of accounts), in order.
        ``labels`` are the victim's top-1 classes, ``probs`` its probabilities (N, K)."""

    def threshold(self) -> float | None:
        """The score at which flagging starts (proof of work asks ``bits_min`` there)."""
        return None

    def saturation(self) -> float | None:
        """The score at which proof of work reaches ``bits_max`` by default."""
        return None

    def flagged_accounts(self) -> set[str]:
        """Accounts this detector has flagged so far (stateless detectors flag none)."""
        return set()

    def is_flagged(self, account_id: str) -> bool:
        return account_id in self.flagged_accounts()

    @classmethod
    def _check_class(cls, where: str) -> None:
        every = cls.params.get("every")
        if cls.population and (not cls.stateful or every is None or every.kind is not int):
            raise ConfigError(f"{where} declares population=True with stateful={cls.stateful} and "
                              f"{'no every parameter' if every is None else f'every of kind {every.kind.__name__}'}; "
                              f"expected a population detector to be stateful and to declare an int parameter every "
                              f"(its queries between verdicts)")

    def verdicts(self) -> dict[str, tuple[float, bool]]:
        """A population detector's latest verdict on each account it has judged: account -> (score, flagged)."""
        raise NotImplementedError(f"{type(self).__name__} is not a population detector")


class StatelessDetector(Detector):
    """A detector that scores each query alone and flags those scoring above ``threshold``; with no threshold
    given, :meth:`calibrate` sets it for ``target_fpr`` false positives on benign images."""

    stateful = False
    params = {
        "threshold": Param(None, help="flag queries scoring above this (unset: calibrated for target_fpr)"),
        "target_fpr": Param(0.05, low=0, high=1, low_open=True, high_open=True, brief=False, nullable=True,
                            help="the threshold flags this fraction of the defender's held-out benign images"),
    }

    def __init__(self, models: Any = None, **params):
        super().__init__(models, **params)
        self._saturation: float | None = None

    def decide(self, scores: np.ndarray) -> Detection:
        """Flag the scores above ``threshold`` (none while it is unset)."""
        t = self.values["threshold"]
        scores = np.asarray(scores, np.float64)
        return Detection(scores, np.zeros(len(scores), bool) if t is None else scores > t)

    def calibrate(self, x: np.ndarray, probs: np.ndarray) -> dict | None:
        """With no threshold given and a ``target_fpr``: set the threshold at the (1 - target_fpr) quantile of the
        scores of benign images ``x`` (victim probabilities ``probs``), and proof of work's saturation at
        1 - target_fpr / 10. Returns what was set, or None when nothing was to calibrate."""
        fpr = self.values["target_fpr"]
        if self.values["threshold"] is not None or fpr is None:
            return None
        scores = self.score("calibration", x, probs.argmax(1), probs).scores
        self.set_params(threshold=float(np.quantile(scores, 1 - fpr)))
        self._saturation = float(np.quantile(scores, 1 - fpr / 10))
        return {"threshold": self.values["threshold"], "saturate": self._saturation, "images": int(len(x)),
                "target_fpr": fpr}

    def threshold(self) -> float | None:
        return self.values["threshold"]

    def saturation(self) -> float | None:
        return self._saturation

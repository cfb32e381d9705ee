"""Response policies: what the victim does with a query its detectors flagged. Pure, no Ray.

Each detector has a :class:`Rule`: which history key it keeps (``group``), and what a flagged query
gets (``action``). When several detectors flag one query, the strictest action wins:
``refuse`` > ``proof_of_work`` > ``perturb`` > ``answer``; a ``perturb`` beside a ``proof_of_work`` still applies
to the answer that solving the puzzle brings.

- ``answer``: answered as usual (the flag is only logged);
- ``perturb``: answered through the rule's own output defense (e.g. MAD) instead of the victim's;
- ``proof_of_work``: the client must solve a hashcash puzzle before it gets the answer; the puzzle's
  difficulty grows with the score, linearly from ``bits_min`` at ``threshold`` to ``bits_max`` at
  ``saturate`` (and stays there above it);
- ``refuse``: no answer.

A stateful detector (PRADA, linking) flags a key for good, and the policy acts from the query *after*
the one that tripped the flag (that one was answered before the history showed the attack). A
stateless detector (SAME, maximum softmax) flags single queries, and the policy acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import Account

ACTIONS = ("answer", "perturb", "proof_of_work", "refuse")  # in increasing strictness
GROUPS = ("account", "actor", "cohort", "all")


@dataclass(frozen=True)
class Rule:
    action: str = "answer"
    group: str = "account"  # the key a stateful detector keeps history under
    threshold: float | None = None  # the score at which the flag starts (bits_min)
    saturate: float | None = None  # the score at which proof of work reaches bits_max
    bits_min: int = 8
    bits_max: int = 16
    perturb: dict | None = None  # defense spec for action=perturb

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {self.group!r}")

    def key(self, account: Account, actor_id: str | None) -> str:
        """The history key of a request under this rule's grouping."""
        if self.group == "account":
            return account.account_id
        if self.group == "actor":
            return f"actor:{actor_id}"
        if self.group == "cohort":
            return f"cohort:{account.cohort or account.account_id}"
        return "all"

    def pow_bits(self, scores: np.ndarray) -> np.ndarray:
        """Puzzle difficulty of flagged queries with these scores."""
        scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
        lo = self.threshold if self.threshold is not None else 0.0
        hi = self.saturate if self.saturate is not None else lo + max(abs(lo), 1e-9)
        frac = np.clip((scores - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return np.rint(self.bits_min + frac * (self.bits_max - self.bits_min)).astype(np.int64)


def acted_on(flags: np.ndarray, was_flagged: bool, stateful: bool) -> np.ndarray:
    """Which queries of a batch the policy acts on, from the detector's flags."""
    flags = np.asarray(flags, bool)
    if not stateful:
        return flags
    return np.r_[was_flagged, flags[:-1]] if len(flags) else flags


def combine(decisions: list[tuple[str, Rule, np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Per query: the strictest action (index into ACTIONS), the proof-of-work bits (0: none) and the name
    of the detector whose perturbation applies (None: the victim's own defense), from (detector name, rule,
    acted-on mask, scores) of each detector."""
    level = np.zeros(n, np.int64)
    bits = np.zeros(n, np.int64)
    perturb: list[str | None] = [None] * n
    for name, rule, mask, scores in decisions:
        if not mask.any():
            continue
        a = ACTIONS.index(rule.action)
        level = np.where(mask, np.maximum(level, a), level)
        if rule.action == "proof_of_work":
            bits = np.where(mask, np.maximum(bits, rule.pow_bits(scores)), bits)
        if rule.action == "perturb":
            for i in np.flatnonzero(mask):
                perturb[i] = perturb[i] or name
    return level, bits, perturb

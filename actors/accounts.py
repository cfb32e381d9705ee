"""Multi-account strategies: which of an actor's accounts sends the next request.

An account is an identity (an API key), not a process: one actor can drive many accounts. Requests are
the unit of assignment (one request = one account, a batch of queries).
- ``round_robin``: requests go to the live accounts in turn, each of at most the budget's even share per account
  (B // k queries), so that a budget smaller than k full requests still reaches every account;
- ``random``: a seeded uniform choice among the live accounts per request;
- ``blocks``: contiguous blocks, account j sends queries [j*B/k, (j+1)*B/k) of the actor's budget B
  (a request never straddles two blocks), or with ``sizes`` a block of its own size per account (a population
  whose accounts send different numbers of queries); when an account retires early, the next one takes over.
On top of any of them:
- ``cap``: an account retires once it has sent this many queries (e.g. to stay under PRADA's min_pool);
- ``max_rate``: an account sends at most this many queries per second (:meth:`AccountSplitter.next`
  says how long to wait first);
- churn: :meth:`AccountSplitter.burn` retires an account the victim refused; the others carry on.
When no live account is left, ``next`` returns None and the actor stops short of its budget.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, NamedTuple

import numpy as np

from sim.errors import ConfigError

STRATEGIES = ("round_robin", "random", "blocks")


class Pick(NamedTuple):
    key: str
    n: int  # queries in this request
    delay: float  # seconds to wait before sending (pacing)


class AccountSplitter:
    def __init__(self, keys: list[str], strategy: str, budget: int, seed: int = 0, *, cap: int | None = None,
                 max_rate: float | None = None, sizes: list[int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not keys:
            raise ConfigError("an actor needs at least one account")
        if strategy not in STRATEGIES:
            raise ConfigError(f"split={strategy!r} is not a known strategy; expected one of: {', '.join(STRATEGIES)}")
        self.keys = list(keys)
        self.strategy = strategy
        self.cap = cap
        self.max_rate = max_rate
        self._clock = clock
        self._rng = np.random.default_rng(seed)
        self._turn = 0  # round robin: index of the next account to consider
        self._share = max(1, budget // len(self.keys))  # round robin: most queries per request
        self._sent = 0
        self.used: Counter = Counter()  # queries sent per account
        self.burned: set[str] = set()
        self._free_at: dict[str, float] = {}  # pacing: when each account may send again
        # blocks: account j's block ends once the actor has sent bounds[j] queries
        k = len(self.keys)
        if sizes is not None and (len(sizes) != k or sum(sizes) != budget or min(sizes) < 1):
            raise ConfigError(f"sizes={list(sizes)}; expected {k} positive block sizes that sum to the budget {budget}")
        self._bounds = ([int(b) for b in np.cumsum(sizes)] if sizes is not None
                        else [((j + 1) * budget) // k for j in range(k)])

    def live(self, key: str) -> bool:
        return key not in self.burned and (self.cap is None or self.used[key] < self.cap)

    def burn(self, key: str) -> None:
        """Retire an account (churn: the victim refused it)."""
        self.burned.add(key)

    def unsent(self, key: str, n: int) -> None:
        """``n`` queries of the last pick for ``key`` were not sent (its source had fewer to propose, as a
        Jacobian attack at the end of a round): they count toward neither the account's cap nor its block."""
        self.used[key] -= n
        self._sent -= n
        if self.max_rate is not None:
            self._free_at[key] -= n / self.max_rate

    def next(self, want: int) -> Pick | None:
        """The account, size and pacing delay of the next request of at most ``want`` queries; None when
        no account can send any more."""
        live = [k for k in self.keys if self.live(k)]
        if not live:
            return None
        if self.strategy == "round_robin":
            while not self.live(self.keys[self._turn % len(self.keys)]):
                self._turn += 1
            key, n = self.keys[self._turn % len(self.keys)], min(want, self._share)
            self._turn += 1
        elif self.strategy == "random":
            key, n = live[int(self._rng.integers(len(live)))], want
        else:
            j = next((i for i, b in enumerate(self._bounds) if b > self._sent and self.live(self.keys[i])), None)
            if j is None:  # the remaining blocks belong to retired accounts: the last live one takes over
                j = self.keys.index(live[-1])
                bound = self._bounds[-1]
            else:
                bound = self._bounds[j]
            key, n = self.keys[j], min(want, max(bound - self._sent, 1))
        if self.cap is not None:
            n = min(n, self.cap - self.used[key])
        delay = 0.0
        if self.max_rate is not None:
            now = self._clock()
            start = max(now, self._free_at.get(key, now))
            delay = start - now
            self._free_at[key] = start + n / self.max_rate
        self.used[key] += n
        self._sent += n
        return Pick(key, n, delay)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers (the first ones one larger)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

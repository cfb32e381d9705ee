"""Multi-account strategies: which of an actor's accounts sends the next request.

An account is an identity (an API key), not a process: one actor can drive many accounts. Requests are
the unit of assignment (one request = one account, a batch of queries).
- ``round_robin``: request i goes to account i mod k;
- ``random``: a seeded uniform choice per request;
- ``blocks``: contiguous blocks, account j sends queries [j*B/k, (j+1)*B/k) of the actor's budget B;
  a request never straddles two blocks.
"""

from __future__ import annotations

import numpy as np

from sim.errors import ConfigError

STRATEGIES = ("round_robin", "random", "blocks")


class AccountSplitter:
    def __init__(self, keys: list[str], strategy: str, budget: int, seed: int = 0):
        if not keys:
            raise ConfigError("an actor needs at least one account")
        if strategy not in STRATEGIES:
            raise ConfigError(f"split={strategy!r} is not a known strategy; expected one of: {', '.join(STRATEGIES)}")
        self.keys = list(keys)
        self.strategy = strategy
        self._rng = np.random.default_rng(seed)
        self._requests = 0
        self._sent = 0
        # blocks: account j's block ends after bounds[j] queries
        k = len(self.keys)
        self._bounds = [((j + 1) * budget) // k for j in range(k)]

    def next(self, want: int) -> tuple[str, int]:
        """(API key, number of queries) for the next request of at most ``want`` queries."""
        if self.strategy == "round_robin":
            key, n = self.keys[self._requests % len(self.keys)], want
        elif self.strategy == "random":
            key, n = self.keys[int(self._rng.integers(len(self.keys)))], want
        else:
            j = next(i for i, b in enumerate(self._bounds) if b > self._sent)
            key, n = self.keys[j], min(want, self._bounds[j] - self._sent)
        self._requests += 1
        self._sent += n
        return key, n


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers (the first ones one larger)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

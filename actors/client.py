"""A client: drives one query source (an attack or a benign user) through its accounts. Pure, no Ray.

The client owns accounts, budget, pacing, proof of work and progress; the source owns the method
(``propose`` / ``observe`` / ``transfer_set``); the transport is two callables, ``query(key, images, actor_id)``
and ``solve(key, challenge_id, counter, actor_id, seconds)``, each returning a :class:`sim.protocol.Reply`.
:class:`actors.remote.ClientActor` runs one against a Serve app; a test or benchmark runs one against a
:class:`sim.service.VictimService` in-process. Attackers and benign users are the same class.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import numpy as np

from sim.errors import ConfigError

from .accounts import AccountSplitter


class VictimRefused(RuntimeError):
    """The victim refused a whole request for a reason that is not the client's to handle (a 4xx that is not a limit,
    a 503 when its log cannot be written): the client stops."""

    def __init__(self, actor_id: str, status: int, reason: str | None):
        super().__init__(f"actor {actor_id}: the victim refused a request ({status}: {reason})")
        self.actor_id, self.status, self.reason = actor_id, status, reason

    def __reduce__(self):  # raised inside a Ray actor, it reaches the driver pickled
        return VictimRefused, (self.actor_id, self.status, self.reason)


class Client:
    def __init__(self, actor_id: str, source, keys: list[str], split: str, budget: int, batch_size: int, *,
                 query: Callable, solve: Callable, seed: int = 0, cap: int | None = None,
                 max_rate: float | None = None, churn: bool = False, sizes: list[int] | None = None,
                 on_progress: Callable[[int], None] | None = None):
        self.actor_id = actor_id
        self.source = source
        self.budget = budget
        self.splitter = AccountSplitter(keys, split, budget, seed, cap=cap, max_rate=max_rate, sizes=sizes)
        self.churn = churn
        self.batch_size = batch_size
        self._query, self._solve, self._on_progress = query, solve, on_progress
        self.pow = {"puzzles": 0, "queries": 0, "hashes": 0, "seconds": 0.0, "max_bits": 0}
        self.limited = {"waits": 0, "seconds": 0.0, "quota_spent": 0}  # what the victim's limits cost this client

    def _prove(self, key: str, reply) -> None:
        """Solve the reply's proof-of-work puzzle, send the solution, and fill the answers into ``reply``."""
        from sim import pow

        ch = reply.challenge
        t0 = time.perf_counter()
        counter, hashes = pow.solve(ch["nonce"], ch["bits"])
        seconds = time.perf_counter() - t0
        self.pow["seconds"] += seconds
        self.pow["hashes"] += hashes
        self.pow["puzzles"] += 1
        self.pow["queries"] += len(ch["indices"])
        self.pow["max_bits"] = max(self.pow["max_bits"], ch["bits"])
        solved = self._solve(key, ch["id"], counter, self.actor_id, seconds)
        idx = np.asarray(ch["indices"])
        if solved.status == 200:  # arrays from Ray's object store are read-only: copy before filling in
            reply.answered = reply.answered.copy()
            reply.probs = reply.probs.copy()
            reply.answered[idx] = solved.answered
            reply.probs[idx] = solved.probs

    def _send(self, key: str, x: np.ndarray):
        """One request; over the victim's rate limit (429 with a wait), wait as told and send it again."""
        while True:
            reply = self._query(key, x, self.actor_id)
            if reply.status != 429 or reply.retry_after is None:
                return reply
            self.limited["waits"] += 1
            self.limited["seconds"] += reply.retry_after
            time.sleep(reply.retry_after)

    def run(self) -> dict:
        """Spend the budget; returns the report (queries sent and refused, per account, burned accounts, budget
        left unspent, seconds, what the method did, proof of work paid). The transfer set stays in the source."""
        sent: Counter = Counter()
        account_of: dict[str, str] = {}  # API key -> account id
        refused = total = 0
        start = time.perf_counter()
        while self.source.remaining > 0:
            pick = self.splitter.next(min(self.batch_size, self.source.remaining))
            if pick is None:  # every account retired (cap reached or burned): the rest of the budget is unspent
                break
            if pick.delay > 0:  # pacing
                time.sleep(pick.delay)
            x = self.source.propose(pick.n)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:  # an attack of the user's own
                got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise ConfigError(f"actor {self.actor_id}: its attack's propose({pick.n}) returned {got}; expected "
                                  f"uint8 images (N, C, H, W)")
            if len(x) < pick.n:  # the source had fewer to propose: the rest stays the account's to send
                self.splitter.unsent(pick.key, pick.n - len(x))
            reply = self._send(pick.key, x)
            if reply.status >= 400 and not len(reply.answered):
                raise VictimRefused(self.actor_id, reply.status, reply.reason)
            if reply.challenge:
                self._prove(pick.key, reply)
            answered = reply.answered
            account_of[pick.key] = reply.account_id
            if "quota" in reply.reasons:  # the account's quota is spent: it will not be answered again
                self.limited["quota_spent"] += 1
                self.splitter.burn(pick.key)
            elif self.churn and not answered.all():
                self.splitter.burn(pick.key)
            self.source.observe(x, reply.probs, answered)
            sent[reply.account_id] += len(x)
            refused += int((~answered).sum())
            total += len(x)
            if self._on_progress is not None:
                self._on_progress(total)
        return {
            "actor_id": self.actor_id,
            "sent": total,
            "refused": refused,
            "per_account": dict(sent),
            "burned": sorted(account_of[k] for k in self.splitter.burned),
            "unspent": self.budget - total,  # (an attack may stop early: its rounds done, nothing to step from)
            "seconds": time.perf_counter() - start,
            "stats": self.source.stats(),
            "extracted": self.source.extracted() if hasattr(self.source, "extracted") else None,
            "pow": dict(self.pow),
            "limited": dict(self.limited),
        }

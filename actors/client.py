"""The Ray actor that drives one query source (an attack or a benign user) through its accounts.

The actor owns transport, accounts, budget and progress; the source owns the method
(``propose`` / ``observe`` / ``transfer_set``). Attackers and benign users are the same actor class.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import numpy as np
import ray

from .accounts import AccountSplitter


@ray.remote(num_cpus=0)
class ClientActor:
    def __init__(self, actor_id: str, source, keys: list[str], split: str, budget: int,
                 batch_size: int, app_name: str, progress=None, seed: int = 0, *, cap: int | None = None,
                 max_rate: float | None = None, churn: bool = False):
        from ray import serve

        if "torch" in sys.modules:  # a source that computes with torch shares the cores with everyone
            sys.modules["torch"].set_num_threads(1)
        self.actor_id = actor_id
        self.source = source
        self.splitter = AccountSplitter(keys, split, budget, seed, cap=cap, max_rate=max_rate)
        self.churn = churn
        self.batch_size = batch_size
        self.handle = serve.get_deployment_handle("victim", app_name)
        self.progress = progress
        self.pow = {"puzzles": 0, "queries": 0, "hashes": 0, "seconds": 0.0, "max_bits": 0}

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
        solved = self.handle.solve.remote(key, ch["id"], counter, self.actor_id, seconds).result()
        idx = np.asarray(ch["indices"])
        if solved.status == 200:  # arrays from Ray's object store are read-only: copy before filling in
            reply.answered = reply.answered.copy()
            reply.probs = reply.probs.copy()
            reply.answered[idx] = solved.answered
            reply.probs[idx] = solved.probs

    def run(self) -> dict:
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
            reply = self.handle.query.remote(pick.key, x, self.actor_id).result()
            if reply.status >= 400 and not len(reply.answered):
                raise RuntimeError(f"actor {self.actor_id}: victim rejected a request: {reply.reason}")
            if reply.challenge:
                self._prove(pick.key, reply)
            answered = reply.answered
            account_of[pick.key] = reply.account_id
            if self.churn and not answered.all():
                self.splitter.burn(pick.key)
            self.source.observe(x, reply.probs, answered)
            sent[reply.account_id] += len(x)
            refused += int((~answered).sum())
            total += len(x)
            if self.progress is not None:
                self.progress.update.remote(self.actor_id, total)
        return {
            "actor_id": self.actor_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "sent": total,
            "refused": refused,
            "per_account": dict(sent),
            "burned": sorted(account_of[k] for k in self.splitter.burned),
            "unspent": self.source.remaining,
            "seconds": time.perf_counter() - start,
            "transfer": self.source.transfer_set(),
            "stats": self.source.stats(),
            "pow": dict(self.pow),
        }

"""What crosses the wire between clients and the victim service: accounts and replies.

Kept free of torch and scipy so that client actors, which only send queries, start fast.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

API_KEY_HEADER = "x-api-key"
ACTOR_HEADER = "x-actor-id"  # the client's own name for itself (a client actor of a run), logged with each query
MAX_ACTOR_ID = 128  # characters of it at most: it is written into every row of a request


@dataclass(frozen=True)
class Account:
    account_id: str
    role: str  # attacker / benign / external
    attack: str | None = None
    cohort: str | None = None  # accounts created together (a sign-up batch); logged, and a grouping key


def make_keys(accounts: list[Account], seed: int | None = None) -> dict[str, Account]:
    """API key -> account. Keys are random tokens of 128 bits (seeded in simulations for reproducible logs)."""
    if seed is None:
        return {secrets.token_hex(16): a for a in accounts}
    rng = np.random.default_rng(seed)
    return {rng.bytes(16).hex(): a for a in accounts}


HASHED = "sha256:"  # the prefix of a stored key: the SHA-256 of the key a client sends, never the key itself


def hash_key(key: str) -> str:
    """What the service stores and compares for an API key."""
    return HASHED + hashlib.sha256(key.encode()).hexdigest()


def hashed(keys: dict[str, Account]) -> dict[str, Account]:
    """``keys`` (API key -> account) with every key replaced by its hash (keys hashed already are kept)."""
    return {k if k.startswith(HASHED) else hash_key(k): a for k, a in keys.items()}


def new_request_id() -> str:
    """A request's id: 32 hex digits, the time it was made (nanoseconds since the epoch) then 64 random bits, so that
    sorting ids sorts requests by when they were made (account linking merges its shards' rows that way)."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


@dataclass
class Reply:
    status: int
    reason: str | None
    request_id: str
    account_id: str | None = None
    answered: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # one per query
    reasons: list[str | None] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1 where refused
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # NaN where refused
    # proof of work: {"id", "nonce", "bits", "indices"}: the queries at ``indices`` are answered once the
    # client sends a counter solving the puzzle (see sim.pow) with the challenge id
    challenge: dict | None = None
    compact: bool = False  # the request came in a compact encoding: answer in kind (see to_json)
    retry_after: float | None = None  # 429 over a rate limit: seconds after which the request would pass

    @property
    def retry_after_header(self) -> str | None:
        """HTTP's ``Retry-After`` (whole seconds, rounded up), or None."""
        return None if self.retry_after is None else str(max(1, math.ceil(self.retry_after)))

    @property
    def actions(self) -> list[str]:
        pending = set(self.challenge["indices"]) if self.challenge else set()
        return ["answered" if a else "challenged" if i in pending else "refused"
                for i, a in enumerate(self.answered)]

    def to_json(self) -> dict[str, Any]:
        """The HTTP answer: one result per query, probabilities as JSON numbers; for a request that came in a compact
        encoding (``compact``), the answer in kind: per-query ``actions``, ``labels`` (-1 where not answered) and
        ``reasons``, and ``probs`` as ``{"float32": BASE64, "shape": [N, K]}`` (the exact float32 values, NaN where
        not answered)."""
        if self.status >= 400 and not len(self.answered):
            out = {"error": self.reason, "request_id": self.request_id}
            if self.retry_after is not None:
                out["retry_after"] = round(self.retry_after, 3)
            return out
        if self.compact:
            probs = np.ascontiguousarray(self.probs, np.float32)
            out = {"request_id": self.request_id, "account": self.account_id, "actions": self.actions,
                   "labels": [int(v) for v in self.labels], "reasons": list(self.reasons),
                   "probs": {"float32": base64.b64encode(probs.tobytes()).decode(), "shape": list(probs.shape)}}
        else:
            out = {"request_id": self.request_id, "account": self.account_id, "results": self._results()}
        if self.challenge:
            out["challenge"] = {k: self.challenge[k] for k in ("id", "nonce", "bits")}
        if self.reason:
            out["error"] = self.reason
        if self.retry_after is not None:
            out["retry_after"] = round(self.retry_after, 3)
        return out

    def _results(self) -> list[dict]:
        results = []
        for i, action in enumerate(self.actions):
            if action == "answered":
                results.append({"action": action, "label": int(self.labels[i]),
                                "probs": [round(float(p), 7) for p in self.probs[i]]})
            elif action == "challenged":
                results.append({"action": action})
            else:
                results.append({"action": action, "reason": self.reasons[i]})
        return results

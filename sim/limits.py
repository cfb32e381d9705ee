"""Per-account limits, Ray-free: a total query quota and a rate limit (a token bucket), per key.

A key is an account, or a group of accounts (a cohort, a client actor, all traffic), as the detectors group
(:class:`sim.policy.Rule.key`). The book of a key lives where the key's other state lives (its shard of the
detection tier, :mod:`sim.tier`), so a limit holds exactly whatever the number of Serve replicas. A request of
``n`` queries is admitted in full, cut to what is left of the quota (the rest refused, reason ``quota``), or refused
whole: over the rate with a wait after which it would pass (``retry_after``, reason ``rate``), or for good once the
quota is spent (reason ``quota``, no wait). Refused queries take nothing from the quota or the bucket. The time is an
argument, so that a journaled book replays exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .policy import GROUPS, Rule
from .protocol import Account


@dataclass(frozen=True)
class Limits:
    quota: int | None = None  # queries per key in all
    rate: float | None = None  # queries per second per key, sustained
    burst: int = 256  # the bucket's size: queries a key may send at once after a pause
    group: str = "account"  # what a key is (see sim.policy.GROUPS)

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"serve.limit_by={self.group!r} is not a grouping; expected one of {', '.join(GROUPS)}")

    @property
    def enabled(self) -> bool:
        return self.quota is not None or self.rate is not None

    def key(self, account: Account, actor_id: str | None) -> str:
        return Rule(group=self.group).key(account, actor_id)


class Admission(NamedTuple):
    admitted: int  # the request's first ``admitted`` queries go on; the rest are refused
    reason: str | None = None  # "rate" or "quota" when any query is refused
    retry_after: float | None = None  # seconds until the whole request would pass (rate); None: never (quota)


class LimitBook:
    """The quota used and the bucket of each key, for one set of :class:`Limits`."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.used: dict[str, int] = {}
        self.bucket: dict[str, tuple[float, float]] = {}  # key -> (tokens, when they were counted)

    def admit(self, key: str, n: int, now: float) -> Admission:
        lim = self.limits
        used = self.used.get(key, 0)
        m = n if lim.quota is None else min(n, lim.quota - used)
        if m <= 0:
            return Admission(0, "quota")
        if lim.rate is not None:
            tokens, then = self.bucket.get(key, (float(lim.burst), now))
            tokens = min(float(lim.burst), tokens + max(now - then, 0.0) * lim.rate)
            if m > lim.burst:  # more at once than the bucket holds: it would never pass
                return Admission(0, "rate")
            if tokens < m:
                self.bucket[key] = (tokens, now)
                return Admission(0, "rate", (m - tokens) / lim.rate)
            self.bucket[key] = (tokens - m, now)
        self.used[key] = used + m
        return Admission(m, "quota" if m < n else None)

    def stats(self) -> dict:
        return {"keys": len(self.used), "queries": sum(self.used.values())}

"""The detection tier, Ray-free: the state of the stateful detectors, sharded by key, and what makes it durable.

A stateful detector (PRADA, pooled PRADA, account linking, a user's own) keeps a history per key: an account, or a
group of accounts (a cohort, a client actor, all traffic: :class:`sim.policy.Rule`). Each key has exactly one
owner among S shards, :func:`owner`, a hash of the key: stable for a given S and even over keys. A :class:`Shard`
holds every stateful detector's state for the keys it owns, and sees their requests one at a time in the order
they reach it: that order is each key's history, and each verdict carries each query's position in it
(``Detection.seq``), which the query log records, so that an offline replay feeds every key its queries in the
order the shard saw them. The shard of an account also holds its open proof-of-work challenges, so a challenge
issued through one Serve replica can be solved through another, and the shard of a limit's key its quota and rate
(:mod:`sim.limits`), so a limit holds exactly across replicas.

Account linking needs every account at once. Its per-account part (what each account asked, its W and flag)
lives in the account's shard like any other history; a :class:`Linker` pulls what the shards recorded, in bulk,
every ``every`` queries, re-clusters all accounts as :class:`sim.detectors.link.AccountLinker` does, and publishes
the verdicts back to the shards (see :class:`LocalTier` for the in-process version and :mod:`sim.tier_actors` for
the Ray one, where the flags arrive a little later: the shards measure how much, in queries).

Durability (:class:`Durable`): every change to a shard is appended to a journal before its result leaves the
shard, and the whole state is snapshotted every so often; a shard restarted after a crash loads the snapshot and
re-applies the journal, so it comes back with exactly the state it had. A verdict is remembered by request id, so
a call retried after the crash gets the verdict it had, not a second scoring of the same queries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from .detectors import Detection, Detector, score_for_good
from .limits import Admission, LimitBook, Limits

__all__ = ["Durable", "Journal", "Linker", "LocalTier", "Shard", "by_owner", "needed", "owner", "per_shard"]


def needed(stateful: bool, actions, limits: Limits | None) -> bool:
    """Whether a victim keeps per-key state, and so a tier: a stateful detector, a rule whose action (of
    ``actions``) is proof of work, or a per-account limit."""
    return stateful or "proof_of_work" in set(actions) or bool(limits is not None and limits.enabled)


def owner(key: str, shards: int) -> int:
    """The shard that owns ``key``: a hash of the key modulo the number of shards (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % shards


def per_shard(verdicts: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """A population detector's verdicts (account -> verdict) split by the shard that owns each account."""
    out: list[dict[str, Any]] = [{} for _ in range(shards)]
    for account, verdict in verdicts.items():
        out[owner(account, shards)][account] = verdict
    return out


class _LinkBook:
    """A shard's part of a population detector (account linking, :attr:`sim.detectors.Detector.population`): per
    account, what it asked since the linker last pulled (request id, 8-bit pixels, labels), how many queries it has
    sent, and the linker's latest verdict.

    The linker works in rounds: round r pulls every shard's new rows once (:meth:`pull`), re-clusters, and publishes
    its verdicts (:meth:`publish`). Each query's :class:`Detection` says which round takes it in (``round``: the
    pulls so far + 1) and which round's verdict it got (``as_of``; 0 before the first), which the query log keeps,
    so that an offline replay reproduces linking's flags at the points where they were published."""

    def __init__(self, every: int):
        self.every = every
        self.rows: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # (request id, account, x, labels)
        self.count: dict[str, int] = {}
        self.verdict: dict[str, tuple[float, bool]] = {}  # account -> (score, flagged)
        self.since = 0  # queries since the last pull
        self.pulled = 0  # rounds that have pulled this shard
        self.published = 0  # the round whose verdicts this shard holds
        self.lags: list[int] = []  # queries an account sent between the linker's pull and its flag's arrival
        self.last_pull: tuple[list, dict[str, int]] = ([], {})

    def score(self, request_id: str, account: str, x: np.ndarray, labels: np.ndarray) -> Detection:
        score, flagged = self.verdict.get(account, (float("nan"), False))
        self.rows.append((request_id, account, x.reshape(len(x), -1), np.asarray(labels, np.int64)))
        self.count[account] = self.count.get(account, 0) + len(x)
        self.since += len(x)
        n = len(x)
        return Detection(np.full(n, score), np.full(n, flagged), was_flagged=flagged,
                         round=np.full(n, self.pulled + 1, np.int32), as_of=np.full(n, self.published, np.int32))

    def pull(self, round_: int) -> tuple[list, dict[str, int]]:
        if round_ == self.pulled:  # a retried pull gets the same rows again
            return self.last_pull
        if round_ != self.pulled + 1:
            raise ValueError(f"linking round {round_} pulled from a shard at round {self.pulled}")
        rows, self.rows, self.since = self.rows, [], 0
        self.pulled, self.last_pull = round_, (rows, dict(self.count))
        return self.last_pull

    def publish(self, round_: int, updates: dict[str, tuple[float, bool, int]]) -> None:
        if round_ <= self.published:  # a retried publish: applied already
            return
        for account, (score, flagged, as_of) in updates.items():
            if flagged and not self.verdict.get(account, (0, False))[1]:
                self.lags.append(self.count.get(account, as_of) - as_of)
            self.verdict[account] = (score, flagged)
        self.published = round_


class Shard:
    """The stateful detectors' state for the keys one shard owns, with the open proof-of-work challenges of its
    accounts. ``detectors``: name -> a fresh stateful detector (a population detector gets a :class:`_LinkBook`).

    ``score`` takes one request's items (detector name, key) that this shard owns, with the request's 8-bit
    images, the victim's labels and probabilities; it returns each item's :class:`Detection` with the queries'
    positions in the key's history (``seq``) and whether the key was flagged before the request."""

    CHANGES = ("score", "admit", "issue", "take", "pull", "publish")  # the methods that change it (journaled)
    TAKEN = 128  # challenges taken that a retried take can get again: more than the calls in flight at a restart

    def __init__(self, detectors: dict[str, Detector], *, limits: Limits | None = None, max_pending: int = 100_000,
                 pending_ttl_s: float = 600.0, recent: int = 4096):
        self.limits = LimitBook(limits) if limits is not None and limits.enabled else None
        self.admitted: OrderedDict[str, Admission] = OrderedDict()  # request id -> its admission (for retries)
        self.detectors: dict[str, Any] = {
            name: _LinkBook(det.values["every"]) if det.population else det
            for name, det in detectors.items()}
        self.seq: dict[tuple[str, str], int] = {}
        self.flagged: dict[str, set[str]] = {}  # detector -> the keys it flagged so far
        self.queries = 0
        self.requests = 0
        self.max_pending = max_pending
        self.pending_ttl_s = pending_ttl_s
        self.pending: OrderedDict[str, dict] = OrderedDict()  # challenge id -> what answering it needs
        self.pending_queries = 0
        self.pending_of: dict[str, int] = {}  # account -> the queries its open challenges hold
        self.recent: OrderedDict[str, dict[str, Detection]] = OrderedDict()  # request id -> its verdicts
        self.taken: OrderedDict[str, tuple[str, dict]] = OrderedDict()  # challenge id -> (taker's request id, it)
        self.recent_size = recent

    def score(self, request_id: str, items: list[tuple[str, str]], x: np.ndarray, labels: np.ndarray,
              probs: np.ndarray) -> dict[str, Detection]:
        done = self.recent.get(request_id)
        if done is not None:  # a retried call: the verdicts it had, not a second history entry
            return done
        n = len(x)
        out = {}
        for name, key in items:
            det = self.detectors[name]
            if isinstance(det, _LinkBook):
                res = det.score(request_id, key, x, labels)
            else:  # a key flagged is flagged for good, whether or not the detector itself remembers it
                res = score_for_good(det, key, x, labels, probs, self.flagged.setdefault(name, set()))
            start = self.seq.get((name, key), 0)
            self.seq[(name, key)] = start + n
            res.seq = np.arange(start, start + n, dtype=np.int64)
            out[name] = res
        self.queries += n
        self.requests += 1
        self.recent[request_id] = out
        if len(self.recent) > self.recent_size:
            self.recent.popitem(last=False)
        return out

    # -- per-account limits -----------------------------------------------------------------------
    def admit(self, request_id: str, key: str, n: int, now: float) -> Admission:
        """How many of a request's ``n`` queries ``key``'s quota and rate let through at time ``now`` (see
        :mod:`sim.limits`); a retried call gets the admission it had."""
        done = self.admitted.get(request_id)
        if done is None:
            done = self.admitted[request_id] = self.limits.admit(key, n, now)
            if len(self.admitted) > self.recent_size:
                self.admitted.popitem(last=False)
        return done

    # -- proof of work ---------------------------------------------------------------------------
    def issue(self, challenge_id: str, item: dict, now: float) -> None:
        """Hold a challenge (``item``: its account, nonce, bits, the challenged queries) from time ``now`` until it
        is solved or expires (``pending_ttl_s``). Beyond ``max_pending`` challenged queries, the oldest challenges of
        the account holding the most go first (never the one just issued), so that one account's unsolved challenges
        cannot push out another's. Issuing an open challenge again (a call retried after a restart) changes nothing."""
        if challenge_id in self.pending:
            return
        account = item["account"]
        self.pending[challenge_id] = {**item, "expires": now + self.pending_ttl_s}
        self.pending_queries += len(item["x"])
        self.pending_of[account] = self.pending_of.get(account, 0) + len(item["x"])
        while self.pending and next(iter(self.pending.values()))["expires"] < now:
            self._drop(next(iter(self.pending)))
        while self.pending_queries > self.max_pending:
            oldest = None
            for holder in sorted(self.pending_of, key=self.pending_of.get, reverse=True):
                oldest = next((c for c, it in self.pending.items() if it["account"] == holder and c != challenge_id),
                              None)
                if oldest is not None:
                    break
            if oldest is None:  # only the new challenge is left
                break
            self._drop(oldest)

    def take(self, challenge_id: str, account_id: str, now: float, request_id: str) -> dict | None:
        """The open challenge ``challenge_id`` of ``account_id`` at time ``now``, removed (a challenge is answered
        once); None if there is none (unknown, another account's, expired, taken). The same request taking it again
        (a call retried after a restart) gets it again: the last :attr:`TAKEN` challenges taken (they hold their
        images: fewer than the verdicts) are remembered with the request that took them."""
        taker, item = self.taken.get(challenge_id, (None, None))
        if item is not None:
            return item if taker == request_id and item["account"] == account_id else None
        item = self.pending.get(challenge_id)
        if item is None or item["account"] != account_id or item["expires"] < now:
            return None
        item = self._drop(challenge_id)
        self.taken[challenge_id] = (request_id, item)
        if len(self.taken) > self.TAKEN:
            self.taken.popitem(last=False)
        return item

    def _drop(self, challenge_id: str) -> dict:
        item = self.pending.pop(challenge_id)
        self.pending_queries -= len(item["x"])
        left = self.pending_of[item["account"]] - len(item["x"])
        if left:
            self.pending_of[item["account"]] = left
        else:
            del self.pending_of[item["account"]]
        return item

    # -- account linking -------------------------------------------------------------------------
    def pull(self, name: str, round_: int) -> tuple[list, dict[str, int]]:
        """What linking detector ``name`` recorded since the last pull (rows), and each account's query count, for
        the linker's round ``round_``. Pulling the same round again (a retry) returns the same rows."""
        return self.detectors[name].pull(round_)

    def publish(self, name: str, round_: int, updates: dict[str, tuple[float, bool, int]]) -> None:
        """Round ``round_``'s verdicts on this shard's accounts: account -> (score, flagged, its query count at the
        pull). Publishing a round again (a retry) changes nothing."""
        self.detectors[name].publish(round_, updates)

    # -- what it holds -----------------------------------------------------------------------------
    def stats(self) -> dict:
        keys: dict[str, int] = {}
        for name, _ in self.seq:
            keys[name] = keys.get(name, 0) + 1
        out = {"requests": self.requests, "queries": self.queries, "keys": keys,
               "pending_challenges": len(self.pending)}
        if self.limits is not None:
            out["limits"] = self.limits.stats()
        memory = {name: det.memory() for name, det in self.detectors.items() if hasattr(det, "memory")}
        if memory:
            out["memory"] = memory
        lags = [lag for det in self.detectors.values() if isinstance(det, _LinkBook) for lag in det.lags]
        if lags:
            out["link_lags"] = lags
        rounds = {name: det.pulled for name, det in self.detectors.items() if isinstance(det, _LinkBook)}
        if rounds:  # how many times each linking detector pulled this shard's rows and re-clustered
            out["link_rounds"] = rounds
        return out


class Linker:
    """A population detector (account linking) over the whole population, fed in arrival order what the shards
    recorded, every ``every`` queries of that stream, as it would be inline; :meth:`verdicts` is what to publish
    (account -> score, flagged, the account's query count when the linker pulled)."""

    def __init__(self, detector: Detector):
        self.linker = detector
        self.counts: dict[str, int] = {}
        self.pulls = 0

    def ingest(self, pulled: list[tuple[list, dict[str, int]]]) -> None:
        """One round: the rows pulled from every shard, merged by request id (which starts with the time the Serve
        replica made it, :func:`sim.protocol.new_request_id`), so the merge depends only on what the log records."""
        rows = sorted((row for part, _ in pulled for row in part), key=lambda r: r[0])
        for _, account, x, labels in rows:
            self.linker.score(account, x, labels)
        for _, counts in pulled:
            self.counts.update(counts)
        self.pulls += 1

    def verdicts(self) -> dict[str, tuple[float, bool, int]]:
        return {a: (score, flagged, self.counts.get(a, 0)) for a, (score, flagged) in self.linker.verdicts().items()}


class LocalTier:
    """The tier in one process (tests, benchmarks, a service used without Ray): ``shards`` in-process shards, and
    account linking fed synchronously once ``every`` queries have passed, right after the request that crossed
    it: it re-clusters at the same queries as inline, and the next request sees the verdict."""

    def __init__(self, detectors: dict[str, Detector], shards: int = 1, **options):
        import copy

        def fresh(d):  # one shard holds the given detectors themselves (their state is then the service's)
            return d if shards == 1 else copy.deepcopy(d)

        self.shards = [Shard({n: fresh(d) for n, d in detectors.items()}, **options) for _ in range(shards)]
        self.linkers = {n: Linker(d) for n, d in detectors.items() if d.population}
        self.every = {n: d.values["every"] for n, d in detectors.items() if d.population}
        self._lock = threading.Lock()  # a shard sees one call at a time, as its actor would

    def score(self, request_id: str, items: list[tuple[str, str]], x, labels, probs) -> dict[str, Detection]:
        with self._lock:
            return self._score(request_id, items, x, labels, probs)

    def _score(self, request_id: str, items: list[tuple[str, str]], x, labels, probs) -> dict[str, Detection]:
        out: dict[str, Detection] = {}
        for s, own in by_owner(items, len(self.shards)).items():
            out.update(self.shards[s].score(request_id, own, x, labels, probs))
        for name, linker in self.linkers.items():
            if sum(sh.detectors[name].since for sh in self.shards) >= self.every[name]:
                linker.ingest([sh.pull(name, linker.pulls + 1) for sh in self.shards])
                for sh, verdicts in zip(self.shards, per_shard(linker.verdicts(), len(self.shards))):
                    sh.publish(name, linker.pulls, verdicts)
        return out

    def admit(self, request_id: str, key: str, n: int) -> Admission:
        with self._lock:
            return self.shards[owner(key, len(self.shards))].admit(request_id, key, n, time.time())

    def issue(self, account_id: str, challenge_id: str, item: dict) -> None:
        with self._lock:
            self.shards[owner(account_id, len(self.shards))].issue(challenge_id, item, time.time())

    def take(self, account_id: str, challenge_id: str, request_id: str) -> dict | None:
        with self._lock:
            return self.shards[owner(account_id, len(self.shards))].take(challenge_id, account_id, time.time(),
                                                                          request_id)

    def stats(self) -> list[dict]:
        return [s.stats() for s in self.shards]


def by_owner(items: list[tuple[str, str]], shards: int) -> dict[int, list[tuple[str, str]]]:
    out: dict[int, list[tuple[str, str]]] = {}
    for name, key in items:
        out.setdefault(owner(key, shards), []).append((name, key))
    return out


class Journal:
    """A shard's durable record in a local directory: ``snapshot.pkl`` (the whole state, replaced atomically, with the
    number of the journal that follows it) and ``journal-G.pkl`` (the changes since, one pickle each, flushed to the
    operating system before the change's result is returned: a process killed with SIGKILL loses none of them). A
    snapshot opens the next journal before it names it, and removes the old one only after: killed anywhere in
    between, the process comes back with the snapshot and the journal it names, and never replays a change the
    snapshot holds already."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.snapshot_path = os.path.join(directory, "snapshot.pkl")
        self.generation = 0  # the journal in use: journal-<generation>.pkl
        self._out = None
        self.journal_bytes = 0  # the journal's size: the changes since the snapshot
        self.snapshot_bytes = 0  # the last snapshot's size

    def path(self, generation: int | None = None) -> str:
        """The journal of ``generation`` (default: the one in use)."""
        return os.path.join(self.directory, f"journal-{self.generation if generation is None else generation}.pkl")

    def load(self) -> tuple[Any, list]:
        """(the last snapshot or None, the changes recorded after it); a torn last record is dropped, and cut off
        the file, so that the changes journaled after a restart are read after the next one too. Journals the
        snapshot does not name (left by a snapshot cut short) are removed."""
        state = None
        if os.path.exists(self.snapshot_path):
            with open(self.snapshot_path, "rb") as fh:
                self.generation, state = pickle.load(fh)
            self.snapshot_bytes = os.path.getsize(self.snapshot_path)
        for name in os.listdir(self.directory):
            if name.startswith("journal-") and name.endswith(".pkl") and name != os.path.basename(self.path()):
                os.remove(os.path.join(self.directory, name))
        ops = []
        path = self.path()
        if os.path.exists(path):
            with open(path, "rb") as fh:
                while True:
                    whole = fh.tell()  # the end of the last whole record
                    try:
                        ops.append(pickle.load(fh))
                    except (EOFError, pickle.UnpicklingError, ValueError, AttributeError):
                        break
            if whole < os.path.getsize(path):
                os.truncate(path, whole)
            self.journal_bytes = whole
        return state, ops

    def append(self, op) -> None:
        """Record one change; one that cannot be written whole (a full disk) is cut off again, so that the journal
        never holds a torn record, behind which :meth:`load` would not read the later ones."""
        if self._out is None:
            self._out = open(self.path(), "ab")
        end = self._out.tell()  # the file's size: every record before was flushed
        try:
            pickle.dump(op, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._out.flush()
            self.journal_bytes = self._out.tell()
        except OSError:
            out, self._out = self._out, None  # reopened by the next append
            with contextlib.suppress(OSError):
                out.close()  # its buffer cannot be written either, and goes with it
            with contextlib.suppress(OSError):
                os.truncate(self.path(), end)
            raise

    def snapshot(self, state) -> None:
        """Write ``state`` whole and start the next journal; where this fails, the last snapshot and the journal in
        use stay as they were."""
        following = self.generation + 1
        out = open(self.path(following), "wb")  # empty: named by the snapshot below, the moment it is in place
        tmp = self.snapshot_path + ".tmp"
        try:
            with open(tmp, "wb") as fh:
                pickle.dump((following, state), fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.snapshot_path)  # the new snapshot holds everything the old journal held
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                os.remove(self.path(following))
            raise
        old, self._out, done = self._out, out, self.path()
        self.generation = following
        self.snapshot_bytes = os.path.getsize(self.snapshot_path)
        self.journal_bytes = 0
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
        with contextlib.suppress(OSError):
            os.remove(done)


class Durable:
    """An object (a :class:`Shard`, a :class:`Linker`) whose every change is journaled (see :class:`Journal`): made
    by ``make()`` the first time, and from its snapshot and journal after a restart, with exactly the state it had.
    ``changes``: the methods that change it (the others are only read). A snapshot is taken once ``every`` changes
    are journaled and the journal has grown as large as the last snapshot: a snapshot rewrites the whole state, and
    pauses the object while it does, so as the state grows snapshots grow rarer, and writing them costs a bounded
    share of what is journaled (a restart replays at most about a snapshot's worth of journal)."""

    def __init__(self, make, directory: str, changes: tuple[str, ...], every: int = 500):
        self.journal = Journal(directory)
        state, ops = self.journal.load()
        self.obj = state if state is not None else make()
        for method, args in ops:
            with contextlib.suppress(Exception):  # a change that raised when it was made raises again: no change
                getattr(self.obj, method)(*args)
        self.restored = {"snapshot": state is not None, "changes": len(ops)}
        self.changes, self.every, self.since = changes, every, len(ops)

    def apply(self, method: str, *args):
        """Call ``method``; a change is journaled before it is made, so that state never runs ahead of its journal
        (a change that cannot be journaled is not made, and its caller gets the error)."""
        if method not in self.changes:
            return getattr(self.obj, method)(*args)
        self.journal.append((method, args))
        result = getattr(self.obj, method)(*args)
        self.since += 1
        if self.since >= self.every and self.journal.journal_bytes >= self.journal.snapshot_bytes:
            self.journal.snapshot(self.obj)
            self.since = 0
        return result

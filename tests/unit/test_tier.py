"""The detection tier without Ray: key ownership, one order per key, retried calls, journal and snapshot, linking
fed from shards, proof-of-work challenges held by the account's shard."""

import os
import subprocess
import sys

import numpy as np
import pytest

from sim import data, detectors, tier
from sim.detectors.link import AccountLinker
from sim.summary import tier_line

from .test_link import _jbda_like


def _stream(n_requests=60, accounts=6, per_request=8, seed=0):
    """Requests (account, images, labels): JBDA-like sign steps for half the accounts, test images for the rest."""
    x, y = _jbda_like(n_seeds=8, steps=40, seed=seed)
    ds = data.load("mnist5k")
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_requests):
        acct = f"acct-{r % accounts}"
        if (r % accounts) % 2 == 0:
            i = (r // accounts) * per_request
            out.append((acct, x[i:i + per_request], y[i:i + per_request]))
        else:
            idx = rng.choice(len(ds.x_test), per_request, replace=False)
            out.append((acct, ds.x_test[idx], ds.y_test[idx]))
    return out


def _prada():
    return {"prada": detectors.build("prada", min_pool=20)}


def test_a_key_has_one_owner_the_same_in_every_process_and_keys_spread_evenly():
    keys = [f"account-{i}" for i in range(20_000)]
    parts = tier.per_shard(dict.fromkeys(keys), 4)
    assert all(tier.owner(k, 4) == i for i, part in enumerate(parts) for k in part)
    counts = [len(part) for part in parts]
    assert sum(counts) == 20_000 and max(counts) < 1.05 * 5_000 and min(counts) > 0.95 * 5_000
    mine = [tier.owner(k, 7) for k in keys[:50]]
    code = "from sim import tier; print([tier.owner(f'account-{i}', 7) for i in range(50)])"
    for seed in ("0", "123"):  # Python's own str hash changes with PYTHONHASHSEED; ownership must not
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        assert out.strip() == str(mine)
    assert all(0 <= o < 7 for o in mine) and len(set(mine)) == 7


def test_each_key_gets_its_queries_numbered_in_the_order_its_shard_saw_them():
    shard = tier.Shard(_prada())
    seen: dict[str, int] = {}
    for r, (acct, x, y) in enumerate(_stream(n_requests=12, accounts=3)):
        res = shard.score(f"req-{r}", [("prada", acct)], x, y, None)["prada"]
        start = seen.get(acct, 0)
        assert res.seq.tolist() == list(range(start, start + len(x)))
        seen[acct] = start + len(x)
    assert shard.stats()["keys"] == {"prada": 3} and shard.stats()["queries"] == 96


def test_a_retried_request_gets_its_verdict_again_and_is_not_scored_twice():
    shard = tier.Shard(_prada())
    acct, x, y = _stream()[0]
    first = shard.score("req-1", [("prada", acct)], x, y, None)["prada"]
    again = shard.score("req-1", [("prada", acct)], x, y, None)["prada"]
    assert again is first and shard.queries == len(x)
    nxt = shard.score("req-2", [("prada", acct)], x, y, None)["prada"]
    assert nxt.seq[0] == len(x)


class _Forgetful(detectors.Detector):
    """Flags a key's 10th query and says nothing of the key afterwards (no flagged_accounts of its own)."""

    def __init__(self, models=None, **params):
        super().__init__(models, **params)
        self.sent: dict[str, int] = {}

    def score(self, key, inputs, labels, probs=None):
        before = self.sent.get(key, 0)
        self.sent[key] = before + len(labels)
        return detectors.Detection(np.zeros(len(labels)), before + np.arange(1, len(labels) + 1) == 10)


def test_the_tier_keeps_a_stateful_detectors_flag_for_good_though_the_detector_forgets_it():
    shard = tier.Shard({"f": _Forgetful()})
    x, y = np.zeros((8, 1, 28, 28), np.uint8), np.zeros(8, np.int64)
    first = shard.score("r1", [("f", "a")], x, y, None)["f"]
    second = shard.score("r2", [("f", "a")], x, y, None)["f"]  # the detector flags its 10th query, the 2nd here
    third = shard.score("r3", [("f", "a")], x, y, None)["f"]  # the detector flags none of these
    other = shard.score("r4", [("f", "b")], x, y, None)["f"]
    assert not first.flags.any() and not first.was_flagged
    assert second.flags.tolist() == [False] + [True] * 7 and not second.was_flagged
    assert third.flags.all() and third.was_flagged
    assert not other.flags.any() and not other.was_flagged
    assert not detectors.for_good(np.zeros(0, bool), False).size
    assert detectors.for_good([False], True).tolist() == [True]


def test_sharding_changes_nothing_a_per_key_detector_decides():
    one, four = tier.LocalTier(_prada(), shards=1), tier.LocalTier(_prada(), shards=4)
    for r, (acct, x, y) in enumerate(_stream()):
        a = one.score(f"r{r}", [("prada", acct)], x, y, None)["prada"]
        b = four.score(f"r{r}", [("prada", acct)], x, y, None)["prada"]
        assert np.array_equal(a.flags, b.flags) and np.array_equal(a.seq, b.seq) and a.was_flagged == b.was_flagged
        np.testing.assert_array_equal(a.scores, b.scores)
    flagged = one.shards[0].detectors["prada"].flagged_accounts()
    assert {"acct-0", "acct-2", "acct-4"} <= flagged  # the JBDA-like accounts (PRADA's pool is small here)
    assert set().union(*(s.detectors["prada"].flagged_accounts() for s in four.shards)) == flagged
    assert sum(s.stats()["keys"].get("prada", 0) for s in four.shards) == 6


def test_a_shard_restarted_from_its_journal_and_snapshot_has_exactly_the_state_it_had(tmp_path):
    requests = _stream()
    reference = tier.Shard(_prada())
    durable = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES, every=7)
    verdicts = {}
    for r, (acct, x, y) in enumerate(requests[:40]):
        verdicts[r] = reference.score(f"r{r}", [("prada", acct)], x, y, None)["prada"]
        durable.apply("score", f"r{r}", [("prada", acct)], x, y, None)
    durable.apply("issue", "ch-1", {"account": "acct-1", "x": requests[0][1][:2]}, 100.0)
    reference.issue("ch-1", {"account": "acct-1", "x": requests[0][1][:2]}, 100.0)
    journaled = durable.since  # the changes since its last snapshot (snapshots wait for the journal to grow too)
    assert 0 < journaled < 41
    # as if killed: no close; a new one starts from the same directory: the snapshot, then the journal's changes
    restarted = tier.Durable(lambda: pytest.fail("made afresh instead of restored"), str(tmp_path),
                             tier.Shard.CHANGES, every=7)
    assert restarted.restored == {"snapshot": True, "changes": journaled}
    assert restarted.obj.detectors["prada"].flagged_accounts() == reference.detectors["prada"].flagged_accounts()
    acct, x, y = requests[39]  # the call in flight at the kill, retried: the verdict it had
    again = restarted.apply("score", "r39", [("prada", acct)], x, y, None)["prada"]
    assert again.seq[0] == verdicts[39].seq[0] == 48 and np.array_equal(again.flags, verdicts[39].flags)
    for r, (acct, x, y) in enumerate(requests[40:], start=40):  # and the histories go on as if nothing happened
        a = reference.score(f"r{r}", [("prada", acct)], x, y, None)["prada"]
        b = restarted.apply("score", f"r{r}", [("prada", acct)], x, y, None)["prada"]
        assert np.array_equal(a.seq, b.seq) and np.array_equal(a.flags, b.flags)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert restarted.apply("take", "ch-1", "acct-1", 101.0, "req-1")["account"] == "acct-1"


def test_a_restored_shard_counts_its_journaled_changes_toward_the_next_snapshot(tmp_path):
    """The journal a restart replays stays bounded by ``every``: 4 changes journaled, a restart, and the 5th change
    (with every=5) writes a snapshot and starts an empty journal, as if no restart had happened."""
    stream = _stream(n_requests=5)
    durable = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES, every=5)
    for r, (acct, x, y) in enumerate(stream[:4]):
        durable.apply("score", f"r{r}", [("prada", acct)], x, y, None)
    restarted = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES, every=5)
    assert restarted.restored == {"snapshot": False, "changes": 4}
    acct, x, y = stream[4]
    restarted.apply("score", "r4", [("prada", acct)], x, y, None)
    again = tier.Durable(lambda: pytest.fail("made afresh instead of restored"), str(tmp_path), tier.Shard.CHANGES)
    assert again.restored == {"snapshot": True, "changes": 0} and again.obj.requests == 5


class _Ledger:
    """A durable object with a large state (``blob``) and small changes (``add``)."""

    def __init__(self):
        self.blob, self.items = bytes(100_000), []

    def add(self, item):
        self.items.append(item)


def test_snapshots_grow_rarer_as_the_state_grows(tmp_path):
    """A snapshot rewrites the whole state: beyond ``every`` changes, the next waits until the journal is as large as
    the last snapshot (here about 100 kB, some 5,000 of these changes), so that snapshots cost a bounded share of what
    is journaled; a restart replays what was journaled since."""
    durable = tier.Durable(_Ledger, str(tmp_path), ("add",), every=3)
    for i in range(3):
        durable.apply("add", i)  # the first snapshot (nothing journaled was as large as no snapshot)
    for i in range(3, 503):
        durable.apply("add", i)
    restarted = tier.Durable(lambda: pytest.fail("made afresh"), str(tmp_path), ("add",), every=3)
    assert restarted.restored == {"snapshot": True, "changes": 500} and restarted.obj.items == list(range(503))
    snapshot, changes = restarted.journal.snapshot_bytes, 0
    while changes < 10_000:
        journaled = restarted.journal.journal_bytes
        restarted.apply("add", 0)
        changes += 1
        if restarted.journal.journal_bytes == 0:  # snapshotted
            break
    # the change that brought the journal to the snapshot's size took the next snapshot
    assert journaled < snapshot <= journaled + 100 and 3_000 < changes < 10_000


def test_changes_journaled_after_a_torn_record_survive_the_next_restart(tmp_path):
    """A kill mid-record leaves a torn tail; the restart drops it from the file as well, so what is journaled next is
    not hidden behind it at the restart after."""
    durable = tier.Durable(_Ledger, str(tmp_path), ("add",), every=10**6)
    for i in range(4):
        durable.apply("add", i)
    path = durable.journal.path()
    os.truncate(path, os.path.getsize(path) - 12)  # killed while writing the fourth
    once = tier.Durable(_Ledger, str(tmp_path), ("add",), every=10**6)
    assert once.obj.items == [0, 1, 2]
    once.apply("add", "after")
    twice = tier.Durable(_Ledger, str(tmp_path), ("add",), every=10**6)
    assert twice.obj.items == [0, 1, 2, "after"] and twice.restored == {"snapshot": False, "changes": 4}


def test_a_snapshot_cut_short_anywhere_replays_no_change_twice_and_loses_none(tmp_path):
    """A snapshot opens the next journal, puts the snapshot in place, then removes the old journal. Killed before the
    snapshot is in place, the restart has the old snapshot and the whole old journal; killed after it, the new
    snapshot alone (the old journal's changes are in it: replaying them would apply them twice). A snapshot that
    cannot be written leaves the journal in use working."""
    directory = str(tmp_path)
    durable = tier.Durable(_Ledger, directory, ("add",), every=10**6)
    for i in range(5):
        durable.apply("add", i)
    old_path = durable.journal.path()
    with open(old_path, "rb") as fh:
        old_journal = fh.read()
    durable.journal.snapshot(durable.obj)
    assert not os.path.exists(old_path)
    with open(old_path, "wb") as fh:  # as if killed after the snapshot was in place, before the old journal went
        fh.write(old_journal)
    after = tier.Durable(_Ledger, directory, ("add",), every=10**6)
    assert after.obj.items == [0, 1, 2, 3, 4] and after.restored == {"snapshot": True, "changes": 0}
    assert not os.path.exists(old_path)
    after.apply("add", 5)
    open(after.journal.path(after.journal.generation + 1), "wb").close()  # killed before the next snapshot was in place
    again = tier.Durable(_Ledger, directory, ("add",), every=10**6)
    assert again.obj.items == [0, 1, 2, 3, 4, 5] and again.restored == {"snapshot": True, "changes": 1}
    journals = sorted(n for n in os.listdir(directory) if n.startswith("journal-"))
    assert journals == [os.path.basename(again.journal.path())]
    os.mkdir(again.journal.snapshot_path + ".tmp")  # the snapshot cannot be written
    with pytest.raises(OSError):
        again.journal.snapshot(again.obj)
    again.apply("add", 6)
    last = tier.Durable(_Ledger, directory, ("add",), every=10**6)
    assert last.obj.items == [0, 1, 2, 3, 4, 5, 6] and last.restored == {"snapshot": True, "changes": 2}


def test_a_torn_last_journal_record_is_dropped(tmp_path):
    durable = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES, every=100)
    for r, (acct, x, y) in enumerate(_stream(n_requests=5)):
        durable.apply("score", f"r{r}", [("prada", acct)], x, y, None)
    path = durable.journal.path()
    os.truncate(path, os.path.getsize(path) - 100)  # killed in the middle of writing the fifth change
    restarted = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES)
    assert restarted.restored == {"snapshot": False, "changes": 4} and restarted.obj.requests == 4


def test_a_change_the_journal_cannot_take_is_not_made_and_leaves_no_torn_record(tmp_path, monkeypatch):
    """A full disk mid-record: the change fails (its caller answers 503), the shard's state stays what its journal
    says, and the changes journaled once there is room again are read back after a restart."""
    import pickle

    stream = _stream(n_requests=6)
    durable = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES, every=100)
    for r, (acct, x, y) in enumerate(stream[:3]):
        durable.apply("score", f"r{r}", [("prada", acct)], x, y, None)
    real_dump = pickle.dump

    def full_disk(obj, fh, protocol=None):
        fh.write(pickle.dumps(obj, protocol=protocol)[:50])  # part of the record reaches the file
        fh.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pickle, "dump", full_disk)
    acct, x, y = stream[3]
    with pytest.raises(OSError, match="No space left"):
        durable.apply("score", "r3", [("prada", acct)], x, y, None)
    assert durable.obj.requests == 3  # not made: the state is what the journal holds
    monkeypatch.setattr(pickle, "dump", real_dump)
    for r, (acct, x, y) in enumerate(stream[3:], start=3):  # room again: the same request, and the next ones
        durable.apply("score", f"r{r}", [("prada", acct)], x, y, None)
    restarted = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES)
    assert restarted.restored == {"snapshot": False, "changes": 6} and restarted.obj.requests == 6


def test_challenges_are_held_by_the_accounts_shard_and_answered_once():
    local = tier.LocalTier({}, shards=3)
    item = {"account": "acct-7", "x": np.zeros((2, 1, 28, 28), np.uint8)}
    local.issue("acct-7", "ch", item)
    holder = tier.owner("acct-7", 3)
    assert [len(s.pending) for s in local.shards] == [int(i == holder) for i in range(3)]
    assert local.take("acct-8", "ch", "req-1") is None  # not another account's to redeem
    assert local.take("acct-7", "ch", "req-2")["x"].shape == (2, 1, 28, 28)
    assert local.take("acct-7", "ch", "req-3") is None  # spent


def test_a_retried_issue_or_take_changes_nothing_more():
    """Ray runs a call in flight to a shard that died again once the shard is back: an issue retried holds one
    challenge, counted once; a take retried by the request that took the challenge gets it again, and any other
    request still finds it spent."""
    shard = tier.Shard({})
    x = np.zeros((3, 1, 4, 4), np.uint8)
    shard.issue("ch", {"account": "a", "x": x}, 100.0)
    shard.issue("ch", {"account": "a", "x": x}, 100.5)
    assert shard.pending_queries == 3 and shard.pending_of == {"a": 3} and shard.pending["ch"]["expires"] == 700.0
    first = shard.take("ch", "a", 101.0, "req-1")
    assert first["x"].shape == (3, 1, 4, 4) and shard.pending_queries == 0 and not shard.pending_of
    assert shard.take("ch", "a", 102.0, "req-1") is first
    assert shard.take("ch", "a", 102.0, "req-2") is None and shard.take("ch", "b", 102.0, "req-1") is None


def test_linking_through_the_tier_flags_what_inline_linking_flags():
    params = {"every": 100, "min_queries": 10, "min_pool": 50}
    inline = detectors.build("link", **params)
    sharded = tier.LocalTier({"link": detectors.build("link", **params)}, shards=3)
    x, y = _jbda_like()
    ds = data.load("mnist5k")
    benign = np.random.default_rng(1).permutation(len(ds.x_test))[:150]
    lags_seen = False
    for r, start in enumerate(range(0, len(x), 10)):
        reqs = [(f"sybil-{r % 15}", x[start:start + 10], y[start:start + 10])]
        reqs.append((f"benign-{r % 2}", ds.x_test[benign[(r * 5) % 150:(r * 5) % 150 + 5]],
                     ds.y_test[benign[(r * 5) % 150:(r * 5) % 150 + 5]]))
        for i, (acct, xb, yb) in enumerate(reqs):
            was = inline.is_flagged(acct)
            inline.score(acct, xb, yb)
            got = sharded.score(f"r{r:04d}-{i}", [("link", acct)], xb, yb, None)["link"]
            assert got.was_flagged == was  # the verdict a request sees is the inline one
            lags_seen = lags_seen or any("link_lags" in s.stats() for s in sharded.shards)
    linker = sharded.linkers["link"].linker
    assert isinstance(linker, AccountLinker) and linker.flagged_accounts() == inline.flagged_accounts()
    assert len(inline.flagged_accounts() & {f"sybil-{i}" for i in range(15)}) >= 12
    assert lags_seen and all(lag == 0 for s in sharded.shards for lag in s.stats().get("link_lags", []))
    rounds = sharded.linkers["link"].pulls  # the shards count the rounds they took part in, as the summary says
    assert rounds >= 2
    assert all(s.stats()["link_rounds"] == {"link": rounds} for s in sharded.shards)
    assert f"; link re-clustered {rounds} times" in tier_line({"shards": 3, "per_shard": [s.stats()
                                                                                       for s in sharded.shards]})


class _Crowded(detectors.Detector):
    """A population detector of the test's own: every ``every`` queries of all traffic, it flags the accounts that sent
    more than half of all queries so far; an account's score is its share."""

    population = True
    params = {"every": detectors.Param(10, int, low=1, help="queries between verdicts")}

    def __init__(self, models=None, **params):
        super().__init__(models, **params)
        self.counts: dict[str, int] = {}
        self.since = 0
        self.judged: dict[str, tuple[float, bool]] = {}

    def score(self, account_id, inputs, labels, probs=None):
        self.counts[account_id] = self.counts.get(account_id, 0) + len(inputs)
        self.since += len(inputs)
        if self.since >= self.values["every"]:
            self.since, total = 0, sum(self.counts.values())
            self.judged = {a: (c / total, c / total > 0.5) for a, c in self.counts.items()}
        share, flagged = self.judged.get(account_id, (np.nan, False))
        return detectors.Detection(np.full(len(inputs), share), np.full(len(inputs), flagged))

    def verdicts(self):
        return dict(self.judged)


def test_a_population_detector_of_ones_own_is_fed_every_account_and_its_verdicts_reach_the_shards():
    """Whatever its class, a detector that declares ``population`` is fed in rounds like account linking: each
    shard keeps its accounts' queries, the tier feeds them all to one instance once ``every`` have passed, and
    the shards give its verdicts to the accounts' next queries."""
    sharded = tier.LocalTier({"crowd": _Crowded(every=10)}, shards=2)
    assert all(isinstance(s.detectors["crowd"], tier._LinkBook) for s in sharded.shards)
    x, y = np.zeros((4, 1, 4, 4), np.uint8), np.zeros(4, np.int64)
    owners = {a: tier.owner(a, 2) for a in ("a", "b", "g")}
    assert len(set(owners.values())) == 2  # the accounts live on both shards
    before = [sharded.score(f"r{i}", [("crowd", a)], x[:n], y[:n], None)["crowd"]
              for i, (a, n) in enumerate([("a", 4), ("b", 1), ("a", 4), ("g", 1)])]  # 10 queries: round 1
    assert not any(r.flags.any() for r in before) and all(np.isnan(r.scores).all() for r in before)
    after = {a: sharded.score(f"s-{a}", [("crowd", a)], x[:1], y[:1], None)["crowd"] for a in ("a", "b", "g")}
    assert after["a"].was_flagged and after["a"].flags.all() and after["a"].as_of.tolist() == [1]
    np.testing.assert_allclose([after[a].scores[0] for a in "abg"], [0.8, 0.1, 0.1])
    assert not after["b"].flags.any() and not after["g"].flags.any()
    assert sharded.linkers["crowd"].linker.counts == {"a": 8, "b": 1, "g": 1}  # one instance saw every account


def test_a_challenge_expires_after_its_ttl_and_is_dropped_by_the_next_issue():
    """A challenge can be redeemed until ``pending_ttl_s`` after it was issued, not later (an expired puzzle is no
    longer worth its answer); the next issue drops it from the pending store. The times are the callers'."""
    shard = tier.Shard({}, pending_ttl_s=10.0)
    x = np.zeros((2, 1, 4, 4), np.uint8)
    shard.issue("ch-a", {"account": "a", "x": x}, 100.0)
    shard.issue("ch-b", {"account": "a", "x": x}, 100.0)
    assert shard.take("ch-a", "a", 110.0, "r1")["account"] == "a"  # exactly the TTL: still open
    assert shard.take("ch-b", "a", 110.5, "r2") is None  # past it: gone, though nothing has removed it yet
    assert list(shard.pending) == ["ch-b"] and shard.pending_queries == 2
    shard.issue("ch-c", {"account": "a", "x": x[:1]}, 110.5)  # issuing at 110.5 drops what expired
    assert list(shard.pending) == ["ch-c"] and shard.pending_queries == 1
    assert shard.stats()["pending_challenges"] == 1
    assert shard.take("ch-c", "a", 120.5, "r3")["x"].shape == (1, 1, 4, 4)  # issued at 110.5: open until 120.5
    assert shard.pending_queries == 0 and not shard.pending


def test_pending_challenges_beyond_max_pending_queries_push_out_the_oldest():
    """The pending store holds at most ``max_pending`` challenged queries: a new challenge pushes out the oldest
    ones (which then cannot be redeemed) until it fits, and ``pending_queries`` counts what is held."""
    shard = tier.Shard({}, max_pending=3)
    two = np.zeros((2, 1, 4, 4), np.uint8)
    shard.issue("ch-1", {"account": "a", "x": two}, 0.0)
    shard.issue("ch-2", {"account": "b", "x": two[:1]}, 0.0)  # 3 queries: exactly the limit, both kept
    assert list(shard.pending) == ["ch-1", "ch-2"] and shard.pending_queries == 3
    shard.issue("ch-3", {"account": "a", "x": two}, 0.0)  # 5 > 3: the oldest, ch-1, goes; 3 left fit
    assert list(shard.pending) == ["ch-2", "ch-3"] and shard.pending_queries == 3
    assert shard.take("ch-1", "a", 0.0, "r") is None  # pushed out
    assert shard.take("ch-3", "a", 0.0, "r")["x"].shape == (2, 1, 4, 4) and shard.pending_queries == 1
    shard.issue("ch-4", {"account": "c", "x": np.zeros((3, 1, 4, 4), np.uint8)}, 0.0)  # 4 > 3: ch-2 goes
    assert list(shard.pending) == ["ch-4"] and shard.pending_queries == 3


def test_one_accounts_unsolved_challenges_cannot_push_out_anothers():
    """A flagged account that never solves its challenges fills the store: beyond ``max_pending`` its own oldest ones
    go, and another account's open challenge stays redeemable; so does the challenge just issued."""
    shard = tier.Shard({}, max_pending=10)
    x = np.zeros((4, 1, 4, 4), np.uint8)
    shard.issue("ch-c", {"account": "c", "x": x[:2]}, 0.0)
    for i in range(50):
        shard.issue(f"ch-a{i}", {"account": "a", "x": x}, 0.0)
    assert list(shard.pending) == ["ch-c", "ch-a48", "ch-a49"] and shard.pending_queries == 10
    assert shard.pending_of == {"c": 2, "a": 8}
    shard.issue("ch-b", {"account": "b", "x": x}, 0.0)  # a holds the most: its oldest goes, not c's
    assert list(shard.pending) == ["ch-c", "ch-a49", "ch-b"] and shard.pending_of == {"c": 2, "a": 4, "b": 4}
    assert shard.take("ch-c", "c", 0.0, "r")["x"].shape == (2, 1, 4, 4) and shard.pending_of == {"a": 4, "b": 4}


def _link_shard():
    return tier.Shard({"link": detectors.build("link", every=10**6, min_queries=1, min_pool=3)})


def test_a_retried_linking_pull_gets_the_same_rows_and_rounds_go_in_order():
    """Ray retries a pull whose reply was lost: pulling round r again returns round r's rows, not nothing and not the
    rows recorded since; a round out of order is an error."""
    shard = _link_shard()
    x, y = np.arange(3 * 16, dtype=np.uint8).reshape(3, 1, 4, 4), np.array([1, 2, 3])
    shard.score("req-1", [("link", "a")], x[:2], y[:2], None)
    shard.score("req-2", [("link", "b")], x[2:], y[2:], None)
    rows, counts = shard.pull("link", 1)
    assert [(r[0], r[1], len(r[2])) for r in rows] == [("req-1", "a", 2), ("req-2", "b", 1)]
    assert counts == {"a": 2, "b": 1}
    np.testing.assert_array_equal(rows[0][2], x[:2].reshape(2, -1))
    shard.score("req-3", [("link", "a")], x[:1], y[:1], None)  # recorded after the pull: round 2's
    again, counts_again = shard.pull("link", 1)
    assert [r[0] for r in again] == ["req-1", "req-2"] and counts_again == {"a": 2, "b": 1}
    nxt, counts2 = shard.pull("link", 2)
    assert [r[0] for r in nxt] == ["req-3"] and counts2 == {"a": 3, "b": 1}
    assert [r[0] for r in shard.pull("link", 2)[0]] == ["req-3"]
    for bad in (1, 4):
        with pytest.raises(ValueError, match=f"linking round {bad} pulled from a shard at round 2"):
            shard.pull("link", bad)
    assert shard.stats()["link_rounds"] == {"link": 2}


def test_linking_flags_arrive_with_their_lag_and_a_retried_publish_changes_nothing():
    """An account flagged in round r whose count at the pull was n, and which has sent m queries by the publish,
    had its flag m - n queries late (the shard's ``link_lags``). Publishing a round again (a retry, possibly after
    a later round) changes neither the verdicts nor the lags."""
    shard = _link_shard()
    x, y = np.zeros((8, 1, 4, 4), np.uint8), np.zeros(8, np.int64)
    shard.score("req-1", [("link", "a")], x, y, None)
    _, counts = shard.pull("link", 1)
    assert counts == {"a": 8}
    shard.score("req-2", [("link", "a")], x[:5], y[:5], None)  # 5 more queries while the linker clusters
    round1 = {"a": (0.1, True, 8)}  # the account's score (1 - W of its cluster), flagged, its count at the pull
    shard.publish("link", 1, round1)
    assert shard.stats()["link_lags"] == [5]  # 13 sent by the publish, 8 at the pull
    shard.publish("link", 1, round1)  # retried
    assert shard.stats()["link_lags"] == [5]
    res = shard.score("req-3", [("link", "a")], x[:1], y[:1], None)["link"]
    assert res.was_flagged and res.flags.all() and res.as_of.tolist() == [1] and res.round.tolist() == [2]
    np.testing.assert_allclose(res.scores, [0.1])
    shard.pull("link", 2)
    shard.publish("link", 2, {"a": (0.8, True, 14), "b": (0.97, False, 3)})
    shard.publish("link", 1, {"a": (0.99, False, 8)})  # a late retry of round 1: round 2's verdicts stand
    det = shard.detectors["link"]
    assert det.published == 2 and det.verdict == {"a": (0.8, True), "b": (0.97, False)}
    assert shard.stats()["link_lags"] == [5]


def test_a_request_that_fails_in_a_shard_call_fails_alone(tmp_path, monkeypatch):
    """Requests that meet on the way to a shard share one call (the replica's line to it); one whose scoring raises
    gets its own error, and the others of the call their verdicts (they were scored: failing them too would answer
    nothing for queries their keys' histories hold). The shard actor's class and the line run here without Ray."""
    import pickle
    from types import SimpleNamespace

    from sim import tier_actors

    spec = SimpleNamespace(detectors={"prada": {"kind": "prada", "params": {"min_pool": 20}}}, detector_models={},
                           limits=None, shards=1)
    shard = tier_actors.ShardActor.__ray_actor_class__("app", 0, spec, str(tmp_path))
    (a, xa, ya), (b, xb, yb) = _stream(n_requests=2)
    calls = [("r1", [("prada", a)], xa, ya, None), ("r2", [("no-such-detector", b)], xb, yb, None),
             ("r3", [("prada", b)], xb, yb, None)]
    answers = pickle.loads(shard.score(pickle.dumps(calls)))  # one call, three requests
    assert answers[0]["prada"].seq.tolist() == list(range(len(xa))) and isinstance(answers[1], KeyError)
    assert answers[2]["prada"].seq.tolist() == list(range(len(xb)))
    # through a replica's line (however it groups them into calls): each caller gets its own outcome
    monkeypatch.setattr(tier_actors.ray, "get", lambda ref: ref)  # the "call" returns its answer itself
    line = tier_actors._Line(SimpleNamespace(score=SimpleNamespace(remote=shard.score)))
    again = [(f"{rid}-again", items, x, y, p) for rid, items, x, y, p in calls]
    futures = [line.submit(c) for c in again]
    assert futures[0].result(timeout=30)["prada"].seq[0] == len(xa)
    assert futures[2].result(timeout=30)["prada"].seq[0] == len(xb)
    with pytest.raises(KeyError):
        futures[1].result(timeout=30)

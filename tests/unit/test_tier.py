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
    counts = tier.spread(keys, 4)
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
    durable.apply("issue", "ch-1", {"account": "acct-1", "x": requests[0][1][:2]})
    reference.issue("ch-1", {"account": "acct-1", "x": requests[0][1][:2]})
    # as if killed: no close; a new one starts from the same directory (snapshot after 35 changes, 6 journaled)
    restarted = tier.Durable(lambda: pytest.fail("made afresh instead of restored"), str(tmp_path),
                             tier.Shard.CHANGES, every=7)
    assert restarted.restored == {"snapshot": True, "changes": 41 % 7}
    assert restarted.obj.detectors["prada"].flagged_accounts() == reference.detectors["prada"].flagged_accounts()
    acct, x, y = requests[39]  # the call in flight at the kill, retried: the verdict it had
    again = restarted.apply("score", "r39", [("prada", acct)], x, y, None)["prada"]
    assert again.seq[0] == verdicts[39].seq[0] == 48 and np.array_equal(again.flags, verdicts[39].flags)
    for r, (acct, x, y) in enumerate(requests[40:], start=40):  # and the histories go on as if nothing happened
        a = reference.score(f"r{r}", [("prada", acct)], x, y, None)["prada"]
        b = restarted.apply("score", f"r{r}", [("prada", acct)], x, y, None)["prada"]
        assert np.array_equal(a.seq, b.seq) and np.array_equal(a.flags, b.flags)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert restarted.apply("take", "ch-1", "acct-1")["account"] == "acct-1"


def test_a_torn_last_journal_record_is_dropped(tmp_path):
    durable = tier.Durable(lambda: tier.Shard(_prada()), str(tmp_path), tier.Shard.CHANGES, every=100)
    for r, (acct, x, y) in enumerate(_stream(n_requests=5)):
        durable.apply("score", f"r{r}", [("prada", acct)], x, y, None)
    path = os.path.join(str(tmp_path), "journal.pkl")
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
    assert local.take("acct-8", "ch") is None  # not another account's to redeem
    assert local.take("acct-7", "ch")["x"].shape == (2, 1, 28, 28)
    assert local.take("acct-7", "ch") is None  # spent


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

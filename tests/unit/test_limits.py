"""Per-account limits: the token bucket and quota (sim.limits), held in the tier's shards, enforced by the service
before the model runs, and honoured by the client."""

import numpy as np
import pytest

from sim import config, models, querylog
from sim.errors import ConfigError
from sim.limits import Admission, LimitBook, Limits
from sim.protocol import Account
from sim.service import VictimService
from sim.tier import Durable, LocalTier, Shard


def test_quota_cuts_the_request_that_crosses_it_then_refuses_for_good():
    book = LimitBook(Limits(quota=10))
    assert book.admit("a", 4, 0.0) == Admission(4)
    assert book.admit("a", 4, 0.0) == Admission(4)
    assert book.admit("a", 4, 0.0) == Admission(2, "quota")  # answered up to the quota, the rest refused
    assert book.admit("a", 1, 99.0) == Admission(0, "quota")  # no wait brings it back
    assert book.admit("b", 4, 0.0) == Admission(4)  # each key its own


def test_rate_is_a_token_bucket_that_says_how_long_to_wait():
    book = LimitBook(Limits(rate=10.0, burst=20))
    assert book.admit("a", 20, 0.0) == Admission(20)  # a full bucket at first sight
    refused = book.admit("a", 5, 0.2)  # 2 tokens back after 0.2 s
    assert refused.admitted == 0 and refused.reason == "rate"
    assert refused.retry_after == pytest.approx(0.3)  # 3 more tokens at 10 per second
    assert book.admit("a", 5, 0.2 + refused.retry_after) == Admission(5)  # waiting as told is enough
    assert book.admit("a", 1, 100.0).admitted == 1
    assert book.admit("a", 21, 1000.0) == Admission(0, "rate")  # more than the bucket holds: never, no wait to give
    # refused requests took nothing: at the same instant, the bucket (full after the pause) still holds all 20 tokens
    assert book.admit("a", 20, 1000.0) == Admission(20)
    assert book.admit("a", 20, 2000.0) == Admission(20)  # and a long pause fills it to the brim again, no more


def test_a_request_over_the_burst_takes_nothing_from_the_bucket():
    """A request larger than the bucket is refused for good (no wait would help) and charges nothing: a request of
    the bucket's size right after it, at the same instant, passes in full."""
    book = LimitBook(Limits(rate=10.0, burst=20))
    assert book.admit("a", 21, 5.0) == Admission(0, "rate")  # a key's first request: its bucket starts full
    assert book.admit("a", 20, 5.0) == Admission(20)
    assert book.admit("a", 25, 7.0) == Admission(0, "rate")  # 20 tokens back after 2 s; 25 never fit
    assert book.admit("a", 20, 7.0) == Admission(20)


def test_a_clock_that_steps_back_neither_drains_nor_fills_the_bucket():
    """The time is an argument (a shard's wall clock, possibly another replica's): a ``now`` before the bucket's last
    count adds no tokens and takes none; the bucket then counts on from that earlier time."""
    book = LimitBook(Limits(rate=10.0, burst=20))
    assert book.admit("a", 10, 100.0) == Admission(10)  # 10 tokens left at t=100
    over = book.admit("a", 11, 99.0)  # one second back: still 10 tokens, 1 short, 0.1 s at 10 per second
    assert over.admitted == 0 and over.reason == "rate" and over.retry_after == pytest.approx(0.1)
    assert book.admit("a", 10, 99.0) == Admission(10)  # the 10 tokens are all there
    assert book.admit("a", 1, 99.0625).reason == "rate"  # counted from t=99 now: 0.625 tokens by 99.0625
    assert book.admit("a", 2, 99.25) == Admission(2)  # 2.5 by 99.25


def test_rate_and_quota_together_count_only_what_was_admitted():
    book = LimitBook(Limits(quota=30, rate=1.0, burst=20))
    assert book.admit("a", 20, 0.0).admitted == 20
    assert book.admit("a", 20, 1.0).reason == "rate"
    assert book.admit("a", 20, 30.0) == Admission(10, "quota")  # 10 left of the quota, 20 tokens in the bucket
    assert book.used == {"a": 30}


def test_limits_group_keys_like_the_detectors():
    acc = Account("acct-1", "attacker", "knockoff", cohort="c1")
    assert Limits(quota=1).key(acc, "actor-9") == "acct-1"
    assert Limits(quota=1, group="cohort").key(acc, "actor-9") == "cohort:c1"
    assert Limits(quota=1, group="actor").key(acc, "actor-9") == "actor:actor-9"
    with pytest.raises(ValueError, match="serve.limit_by='ip' is not a grouping"):
        Limits(quota=1, group="ip")


def test_a_journaled_shard_restores_its_limits_and_answers_a_retry_as_before(tmp_path):
    make = lambda: Shard({}, limits=Limits(quota=100, rate=5.0, burst=10))  # noqa: E731
    first = Durable(make, str(tmp_path), Shard.CHANGES)
    answers = [first.apply("admit", f"r{i}", "acct", 4, i * 0.2) for i in range(6)]
    assert [a.admitted for a in answers] == [4, 4, 4, 0, 0, 0]  # 5 tokens a second, a bucket of 10
    again = Durable(make, str(tmp_path), Shard.CHANGES)  # a restart: snapshot (none yet) plus journal
    assert again.obj.limits.used == first.obj.limits.used and again.obj.limits.bucket == first.obj.limits.bucket
    assert again.apply("admit", "r5", "acct", 4, 99.0) == answers[5]  # a retried call: the same admission
    assert again.obj.limits.used["acct"] == 12
    assert again.apply("admit", "r6", "acct", 4, 99.0) == Admission(4)


def _service(tmp_path, limits, max_images=16):
    model = models.build("lenet", (1, 28, 28), 10)
    calls = []
    forward = model.forward
    model.forward = lambda x: (calls.append(len(x)), forward(x))[1]
    keys = {"k1": Account("a1", "attacker", "knockoff", cohort="c"), "k2": Account("a2", "attacker", "knockoff",
                                                                                   cohort="c")}
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    svc = VictimService(model=model, victim="v", run_id="r", accounts=keys, input_shape=(1, 28, 28), writer=writer,
                        max_images=max_images, limits=limits)
    calls.clear()  # the service's own look at the model's outputs
    return svc, writer, calls


def test_the_service_refuses_over_the_limits_before_the_model_and_logs_every_query(tmp_path):
    svc, writer, calls = _service(tmp_path, Limits(quota=10, group="cohort"))
    x = np.zeros((6, 1, 28, 28), np.uint8)
    assert svc.query("k1", x).status == 200 and calls == [6]
    cut = svc.query("k2", x)  # the same cohort: 4 left
    assert cut.status == 200 and cut.actions == ["answered"] * 4 + ["refused"] * 2
    assert cut.reasons[4:] == ["quota", "quota"] and (cut.labels[4:] == -1).all() and np.isnan(cut.probs[4:]).all()
    assert calls == [6, 4]  # the model saw only what was admitted
    spent = svc.query("k1", x)
    assert spent.status == 429 and spent.reason == "quota" and spent.retry_after is None
    assert spent.retry_after_header is None and calls == [6, 4]
    assert spent.to_json()["error"] == "quota" and len(spent.answered) == 6 and not spent.answered.any()
    writer.close()
    rows = querylog.read(str(tmp_path)).to_pylist()
    assert len(rows) == 18  # every query, answered or refused, once
    refused = [r for r in rows if r["action"] == "refused"]
    assert len(refused) == 8 and {r["refusal_reason"] for r in refused} == {"quota"}
    assert all(r["input_sha1"] for r in refused) and all(r["clean_probs"] is None for r in refused)


def test_the_service_answers_over_the_rate_with_429_and_a_wait(tmp_path):
    svc, writer, calls = _service(tmp_path, Limits(rate=2.0, burst=16))
    x = np.zeros((16, 1, 28, 28), np.uint8)
    assert svc.query("k1", x).status == 200
    over = svc.query("k1", x[:4])
    assert over.status == 429 and over.reason == "rate" and 1.5 < over.retry_after <= 2.0
    assert over.retry_after_header == "2" and over.to_json()["retry_after"] == pytest.approx(over.retry_after, 1e-3)
    assert svc.query("k2", x[:4]).status == 200  # another account has its own bucket
    assert calls == [16, 4]
    writer.close()


def test_limits_hold_across_the_shards_of_a_tier():
    tier = LocalTier({}, shards=3, limits=Limits(quota=5))
    admitted = {key: sum(tier.admit(f"{key}-{i}", key, 2).admitted for i in range(4)) for key in ("a", "b", "c", "d")}
    assert admitted == dict.fromkeys("abcd", 5)


def test_the_client_waits_out_the_rate_and_retires_an_account_out_of_quota(tmp_path):
    from actors.attacks.base import CollectingStream
    from actors.client import Client

    svc, writer, _ = _service(tmp_path, Limits(quota=40, rate=40.0, burst=16))
    images = np.random.default_rng(0).integers(0, 256, (200, 1, 28, 28), dtype=np.uint8)
    source = CollectingStream(images, np.arange(200))
    client = Client("act-0", source, ["k1", "k2"], "blocks", 200, 16, query=svc.query, solve=svc.solve)
    report = client.run()
    writer.close()
    assert report["limited"]["waits"] > 0 and report["limited"]["seconds"] > 0  # the bucket made it wait
    assert report["limited"]["quota_spent"] == 2 and sorted(report["burned"]) == ["a1", "a2"]
    assert sum(report["per_account"].values()) - report["refused"] == 80  # each account answered up to its quota
    assert report["unspent"] > 0 and len(source.transfer_set()[0]) == 80


def test_burst_below_max_images_is_a_config_error():
    with pytest.raises(ConfigError, match=r"serve.burst=8 is below serve.max_images=256"):
        config.load("distributed_knockoff", ["serve.burst=8", "serve.rate=10"])
    cfg = config.load("distributed_knockoff", ["serve.rate=10", "serve.quota=500", "serve.limit_by=cohort"])
    assert cfg.serve.limits() == Limits(quota=500, rate=10.0, burst=256, group="cohort")
    assert config.load("distributed_knockoff").serve.limits() is None

"""The detection tier under a real Serve app: many replicas and shards decide what one would, replay is exact, a
challenge can be solved through another replica, and state survives SIGKILL of a shard and of a replica."""

import os
import signal
import threading
import time

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
import torch

import analysis
from sim import data, models, pow, querylog, tier_actors
from sim.detectors import build
from sim.protocol import Account
from sim.service import VictimService
from sim.serving import VictimSpec, delete, deploy
from sim.summary import tier_line

from ..unit.test_link import _jbda_like

PRADA = {"delta": 0.95, "min_pool": 50}
LINK = {"every": 60, "min_queries": 10, "min_pool": 50}


def _model():
    torch.manual_seed(0)
    return models.build("lenet", (1, 28, 28), 10)


def _accounts(n=8):
    """Half attackers (JBDA-like steps around seeds), half benign (test images), in two cohorts."""
    return {f"key-{i}": Account(f"acct-{i}", "attacker" if i % 2 == 0 else "benign",
                                "jbda" if i % 2 == 0 else None, f"cohort-{i % 2}") for i in range(n)}


def _requests(keys, per_account=10, batch=8):
    """Each account's requests, in its own order: key -> list of uint8 batches."""
    ds = data.load("mnist5k")
    rng = np.random.default_rng(0)
    out = {}
    for i, (key, acct) in enumerate(sorted(keys.items())):
        if acct.role == "attacker":
            x, _ = _jbda_like(n_seeds=batch, steps=per_account, seed=i)
        else:
            x = ds.x_test[rng.choice(len(ds.x_test), per_account * batch, replace=False)]
        out[key] = [x[j:j + batch] for j in range(0, len(x), batch)]
    return out


def _spec(tmp_path, keys, detectors, rules, shards):
    model = _model()
    return VictimSpec(victim="tiered", run_id="t", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts=keys, detectors=detectors, rules=rules,
                      defense={"name": "identity"}, log_dir=str(tmp_path / "queries"), log_inputs=True,
                      max_images=16, shards=shards, state_dir=str(tmp_path / "tier"))


def _send_all(handle, requests, replies, delay=0.0):
    """One thread per account, each sending its requests in order (accounts interleave freely)."""
    def worker(key):
        for x in requests[key]:
            replies.setdefault(key, []).append(handle.query.remote(key, x, f"actor-{key}").result(timeout_s=120))
            time.sleep(delay)
    threads = [threading.Thread(target=worker, args=(k,)) for k in requests]
    for t in threads:
        t.start()
    return threads


@pytest.fixture()
def app(ray_serve):
    deployed = []

    def make(spec, replicas):
        deployed.append(spec)
        return deploy(spec, "tiered", replicas=replicas, replica_cpus=0.5)

    yield make
    for spec in deployed:
        delete(spec, "tiered")


def test_two_replicas_and_two_shards_flag_what_one_service_flags_and_replay_is_exact(app, tmp_path):
    keys = _accounts()
    dets = {"prada": {"kind": "prada", "params": PRADA},
            "cohort_prada": {"kind": "prada", "params": {**PRADA, "group": "cohort", "skip_repeats": True}},
            "link": {"kind": "link", "params": LINK}}
    rules = {"cohort_prada": {"group": "cohort"}}
    handle = app(_spec(tmp_path, keys, dets, rules, shards=2), replicas=2)
    requests, replies = _requests(keys), {}
    for t in _send_all(handle, requests, replies):
        t.join()
    assert all(r.status == 200 for rs in replies.values() for r in rs)

    table = querylog.read(str(tmp_path / "queries"))
    assert table.num_rows == 8 * 10 * 8 and len(set(table.column("writer").to_pylist())) == 2  # both replicas
    # the same queries per account, in the same order, through one in-process service with one shard
    reference = VictimService(model=_model(), victim="v", run_id="r", accounts=keys, input_shape=(1, 28, 28),
                              detectors={"prada": build("prada", **PRADA)})
    expected = {}
    for key, xs in requests.items():
        expected[keys[key].account_id] = np.concatenate([
            reference._detect(f"{key}-{i}", keys[key], None, x, _probs(reference, x))["prada"].flags
            for i, x in enumerate(xs)])
    rows = analysis.scored_rows(table)
    acct = np.asarray(rows.column("account_id").to_pylist())
    seq = rows.column("prada_seq").to_numpy()
    flags = rows.column("prada_flagged").to_numpy(zero_copy_only=False)
    for a, want in expected.items():
        mine = np.flatnonzero(acct == a)
        assert np.array_equal(flags[mine[np.argsort(seq[mine])]], want), a
    assert {f"acct-{i}" for i in (0, 2, 4, 6)} & {a for a, f in expected.items() if f.any()}  # it does flag
    # offline replay in each detector's per-key order gives back every online score and flag
    for name, group in (("prada", "account"), ("cohort_prada", "cohort")):
        params = dets[name]["params"]
        again = analysis.replay(table, "prada", {k: v for k, v in params.items() if k != "group"}, group, order=name)
        assert np.array_equal(again["flags"], rows.column(f"{name}_flagged").to_numpy(zero_copy_only=False)), name
        np.testing.assert_array_equal(np.float32(again["scores"]),
                                      np.float32(rows.column(f"{name}_score").to_numpy(zero_copy_only=False)))
    # linking, round by round as the linker took the queries in, each query with the verdict it got online
    rounds, as_of = (rows.column(f"link_{c}").to_numpy() for c in ("round", "as_of"))
    assert rounds.max() >= 5 and as_of.max() >= 4
    again = analysis.replay(table, "link", LINK, order="link")
    assert np.array_equal(again["flags"], rows.column("link_flagged").to_numpy(zero_copy_only=False))
    online = np.float32(rows.column("link_score").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(np.float32(again["scores"]), online)
    assert not np.isnan(online).all()


def _probs(service, x):
    from sim.training import predict_probs

    return predict_probs(service.model, x)


def test_a_challenge_issued_by_one_replica_is_solved_through_another(app, tmp_path):
    keys = {"key-0": Account("acct-0", "attacker", "jbda")}
    dets = {"msp": {"kind": "msp", "params": {"threshold": -1.0}}}  # every query is challenged
    rules = {"msp": {"action": "proof_of_work", "threshold": 0.0, "saturate": 1.0, "bits_min": 2, "bits_max": 2}}
    handle = app(_spec(tmp_path, keys, dets, rules, shards=2), replicas=2)
    imgs = data.load("mnist5k").x_test
    for i in range(12):
        first = handle.query.remote("key-0", imgs[i:i + 1], "a").result(timeout_s=60)
        assert first.status == 202
        counter, _ = pow.solve(first.challenge["nonce"], first.challenge["bits"])
        solved = handle.solve.remote("key-0", first.challenge["id"], counter, "a").result(timeout_s=60)
        assert solved.status == 200 and solved.answered.all()
    table = querylog.read(str(tmp_path / "queries"))
    writers = {}
    for row in table.select(["input_sha1", "resubmission", "writer"]).to_pylist():
        writers.setdefault(row["input_sha1"], {})[row["resubmission"]] = row["writer"]
    assert len(writers) == 12 and all(len(w) == 2 for w in writers.values())
    assert any(w[False] != w[True] for w in writers.values())  # issued by one replica, solved through the other


def test_a_tier_without_a_state_directory_removes_its_temporary_one(ray_serve, tmp_path):
    """A run whose run_dir no node can write to as a local path (s3://…) journals to a temporary directory on each
    shard's node: nobody could find it afterwards, so it goes with the tier."""
    import dataclasses

    keys = {"key-0": Account("acct-0", "benign")}
    spec = dataclasses.replace(_spec(tmp_path, keys, {"prada": {"kind": "prada", "params": PRADA}}, {}, shards=2),
                               state_dir=None)
    handle = deploy(spec, "untethered", replicas=1, replica_cpus=0.5)
    try:
        imgs = data.load("mnist5k").x_test
        assert handle.query.remote("key-0", imgs[:4], "a").result(timeout_s=60).status == 200
        temporary = tier_actors._TEMPORARY["untethered"]
        assert sorted(os.listdir(temporary)) == ["shard-0", "shard-1"]  # both shards journal there (one node)
    finally:
        delete(spec, "untethered")
    assert not os.path.exists(temporary) and "untethered" not in tier_actors._TEMPORARY


def test_state_survives_sigkill_of_a_shard_and_of_a_replica_mid_run(app, tmp_path):
    keys = _accounts(6)
    dets = {"prada": {"kind": "prada", "params": PRADA}}
    rules = {"prada": {"action": "refuse"}}
    handle = app(_spec(tmp_path, keys, dets, rules, shards=2), replicas=1)
    requests = _requests(keys, per_account=16)
    attacker = "key-0"
    for x in requests[attacker][:10]:  # until PRADA refuses it
        last = handle.query.remote(attacker, x, "a").result(timeout_s=60)
    assert last.status == 403 and "account flagged by prada" in last.reason
    victim_shard = tier_actors._actor(tier_actors.shard_name("tiered", tier_actors.owner("acct-0", 2)))
    pid = ray.get(victim_shard.stats.remote())["pid"]
    replies = {}
    rest = {k: (v[10:] if k == attacker else v) for k, v in requests.items()}
    threads = _send_all(handle, rest, replies, delay=0.02)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)  # the shard that owns the attacker's history, with requests in flight
    for t in threads:
        t.join()
    after = ray.get(victim_shard.stats.remote())
    assert after["pid"] != pid and (after["restored"]["snapshot"] or after["restored"]["changes"] > 0)
    shard = tier_actors.owner("acct-0", 2)  # and the run's summary says so
    assert f"; shard {shard} was restarted and restored its state (" in tier_line({"shards": 2, "per_shard": [
        after if i == shard else ray.get(tier_actors._actor(tier_actors.shard_name("tiered", i)).stats.remote())
        for i in range(2)]})
    assert all(r.status == 403 for r in replies[attacker])  # still refused: crashing the shard reset nothing
    assert all(len(r.answered) for rs in replies.values() for r in rs)  # every query got a verdict
    # the Serve replica now: its successor reaches the same tier, which still refuses the attacker
    os.kill(handle.info.remote().result()["pid"], signal.SIGKILL)
    reply = handle.query.remote(attacker, requests[attacker][0], "a").result(timeout_s=120)
    assert reply.status == 403
    table = querylog.read(str(tmp_path / "queries"))
    att = table.filter(pc.equal(table.column("account_id"), "acct-0"))
    assert att.num_rows == sum(len(x) for x in requests[attacker]) + len(requests[attacker][0])
    # no query was scored twice: each account's positions are 0..n-1 exactly
    rows = analysis.scored_rows(table)
    for a in {k.account_id for k in keys.values()}:
        seq = np.sort(rows.filter(pc.equal(rows.column("account_id"), a)).column("prada_seq").to_numpy())
        assert np.array_equal(seq, np.arange(len(seq))), a
    again = analysis.replay(table, "prada", PRADA, "account", order="prada")
    assert np.array_equal(again["flags"], rows.column("prada_flagged").to_numpy(zero_copy_only=False))


def test_crowd_on_a_tiny_budget(ray_serve, cache_dir, tmp_path):
    import sim
    from sim import config
    from sim.plan import make_plan

    # at its defaults: 16 attacker actors over 1,001 accounts and 8 benign users (the plan alone, no run)
    plan = make_plan(config.load("crowd"), data.load("mnist5k"))
    attackers = [c for c in plan.clients if c.attacker is not None]
    assert len(attackers) == 16 and sum(len(c.accounts) for c in attackers) == 1001
    assert len(plan.clients) - len(attackers) == 8
    # run with fewer actors and tiny budgets (every actor is a process, seconds to start on two cores, and those of
    # JBDA and adaptive Knockoff import torch and train as they query): one attacker over two actors, the two benign
    # accounts in one
    small = [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", "victim.epochs=2", "benign.queries=30",
             "benign.users=1", "benign.accounts=2", "attackers.single.budget=96",
             "attackers.knockoff_sybils.budget=300", "attackers.knockoff_sybils.accounts=100",
             "attackers.jbda_sybils.budget=300", "attackers.jbda_sybils.accounts=100",
             "attackers.jbda_sybils.jacobian.substitute_epochs=2", "attackers.adaptive.budget=200",
             "attackers.adaptive.accounts=20", "detectors.link.every=200", "attackers.knockoff_sybils.actors=2",
             *(f"attackers.{a}.actors=1" for a in ("jbda_sybils", "adaptive")),
             *(f"attackers.{a}.replica.epochs=1" for a in ("single", "knockoff_sybils", "jbda_sybils", "adaptive"))]
    s = sim.run("crowd", small, quiet=True)
    assert s.queries.logged == s.queries.total == 96 + 300 + 300 + 200 + 2 * 30
    tier = s.serve.tier
    assert tier["shards"] == 2 and s.serve.replicas == 2 and 1 <= s.serve.writers <= 2  # no replica replaced
    assert all(sh["link_rounds"]["link"] >= 1 for sh in tier["per_shard"])  # linking ran (956 queries, every 200)
    per_shard = [sh["keys"]["prada"] for sh in tier["per_shard"]]
    assert all(k > 0 for k in per_shard) and sum(per_shard) == 1 + 100 + 100 + 20 + 2  # every account, once
    table = analysis.read_run(str(tmp_path / "run"))
    rows = analysis.scored_rows(table)
    again = analysis.replay(table, "prada", s.detection["pooled_prada"].params, "cohort",
                            order="pooled_prada")  # each cohort's queries in the order its shard saw them
    assert np.array_equal(again["flags"], rows.column("pooled_prada_flagged").to_numpy(zero_copy_only=False))
    for a in s.attackers:
        assert set(a.accounts_flagged_by) == {"prada", "pooled_prada", "link"}
    assert s.attacker("jbda_sybils").accounts_flagged_by["prada"] == 0  # 3 queries per account: never judged


def test_autoscaling_adds_replicas_under_load_and_the_tier_serves_them_all(ray_serve, tmp_path):
    from ray import serve

    keys = _accounts(8)
    spec = _spec(tmp_path, keys, {"prada": {"kind": "prada", "params": PRADA}}, {}, shards=2)
    auto = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
            "metrics_interval_s": 0.5, "look_back_period_s": 1}
    handle = deploy(spec, "autoscaled", replica_cpus=0.1, autoscaling=auto)  # small: placement never holds it back
    try:
        def running():
            states = serve.status().applications["autoscaled"].deployments["victim"].replica_states
            return states.get("RUNNING", 0)

        assert running() == 1
        stop, replies = threading.Event(), []

        def load(key):
            x = _requests({key: keys[key]}, per_account=2)[key][0]
            while not stop.is_set():
                replies.append(handle.query.remote(key, x, "load").result(timeout_s=60).status)

        threads = [threading.Thread(target=load, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while running() < 2 and time.time() < deadline:
            time.sleep(0.5)
        grown, seen = running(), serve.status().applications["autoscaled"].deployments["victim"]
        stop.set()
        for t in threads:
            t.join()
        assert grown == 2, (seen.replica_states, seen.message, ray.available_resources(), len(replies))
        assert set(replies) == {200}
        writers = set(querylog.read(str(tmp_path / "queries")).column("writer").to_pylist())
        assert len(writers) == 2  # the new replica served too, through the same tier
    finally:
        delete(spec, "autoscaled")
        handle.shutdown()  # its router reports load to Serve's autoscaler until told to stop

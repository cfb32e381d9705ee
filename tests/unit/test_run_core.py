"""The Ray-free run core: planning, summarising and the typed summary, with the real victim service in-process."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import sim
from actors.client import Client
from actors.replica import score, train_replica, undefended_targets
from sim import config, data, defenses, detection, models, querylog, summary, zoo
from sim.errors import ConfigError
from sim.plan import derive_seed, make_plan
from sim.service import VictimSpec, build_service
from sim.summarize import Outcome, evaluate_defense, log_columns, summarize
from sim.training import predict_probs

V1 = Path(__file__).parent.parent / "data" / "summary_v1.json"
def tiny(*attackers: str) -> list[str]:
    return ["victim.epochs=1", "benign.queries=32", *[f"attackers.{aid}.{k}" for aid in attackers
                                                       for k in ("budget=96", "replica.epochs=1", "batch_size=32")]]


def test_plan_splits_accounts_budget_and_actors_and_is_seeded():
    cfg = config.load("distributed_knockoff", ["attackers.distributed.budget=1498"])
    ds = data.load("mnist5k")
    plan = make_plan(cfg, ds)
    dist = plan.of(attacker="distributed")
    assert [c.budget for c in dist] == [375, 375, 374, 374] and [len(c.accounts) for c in dist] == [5, 5, 5, 5]
    assert len({a for c in dist for a in c.accounts}) == 20 and len(plan.of(role="benign")) == 2
    assert len(plan.accounts) == 1 + 20 + 2 and all(len(c.keys) == len(c.accounts) for c in plan.clients)
    assert {plan.accounts[k].cohort for c in dist for k in c.keys} == {"distributed-c0"}
    assert dist[0].seed == derive_seed(cfg.seed, "split", "distributed-actor0")
    # each actor its own shard of the pool: no image twice over the attacker
    sent = np.concatenate([c.source.propose(c.budget) for c in dist])
    assert len({img.tobytes() for img in sent}) == 1498
    again = make_plan(cfg, ds)  # the same seed, the same plan
    assert list(again.accounts) == list(plan.accounts)
    (first,), (second,) = again.of(attacker="single"), plan.of(attacker="single")
    assert np.array_equal(first.source.propose(8), second.source.propose(8))


def test_plan_holds_out_the_jacobian_seeds_and_checks_the_pool_first():
    cfg = config.load("distributed_jbda", ["attackers.jbda.jacobian.seed_size=30",
                                           "attackers.distributed.jacobian.seed_size=40"])
    plan = make_plan(cfg, data.load("mnist5k"))
    assert 60 <= len(plan.held_out) <= 70 and len(plan.eval_indices(1000)) == 1000 - len(plan.held_out)
    too_big = config.load("single_knockoff", ["attackers.single.budget=5000"])
    with pytest.raises(Exception, match="attackers.single.budget=5000 exceeds the 1797 images of pool 'digits'"):
        make_plan(too_big, data.load("mnist5k"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny mad_vs_knockoff run without Ray: plan, detectors, the victim service writing a real log, the
    clients driven in-process, replicas trained here; what the engine hands to :func:`summarize`."""
    root = tmp_path_factory.mktemp("run")
    cfg = config.load("mad_vs_knockoff", [f"cache_dir={root / 'cache'}", f"run_dir={root / 'run'}",
                                          *tiny("knockoff", "label_only"), "detectors.msp.enabled=true"])
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    ds = victim.dataset
    plan = make_plan(cfg, ds)
    ctx = zoo.ModelContext.of(cfg, victim)
    dets, defense_models = detection.setup(cfg, ctx), defenses.prepare(cfg.defense.spec(), ctx)
    log_dir = str(root / "run" / "queries")
    spec = VictimSpec(victim="victim", run_id="r", model=models.to_bytes(victim.model, "lenet", ds.input_shape, 10),
                      input_shape=ds.input_shape, accounts=plan.accounts, detectors=dets.detectors, rules=dets.rules,
                      detector_models=dets.models, defense=cfg.defense.spec(), defense_models=defense_models,
                      log_dir=log_dir, log_inputs=True, max_images=256)
    svc = build_service(spec, "w0")
    for c in plan.clients:
        c.result = Client(c.actor_id, c.source, c.keys, c.split, c.budget, c.batch_size, seed=c.seed,
                          query=svc.query, solve=svc.solve, **c.strategy or {}).run()
        c.result["node_id"] = "local"
    svc.writer.close()
    logged = querylog.compact(log_dir)
    table = querylog.read(log_dir, columns=[*log_columns(dets.detectors), "clean_probs"])
    clean_test = predict_probs(victim.model, ds.x_test)
    keep = plan.eval_indices(len(ds.x_test))
    eval_set = (ds.x_test[keep], ds.y_test[keep], clean_test[keep].argmax(1))
    replicas = {}
    for aid, att in cfg.attackers.items():
        (client,) = plan.of(attacker=aid)
        x, y = client.source.transfer_set()
        clean = querylog.clean_answers(table, set(client.accounts))
        for key, targets in ((aid, y), (f"{aid}:undefended", undefended_targets(x, clean))):
            model = train_replica(x, targets, arch="lenet", input_shape=ds.input_shape, num_classes=10,
                                  cfg=att.replica, seed=0)
            replicas[key] = summary.Replica(**score(model, eval_set))
    defense = defenses.from_spec(cfg.defense.spec(), victim=victim.model, models=defense_models)
    outcome = Outcome(run_id="r", victim=victim, plan=plan, replicas=replicas, log=table, logged=logged,
                      defended=evaluate_defense(defense, clean_test, ds.x_test, ds.y_test), detectors=dets.info)
    return cfg, outcome, clean_test


def test_the_baseline_reads_the_logs_clean_answers(finished_run):
    cfg, out, _ = finished_run
    (client,) = out.plan.of(attacker="knockoff")
    x, returned = client.source.transfer_set()
    clean = undefended_targets(x, querylog.clean_answers(out.log, set(client.accounts)))
    victim = out.victim.model
    np.testing.assert_allclose(clean, predict_probs(victim, x), atol=1e-5)  # what the victim answers, undefended
    assert np.abs(clean - returned).sum(1).mean() == pytest.approx(0.8, abs=0.05)  # MAD moved them by eps
    with pytest.raises(KeyError):  # only this attacker's own queries
        undefended_targets(x, querylog.clean_answers(out.log, {"benign-0"}))


def test_attempts_refused_over_the_rate_are_no_refused_queries_and_the_hardest_puzzle_is_the_maximum(finished_run):
    """The summary's refused queries leave out the attempts a rate limit refused (the clients sent them again), which
    it counts apart; proof of work adds up puzzles, hashes and seconds but takes the hardest puzzle's bits."""
    import dataclasses

    import pyarrow as pa

    from sim.summarize import pow_paid

    cfg, out, _ = finished_run
    rows = out.log.slice(0, 3).to_pydict()
    rows.update(action=["refused"] * 3, refusal_reason=[querylog.RATE] * 3)
    limited = dataclasses.replace(out, log=pa.concat_tables([out.log, pa.Table.from_pydict(rows, out.log.schema)]))
    before, after = summarize(cfg, out).queries, summarize(cfg, limited).queries
    assert (after.refused, after.rate_limited) == (before.refused, before.rate_limited + 3)
    paid = pow_paid([{"pow": {"puzzles": 2, "queries": 8, "hashes": 300, "seconds": 0.1004, "max_bits": 12}},
                     {"pow": {"puzzles": 1, "queries": 4, "hashes": 100, "seconds": 0.2, "max_bits": 9}}, {}])
    assert paid.model_dump() == {"puzzles": 3, "queries": 12, "hashes": 400, "seconds": 0.3, "max_bits": 12}


def test_summarize_adds_up_what_the_clients_the_log_and_the_detectors_say(finished_run):
    cfg, out, clean_test = finished_run
    s = summarize(cfg, out)
    assert s.version == summary.SUMMARY_VERSION and s.scenario == "mad_vs_knockoff"
    assert s.queries.total == 96 + 96 + 2 * 32 == s.queries.logged == s.queries.answered
    assert [a.id for a in s.attackers] == ["knockoff", "label_only"]
    k = s.attacker("knockoff")
    assert k.queries == 96 and k.accounts_used == 1 and k.params["pool"] == "digits" and k.labels == "soft"
    assert k.replica == out.replicas["knockoff"] and k.undefended == out.replicas["knockoff:undefended"]
    assert s.defense.name == "mad" and s.defense.params["eps"] == 0.8
    assert s.defense.params["objective"] == "angle" and s.defense.params["seed"] == 0  # defaults recorded too
    assert s.defense.test_l1_mean == pytest.approx(0.8, abs=0.02) and s.defense.by_role["benign"].answered == 64
    assert s.victim.defended_test_accuracy == out.defended["defended_test_accuracy"]
    assert s.evaluation.replica_test_images == 1000
    assert set(s.detection) == {"prada", "msp"}
    prada, msp = s.detection["prada"], s.detection["msp"]
    assert prada.stateful and prada.kind == "prada" and prada.threshold == pytest.approx(0.05)
    assert prada.attacker_accounts == 2 and prada.benign_accounts == 2 and prada.group == "account"
    assert not msp.stateful and msp.calibration["target_fpr"] == 0.05
    assert msp.params == {"threshold": msp.threshold, "model": "victim"}
    assert msp.flagged_queries["benign_queries_total"] == 64 and msp.query_level.auroc is not None
    assert sum(c.queries for c in s.clients) == s.queries.total and s.ray.client_nodes == 1
    text = summary.format_summary(s)
    assert "knockoff      knockoff          1      1       96" in text
    assert "msp (threshold=" in text and "of attacker queries" in text  # stateless: flagged query rates
    assert "model=victim; action=answer): flagged" in text  # and no group: it keeps no history per key
    assert "defense mad (eps=0.8, norm=l1, jacobian=last_layer, seed=0, objective=angle): " in text
    assert "prada (delta=0.95, min_pool=100, skip_repeats=False; action=answer, group=account)" in text
    assert "accounts u/n" not in text and s.victim.train_threads is None  # the default one thread
    log = out.log.to_pydict()
    flagged = {d: {a for a, f in zip(log["account_id"], log[f"{d}_flagged"]) if f} for d in ("prada", "msp")}
    mine = set(out.plan.of(attacker="knockoff")[0].accounts)
    assert re.search(rf"accounts flagged by +prada +msp\nknockoff +{len(flagged['prada'] & mine)} +"
                     rf"{len(flagged['msp'] & mine)}  of 1\n", text)
    benign = {a for a, r in zip(log["account_id"], log["role"]) if r == "benign"}
    assert flagged["msp"] & benign  # msp flags single queries of honest users too: it flags no account for good
    assert k.accounts_flagged == len(flagged["prada"] & mine) and s.benign.accounts_flagged == len(
        flagged["prada"] & benign)
    assert "flags a whole cohort" not in text  # PRADA is keyed by account here
    shards = [{"keys": {"prada": 3}, "restored": {"snapshot": False, "changes": 0}},
              {"keys": {"prada": 2}, "restored": {"snapshot": True, "changes": 4}}]
    restarted = s.model_copy(update={"serve": summary.Serve(app="victim", tier={"shards": 2, "per_shard": shards})})
    assert ("detection tier: 2 shards; keys per shard: prada 3/2; shard 1 was restarted and restored its state (a "
            "snapshot and 4 journaled changes)") in summary.format_summary(restarted)
    replaced = s.model_copy(update={"serve": summary.Serve(app="victim", replicas=2, writers=3)})
    assert ("serve: 3 replica processes wrote the log for serve.replicas=2: 1 replaced after a crash (each one's rows "
            "are under its own writer)") in summary.format_summary(replaced)
    assert "replaced after a crash" not in summary.format_summary(s.model_copy(update={"serve": summary.Serve(
        app="victim", replicas=None, writers=3)}))  # autoscaling: more writers than the first replicas is normal
    one = s.model_copy(update={"serve": summary.Serve(app="victim", tier={"shards": 1, "per_shard": shards[1:]})})
    assert "shard 0 was restarted" in summary.format_summary(one)  # one shard: said only when it restarted
    assert "detection tier" not in summary.format_summary(s.model_copy(update={"serve": summary.Serve(
        app="victim", tier={"shards": 1, "per_shard": shards[:1]})}))
    cohort = {**s.detection, "prada": s.detection["prada"].model_copy(update={"group": "cohort"})}
    assert "(prada flags a whole cohort (a sign-up batch) at once: an account counts once it sends a query after " \
           "that flag)" in summary.format_summary(s.model_copy(update={"detection": cohort}))
    given = s.model_copy(update={"victim": s.victim.model_copy(update={"source": "checkpoint", "trained_now": False})})
    assert f"victim lenet on mnist5k (trained elsewhere): test accuracy {s.victim.test_accuracy:.4f} (given: " in (
        summary.format_summary(given))
    assert "(standard training, 2 torch threads)" in summary.format_summary(
        s.model_copy(update={"victim": s.victim.model_copy(update={"train_threads": 2})}))
    two = cfg.model_copy(update={"victim": cfg.victim.model_copy(update={"train_threads": 2})})
    assert summarize(two, out).victim.train_threads == 2
    fewer = s.model_copy(update={"attackers": [k.model_copy(update={"accounts": 4}), *s.attackers[1:]]})
    text = summary.format_summary(fewer)
    assert "knockoff      knockoff        1/4      1       96" in text and "accounts u/n: u of the" in text
    limited = s.model_copy(update={"queries": s.queries.model_copy(update={"rate_limited": 12})})
    assert " 0 refused (and 12 attempts over the rate limit, sent again), " in summary.format_summary(limited)


def test_a_summary_round_trips_and_version_1_still_reads(finished_run, tmp_path):
    cfg, out, _ = finished_run
    s = summarize(cfg, out)
    s.write(str(tmp_path))
    assert summary.read(str(tmp_path)) == s

    old = json.loads(V1.read_text())
    assert "version" not in old and old["attackers"][0]["replica_test_accuracy"] is not None
    v1 = summary.parse(old)
    assert v1.version == 2
    a = v1.attacker("knockoff")
    with pytest.raises(ConfigError, match="attacker 'nobody' is not in run .*; expected one of: knockoff"):
        v1.attacker("nobody")
    assert a.replica.test_accuracy == old["attackers"][0]["replica_test_accuracy"]
    assert a.undefended.fidelity == old["attackers"][0]["replica_fidelity_undefended"]
    assert a.params == {"pool": "digits"} and v1.detection["prada"].stateful
    assert v1.detection["prada"].threshold == pytest.approx(1 - old["detection"]["prada"]["params"]["delta"])
    assert v1.benign.accounts_flagged is None and "benign" in summary.format_summary(v1)


def test_what_is_not_a_readable_summary(tmp_path):
    """summary.read gives None (a report then comes from the log alone); sim.read_summary (summary.load) says why."""
    assert summary.read(str(tmp_path)) is None  # none at all
    with pytest.raises(ConfigError, match=r"run_dir='.*' has no summary.json; expected the directory of a finished"):
        sim.read_summary(str(tmp_path / "nowhere"))
    summary.write_interrupted(str(tmp_path), "r1", "single_knockoff", "querying", 10)
    assert summary.read(str(tmp_path)) is None
    with pytest.raises(ConfigError, match="run r1 was interrupted during querying: it has no results"):
        sim.read_summary(str(tmp_path))
    summary.write_interrupted(str(tmp_path), "r1", "single_knockoff", "evaluation", 0, error="the URL is gone")
    with pytest.raises(ConfigError, match=r"run r1 was interrupted during evaluation \(the URL is gone\): it has no"):
        sim.read_summary(str(tmp_path))  # why it stopped, as the summary keeps it
    assert {sim.RunFailed, sim.Interrupted} <= {getattr(sim, n) for n in sim.__all__ if n[0].isupper()}
    (tmp_path / "summary.json").write_text('{"run_id": "x"}')
    assert summary.read(str(tmp_path)) is None  # not a run summary
    with pytest.raises(summary.SummaryError, match="summary version 9 is newer than this mlsim reads"):
        summary.parse({"version": 9})
    with pytest.raises(summary.SummaryError, match="summary version '2' is not an integer"):
        summary.parse({"version": "2"})


@pytest.mark.parametrize("name", config.scenario_names())
def test_every_shipped_scenario_can_make_its_plan_at_its_defaults(name):
    """Budgets, pools and seeds fit together as shipped (a pool smaller than a budget fails here, not mid-study)."""
    from sim.errors import DataError

    cfg = config.load(name)
    try:
        ds = data.load(cfg.victim.dataset)
    except DataError as exc:  # Fashion-MNIST where the Debian package is missing
        pytest.skip(str(exc))
    plan = make_plan(cfg, ds)
    for aid, att in cfg.attackers.items():
        assert sum(c.budget for c in plan.of(attacker=aid)) == att.budget


def test_a_response_prints_with_its_settings_and_a_chain_by_member():
    base = dict(kind="prada", stateful=True, group="account", params={}, flagged_accounts=0,
                flagged_attacker_accounts=0, flagged_benign_accounts=0, attacker_accounts=1, benign_accounts=0)
    perturb = summary.Detector(action="perturb", response={"name": "mad", "eps": 0.8, "seed": 0}, **base)
    assert summary.action_text(perturb) == "perturb through mad (eps=0.8, seed=0)"
    pow_ = summary.Detector(action="proof_of_work", response={"bits_min": 8, "bits_max": 16, "saturate": None}, **base)
    assert summary.action_text(pow_) == "proof_of_work of 8 to 16 bits"
    assert summary.action_text(summary.Detector(action="refuse", **base)) == "refuse"
    chain = {"reverse_sigmoid": {"beta": 0.3, "gamma": 0.5}, "rounding": {"decimals": 1}}
    assert summary.params_text(chain) == "reverse_sigmoid: beta=0.3, gamma=0.5; rounding: decimals=1"


def test_a_refused_client_stops_the_run_with_the_senders_mistake_or_the_victims():
    from actors.client import VictimRefused
    from sim.engine import _stopped, _VictimStopped
    from sim.errors import SimError

    plan = make_plan(config.load("distributed_knockoff"), data.load("mnist5k"))
    actor = plan.of(attacker="distributed")[0].actor_id
    bad = _stopped(plan, VictimRefused(actor, 400, "images shape (64, 3, 5, 5) is wrong; expected (N, 1, 28, 28)"))
    assert isinstance(bad, SimError) and str(bad) == (
        f"attackers.distributed.attack: the victim refused the images of actor {actor} (images shape (64, 3, 5, 5) "
        f"is wrong; expected (N, 1, 28, 28)); expected images the victim takes")
    benign = plan.of(role="benign")[0].actor_id
    assert str(_stopped(plan, VictimRefused(benign, 400, "x"))).startswith("benign: the victim refused")
    down = _stopped(plan, VictimRefused(actor, 503, "the query log cannot be written"))
    assert isinstance(down, _VictimStopped) and str(down) == "the victim answered 503: the query log cannot be written"

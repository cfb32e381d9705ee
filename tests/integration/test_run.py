import os

import pyarrow.compute as pc
import pytest
import yaml

import analysis
import sim
from sim.summary import format_summary


def test_distributed_knockoff_end_to_end(ray_serve, small_overrides, tmp_path):
    overrides = small_overrides + ["attackers.distributed.budget=160", "attackers.distributed.replica.epochs=8",
                                   "attackers.single.replica.epochs=8", "attackers.distributed.batch_size=4"]
    s = sim.run("distributed_knockoff", overrides, quiet=True)
    run_dir = str(tmp_path / "run")

    assert 0.5 < s.victim.test_accuracy <= 1
    q = s.queries
    assert q.total == 160 + 160 + 2 * 40
    assert q.logged == q.total == q.answered + q.refused
    single, dist = s.attacker("single"), s.attacker("distributed")
    assert single.accounts == 1 and dist.accounts == 20 and dist.actors == 4
    for a in s.attackers:
        assert a.attack == "knockoff" and a.queries == 160 and a.params["pool"] == "digits"
        # 160 soft-labelled digits already teach a replica far more than chance (0.1)
        assert a.replica.test_accuracy > 0.3 and a.replica.fidelity > 0.3
        assert a.undefended is None  # no defense: no undefended twin
    prada = s.detection["prada"]
    assert prada.attacker_accounts == 21 and prada.benign_accounts == 2
    assert prada.flagged_accounts == prada.flagged_attacker_accounts + prada.flagged_benign_accounts
    assert prada.flagged_benign_accounts == 0 == s.benign.accounts_flagged  # 40 test images each: too few to flag
    assert prada.flagged_attacker_accounts == sum(a.accounts_flagged for a in s.attackers)
    assert prada.stateful and prada.threshold == pytest.approx(0.05)
    # the distributed attacker's 8 queries per account never reach PRADA's pool of 50
    assert dist.accounts_flagged == 0
    assert s.wall_seconds > 0 and s.version == 2

    # the files a run leaves
    assert sim.read_summary(run_dir) == s
    resolved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert resolved["run_dir"] == run_dir and resolved["attackers"]["distributed"]["accounts"] == 20

    # the log agrees with what every actor says it sent, account by account
    table = analysis.read_run(run_dir)
    assert table.num_rows == q.total
    logged = analysis.per_account_counts(table)
    sent = {}
    for c in s.clients:
        for acct, n in c.per_account.items():
            sent[acct] = sent.get(acct, 0) + n
    assert logged == sent
    assert len([a for a in logged if a.startswith("distributed-")]) == 20
    assert all(logged[a] == 8 for a in logged if a.startswith("distributed-"))  # round robin: 160 / 20
    # each distributed actor used only its own accounts
    dist = [c for c in s.clients if c.attacker == "distributed"]
    assert len(dist) == 4 and sum(len(c.per_account) for c in dist) == 20
    # ground truth and per-account indices
    roles = pc.value_counts(table.column("role")).to_pylist()
    assert {r["values"]: r["counts"] for r in roles} == {"attacker": 320, "benign": 80}
    benign = table.filter(pc.equal(table.column("account_id"), "benign-0"))
    assert sorted(benign.column("query_index").to_pylist()) == list(range(40))
    assert table.column("input").null_count == 0


def test_prada_refuse_action_shows_in_the_summary(ray_serve, small_overrides):
    # delta = 1 flags an account as soon as PRADA has a score, so its later queries are refused
    overrides = small_overrides + ["detectors.prada.action=refuse", "detectors.prada.delta=1.0",
                                   "detectors.prada.min_pool=10", "benign.users=0"]
    s = sim.run("single_knockoff", overrides, quiet=True)
    single = s.attackers[0]
    assert single.accounts_flagged == 1 and 0 < single.refused < single.queries
    assert s.queries.refused == single.refused
    assert s.queries.logged == s.queries.total == 160
    assert single.replica is not None  # trained on the answered part only


def test_a_perturbing_response_gets_an_undefended_baseline_and_names_its_defense(ray_serve, small_overrides):
    # no output defense for honest users, but flagged accounts' answers go through MAD: the replica's loss to it
    # is only known beside the replica the same queries would have given undefended
    overrides = small_overrides + ["detectors.prada.action=perturb", "detectors.prada.delta=1.0",
                                   "detectors.prada.min_pool=10", "detectors.prada.perturb.eps=0.8", "benign.users=0"]
    s = sim.run("single_knockoff", overrides, quiet=True)
    single = s.attackers[0]
    assert s.defense.name == "identity" and 0 < s.queries.perturbed < s.queries.answered
    assert single.replica is not None and single.undefended is not None and single.replica.gradient_angle is not None
    prada = s.detection["prada"]
    assert prada.response["name"] == "mad" and prada.response["eps"] == 0.8 and prada.response["objective"] == "angle"
    assert "action=perturb through mad (eps=0.8, norm=l1" in format_summary(s)

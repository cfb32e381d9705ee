"""Defenses in the serving path: a short MAD run end to end, and live reconfiguration on Serve."""

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

import analysis
import sim
from sim import data, models
from sim.errors import ConfigError
from sim.protocol import Account
from sim.serving import VictimSpec, delete, deploy, update_defense


def test_mad_vs_knockoff_hurts_the_replica_not_the_honest_users(ray_serve, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    s = sim.run("mad_vs_knockoff", [
        f"cache_dir={cache_dir}", f"run_dir={run_dir}", "benign.queries=40",  # the scenario's 10-epoch victim
        "attackers.knockoff.budget=400", "attackers.label_only.budget=400",
        "attackers.knockoff.replica.epochs=6", "attackers.label_only.replica.epochs=6",
    ], quiet=True)
    v, d = s.victim, s.defense
    eps = d.params["eps"]
    assert d.name == "mad" and d.params == {"eps": eps, "norm": "l1", "jacobian": "last_layer", "seed": 0,
                                            "objective": "angle"}  # the defaults recorded too
    assert v.test_accuracy - v.defended_test_accuracy < 0.02  # honest users barely notice
    soft, hard = s.attacker("knockoff"), s.attacker("label_only")
    assert soft.labels == "soft" and soft.undefended.test_accuracy > 0.5
    assert soft.replica.test_accuracy < soft.undefended.test_accuracy
    assert hard.labels == "hard" and hard.undefended is not None

    # the log: per query, the L1 distortion (eps unless the vertex was closer) and whether top-1 changed
    table = analysis.read_run(str(run_dir))
    answered = table.filter(pc.equal(table.column("action"), "answered"))
    clean = np.array(answered.column("clean_probs").to_pylist())
    returned = np.array(answered.column("returned_probs").to_pylist())
    l1 = answered.column("defense_l1").to_numpy()
    np.testing.assert_allclose(l1, np.abs(returned - clean).sum(1), atol=1e-5)
    assert (l1 <= eps + 1e-4).all() and np.mean(np.abs(l1 - eps) < 1e-3) > 0.9
    changed = answered.column("top1_changed").to_numpy(zero_copy_only=False)
    assert np.array_equal(changed, returned.argmax(1) != clean.argmax(1))
    assert d.top1_preserved_rate == pytest.approx(1 - changed.mean(), abs=1e-4)
    assert d.l1_mean == pytest.approx(l1.mean(), abs=1e-4)
    # the report shows what the defense denied each attacker: its replica beside the undefended one
    text = open(analysis.write_report(str(run_dir))).read()
    assert "| replica acc % | fidelity % | undefended acc % | PoW s |" in text
    row = next(line for line in text.splitlines() if line.startswith("| knockoff | knockoff |"))
    assert f"| {100 * soft.replica.test_accuracy:.1f} |" in row and f"| {100 * soft.undefended.test_accuracy:.1f} |" \
        in row


@pytest.fixture()
def victim_app(ray_serve, tmp_path):

    torch.manual_seed(0)
    model = models.build("lenet", (1, 28, 28), 10)
    spec = VictimSpec(victim="defvictim", run_id="t", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts={"key": Account("acct", "external")}, detectors={},
                      rules={}, defense={"name": "identity"}, log_dir=str(tmp_path / "queries"),
                      log_inputs=False, max_images=16)
    handle = deploy(spec, "defvictim")
    yield spec, handle, str(tmp_path / "queries")
    delete(spec, "defvictim")


def test_defense_changes_live_without_restarting_the_replica(victim_app):
    spec, handle, log_dir = victim_app
    x = data.load("mnist5k").x_test[:8]
    before = handle.info.remote().result()
    clean = handle.query.remote("key", x).result().probs
    assert before["defense"] == {"name": "identity"}

    spec = update_defense(spec, "defvictim", {"name": "top_k", "k": 2})
    after = handle.info.remote().result()
    assert after["pid"] == before["pid"] and after["writer"] == before["writer"]  # same replica, same log
    assert after["defense"] == {"name": "top_k", "k": 2}
    topk = handle.query.remote("key", x).result().probs
    assert ((topk > 0).sum(1) <= 2).all()
    np.testing.assert_array_equal(topk.argmax(1), clean.argmax(1))

    with pytest.raises(ConfigError, match="defense.k must be an integer >= 1, got 0"):
        update_defense(spec, "defvictim", {"name": "top_k", "k": 0})
    with pytest.raises(ConfigError, match="adaptive_misinformation needs its trained misinformation model"):
        update_defense(spec, "defvictim", {"name": "adaptive_misinformation"})
    assert handle.info.remote().result()["defense"] == {"name": "top_k", "k": 2}  # unchanged

    update_defense(spec, "defvictim", {"name": "mad", "eps": 0.3})  # a defense that builds a surrogate
    mad = handle.query.remote("key", x).result().probs
    np.testing.assert_allclose(np.abs(mad - clean).sum(1), 0.3, atol=1e-4)
    assert handle.info.remote().result()["pid"] == before["pid"]

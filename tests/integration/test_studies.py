"""The seed studies' scenarios, tiny, through Serve: a quantized (DivQAT) victim, an adversarially trained one, and
MAD against the paper's attacker countermeasures."""

import numpy as np
import pyarrow.compute as pc

import analysis
import sim
from sim import config, zoo
from sim.training import predict_probs


def _tiny(attackers, budget, epochs=2):
    return [item for aid in attackers for item in (f"attackers.{aid}.budget={budget}",
                                                   f"attackers.{aid}.replica.epochs={epochs}")]


def test_a_quantized_victim_is_what_serve_runs_and_the_summary_reports(ray_serve, cache_dir, tmp_path):
    overrides = [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", "victim.epochs=2", "victim.quant.epochs=1",
                 "benign.queries=40", "robustness.samples=100", *_tiny(["knockoff", "label_only"], 160)]
    s = sim.run("quantized_vs_knockoff", overrides, quiet=True)
    v = s.victim
    assert v.quantization == "divqat" and v.quant["divqat"] == {"alpha": 0.5, "kl_cap": 5.0}
    assert v.size_bytes < v.float_size_bytes / 3 and v.latency_ms > 0 and v.float_latency_ms > 0
    assert abs(v.test_accuracy - v.float_test_accuracy) < 0.05 and 0 <= v.robust_accuracy <= v.test_accuracy
    cfg = config.load("quantized_vs_knockoff", overrides)
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)  # from the cache, as the run had it
    table = analysis.read_run(str(tmp_path / "run"))
    answered = table.filter(pc.equal(table.column("action"), "answered")).slice(0, 64)
    images = np.stack([np.frombuffer(b, np.uint8) for b in answered.column("input").to_pylist()])
    images = images.reshape(-1, *victim.dataset.input_shape)
    served = np.array(answered.column("clean_probs").to_pylist())
    np.testing.assert_allclose(served, predict_probs(victim.model, images), atol=1e-5)  # the int8 model answered
    assert np.abs(served - predict_probs(victim.float_model, images)).max() > 1e-3  # not the float one
    for a in s.attackers:
        assert a.replica.robust_accuracy is not None and a.replica.gradient_angle is None  # no output defense


def test_adversarial_victim_reports_robust_accuracy_of_victim_and_replicas(ray_serve, cache_dir, tmp_path):
    s = sim.run("adversarial_victim", [
        f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", "victim.epochs=1", "victim.adversarial.steps=2",
        "victim.adversarial.step=0.05", "benign.users=1", "benign.queries=40", "robustness.samples=100",
        "attackers.jbda.jacobian.substitute_epochs=1", "attackers.jbda_500.jacobian.substitute_epochs=1",
        "attackers.jbda.jacobian.rounds=1", "attackers.jbda_500.jacobian.rounds=1",
        "attackers.jbda.jacobian.seed_size=32", "attackers.jbda_500.jacobian.seed_size=32",  # a round within 128
        *_tiny(["knockoff", "knockoff_500", "jbda", "jbda_500"], 128, epochs=1)], quiet=True)
    assert s.victim.training == "adversarial" and s.victim.adversarial["eps"] == 0.1
    assert 0 <= s.victim.robust_accuracy <= s.victim.test_accuracy
    assert {a.id for a in s.attackers} == {"knockoff", "knockoff_500", "jbda", "jbda_500"}
    for a in s.attackers:
        assert 0 <= a.replica.robust_accuracy <= 1 and a.undefended is None


def test_mad_evasion_measures_every_countermeasure_and_the_gradient_angle(ray_serve, cache_dir, tmp_path):
    attackers = ["knockoff", "argmax", "arch", "optimizer", "repeats", "augment"]
    s = sim.run("mad_evasion", [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", "benign.users=0",
                                "robustness.enabled=false", *_tiny(attackers, 128)], quiet=True)
    by_id = {a.id: a for a in s.attackers}
    assert list(by_id) == attackers
    assert by_id["argmax"].labels == "hard" and by_id["repeats"].params["sample_with_replacement"]
    for a in s.attackers:
        assert a.replica is not None and a.undefended is not None and a.replica.robust_accuracy is None
        angle = a.replica.gradient_angle
        assert len(angle.by_epoch) == 2 and angle.queries == 64 and 0 <= angle.mean <= 180
        assert 0 <= angle.at_start <= 180 and angle.at_start not in angle.by_epoch  # before any epoch
    # MAD turns the soft-label attacker's gradient far more than the top-1 attacker's, whose labels mostly stay
    assert by_id["knockoff"].replica.gradient_angle.mean > by_id["argmax"].replica.gradient_angle.mean + 10

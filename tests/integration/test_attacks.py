"""The Jacobian-attack scenarios end to end on tiny budgets."""

import numpy as np
import pytest

import sim

from .conftest import SMALL

TINY = ["victim.epochs=2", "benign.queries=40", "detectors.prada.min_pool=50"]


def tiny_attacker(aid: str, budget: int = 200) -> list[str]:
    return [f"attackers.{aid}.budget={budget}", f"attackers.{aid}.jacobian.seed_size=20",
            f"attackers.{aid}.jacobian.substitute_epochs=2", f"attackers.{aid}.replica.epochs=10"]


def test_distributed_jbda_prada_flags_one_account_not_fifty(ray_serve, cache_dir, tmp_path):
    overrides = [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", *TINY, *tiny_attacker("jbda"),
                 *tiny_attacker("distributed"), "attackers.distributed.batch_size=4"]
    s = sim.run("distributed_jbda", overrides, quiet=True)
    jbda, dist = s.attacker("jbda"), s.attacker("distributed")
    assert jbda.attack == "jbda" and jbda.queries == 200 and jbda.params["jacobian.seed_size"] == 20
    assert jbda.accounts_flagged == 1  # one account, 200 Jacobian steps around 20 seeds: caught
    assert dist.accounts_used == 50 and dist.accounts_flagged == 0  # 4 each
    assert s.detection["prada"].flagged_benign_accounts == 0
    assert s.evaluation.held_out_attack_seeds == 40  # two attackers' seeds, left out of the evaluation
    assert s.evaluation.replica_test_images == 1000 - 40
    for a in s.attackers:
        assert a.replica.test_accuracy > 0.3  # 200 in-domain queries teach far more than chance


@pytest.mark.parametrize("scenario,aid", [("single_jbda", "jbda"), ("jbtop3", "jbtop3")])
def test_jacobian_scenarios_run_end_to_end(ray_serve, cache_dir, tmp_path, scenario, aid):
    overrides = [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", *TINY, *tiny_attacker(aid, 120)]
    s = sim.run(scenario, overrides, quiet=True)
    (att,) = s.attackers
    assert att.queries == 120 and s.queries.logged == s.queries.total
    assert att.replica is not None


@pytest.fixture(scope="module")
def knockoff_variants(ray_serve, cache_dir, tmp_path_factory):
    """One run of the label-only scenario with two more Knockoff attackers beside its own (one deployment, not
    three): one whose budget exceeds the pool (sampled with replacement and augmented), one adaptive over two
    actors."""
    return sim.run("label_only_knockoff", [
        f"cache_dir={cache_dir}", f"run_dir={tmp_path_factory.mktemp('variants') / 'run'}", *SMALL,
        "attackers.single.replica.epochs=6",
        "attackers.beyond.attack=knockoff", "attackers.beyond.budget=1900",  # the pool has 1,797
        "attackers.beyond.sample_with_replacement=true", "attackers.beyond.augment=true",
        "attackers.beyond.replica.epochs=1",
        "attackers.adaptive.attack=knockoff", "attackers.adaptive.budget=160", "attackers.adaptive.strategy=adaptive",
        "attackers.adaptive.actors=2", "attackers.adaptive.accounts=2", "attackers.adaptive.batch_size=16",
        "attackers.adaptive.replica.epochs=8"], quiet=True)


def test_label_only_knockoff_trains_on_hard_labels(knockoff_variants):
    att = knockoff_variants.attacker("single")
    assert att.labels == "hard" and att.queries == 160
    assert att.replica.test_accuracy > 0.2
    assert knockoff_variants.queries.logged == knockoff_variants.queries.total == 160 + 1900 + 160 + 2 * 40


def test_knockoff_budget_beyond_the_pool_with_replacement_and_augmentation(knockoff_variants):
    att = knockoff_variants.attacker("beyond")
    assert att.labels == "soft" and att.queries == 1900 and att.params["sample_with_replacement"]
    assert att.replica is not None


def test_adaptive_knockoff_runs_over_two_actors(knockoff_variants):
    att = knockoff_variants.attacker("adaptive")
    assert att.params["strategy"] == "adaptive" and len(att.stats) == 2  # one entry per actor
    assert att.queries == 160 and att.replica.test_accuracy > 0.2


def test_dfme_scenario_reports_its_iterations(ray_serve, cache_dir, tmp_path):
    s = sim.run("dfme", [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", *TINY,
                         "attackers.dfme.budget=112", "attackers.dfme.dfme.batch=8", "attackers.dfme.batch_size=20",
                         "attackers.dfme.replica.epochs=2"], quiet=True)
    (att,) = s.attackers
    (stats,) = att.stats
    assert stats["queries_per_iteration"] == 8 * (1 * (1 + 1) + 5) == 56
    assert stats["iterations"] == 2 and stats["generator_updates"] == 2 and stats["student_updates"] == 10
    assert stats["unmoved_perturbations"] == 0.0  # the default step survives 8-bit rounding
    assert att.queries == 112 and s.queries.logged == s.queries.total
    assert att.replica is not None
    # DFME's own student, the model the paper scores, beside the replica trained afresh on its queries
    own = stats["extracted"]
    assert set(own) == {"test_accuracy", "fidelity"} and all(0 <= v <= 1 for v in own.values())
    from sim.summary import format_summary

    assert (f"dfme (actor 0): the model dfme trained itself while it queried: test accuracy "
            f"{own['test_accuracy']:.4f}, fidelity {own['fidelity']:.4f}") in format_summary(s)


def _write_idx(path, arr):
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(arr, np.uint8).tobytes())


def test_fashion_knockoff_scenario_on_a_small_copy_of_fashion_mnist(ray_serve, cache_dir, tmp_path):
    """The scenario end to end, victim trained on 1,200 Fashion-MNIST images (or, on a machine without the
    Debian package, MNIST digits written as the same IDX files): the IDX reader, the two-dataset pool, and a
    budget beyond the pool's size."""
    from sim import data

    try:
        full = data.load("fashion_mnist")
    except data.DataError:
        full = data.load("mnist5k")
    root = tmp_path / "fashion"
    root.mkdir()
    for split, x, y in (("train", full.x_train[:1000], full.y_train[:1000]),
                        ("t10k", full.x_test[:200], full.y_test[:200])):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", x[:, 0])
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    s = sim.run("fashion_knockoff", [f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}", f"data.root={root}",
                                     "victim.epochs=2", "benign.queries=40", "attackers.knockoff.budget=7000",
                                     "attackers.knockoff.batch_size=256", "serve.max_images=256",
                                     "attackers.knockoff.replica.epochs=1"], quiet=True)
    assert s.victim.dataset == "fashion_mnist" and s.evaluation.replica_test_images == 200
    (att,) = s.attackers
    assert att.params["pool"] == "mnist5k+digits" and att.queries == 7000 > 5000 + 1797
    assert s.queries.logged == s.queries.total == 7080

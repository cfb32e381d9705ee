"""JBDA, JB-self and JB-top3 as pure, stepwise query sources on a tiny victim (no Ray)."""

import numpy as np
import pytest
import torch

from actors.attacks.jacobian import JacobianAttack, jacobian_step, targeted_step
from sim import data, models
from sim.training import predict_probs, train_classifier


@pytest.fixture(scope="module")
def victim():
    ds = data.load("mnist5k")
    torch.manual_seed(0)
    model = train_classifier(models.build("lenet", (1, 28, 28), 10), ds.x_train[:600], ds.y_train[:600], epochs=2)
    return model, ds


def drive(attack, victim_model, batch=32):
    """Play the victim: answer every proposal; returns all proposals."""
    sent = []
    while attack.remaining:
        x = attack.propose(batch)
        assert 1 <= len(x) <= batch and x.dtype == np.uint8 and x.shape[1:] == (1, 28, 28)
        attack.observe(x, predict_probs(victim_model, x), np.ones(len(x), bool))
        sent.append(x)
    return np.concatenate(sent)


def test_a_jacobian_step_moves_every_interior_pixel_by_exactly_lambda(victim):
    model, ds = victim
    x = torch.rand(8, 1, 28, 28) * 0.4 + 0.3  # away from 0 and 1: no clipping
    classes = torch.arange(8) % 10
    for step in (jacobian_step(model, x, classes, 0.1), targeted_step(model, x, classes, 0.1)):
        diff = (step - x).abs()
        assert torch.allclose(diff.amax(dim=(1, 2, 3)), torch.full((8,), 0.1))
        assert ((diff - 0.1).abs() < 1e-6).float().mean() > 0.5  # nearly every pixel moves (zero gradients stay)


@pytest.mark.parametrize("variant,growth", [("jbda", 1), ("jb_self", 1), ("jb_top3", 3)])
def test_rounds_grow_by_the_variant_s_factor_and_never_exceed_the_budget(victim, variant, growth):
    model, ds = victim
    attack = JacobianAttack(variant, ds.x_test[:10], ds.y_test[:10], 400, arch="lenet", num_classes=10,
                            substitute_epochs=1, seed=1)
    sent = drive(attack, model)
    assert len(sent) == 400 and attack.remaining == 0
    rounds = attack.queries_per_round
    assert rounds[0] == 10 and sum(rounds) == 400
    for before, after in zip(np.cumsum(rounds)[:-2], rounds[1:-1]):  # every round but the capped last one
        assert after == growth * before
    x, y = attack.transfer_set()
    assert len(x) == 400 and np.allclose(y.sum(1), 1, atol=1e-5)


def test_the_attack_stops_after_its_rounds_even_with_budget_left(victim):
    model, ds = victim
    attack = JacobianAttack("jbda", ds.x_test[:5], ds.y_test[:5], 10_000, arch="lenet", num_classes=10,
                            rounds=2, substitute_epochs=1)
    assert len(drive(attack, model)) == 5 + 5 + 10  # seeds, then two doublings


def test_same_seed_same_queries(victim):
    model, ds = victim

    def run():
        torch.manual_seed(123)  # other global state must not matter
        return drive(JacobianAttack("jb_top3", ds.x_test[:6], ds.y_test[:6], 100, arch="lenet", num_classes=10,
                                    substitute_epochs=1, seed=7), model)

    assert np.array_equal(run(), run())


def test_refused_queries_stay_out_of_the_transfer_set(victim):
    model, ds = victim
    attack = JacobianAttack("jbda", ds.x_test[:4], ds.y_test[:4], 4, arch="lenet", num_classes=10)
    x = attack.propose(4)
    attack.observe(x, predict_probs(model, x), np.array([True, False, True, False]))
    assert len(attack.transfer_set()[0]) == 2 and attack.remaining == 0

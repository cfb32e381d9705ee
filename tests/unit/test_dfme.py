"""DFME as a pure, stepwise query source on a tiny victim (no Ray)."""

import numpy as np
import pytest
import torch

from actors.attacks.dfme import DFME, Generator, disagreement, mean_corrected_logits
from sim import data, models
from sim.training import predict_probs, to_float, train_classifier


@pytest.fixture(scope="module")
def victim():
    ds = data.load("mnist5k")
    torch.manual_seed(0)
    return train_classifier(models.build("lenet", (1, 28, 28), 10), ds.x_train[:600], ds.y_train[:600], epochs=2)


def drive(attack, model, batch=50, answered=None):
    """Play the victim: answer every proposal (``answered(x)`` may refuse some); returns all proposals."""
    sent = []
    while attack.remaining:
        x = attack.propose(batch)
        assert 1 <= len(x) <= batch and x.dtype == np.uint8 and x.shape[1:] == attack.input_shape
        ok = np.ones(len(x), bool) if answered is None else answered(x)
        probs = predict_probs(model, x)
        probs[~ok] = np.nan
        attack.observe(x, probs, ok)
        sent.append(x)
    return np.concatenate(sent)


def test_queries_per_iteration_match_the_formula(victim):
    attack = DFME((1, 28, 28), 10_000, arch="lenet", num_classes=10, batch_size=8, directions=3,
                  generator_steps=2, student_steps=4)
    assert attack.queries_per_iteration == 8 * (2 * (3 + 1) + 4) == 96
    sent = 0
    while attack.iterations < 3:
        x = attack.propose(7)  # a request size that does not divide the phases
        attack.observe(x, predict_probs(victim, x), np.ones(len(x), bool))
        sent += len(x)
    assert sent == 3 * 96
    assert attack.generator_updates == 6 and attack.student_updates == 12


def test_the_budget_is_spent_exactly_and_the_tail_still_queries(victim):
    attack = DFME((1, 28, 28), 1000, arch="lenet", num_classes=10, batch_size=16, directions=2)
    sent = drive(attack, victim)
    assert len(sent) == 1000 and attack.remaining == 0
    x, y = attack.transfer_set()
    assert len(x) == 1000 and np.allclose(y.sum(1), 1, atol=1e-5)


def test_perturbed_queries_sit_one_step_from_their_base(victim):
    attack = DFME((1, 28, 28), 10_000, arch="lenet", num_classes=10, batch_size=4, directions=2)
    phase = attack.propose(4 * 3)  # the generator phase: 4 base images, then 2 perturbed copies of each
    base = to_float(phase[:4]).reshape(4, 1, -1)
    moved = to_float(phase[4:]).reshape(4, 2, -1)
    dist = (moved - base).norm(dim=2)
    assert attack.step == pytest.approx(np.sqrt(784) / 255)
    assert torch.allclose(dist, torch.full_like(dist, attack.step), rtol=0.1)  # up to 8-bit rounding and clipping


def test_the_generator_learns_from_the_estimate_and_the_student_from_the_answers(victim):
    attack = DFME((1, 28, 28), 10_000, arch="lenet", num_classes=10, batch_size=8)
    g0 = [p.detach().clone() for p in attack.generator.parameters()]
    s0 = [p.detach().clone() for p in attack.student.parameters()]
    while attack.iterations < 1:
        x = attack.propose(64)
        attack.observe(x, predict_probs(victim, x), np.ones(len(x), bool))
    assert any(not torch.equal(a, b) for a, b in zip(g0, attack.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(s0, attack.student.parameters()))
    assert attack.extracted() is attack.student and not attack.student.training  # what the run scores as DFME's own


def test_a_step_below_one_gray_level_rounds_away_and_is_reported(victim):
    attack = DFME((1, 28, 28), 200, arch="lenet", num_classes=10, batch_size=10, step=1e-3)
    g0 = [p.detach().clone() for p in attack.generator.parameters()]
    phase = attack.propose(20)
    assert np.array_equal(phase[:10], phase[10:])  # every perturbed query equals its base
    attack.observe(phase, predict_probs(victim, phase), np.ones(20, bool))
    assert attack.stats()["unmoved_perturbations"] == 1.0
    # a zero estimate: Adam's step on a zero gradient leaves the generator where it was
    assert all(torch.equal(a, b) for a, b in zip(g0, attack.generator.parameters()))


def test_refused_queries_stay_out_of_the_transfer_set_and_of_the_estimate(victim):
    attack = DFME((1, 28, 28), 600, arch="lenet", num_classes=10, batch_size=10)
    refuse = np.random.default_rng(0)
    drive(attack, victim, answered=lambda x: refuse.random(len(x)) > 0.3)
    x, y = attack.transfer_set()
    assert 300 < len(x) < 550 and np.isfinite(y).all()
    assert all(np.isfinite(p.detach().numpy()).all() for p in attack.generator.parameters())


def test_same_seed_same_queries(victim):
    def run():
        torch.manual_seed(123)  # other global state must not matter
        return drive(DFME((1, 28, 28), 300, arch="lenet", num_classes=10, batch_size=10, seed=5), victim)

    assert np.array_equal(run(), run())


def test_colour_32x32_images():
    gen = Generator((3, 32, 32), nz=16, width=8)
    x = gen(torch.randn(5, 16))
    assert x.shape == (5, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    model = models.build("resnet18", (3, 32, 32), 10)
    attack = DFME((3, 32, 32), 30, arch="resnet18", num_classes=10, batch_size=5, nz=16)
    assert attack.step == pytest.approx(np.sqrt(3 * 32 * 32) / 255)
    assert len(drive(attack, model.eval(), batch=30)) == 30


def test_mean_corrected_logits_recover_logits_up_to_a_shift():
    logits = torch.randn(6, 10) * 3
    recovered = mean_corrected_logits(torch.softmax(logits, 1))
    assert torch.allclose(recovered, logits - logits.mean(1, keepdim=True), atol=1e-4)
    assert torch.isfinite(mean_corrected_logits(torch.eye(10))).all()  # zero probabilities: no log 0
    assert torch.allclose(disagreement(logits + 5, torch.softmax(logits, 1)), torch.zeros(6), atol=1e-4)


def test_an_attack_pickles_mid_phase_for_ray(victim):
    import pickle

    attack = DFME((1, 28, 28), 500, arch="lenet", num_classes=10, batch_size=8)
    attack.propose(5)
    clone = pickle.loads(pickle.dumps(attack))
    assert np.array_equal(clone.propose(50), attack.propose(50))

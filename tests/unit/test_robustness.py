"""Quantized victims, DivQAT's loss, PGD and adversarial training, and the gradient angle under a defense."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from actors.replica import gradient_angles
from sim import data, models, quantize
from sim.adversarial import adversary, pgd, robust_accuracy
from sim.training import accuracy, divqat_loss, predict_probs, train_classifier

AGREEMENT = 0.97  # top-1 agreement of an int8 LeNet with its float source on MNIST test images, at least


@pytest.fixture(scope="module")
def mnist_lenet():
    ds = data.load("mnist5k")
    torch.manual_seed(0)
    model = models.build("lenet", ds.input_shape, 10)
    train_classifier(model, ds.x_train[:2000], ds.y_train[:2000], epochs=2, seed=0)
    return ds, model


def agreement(a: nn.Module, b: nn.Module, x: np.ndarray) -> float:
    return accuracy(predict_probs(a, x).argmax(1), predict_probs(b, x).argmax(1))


def test_post_training_quantization_agrees_with_the_float_model_and_is_smaller(mnist_lenet):
    ds, model = mnist_lenet
    int8, twin = quantize.post_training(model, ds.input_shape, ds.x_train[:512])
    x = ds.x_test
    assert agreement(int8, model, x) >= AGREEMENT
    assert agreement(twin, int8, x) >= AGREEMENT  # the fake-quantized twin computes what the int8 model does
    assert quantize.size_bytes(int8) < 0.3 * quantize.size_bytes(model)  # 8-bit weights: about a quarter
    assert any("quantized" in type(m).__module__ for m in int8.modules())


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_a_quantized_model_survives_the_trip_to_a_serve_replica(mnist_lenet, mode):
    ds, model = mnist_lenet
    if mode == "ptq":
        int8, _ = quantize.post_training(model, ds.input_shape, ds.x_train[:256])
    else:
        twin = quantize.prepare_twin(model, ds.input_shape)
        train_classifier(twin, ds.x_train[:256], ds.y_train[:256], epochs=1, lr=1e-4, seed=0)
        int8 = quantize.convert(quantize.freeze(twin))
    blob = models.to_bytes(int8, "lenet", ds.input_shape, 10, quantization=mode)
    back = models.from_bytes(blob)
    np.testing.assert_array_equal(predict_probs(back, ds.x_test[:200]), predict_probs(int8, ds.x_test[:200]))
    fresh = models.from_bytes(blob, architecture_only=True)
    assert isinstance(fresh, models.LeNet) and not fresh.training


def test_divqat_loss_is_cross_entropy_minus_the_weighted_capped_kl_from_the_teacher():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    t = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in teacher.tolist()]
    ce = -(math.log(p[0][0]) + math.log(p[1][2])) / 2
    kl = [sum(ti * math.log(ti / pi) for ti, pi in zip(t[i], p[i])) for i in range(2)]
    got = divqat_loss(logits, labels, teacher, weight=0.5)
    assert float(got) == pytest.approx(ce - 0.5 * (kl[0] + kl[1]) / 2, rel=1e-5)
    capped = divqat_loss(logits, labels, teacher, weight=0.5, cap=0.1)
    assert float(capped) == pytest.approx(ce - 0.5 * (min(kl[0], 0.1) + min(kl[1], 0.1)) / 2, rel=1e-5)
    assert float(divqat_loss(logits, labels, teacher, weight=0.0)) == pytest.approx(ce, rel=1e-6)


def test_divqat_pushes_the_quantized_answers_away_from_the_float_ones(mnist_lenet):
    ds, model = mnist_lenet
    x = ds.x_test[:500]

    def kl_from_float(alpha: float) -> float:
        twin = quantize.prepare_twin(model, ds.input_shape)
        train_classifier(twin, ds.x_train[:1000], ds.y_train[:1000], epochs=1, lr=1e-4, seed=0,
                         teacher=model, divergence=alpha, divergence_cap=5.0)
        q, f = predict_probs(quantize.convert(quantize.freeze(twin)), x), predict_probs(model, x)
        return float((f * (np.log(f + 1e-12) - np.log(q + 1e-12))).sum(1).mean())

    assert kl_from_float(1.0) > 2 * kl_from_float(0.0)


def test_pgd_stays_inside_the_ball_and_the_pixel_range_and_finds_adversarial_examples(mnist_lenet):
    ds, model = mnist_lenet
    x = torch.as_tensor(ds.x_test[:200]).float() / 255
    y = torch.as_tensor(ds.y_test[:200]).long()
    before = [p.clone() for p in model.parameters()]
    adv = pgd(model, x, y, eps=0.1, step=0.025, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean, attacked = (model(x).argmax(1) == y).float().mean(), (model(adv).argmax(1) == y).float().mean()
    assert attacked < clean - 0.2  # a naturally trained LeNet loses much of its accuracy at eps 0.1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not model.training
    robust = robust_accuracy(model, ds.x_test[:200], ds.y_test[:200], eps=0.1, step=0.025, steps=10, seed=0)
    assert robust < float(clean) - 0.2
    assert robust_accuracy(model, ds.x_test[:200], ds.y_test[:200], eps=0.1, step=0.1, steps=0, seed=0) == \
        pytest.approx(float(clean))


def test_adversarial_training_makes_a_model_more_robust(mnist_lenet):
    ds, standard = mnist_lenet
    torch.manual_seed(0)
    robust = models.build("lenet", ds.input_shape, 10)
    train_classifier(robust, ds.x_train[:2000], ds.y_train[:2000], epochs=2, seed=0,
                     adversary=adversary(eps=0.1, step=0.05, steps=3, seed=0))
    settings = dict(eps=0.1, step=0.025, steps=10, seed=1)
    x, y = ds.x_test[:300], ds.y_test[:300]
    assert robust_accuracy(robust, x, y, **settings) > robust_accuracy(standard, x, y, **settings) + 0.1


def test_gradient_angle_of_a_linear_model_is_the_angle_between_the_loss_residuals():
    # for logits W x the loss gradient over W is (p - y) x^T, so the angle is that between p - y1 and p - y2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 2, 2)).astype(np.uint8)
    returned = np.random.default_rng(1).dirichlet(np.ones(3), 5).astype(np.float32)
    clean = np.random.default_rng(2).dirichlet(np.ones(3), 5).astype(np.float32)
    p = predict_probs(model, x)
    expected = [math.degrees(math.acos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))
                for a, b in zip(p - returned, p - clean)]
    np.testing.assert_allclose(gradient_angles(model, x, returned, clean), expected, atol=1e-3)
    np.testing.assert_allclose(gradient_angles(model, x, clean, clean), 0, atol=1e-3)
    labels = clean.argmax(1)
    np.testing.assert_allclose(gradient_angles(model, x, labels, labels), 0, atol=1e-3)  # hard labels too

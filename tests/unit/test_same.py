"""SAME on a tiny MAE: trains in seconds, scores deterministically, and scores DFME above natural images."""

import numpy as np
import pytest

from actors.attacks.dfme import DFME
from sim import data, detectors, models
from sim.detectors.mae import MAE
from sim.detectors.same import Same, SameModels, train_same
from sim.errors import ConfigError
from sim.training import predict_probs, train_classifier

TINY = {"patch": 7, "dim": 16, "depth": 1, "heads": 2, "decoder_dim": 16, "decoder_depth": 1, "mask_ratio": 0.75}


@pytest.fixture(scope="module")
def tiny():
    ds = data.load("mnist5k")
    victim = models.build("lenet", ds.input_shape, 10)
    train_classifier(victim, ds.x_train[:1500], ds.y_train[:1500], epochs=2, seed=0)
    same = train_same(victim, "lenet", ds.x_train[:1500], 10, seed=0, mae_config=TINY, epochs=8, aux_epochs=3,
                      batch_size=32, lr=2e-3)
    return ds, victim, same


def test_reconstruction_is_deterministic_and_never_copies_the_input():
    mae = MAE((1, 28, 28), **TINY)
    groups = mae.groups()
    assert sorted(np.concatenate(groups).tolist()) == list(range(16))  # a partition of the 16 patches
    assert len(groups) == 4  # mask ratio 0.75: each pass shows a quarter
    x = data.load("mnist5k").x_test[:5]
    assert np.array_equal(mae.reconstruct(x).numpy(), mae.reconstruct(x).numpy())
    assert mae.unpatchify(mae.patchify(mae.reconstruct(x))).shape == (5, 1, 28, 28)


def test_same_scores_dfme_queries_above_benign_test_images(tiny):
    """On the reconstruction term (weight 0, the paper's SAME-X): a seconds-trained auxiliary model agrees
    with the victim too rarely for the deviation term to mean anything (the benchmark measures both)."""
    ds, victim, same_models = tiny
    det = detectors.build("same", models=same_models, weight=0.0)
    benign = ds.x_test[:300]
    dfme = DFME(ds.input_shape, 256, arch="lenet", num_classes=10, seed=0)
    synthetic = dfme.propose(128)
    b = det.score("u", benign, None, predict_probs(victim, benign)).scores
    s = det.score("u", synthetic, None, predict_probs(victim, synthetic)).scores
    assert s.mean() > b.mean() + 1.0
    assert abs(np.median(b)) < 1.0  # standardised on held-out training images: benign scores sit near 0


def test_same_survives_serialisation_and_flags_above_its_threshold(tiny):
    ds, victim, same_models = tiny
    x = ds.x_test[:50]
    probs = predict_probs(victim, x)
    a = Same(same_models).score("k", x, None, probs).scores
    copy = SameModels.from_bytes(same_models.to_bytes())
    res = Same(copy, threshold=float(np.median(a))).score("k", x, None, probs)
    np.testing.assert_allclose(res.scores, a, rtol=1e-5, atol=1e-6)
    assert res.flags.tolist() == (a > np.median(a)).tolist()
    zr, zd = Same(copy).components(x, probs)
    np.testing.assert_allclose(Same(copy, weight=0.0).score("k", x, None, probs).scores, zr, rtol=1e-6)
    assert zd.shape == (50,)


@pytest.mark.parametrize("params, message", [
    ({"weight": -1}, "same.weight must be a number >= 0, got -1"),
    ({"threshold": "high"}, "same.threshold must be a number"),
    ({"alpha": 1}, "same.alpha is not a parameter of detector same"),
])
def test_bad_same_parameters_are_errors(tiny, params, message):
    with pytest.raises(ConfigError, match=message):
        Same(tiny[2], **params)


def test_mae_shape_errors_name_the_field():
    with pytest.raises(ConfigError, match="same.patch=5 must divide the image sides 28x28"):
        MAE((1, 28, 28), patch=5)
    with pytest.raises(ConfigError, match="must be multiples of same.heads=3"):
        MAE((1, 28, 28), dim=16, heads=3)

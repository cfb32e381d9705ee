"""SAME on a tiny MAE: trains in seconds, scores deterministically, and scores DFME above natural images."""

import numpy as np
import pytest

from actors.attacks.dfme import DFME
from sim import data, detectors, models
from sim.detectors._same_models import MAE, SameModels, train_same
from sim.detectors.same import Same
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
    ({"beta": 1}, "same.beta is not a parameter of detector same"),
    ({"alpha": 1.5}, "same.alpha must be a number in \\[0, 1\\], got 1.5"),
])
def test_bad_same_parameters_are_errors(tiny, params, message):
    with pytest.raises(ConfigError, match=message):
        Same(tiny[2], **params)


def test_mae_shape_errors_name_the_field():
    with pytest.raises(ConfigError, match="same.patch=5 must divide the image sides 28x28"):
        MAE((1, 28, 28), patch=5)
    with pytest.raises(ConfigError, match="must be multiples of same.heads=3"):
        MAE((1, 28, 28), dim=16, heads=3)


# -- the authors' code (variant=same_code) ----------------------------------------------------------------------------

def test_same_code_kl_is_victim_against_auxiliary_averaged_over_classes():
    """KL((1/2, 1/2, 0) || (1/4, 1/4, 1/2)) = ln 2 (the zero class adds nothing), averaged over 3 classes."""
    from sim.detectors._same_models import kl_per_class

    np.testing.assert_allclose(kl_per_class([[0.5, 0.5, 0.0]], [[0.25, 0.25, 0.5]]), [np.log(2) / 3])
    assert kl_per_class([[0.2, 0.8]], [[0.2, 0.8]])[0] == 0


def test_full_view_reconstruction_sees_every_patch():
    """With every patch visible, a patch's own pixels change its reconstruction; the default partition never lets
    a patch see itself, so there they change only the other patches'."""
    import torch

    torch.manual_seed(0)
    mae = MAE((1, 28, 28), **TINY)
    x = data.load("mnist5k").x_test[:1].copy()
    y = x.copy()
    y[:, :, :7, :7] = 255 - y[:, :, :7, :7]  # patch 0 changed
    full = (mae.reconstruct_full(x) - mae.reconstruct_full(y)).abs()
    assert full[:, :, :7, :7].max() > 1e-4
    part = (mae.reconstruct(x) - mae.reconstruct(y)).abs()
    assert part[:, :, :7, :7].max() < 1e-6 < part.max()


@pytest.fixture(scope="module")
def tiny_code(tiny):
    ds, victim, _ = tiny
    same = train_same(victim, "lenet", ds.x_train[:1500], 10, seed=0, mae_config=TINY, epochs=3, aux_epochs=5,
                      batch_size=32, lr=2e-3, variant="same_code", warmup=1, y_train=ds.y_train[:1500])
    return ds, victim, same


def test_same_code_scores_alpha_mse_plus_kl_on_raw_scales(tiny_code):
    from sim.detectors._same_models import kl_per_class
    from sim.training import to_float

    ds, victim, models_ = tiny_code
    x = ds.x_test[:40]
    probs = predict_probs(victim, x)
    det = Same(models_, variant="same_code", alpha=0.9)
    recon = models_.mae.reconstruct_full(x)
    mse = ((to_float(x) - recon) ** 2).flatten(1).mean(1).numpy()
    kl = kl_per_class(probs, predict_probs(models_.aux, recon))
    np.testing.assert_allclose(det.score("k", x, None, probs).scores, 0.9 * mse + 0.1 * kl, rtol=1e-5)
    assert SameModels.from_bytes(models_.to_bytes()).variant == "same_code"
    with pytest.raises(ConfigError, match="same.variant=default but its models were trained for variant=same_code"):
        Same(models_)


def test_same_code_auxiliary_model_learns_the_true_labels_from_masked_reconstructions(tiny_code):
    ds, _, models_ = tiny_code
    pred = predict_probs(models_.aux, models_.mae.reconstruct_full(ds.x_test[:300])).argmax(1)
    assert (pred == ds.y_test[:300]).mean() > 0.2  # trained on the true labels (chance: 0.1)


def test_same_code_without_full_view_reconstructs_each_patch_from_views_that_hide_it(tiny_code):
    """without=[full_view] changes the scoring only: the MSE and the KL against the default partitioned
    reconstruction, mixed as the code mixes them; the same models serve both."""
    from sim.detectors._same_models import kl_per_class
    from sim.training import to_float

    ds, victim, models_ = tiny_code
    x, probs = ds.x_test[:40], predict_probs(victim, ds.x_test[:40])
    recon = models_.mae.reconstruct(x)
    mse = ((to_float(x) - recon) ** 2).flatten(1).mean(1).numpy()
    kl = kl_per_class(probs, predict_probs(models_.aux, recon))
    det = Same(models_, variant="same_code", alpha=0.9, without=["full_view"])
    np.testing.assert_allclose(det.score("k", x, None, probs).scores, 0.9 * mse + 0.1 * kl, rtol=1e-5)
    full = Same(models_, variant="same_code", alpha=0.9).score("k", x, None, probs).scores
    assert not np.allclose(full, 0.9 * mse + 0.1 * kl)


def test_same_code_models_and_detector_agree_on_the_training_choices_turned_off(tiny_code):
    import dataclasses

    _, _, models_ = tiny_code
    masked = dataclasses.replace(models_, without=("all_pixel_loss",))
    assert SameModels.from_bytes(masked.to_bytes()).without == ("all_pixel_loss",)
    Same(masked, variant="same_code", without=["full_view", "all_pixel_loss"])
    with pytest.raises(ConfigError, match=r"same.without=None but its models were prepared with "
                                          r"without=\['all_pixel_loss'\]"):
        Same(masked, variant="same_code")


def test_same_code_without_all_pixel_loss_trains_the_mae_on_masked_patches_with_the_code_s_optimizer(tiny,
                                                                                                      monkeypatch):
    import sim.detectors._same_models as same_module

    ds, victim, _ = tiny
    seen = []

    class Stop(Exception):
        pass

    def spy(mae, x, **kw):
        seen.append((kw["loss_on"], kw["betas"]))
        raise Stop  # the settings are what this test checks, not the training

    monkeypatch.setattr(same_module, "train_mae", spy)
    for without in ((), ("all_pixel_loss",)):
        with pytest.raises(Stop):
            train_same(victim, "lenet", ds.x_train[:200], 10, seed=0, mae_config=TINY, epochs=1, aux_epochs=1,
                       variant="same_code", y_train=ds.y_train[:200], without=without)
    assert seen == [("all", (0.9, 0.95)), ("masked", (0.9, 0.95))]
    with pytest.raises(ConfigError, match=r"same.without=\['full_view'\] has no effect unless "
                                          r"same.variant=same_code"):
        Same.prepare({"without": ["full_view"]}, None)


def test_same_settings_that_contradict_each_other_are_refused_with_the_scenario_key():
    from sim import config

    with pytest.raises(ConfigError, match=r"detectors.same.without=\['full_view'\] has no effect unless "
                                          r"detectors.same.variant=same_code"):
        config.load("single_knockoff", ["detectors.same.enabled=true", "detectors.same.without=[full_view]"])
    with pytest.raises(ConfigError, match=r"detectors.mine.dim=30 and detectors.mine.decoder_dim=64 must be multiples "
                                          r"of detectors.mine.heads=4"):
        config.load("single_knockoff", ["detectors.mine.kind=same", "detectors.mine.dim=30"])


def test_same_built_without_its_models_says_what_it_needs():
    with pytest.raises(ConfigError, match=r"^detector same needs its trained models \(models=, what Same.prepare"):
        detectors.build("same")

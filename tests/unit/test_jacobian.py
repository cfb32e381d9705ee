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


# -- the MAD code's variant (jacobian.variant=mad_code), against hand-worked cases -----------------------------------

def test_mad_code_step_sign_flips_with_pythons_round_of_rho_over_tau():
    from actors.attacks.jacobian_mad_code import round_sign

    assert [round_sign(rho, 5) for rho in range(13)] == [1, 1, 1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1]


def test_mad_code_clamp_in_normalised_units_squeezes_images_to_grey(victim):
    """Background 0 is -0.4242 normalised, ink 1 is 2.8215: whatever the step's sign, x + delta is cut to [0, 1]
    normalised, pixel values 0.1307 (33/255) and 0.4388 (112/255)."""
    from actors.attacks.jacobian_mad_code import fgsm_step, normalised, to_pixels

    model, _ = victim
    x = np.zeros((2, 1, 28, 28), np.uint8)
    x[:, :, 10:18, 10:18] = 255
    for lam in (0.1, -0.1):
        stored = to_pixels(normalised(x) + fgsm_step(model, normalised(x), torch.tensor([3, 7]), lam))
        assert set(np.unique(stored[:, :, 10:18, 10:18])) == {112} and set(np.unique(stored[:, :, :5])) == {33}


def test_without_the_normalised_clamp_a_step_is_clipped_to_pixels(victim):
    """jacobian.without=[normalised_clamp]: lambda 0.1 normalised is 0.1 x 0.3081 x 255 = 7.9 pixel levels, so
    background 0 goes to 0 or 8 and ink 255 to 247 or 255, never to the grey of the code's clamp."""
    from actors.attacks.jacobian_mad_code import fgsm_step, normalised, to_pixels

    model, _ = victim
    x = np.zeros((2, 1, 28, 28), np.uint8)
    x[:, :, 10:18, 10:18] = 255
    seen_ink, seen_background = set(), set()
    for lam in (0.1, -0.1):
        stored = to_pixels(normalised(x) + fgsm_step(model, normalised(x), torch.tensor([3, 7]), lam, "pixels"))
        seen_ink |= set(np.unique(stored[:, :, 10:18, 10:18]).tolist())
        seen_background |= set(np.unique(stored[:, :, :5]).tolist())
    assert seen_ink <= {247, 255} and seen_background <= {0, 8} and 8 in seen_background


def drive_mad_code(variant, victim_model, seeds, budget, batch=3, without=()):
    from actors.attacks.jacobian_mad_code import MadCodeJacobian

    attack = MadCodeJacobian(variant, seeds, budget, arch="lenet", num_classes=10, substitute_epochs=1,
                             without=without)
    for value in vars(attack).values():  # as a client actor gets it: arrays from Ray's object store are read-only
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return attack, drive(attack, victim_model, batch)


def test_mad_code_jbda_aliases_its_transfer_set_so_it_doubles_with_duplicates(victim):
    """4 seeds, budget 4 + 4 + 8 + 5: every round steps every stored point (only 5 in the last, which the budget
    cuts), writes them over the points they came from and joins D with those rows: D holds 4, 8, 16, then 21 rows,
    and never more than 8 distinct images; the replica trains on D, not on the 21 queries."""
    model, ds = victim
    attack, sent = drive_mad_code("jbda", model, ds.x_train[:4], 21)
    assert attack.queries_per_round == [4, 4, 8, 5] and len(sent) == 21
    x, y = attack.transfer_set()
    assert len(x) == 21 and len(y) == 21
    np.testing.assert_array_equal(x[:5], x[16:])  # the last round's rows, written, then joined again
    assert attack.stats()["distinct_images"] <= 8 < len(np.unique(sent.reshape(21, -1), axis=0)) + 1
    # round 2 queried round 1's 4 points twice over: the same images, and the same answers stored for them
    np.testing.assert_array_equal(sent[8:12], sent[12:16])
    assert not {s.tobytes() for s in ds.x_train[:4]} & {r.tobytes() for r in x}  # the seeds themselves are lost


def test_without_aliasing_every_query_joins_the_set_once_and_the_seeds_stay(victim):
    """jacobian.without=[aliasing], same budget as above: the rounds query as many points (D still doubles), but
    the stepped points join D beside the ones they came from, so D is exactly the 21 queries, seeds first."""
    model, ds = victim
    attack, sent = drive_mad_code("jbda", model, ds.x_train[:4], 21, without=("aliasing",))
    assert attack.queries_per_round == [4, 4, 8, 5]
    x, _ = attack.transfer_set()
    np.testing.assert_array_equal(x, sent)
    np.testing.assert_array_equal(x[:4], ds.x_train[:4])


def test_mad_code_jb_self_queries_x_minus_delta_and_stores_x_plus_delta(victim):
    """A seed of 0 and 255 pixels: x + delta is cut to 33 / 112 (stored), while x - delta is 2x - (x + delta),
    outside [0, 1] pixels, sent clipped: 0 stays 0 and 255 stays 255."""
    model, _ = victim
    seed = np.zeros((1, 1, 28, 28), np.uint8)
    seed[:, :, 8:20, 8:20] = 255
    attack, sent = drive_mad_code("jb_self", model, seed, 2, batch=1)
    np.testing.assert_array_equal(sent[1], seed[0])  # the query: x - delta, clipped back to the seed itself
    x, _ = attack.transfer_set()
    assert set(np.unique(x[0])) == {33, 112}  # the stored point: x + delta, in normalised [0, 1]
    np.testing.assert_array_equal(x[0], x[1])  # and D doubled


def test_mad_code_jb_top3_runs_8_pgd_steps_bounded_by_lambda_and_a_negative_bound_sets_every_element(victim):
    from actors.attacks.jacobian_mad_code import targeted_pgd

    model, ds = victim
    xn = (torch.tensor(ds.x_train[:3], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    target = torch.tensor([1, 2, 3])
    delta = targeted_pgd(model, xn, target, 0.1)
    assert delta.abs().max() <= 0.08 + 1e-6  # 8 steps of 0.01: the bound 0.1 never binds
    assert torch.allclose((delta * 100).round(), delta * 100, atol=1e-4)
    assert torch.equal(targeted_pgd(model, xn, target, -0.1), torch.full_like(xn, -0.1))  # torch.clamp, min > max
    attack, sent = drive_mad_code("jb_top3", model, ds.x_train[:2], 2 + 6 + 9)
    assert attack.queries_per_round == [2, 6, 9]  # 3 per point, then a third of what is left, rounded up
    assert len(attack.transfer_set()[0]) == 17  # the new points join D: no aliasing


def test_without_round_sign_the_sign_is_papernots_floor_of_rho_over_tau():
    from actors.attacks.jacobian_mad_code import periodic_sign

    assert [periodic_sign(rho, 5) for rho in range(12)] == [1] * 5 + [-1] * 5 + [1, 1]


def grey_seeds(n=2):
    return np.full((n, 1, 28, 28), 128, np.uint8)  # mid-grey: no step reaches 0 or 255 pixels


def test_without_normalised_step_lambda_moves_a_pixel_by_lambda_in_pixels(victim):
    """lam 0.1 in pixels is 25.5 levels: 128 goes to 102.5 or 153.5, rounded; the code's normalised step moves it
    by 0.1 x 0.3081 x 255 = 7.9 levels (both with the pixel clamp, so the grey seed is not squeezed)."""
    model, _ = victim
    for without, moves in ((("normalised_clamp", "normalised_step"), {25, 26}), (("normalised_clamp",), {8})):
        attack, sent = drive_mad_code("jbda", model, grey_seeds(), 4, without=without)
        moved = set(np.unique(np.abs(sent[2:].astype(int) - 128)).tolist())
        assert moved - {0} <= moves and moved & moves, (without, moved)


def test_without_away_from_label_the_step_lowers_the_top1_cross_entropy(victim):
    """The code's step raises the cross-entropy of the answer's top-1 class; turned off, the same substitute steps
    the other way: the two round-1 queries of a grey seed are x + delta and x - delta."""
    import torch.nn.functional as F

    from actors.attacks.jacobian_mad_code import fgsm_step, normalised

    model, ds = victim
    xn, cls = normalised(ds.x_train[:16]), torch.as_tensor(ds.y_train[:16])
    x = xn * 0.3081 + 0.1307

    def ce(lam):
        step = fgsm_step(model, xn, cls, lam, "pixels")
        return F.cross_entropy(model((xn + step) * 0.3081 + 0.1307), cls).item()

    base = F.cross_entropy(model(x), cls).item()
    assert ce(-0.5) < base < ce(0.5)
    _, away = drive_mad_code("jbda", model, grey_seeds(), 4, without=("normalised_clamp",))
    _, toward = drive_mad_code("jbda", model, grey_seeds(), 4, without=("normalised_clamp", "away_from_label"))
    both = away[2:].astype(int) + toward[2:].astype(int) - 256  # (x + delta) + (x - delta) - 2x, up to rounding
    assert np.abs(both).max() <= 1 and np.abs(away[2:].astype(int) - 128).max() == 8


def test_without_self_query_jb_self_queries_the_point_it_stores(victim):
    model, _ = victim
    seed = np.zeros((1, 1, 28, 28), np.uint8)
    seed[:, :, 8:20, 8:20] = 255
    attack, sent = drive_mad_code("jb_self", model, seed, 2, batch=1, without=("self_query",))
    x, _ = attack.transfer_set()
    np.testing.assert_array_equal(sent[1], x[0])
    assert set(np.unique(sent[1])) == {33, 112}  # the stored point, in normalised [0, 1], not the seed


def test_without_fresh_substitute_the_substitute_trains_as_the_clean_mode_s(victim, monkeypatch):
    from actors.attacks import jacobian_mad_code

    model, ds = victim
    seen = []

    def record(net, x, y, **kw):
        seen.append({k: kw.get(k) for k in ("optimizer", "lr", "weight_decay")})
        return net

    monkeypatch.setattr(jacobian_mad_code, "train_classifier", record)
    for without in ((), ("fresh_substitute",)):
        drive_mad_code("jbda", model, ds.x_train[:2], 4, without=without)
    assert seen == [{"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4}, {"optimizer": None, "lr": None,
                                                                             "weight_decay": None}]


def test_without_train_seeds_the_seeds_come_from_the_test_split_and_are_held_out():
    from sim import config
    from sim.plan import make_plan

    ds = data.load("mnist5k")
    base = ["attackers.single.attack=jbda", "attackers.single.jacobian.variant=mad_code",
            "attackers.single.jacobian.seed_size=100"]
    for without, split, held in (("null", ds.x_train, 0), ("[train_seeds]", ds.x_test, 100)):
        plan = make_plan(config.load("single_knockoff", [*base, f"attackers.single.jacobian.without={without}"]), ds)
        (client,) = plan.of(attacker="single")
        seeds = {s.tobytes() for s in client.source.propose(100)}
        assert seeds <= {s.tobytes() for s in split} and len(seeds) == 100
        assert len(plan.eval_indices(len(ds.x_test))) == len(ds.x_test) - held


def test_every_mad_code_quirk_is_named_in_the_module_and_the_docs():
    from pathlib import Path

    from actors.attacks import jacobian_mad_code

    docs = (Path(__file__).resolve().parents[2] / "docs" / "attacks.md").read_text()
    for quirk in jacobian_mad_code.QUIRKS:
        assert f"``{quirk}``" in jacobian_mad_code.__doc__ and f"| `{quirk}` |" in docs


def test_quirks_can_be_turned_off_only_in_the_mad_code_mode():
    from sim import config, data
    from sim.errors import ConfigError
    from sim.plan import make_plan

    ds = data.load("mnist5k")
    base = ["attackers.single.attack=jbda", "attackers.single.jacobian.without=[aliasing]"]
    with pytest.raises(ConfigError, match=r"attackers.single.jacobian.without=\['aliasing'\] has no effect unless "
                                          r"attackers.single.jacobian.variant=mad_code"):
        make_plan(config.load("single_knockoff", base), ds)
    (client,) = make_plan(config.load("single_knockoff", [*base, "attackers.single.jacobian.variant=mad_code"]),
                          ds).of(attacker="single")
    assert client.source.without == ("aliasing",)
    for attack, quirk in (("jbda", "self_query"), ("jb_top3", "aliasing")):
        with pytest.raises(ConfigError, match=rf"attackers.single.jacobian.without=\['{quirk}'\]: {attack} has no "
                                              rf"quirk {quirk}; expected quirks among"):
            make_plan(config.load("single_knockoff", [f"attackers.single.attack={attack}",
                                                      "attackers.single.jacobian.variant=mad_code",
                                                      f"attackers.single.jacobian.without=[{quirk}]"]), ds)


def test_a_seed_pool_gives_the_seeds_and_their_labels_and_holds_no_test_image_out():
    from sim import config
    from sim.errors import ConfigError
    from sim.plan import make_plan

    ds, digits = data.load("mnist5k"), data.load("digits")
    pool = np.concatenate([digits.x_train, digits.x_test])
    labels = dict(zip((x.tobytes() for x in pool), np.concatenate([digits.y_train, digits.y_test])))
    base = ["attackers.single.attack=jbda", "attackers.single.jacobian.seed_size=100"]
    plan = make_plan(config.load("single_knockoff", [*base, "attackers.single.jacobian.seed_pool=digits"]), ds)
    (client,) = plan.of(attacker="single")
    seeds = client.source.propose(100)
    assert len({s.tobytes() for s in seeds}) == 100 and {s.tobytes() for s in seeds} <= set(labels)
    assert client.source._in_flight.tolist() == [labels[s.tobytes()] for s in seeds]  # each seed's true label
    assert len(plan.eval_indices(len(ds.x_test))) == len(ds.x_test)  # no test image is a seed
    for extra, match in ((["attackers.single.jacobian.seed_size=1798"], r"seed_size=1798 exceeds the 1797 images of "
                                                                          r"seed_pool 'digits'; expected at most 1797"),
                         (["attackers.single.jacobian.variant=mad_code"], r"seed_pool=digits has no effect unless "
                                                                           r"attackers.single.jacobian.variant=default")):
        with pytest.raises(ConfigError, match=match):
            make_plan(config.load("single_knockoff", [*base, "attackers.single.jacobian.seed_pool=digits", *extra]), ds)
    # a joined pool's second dataset has classes 10 to 19, which are not the victim's
    with pytest.raises(ConfigError, match=r"seed_pool='digits\+digits' has labels 0 to 19; expected a "
                                          r"labelled pool of the victim's classes 0 to 9"):
        make_plan(config.load("single_knockoff", [*base, "attackers.single.jacobian.seed_pool=digits+digits"]), ds)
    with pytest.raises(ConfigError, match=r"seed_pool='digits\+mnist5k' holds the victim's own dataset"):
        make_plan(config.load("single_knockoff", [*base, "attackers.single.jacobian.seed_pool=digits+mnist5k"]), ds)
    # a Knockoff pool likewise: the victim's test images, queried, would score a replica trained on them
    with pytest.raises(ConfigError, match=r"^attackers.single.pool='digits\+mnist5k' holds the victim's own dataset "
                                          r"'mnist5k', whose test images score the replica"):
        make_plan(config.load("single_knockoff", ["attackers.single.pool=digits+mnist5k"]), ds)


def test_a_seed_pool_of_another_image_shape_is_refused(monkeypatch):
    from sim import config
    from sim.errors import ConfigError
    from sim.plan import make_plan

    ds = data.load("mnist5k")
    monkeypatch.setattr(data, "load_pool", lambda *a, **k: (np.zeros((200, 3, 32, 32), np.uint8), np.zeros(200, int)))
    with pytest.raises(ConfigError, match=r"seed_pool='cifar10' has images of shape \(3, 32, 32\), but the victim "
                                          r"takes \(1, 28, 28\)"):
        make_plan(config.load("single_knockoff", ["attackers.single.attack=jbda",
                                                  "attackers.single.jacobian.seed_pool=cifar10"]), ds)


def test_a_pool_that_is_not_a_dataset_names_the_setting_that_gave_it():
    from sim import config
    from sim.errors import ConfigError
    from sim.plan import make_plan

    with pytest.raises(ConfigError, match=r"^attackers.single.jacobian.seed_pool='digts': dataset='digts' is not a "
                                          r"known dataset"):
        make_plan(config.load("single_knockoff", ["attackers.single.attack=jbda",
                                                  "attackers.single.jacobian.seed_pool=digts"]), data.load("mnist5k"))


@pytest.mark.parametrize("extra", [[], ["attackers.single.jacobian.variant=mad_code",
                                        "attackers.single.jacobian.seed_size=150"]])
def test_a_budget_the_seeds_would_spend_whole_is_refused_unless_no_round_is_asked(extra):
    from sim import config, data
    from sim.errors import ConfigError
    from sim.plan import make_plan

    ds = data.load("mnist5k")
    base = ["attackers.single.attack=jbda", "attackers.single.budget=150", *extra]
    with pytest.raises(ConfigError, match=r"attackers.single.budget=150 leaves no query for a Jacobian round after "
                                          r"the 150 seeds \(attackers.single.jacobian.seed_size\); expected a budget "
                                          r"above seed_size"):
        make_plan(config.load("single_knockoff", base), ds)
    if not extra:  # the seeds alone, asked for
        (client,) = make_plan(config.load("single_knockoff", [*base, "attackers.single.jacobian.rounds=0"]),
                              ds).of(attacker="single")
        assert client.budget == 150


@pytest.mark.parametrize("cap, sent, rounds", [(None, 20, [5, 5, 10]),  # the rounds end before the budget
                                               (12, 12, [5, 5, 2])])  # the account's cap ends the third round
def test_the_client_reports_what_it_sent_per_round_and_the_budget_it_did_not_spend(victim, cap, sent, rounds):
    from types import SimpleNamespace

    from actors.client import Client

    model, ds = victim
    attack = JacobianAttack("jbda", ds.x_test[:5], ds.y_test[:5], 1_000, arch="lenet", num_classes=10,
                            rounds=2, substitute_epochs=1)

    def query(key, x, actor_id):
        return SimpleNamespace(status=200, answered=np.ones(len(x), bool), challenge=None, account_id=key,
                               reasons=[None] * len(x), probs=predict_probs(model, x), retry_after=None)

    report = Client("a-actor0", attack, ["k"], "round_robin", 1_000, 4, seed=0, query=query, solve=None,
                    cap=cap).run()
    assert report["sent"] == sent and report["unspent"] == 1_000 - sent
    assert report["stats"]["queries_per_round"] == rounds and sum(rounds) == sent


@pytest.mark.parametrize("variant", ["jbda", "jb_self"])
def test_each_round_steps_along_its_variants_class_and_turns_back_every_tau_rounds(victim, variant):
    """JBDA steps each point along the gradient of its true label's score, JB-self along the victim's top-1 answer;
    from round tau on, the step's sign flips (Papernot's periodic step size). Checked against jacobian_step on the
    substitute itself, with answers whose top-1 is never the true label (so the two classes differ)."""
    from actors.attacks.jacobian import quantize, to_float

    model, ds = victim
    seeds, truth = ds.x_test[:8], ds.y_test[:8].astype(np.int64)
    attack = JacobianAttack(variant, seeds, truth, budget=8 * 4, arch="lenet", num_classes=10, lam=0.1, rounds=2,
                            tau=1, seed=0)
    attack.substitute = lambda: model  # the substitute each round trains: here, one fixed model
    wrong = (truth + 1) % 10  # the victim's answers: top-1 one class above the truth
    sent, answers = [], []
    for _ in range(3):  # the seeds, then two rounds (each doubles the set)
        x = attack.propose(64)
        probs = np.eye(10, dtype=np.float32)[np.tile(wrong, len(x) // 8)]
        attack.observe(x, probs, np.ones(len(x), bool))
        sent.append(x)
        answers.append(probs)
    for r, lam in ((1, 0.1), (2, -0.1)):  # round 1 steps forward; round 2 is at tau=1: backward
        before = np.concatenate(sent[:r])
        classes = np.tile(truth if variant == "jbda" else wrong, len(before) // 8)
        expected = quantize(jacobian_step(model, to_float(before), torch.as_tensor(classes), lam))
        np.testing.assert_array_equal(sent[r], expected)

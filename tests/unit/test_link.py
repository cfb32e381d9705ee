"""Account linking: sybil accounts too small for per-account PRADA are linked, pooled and flagged;
honest users are not."""

import numpy as np
import pytest

from sim import data, detectors
from sim.detectors.link import REASONS
from sim.errors import ConfigError


def _jbda_like(n_seeds=10, steps=30, eps=0.1, seed=0):
    """Natural seeds, then rounds of +-eps sign steps around them (the pixel statistics of JBDA)."""
    ds = data.load("mnist5k")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.x_train), n_seeds, replace=False)
    cur, labels = ds.x_train[idx].astype(np.float32) / 255, ds.y_train[idx]
    xs, ys = [], []
    for _ in range(steps):
        cur = np.clip(cur + eps * rng.choice([-1.0, 1.0], size=cur.shape), 0, 1)
        xs.append(np.rint(cur * 255).astype(np.uint8))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _interleave(link, prada, sybils: int, benign_users: int = 2, per_request: int = 10):
    """Sybil accounts get the attack's requests in turn; benign users send test images in between."""
    x, y = _jbda_like()
    ds = data.load("mnist5k")
    rng = np.random.default_rng(1)
    benign = [rng.permutation(len(ds.x_test))[:150] for _ in range(benign_users)]
    for r, start in enumerate(range(0, len(x), per_request)):
        acct = f"sybil-{r % sybils}"
        for det in (link, prada):
            det.score(acct, x[start:start + per_request], y[start:start + per_request])
        for u, idx in enumerate(benign):
            part = idx[(r * 5) % 150:(r * 5) % 150 + 5]
            if len(part):
                for det in (link, prada):
                    det.score(f"benign-{u}", ds.x_test[part], ds.y_test[part])
    return link, prada


def test_linking_flags_sybils_that_per_account_prada_cannot_judge_and_spares_honest_users():
    link = detectors.build("link", every=100, min_queries=10, min_pool=50)
    prada = detectors.build("prada", min_pool=50)
    _interleave(link, prada, sybils=15)  # 300 queries over 15 accounts: 20 each, under PRADA's pool of 50
    sybils = {f"sybil-{i}" for i in range(15)}
    assert prada.flagged_accounts() == set()
    assert len(link.flagged_accounts() & sybils) >= 12
    assert not link.flagged_accounts() & {"benign-0", "benign-1"}
    assert any(set(c) <= sybils and len(c) >= 2 for c in link.clusters)
    assert link.flag_reasons().keys() == link.flagged_accounts()
    assert set(link.flag_reasons().values()) <= set(REASONS)


def test_a_lone_attacker_account_pooled_with_honest_ones_does_not_drag_them_down():
    """Once the attacker's account can be judged on its own, the pooled cluster's flag is its own: the honest users
    are cleared. Linking's first round here (every=200) pools 200 queries: the attacker's 100 and the honest pair's
    100. Had it come at 100 queries, no account could have been judged (50 each, min_pool 50): a flagged pool whose
    parts are all too small to judge blames every account of it, honest or not, and for good."""
    link = detectors.build("link", every=200, min_queries=10, min_pool=50, distance=10.0)  # one big cluster
    prada = detectors.build("prada", min_pool=50)
    _interleave(link, prada, sybils=1)
    assert "sybil-0" in prada.flagged_accounts()  # the attacker is plain to see on its own
    assert link.clusters == [["benign-0", "benign-1", "sybil-0"]]
    assert link.flag_reasons() == {"sybil-0": "own stream"}  # pooling does not blame the honest users
    early = detectors.build("link", every=100, min_queries=10, min_pool=50, distance=10.0)
    _interleave(early, detectors.build("prada", min_pool=50), sybils=1)
    assert early.flag_reasons() == dict.fromkeys(["sybil-0", "benign-0", "benign-1"], "too small to judge")


def test_repeated_images_add_no_distance_when_skipped():
    ds = data.load("mnist5k")
    x = np.concatenate([ds.x_test[:200], ds.x_test[:200]])  # two honest users asking the same images
    y = np.concatenate([ds.y_test[:200], ds.y_test[:200]])
    plain = detectors.build("prada").score("g", x, y)
    skipping = detectors.build("prada", skip_repeats=True).score("g", x, y)
    assert plain.flags[-1] and not skipping.flags.any()


@pytest.mark.parametrize("params, message", [
    ({"every": 0}, "link.every must be an integer >= 1, got 0"),
    ({"distance": -1}, "link.distance must be a number > 0, got -1"),
    ({"delta": 2}, "link.delta must be a number in \\(0, 1\\], got 2"),
])
def test_bad_link_parameters_are_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        detectors.build("link", **params)


def test_a_lone_account_can_be_judged_and_only_the_last_query_of_a_batch_sees_a_new_verdict():
    x, y = _jbda_like()
    link = detectors.build("link", every=100, min_queries=10, min_pool=50, min_accounts=1)
    flags = np.concatenate([link.score("solo", x[i:i + 50], y[i:i + 50]).flags for i in range(0, len(x), 50)])
    first = int(np.argmax(flags))
    assert flags.any() and (first + 1) % 50 == 0  # the flag arrives on the query that closed a re-clustering batch
    assert flags[first:].all() and link.flagged_accounts() == {"solo"}


@pytest.mark.parametrize("spare, blamed", [(True, {"b", "c", "d"}), (False, {"a", "b", "c", "d"})])
def test_a_dip_that_shows_only_pooled_blames_the_accounts_that_cannot_clear_themselves(spare, blamed):
    """Tree ((a, b), (c, d)): the four pooled fail PRADA, each pair clears itself. Account a clears on its own
    stream, b and d are too small to judge, c fails alone (but not with d). Only a may be spared."""
    from scipy.cluster.hierarchy import linkage, to_tree

    link = detectors.build("link", min_pool=50, spare=spare)
    names = ["a", "b", "c", "d"]
    for a in names:
        link.score(a, np.zeros((1, 4), np.uint8), np.zeros(1, np.int64))
    verdicts = {"abcd": (0.9, True), "ab": (0.97, False), "cd": (0.96, False), "a": (0.99, False), "b": None,
                "c": (0.9, True), "d": None}
    link._test = lambda accounts, owner: verdicts["".join(sorted(accounts))]
    tree = to_tree(linkage(np.array([[0.0], [0.1], [5.0], [5.1]]), "average"))
    link._descend(tree, names, np.array([]))
    assert link.flagged_accounts() == blamed
    assert set(link.flag_reasons().values()) == {"pooled"}


@pytest.mark.parametrize("spare", [True, False])
def test_a_node_with_one_child_failing_alone_blames_that_child_only(spare):
    """Tree ((a, b), (c, d)): the four pooled fail, (a, b) clears itself and (c, d) fails on its own, then c fails
    alone and d clears: the search blames c, on its own stream, and spares a and b with or without ``spare`` (the
    node is pooled only when both of its children clear)."""
    from scipy.cluster.hierarchy import linkage, to_tree

    link = detectors.build("link", min_pool=50, spare=spare)
    names = ["a", "b", "c", "d"]
    for a in names:
        link.score(a, np.zeros((1, 4), np.uint8), np.zeros(1, np.int64))
    verdicts = {"abcd": (0.9, True), "ab": (0.97, False), "cd": (0.91, True), "a": (0.99, False), "b": (0.98, False),
                "c": (0.9, True), "d": (0.99, False)}
    link._test = lambda accounts, owner: verdicts["".join(sorted(accounts))]
    tree = to_tree(linkage(np.array([[0.0], [0.1], [5.0], [5.1]]), "average"))
    link._descend(tree, names, np.array([]))
    assert link.flagged_accounts() == {"c"} and link.flag_reasons() == {"c": "own stream"}


def test_an_account_keeps_the_reason_it_was_first_flagged_for():
    """Flags are for good, and so is why: c, blamed on its own stream in one round, is still blamed for that after a
    later round finds it only in a pooled failure."""
    from scipy.cluster.hierarchy import linkage, to_tree

    link = detectors.build("link", min_pool=50)
    names = ["a", "b", "c", "d"]
    for a in names:
        link.score(a, np.zeros((1, 4), np.uint8), np.zeros(1, np.int64))
    tree = to_tree(linkage(np.array([[0.0], [0.1], [5.0], [5.1]]), "average"))
    first = {"abcd": (0.9, True), "ab": (0.97, False), "cd": (0.91, True), "a": (0.99, False), "b": (0.98, False),
             "c": (0.9, True), "d": (0.99, False)}
    later = {"abcd": (0.9, True), "ab": (0.97, False), "cd": (0.96, False), "a": None, "b": None, "c": None, "d": None}
    for verdicts in (first, later):
        link._test = lambda accounts, owner, v=verdicts: v["".join(sorted(accounts))]
        link._descend(tree, names, np.array([]))
    assert link.flag_reasons() == {"a": "pooled", "b": "pooled", "c": "own stream", "d": "pooled"}


def test_accounts_are_relinked_as_soon_as_every_queries_have_arrived():
    link = detectors.build("link", every=10, min_queries=5, min_pool=50)
    for a in ("a", "b"):
        link.score(a, np.zeros((5, 4), np.uint8), np.zeros(5, np.int64))
    assert link.clusters == [["a", "b"]]  # the tenth query closed the round


def test_accounts_are_embedded_so_that_their_distance_is_the_hellinger_distance_of_their_pixels():
    link = detectors.build("link")
    half = np.array([[0, 16, 0, 16]], np.uint8)  # intensity bins 0 and 1, half each
    link.score("half", half, np.zeros(1, np.int64))
    link.score("dark", np.zeros((1, 4), np.uint8), np.zeros(1, np.int64))  # bin 0 only
    f = link.features(["half", "dark"])
    p, q = np.r_[0.5, 0.5, np.zeros(14)], np.r_[1.0, np.zeros(15)]
    hellinger = np.sqrt(1 - np.sqrt(p * q).sum())
    assert np.linalg.norm(f[0] - f[1]) == pytest.approx(hellinger)  # 0.541 (without the square roots: 0.5)

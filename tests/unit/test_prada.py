import numpy as np
import pytest

from sim import data, detectors
from sim.detectors.prada import Prada


def _synthetic_stream(n_seeds=10, steps=30, eps=0.03, seed=0):
    """JBDA-like queries: a few natural seeds, then many small perturbations around them."""
    ds = data.load("mnist5k")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.x_train), n_seeds, replace=False)
    seeds = ds.x_train[idx].astype(np.float32) / 255
    labels = ds.y_train[idx]
    xs, ys = [seeds], [labels]
    cur = seeds.copy()
    for _ in range(steps):
        cur = np.clip(cur + eps * rng.choice([-1.0, 1.0], size=cur.shape), 0, 1)
        xs.append(cur.copy())
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def test_prada_flags_a_stream_of_small_perturbations_around_a_few_seeds():
    x, y = _synthetic_stream()
    det = detectors.build("prada", delta=0.95, min_pool=50)
    res = det.score("attacker", x, y)
    assert res.flags[-1] and det.flagged_accounts() == {"attacker"}
    assert not res.flags[:50].any()  # cannot flag before the pool is large enough
    first = int(np.argmax(res.flags))
    assert res.flags[first:].all()  # a flag stays


def test_prada_does_not_flag_iid_natural_test_images():
    ds = data.load("mnist5k")
    det = Prada(delta=0.95, min_pool=50)
    for user in range(3):
        sl = slice(user * 300, (user + 1) * 300)
        res = det.score(f"benign-{user}", ds.x_test[sl], ds.y_test[sl])
        assert not res.flags.any()
        assert np.isfinite(res.scores[-1]) and res.scores[-1] < 0.05
    assert det.flagged_accounts() == set()


def test_prada_keeps_accounts_apart_and_scores_in_batches_like_one_by_one():
    x, y = _synthetic_stream(steps=10)
    whole = Prada().score("a", x, y)
    det = Prada()
    parts = [det.score("b", x[i:i + 7], y[i:i + 7]) for i in range(0, len(x), 7)]
    assert np.array_equal(np.concatenate([p.flags for p in parts]), whole.flags)
    np.testing.assert_allclose(np.concatenate([p.scores for p in parts]), whole.scores, equal_nan=True)
    ds = data.load("mnist5k")
    assert not det.score("c", ds.x_test[:100], ds.y_test[:100]).flags.any()


@pytest.mark.parametrize("params,message", [
    ({"delta": 0}, r"prada.delta must be a number in \(0, 1\], got 0"),
    ({"delta": 1.2}, r"prada.delta must be a number in \(0, 1\], got 1.2"),
    ({"min_pool": 2}, "prada.min_pool must be an integer >= 3, got 2"),
    ({"window": 5}, "prada.window is not a parameter of detector prada; expected one of: delta, min_pool"),
])
def test_prada_rejects_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        detectors.build("prada", **params)


def test_unknown_detector_lists_known():
    with pytest.raises(ValueError, match="detector='eDM' is not a known detector; expected one of: link, .*prada, "
                                         ".*same"):
        detectors.build("eDM")


def test_w_is_scipys_shapiro_wilk_also_from_the_shared_coefficient_cache():
    import warnings

    from scipy.stats import shapiro

    from sim.detectors.prada import _COEFFICIENTS, _w_sorted

    rng = np.random.default_rng(3)
    for n in (3, 11, 12, 200, 200, 5001, 5001):  # each size twice or more: computed, then from the cache
        d = np.sort(rng.exponential(size=n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # scipy: p-value approximate past 5,000
            assert _w_sorted(d) == float(shapiro(d)[0]), n
    assert 5001 in _COEFFICIENTS.cache and _COEFFICIENTS.bytes <= _COEFFICIENTS.max_bytes


def _reference(stream, labels, delta=0.95, min_pool=100, skip_repeats=False):
    """PRADA one query at a time, as the paper states it (each class's own distances start as {0}, its threshold at 0):
    the per-query scores and flags ``Prada.score`` must give."""
    from scipy.stats import shapiro

    sets, thresholds, own, pool = {}, {}, {}, []
    w, flagged, scores, flags = float("nan"), False, [], []
    for x, c in zip(stream.reshape(len(stream), -1).astype(np.int64), labels.tolist()):
        if c not in sets:
            sets[c], thresholds[c], own[c] = [x], 0.0, [0.0]
        else:
            d = float(np.sqrt(min(int(((m - x) ** 2).sum()) for m in sets[c]))) / 255.0
            if d > 0 or not skip_repeats:
                pool.append(d)
                if d > thresholds[c]:
                    sets[c].append(x)
                    own[c].append(d)
                    thresholds[c] = max(thresholds[c], np.mean(own[c]) - np.std(own[c]))
                if len(pool) > min_pool:
                    p = np.sort(pool)
                    if p.std() > 0:
                        p = p[(p >= p.mean() - 3 * p.std()) & (p <= p.mean() + 3 * p.std())]
                    w = 1.0 if p[-1] == p[0] else float(shapiro(p)[0])
                    flagged = flagged or w < delta
        scores.append(1 - w)
        flags.append(flagged)
    return np.array(scores), np.array(flags)


@pytest.mark.parametrize("skip_repeats", [False, True])
@pytest.mark.parametrize("one_product", [True, False])
def test_prada_batched_distances_give_the_one_query_at_a_time_scores(skip_repeats, one_product, monkeypatch):
    """Distances come from matrix products over a request (and over chunks of ``CHUNK`` queries), one masked product
    for all classes or one per class in blocks of members: the scores and flags are those of the query-by-query
    algorithm, whatever the request sizes, repeats included."""
    from sim.detectors.prada import _ClassSet

    if not one_product:
        monkeypatch.setattr(Prada, "SMALL", 0)
        monkeypatch.setattr(_ClassSet, "BLOCK", 4)
    x, y = _synthetic_stream(n_seeds=6, steps=25, seed=4)  # 156 queries
    ds = data.load("mnist5k")
    x = np.concatenate([x, ds.x_test[:150] / 255.0, x[:20]])  # natural images, then repeats of the first queries
    y = np.concatenate([y, ds.y_test[:150], y[:20]])
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    want_scores, want_flags = _reference(np.rint(x * 255), y, min_pool=50, skip_repeats=skip_repeats)
    det = Prada(min_pool=50, skip_repeats=skip_repeats)
    det.CHUNK = 40  # chunk boundaries inside requests
    parts, i = [], 0
    for size in (1, 64, 3, 100, 7, 200, 300):
        parts.append(det.score("a", x[i:i + size], y[i:i + size]))
        i += size
    assert i >= len(x)
    got_scores = np.concatenate([p.scores for p in parts])
    assert np.isfinite(want_scores[100:]).all() and want_flags.any() and not want_flags.all()
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-12, equal_nan=True)
    assert np.array_equal(np.concatenate([p.flags for p in parts]), want_flags)
    assert det.final_w(x, y) == pytest.approx(1 - want_scores[-1], abs=1e-12)


def _pairs(distances):
    """One-pixel queries, two per class: a 0 (the class's first query: no distance), then the pixel value ``d``, whose
    distance to its class set is exactly d / 255. The pool then holds exactly ``distances`` / 255, in order."""
    x = np.array([[v] for d in distances for v in (0, d)], np.uint8).reshape(-1, 1, 1, 1)
    return x, np.repeat(np.arange(len(distances)), 2)


# 20 distances at the normal quantiles 100 + 5 z_(i-0.5)/20, rounded: W of them is about 0.996
_NORMAL = [90, 93, 94, 95, 96, 97, 98, 98, 99, 100, 100, 101, 102, 102, 103, 104, 105, 106, 107, 110]


@pytest.mark.parametrize("outlier", [250, 0])
def test_prada_trims_a_far_outlier_before_the_shapiro_wilk_test(outlier):
    """PRADA tests the pool with the values beyond 3 standard deviations of its mean removed: one far distance (250
    among 90..110: mean 107, std 32, so beyond 204; or 0: beyond 30 below) is not evidence of a synthetic stream. W
    is then that of the 20 normal distances alone; untrimmed it would be far below delta."""
    from scipy.stats import shapiro

    distances = _NORMAL[:10] + [outlier] + _NORMAL[10:]
    x, y = _pairs(distances)
    want = float(shapiro(np.array(_NORMAL) / 255.0)[0])
    assert want > 0.95 and shapiro(np.array(distances) / 255.0)[0] < 0.5  # the trim decides the verdict
    det = Prada(delta=0.95, min_pool=20)  # judged once: at the 21st distance
    res = det.score("a", x, y)
    assert np.isnan(res.scores[:-1]).all() and res.scores[-1] == pytest.approx(1 - want, abs=1e-12)
    assert not res.flags.any() and det.flagged_accounts() == set()
    assert det.final_w(x, y) == pytest.approx(want, abs=1e-12)
    want_scores, want_flags = _reference(x, y, min_pool=20)
    np.testing.assert_allclose(res.scores, want_scores, rtol=0, atol=1e-12, equal_nan=True)
    assert np.array_equal(res.flags, want_flags)
    # and only beyond 3 std: the 20 alone (mean 100, std 4.9) keep 90 and 110, which lie beyond 2 std
    assert Prada(min_pool=19).final_w(*_pairs(_NORMAL)) == pytest.approx(want, abs=1e-12)


def test_prada_class_threshold_never_goes_down():
    """T_c = max(T_c, mean - std of the set's own distances), the first member's own distance 0 included (the paper's
    D_Gc starts as {0}): a large distance joining the set raises the spread and lowers mean - std, but not the
    threshold. One class of one-pixel queries 0, 10, 20, 60: own distances 0, 10, 10, 40 (/255), thresholds
    max(0, 5 - 5) = 0, then 6.67 - 4.71 = 1.95, then (40 joins) 15 - 15 = 0, so it stays 1.95. Then 61 (1 from 60)
    stays out of the set, so 62's distance is to 60 (2, which joins), not to 61 (1, which would not)."""
    x = np.array([0, 10, 20, 60, 61, 62], np.uint8).reshape(-1, 1, 1, 1)
    y = np.zeros(6, np.int64)
    det = Prada(min_pool=3)
    det.score("a", x, y)
    cls = det._accounts["a"].classes[0]
    assert cls.threshold == pytest.approx((20 / 3 - np.sqrt(200 / 9)) / 255, abs=1e-15)
    assert cls.points.values.ravel().tolist() == [0, 10, 20, 60, 62]
    np.testing.assert_allclose(det._accounts["a"].pool.values * 255, [1, 2, 10, 10, 40], atol=1e-9)
    want_scores, want_flags = _reference(x, y, min_pool=3)
    np.testing.assert_allclose(det.score("b", x, y).scores, want_scores, rtol=0, atol=1e-12, equal_nan=True)


def test_prada_starts_each_class_threshold_at_zero_as_the_paper_does():
    """The class's first member counts as an own distance of 0, so the second member's distance d gives the threshold
    max(0, d/2 - d/2) = 0, not d: with one-pixel queries 0, 100, 110, 120 of one class, 110 and 120 join the set
    (distances 10 and 10), where a threshold of 100 would keep them out (their distances then 10 and 20)."""
    x = np.array([0, 100, 110, 120], np.uint8).reshape(-1, 1, 1, 1)
    det = Prada(min_pool=3)
    det.score("a", x, np.zeros(4, np.int64))
    cls = det._accounts["a"].classes[0]
    assert cls.points.values.ravel().tolist() == [0, 100, 110, 120]
    np.testing.assert_allclose(det._accounts["a"].pool.values * 255, [10, 10, 100], atol=1e-9)
    assert Prada.params["min_pool"].default == 100  # the paper's: the test runs once more than 100 distances


def test_final_w_judges_a_stream_from_the_same_pool_size_as_score():
    """``final_w`` is what ``score`` gives at a stream's last query: nothing (None, a NaN score) with exactly
    ``min_pool`` distances, W of the pool from ``min_pool + 1`` on."""
    from scipy.stats import shapiro

    det = Prada(min_pool=3)
    x, y = _pairs([10, 12, 30])  # 3 distances: not yet judged
    assert det.final_w(x, y) is None and np.isnan(det.score("a", x, y).scores).all()
    x, y = _pairs([10, 12, 30, 9])  # 4: judged (no value of 4 lies beyond 3 std: at most 1.5 std from the mean)
    want = float(shapiro(np.array([9, 10, 12, 30]) / 255.0)[0])
    assert det.final_w(x, y) == pytest.approx(want, abs=1e-12)
    assert det.score("b", x, y).scores[-1] == pytest.approx(1 - want, abs=1e-12)

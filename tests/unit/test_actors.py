from collections import Counter

import numpy as np
import pytest
import torch

from actors.accounts import AccountSplitter, split_evenly
from actors.attacks.knockoff import KnockoffRandom
from actors.benign import BenignStream
from actors.replica import train_replica
from sim import data
from sim.config import ReplicaConfig
from sim.errors import ConfigError
from sim.training import accuracy, fidelity, predict_probs


def _drain(splitter, budget, batch):
    counts, left = Counter(), budget
    while left:
        key, n, _ = splitter.next(min(batch, left))
        counts[key] += n
        left -= n
    return counts


def test_round_robin_spreads_requests_evenly():
    keys = [f"k{i}" for i in range(5)]
    assert _drain(AccountSplitter(keys, "round_robin", 100, 0), 100, 4) == {k: 20 for k in keys}


def test_round_robin_reaches_every_account_when_the_budget_is_less_than_a_full_request_each():
    """375 queries over 25 accounts in requests of up to 16: full requests would leave one account unused (24
    requests); requests of the even share, 15, reach all 25. With a remainder, the first accounts send it."""
    keys = [f"k{i}" for i in range(25)]
    assert _drain(AccountSplitter(keys, "round_robin", 375, 0), 375, 16) == {k: 15 for k in keys}
    uneven = _drain(AccountSplitter(keys, "round_robin", 380, 0), 380, 16)
    assert set(uneven) == set(keys) and uneven["k0"] == 20 and uneven["k1"] == 15
    assert len(_drain(AccountSplitter(keys, "round_robin", 10, 0), 10, 16)) == 10  # fewer queries than accounts


def test_blocks_are_contiguous_and_never_straddle():
    keys = ["a", "b", "c"]
    s = AccountSplitter(keys, "blocks", 10, 0)
    seq = []
    left = 10
    while left:
        key, n, _ = s.next(min(4, left))
        seq.append((key, n))
        left -= n
    assert seq == [("a", 3), ("b", 3), ("c", 4)]  # blocks end after 3, 6 and 10 queries


def test_random_split_is_seeded_and_uses_every_account():
    keys = [f"k{i}" for i in range(4)]
    a = _drain(AccountSplitter(keys, "random", 400, 1), 400, 4)
    assert a == _drain(AccountSplitter(keys, "random", 400, 1), 400, 4)
    assert set(a) == set(keys) and sum(a.values()) == 400


@pytest.mark.parametrize("strategy", ["round_robin", "random", "blocks"])
def test_account_cap_retires_accounts_and_ends_when_all_are_spent(strategy):
    keys = [f"k{i}" for i in range(4)]
    s = AccountSplitter(keys, strategy, 100, 0, cap=10)
    counts = Counter()
    while (pick := s.next(7)) is not None:
        assert pick.n >= 1
        counts[pick.key] += pick.n
    assert counts == {k: 10 for k in keys}  # 40 of the 100 queries: then no account may send


@pytest.mark.parametrize("strategy", ["round_robin", "random", "blocks"])
def test_burned_accounts_never_send_again(strategy):
    keys = ["a", "b", "c"]
    s = AccountSplitter(keys, strategy, 90, 3)
    first = s.next(5).key
    s.burn(first)
    later = [s.next(5) for _ in range(12)]
    assert all(p is not None and p.key != first for p in later)
    assert sum(p.n for p in later) == 60  # the others carry the budget on
    for k in set(keys) - {first}:
        s.burn(k)
    assert s.next(5) is None


def test_blocks_hand_a_burned_account_s_block_to_the_next():
    s = AccountSplitter(["a", "b", "c"], "blocks", 9, 0)
    assert s.next(2)[:2] == ("a", 2)
    s.burn("a")
    assert [s.next(4)[:2] for _ in range(2)] == [("b", 4), ("c", 3)]  # b takes over a's block up to 6


def test_pacing_spaces_each_account_s_requests_by_its_rate():
    now = [100.0]
    s = AccountSplitter(["a", "b"], "round_robin", 1000, 0, max_rate=10.0, clock=lambda: now[0])
    picks = [s.next(5) for _ in range(4)]  # a, b, a, b at the same instant
    assert [p.key for p in picks] == ["a", "b", "a", "b"]
    assert [p.delay for p in picks] == [0.0, 0.0, 0.5, 0.5]  # 5 queries at 10/s keep an account busy 0.5 s
    now[0] = 101.0
    assert s.next(5).delay == 0.0


def test_split_evenly():
    assert split_evenly(10, 4) == [3, 3, 2, 2] and sum(split_evenly(1500, 7)) == 1500


def test_knockoff_shards_never_repeat_an_image_and_respect_the_budget():
    pool = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    shards = [KnockoffRandom(pool, 20, seed=5, shard=(i, 4)) for i in range(4)]
    seen = []
    for att in shards:
        while att.remaining:
            seen += att.propose(7).ravel().tolist()
    assert len(seen) == 80 and len(set(seen)) == 80
    with pytest.raises(ValueError, match="budget 30 exceeds the 25 pool images"):
        KnockoffRandom(pool, 30, seed=5, shard=(0, 4))


def test_knockoff_with_replacement_and_augmentation_exceeds_the_pool_with_new_images():
    from actors.attacks.knockoff import augment_images

    pool = data.load("digits").x_test[:50]
    shards = [KnockoffRandom(pool, 120, seed=3, shard=(i, 2), replacement=True, augment=True) for i in range(2)]
    sent = np.concatenate([s.propose(120) for s in shards])
    assert len(sent) == 240 and all(s.remaining == 0 for s in shards)  # 240 queries from 50 images
    assert len({img.tobytes() for img in sent}) > 200  # augmented repeats are (nearly all) new queries
    assert not np.array_equal(shards[0].images, shards[1].images)  # each actor its own draws
    again = KnockoffRandom(pool, 120, seed=3, shard=(0, 2), replacement=True, augment=True)
    assert np.array_equal(again.propose(120), sent[:120])  # seeded
    shifted = augment_images(pool[:10], np.random.default_rng(0))
    assert shifted.dtype == np.uint8 and shifted.shape == pool[:10].shape
    # a shift of at most 2 pixels and a 10% brightness change keep most of the ink where it was
    overlap = ((shifted > 64) & (pool[:10] > 64)).sum() / (pool[:10] > 64).sum()
    assert 0.3 < overlap <= 1.0


def test_replica_optimizer_option_changes_training_deterministically():
    ds = data.load("mnist5k")
    x, y = ds.x_train[:200], ds.y_train[:200]

    def weights(opt):
        model = train_replica(x, np.eye(10, dtype=np.float32)[y], arch="lenet", input_shape=(1, 28, 28),
                              num_classes=10, cfg=ReplicaConfig(epochs=1, optimizer=opt, lr=0.01), seed=0)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    sgd = weights("sgd")
    assert torch.equal(sgd, weights("sgd")) and not torch.equal(sgd, weights("adam"))


def test_adaptive_knockoff_learns_the_rewarding_class_and_stays_finite():
    from actors.attacks.knockoff import KnockoffAdaptive

    labels = np.repeat(np.arange(5), 40)
    pool = (labels[:, None, None, None] * 50 + np.zeros((200, 1, 28, 28))).astype(np.uint8)
    att = KnockoffAdaptive(pool, labels, 150, arch="lenet", num_classes=5, seed=0, lr=0.05,
                           rewards=("certainty",))

    def victim(x):  # certain only about class-3 images: the certainty reward favours class 3
        probs = np.full((len(x), 5), 0.2, np.float32)
        probs[x[:, 0, 0, 0] == 150] = np.eye(5, dtype=np.float32)[3]
        return probs

    sent = []
    while att.remaining:
        x = att.propose(10)
        att.observe(x, victim(x), np.ones(len(x), bool))
        sent.append(x)
        assert np.isfinite(att.policy()).all() and abs(att.policy().sum() - 1) < 1e-9
    sent = np.concatenate(sent)
    assert len(sent) == 150 and len(att.transfer_set()[0]) == 150
    assert (sent[:, 0, 0, 0] == 150).sum() == 40  # every class-3 image was used up first ...
    assert att.policy()[3] == 0  # ... and an exhausted class is never drawn again


def test_adaptive_knockoff_survives_extreme_answers():
    from actors.attacks.knockoff import KnockoffAdaptive

    labels = np.repeat(np.arange(3), 30)
    pool = np.random.default_rng(0).integers(0, 256, (90, 1, 28, 28), dtype=np.uint8)
    att = KnockoffAdaptive(pool, labels, 90, arch="lenet", num_classes=3, seed=1, lr=100.0)
    while att.remaining:
        x = att.propose(16)
        probs = np.zeros((len(x), 3), np.float32)
        probs[:, 0] = 1.0  # exact zeros and ones: no log 0, no overflow
        att.observe(x, probs, np.ones(len(x), bool))
        assert np.isfinite(att.preferences).all() and np.isfinite(att.policy()).all()


def test_adaptive_knockoff_diversity_compares_each_answer_with_the_last_window_answers_only():
    from actors.attacks.knockoff import KnockoffAdaptive

    labels = np.repeat(np.arange(2), 10)
    pool = np.zeros((20, 1, 28, 28), np.uint8)
    att = KnockoffAdaptive(pool, labels, 20, arch="lenet", num_classes=2, seed=0, rewards=("diversity",), window=2)
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    # the third answer is measured against the mean of the two before it, the fourth against the second and third
    div = att.reward_signals(pool[:4], np.stack([a, a, b, b]))["diversity"]
    np.testing.assert_allclose(div, [1.0, 0.0, 1.0, 0.5])  # the fourth: b beyond mean(a, b) = 0.5, not mean(a, a, b)
    assert len(att._recent) == 2


def test_knockoff_transfer_set_keeps_only_answered_queries():
    pool = np.zeros((10, 1, 2, 2), np.uint8)
    att = KnockoffRandom(pool, 10)
    x = att.propose(4)
    probs = np.eye(4, dtype=np.float32)
    att.observe(x, probs, np.array([True, False, True, True]))
    tx, ty = att.transfer_set()
    assert len(tx) == 3 and np.array_equal(ty, probs[[0, 2, 3]])


def test_benign_stream_cycles_its_images_up_to_the_budget():
    imgs = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    b = BenignStream(imgs, 12, seed=0)
    got = np.concatenate([b.propose(5) for _ in range(3)]).ravel()
    assert len(got) == 12 and Counter(got.tolist())[0] >= 2 and b.remaining == 0


def test_benign_stream_sends_the_popular_images_at_the_share_asked_for():
    imgs = np.arange(200, dtype=np.uint8).reshape(200, 1, 1, 1)
    popular = np.array([7, 8, 9])
    got = BenignStream(imgs, 2000, seed=0, popular=0.3, popular_idx=popular).propose(2000).ravel()
    counts = Counter(got.tolist())
    # without the popular set each image appears 10 times; with it, 30% of 2,000 queries go to 3 images,
    # the first twice as often as the second (Zipf weights 1, 1/2, 1/3)
    share = sum(counts[i] for i in popular) / 2000
    assert 0.27 < share < 0.34
    assert counts[7] > 1.5 * counts[8] > counts[9]


def test_blocks_of_given_sizes_give_each_account_its_own_number_of_queries():
    s = AccountSplitter(["a", "b", "c"], "blocks", 9, 0, sizes=[2, 5, 2])
    sent = [(pick.key, pick.n) for pick in (s.next(4) for _ in range(4))]
    assert sent == [("a", 2), ("b", 4), ("b", 1), ("c", 2)]
    with pytest.raises(ConfigError, match=r"sizes=\[2, 5\]; expected 3 positive block sizes that sum to the "
                                          r"budget 9"):
        AccountSplitter(["a", "b", "c"], "blocks", 9, 0, sizes=[2, 5])


def test_a_benign_population_varies_its_accounts_and_shares_attacker_signups():
    from sim import config
    from sim.plan import make_plan

    cfg = config.load("distributed_knockoff", [
        "benign.users=3", "benign.accounts=200", "benign.queries=20", "benign.queries_max=400",
        "benign.popular=0.2", "benign.shared_signup=0.25", "attackers.distributed.cohort_size=5"])
    plan = make_plan(cfg, data.load("mnist5k"))
    benign = plan.of(role="benign")
    assert [len(c.accounts) for c in benign] == [67, 67, 66]
    sizes = [q for c in benign for q in c.strategy["sizes"]]
    assert len(sizes) == 200 and min(sizes) >= 20 and max(sizes) <= 400 and len(set(sizes)) > 100
    assert all(c.budget == sum(c.strategy["sizes"]) and c.split == "blocks" for c in benign)
    accounts = [a for a in plan.accounts.values() if a.role == "benign"]
    shared = [a for a in accounts if not a.cohort.startswith("benign-")]
    attacker_cohorts = {a.cohort for a in plan.accounts.values() if a.role == "attacker"}
    assert 30 <= len(shared) <= 70 and {a.cohort for a in shared} <= attacker_cohorts
    assert len({a.cohort for a in shared}) > 2  # spread over the attackers' batches


def test_a_benign_actor_sends_each_of_its_accounts_own_number_of_queries():
    from actors.client import Client
    from sim import config, models
    from sim.plan import make_plan
    from sim.service import VictimService

    cfg = config.load("single_knockoff", ["benign.users=2", "benign.accounts=7", "benign.queries=5",
                                          "benign.queries_max=40", "benign.batch_size=8"])
    ds = data.load("mnist5k")
    plan = make_plan(cfg, ds)
    svc = VictimService(model=models.build("lenet", ds.input_shape, 10).eval(), victim="v", run_id="r",
                        accounts=plan.accounts, input_shape=ds.input_shape)
    c = plan.of(role="benign")[0]
    report = Client(c.actor_id, c.source, c.keys, c.split, c.budget, c.batch_size, seed=c.seed, query=svc.query,
                    solve=svc.solve, **c.strategy).run()
    assert report["per_account"] == dict(zip(c.accounts, c.strategy["sizes"]))


def test_the_default_benign_users_keep_their_one_account_each():
    from sim import config
    from sim.plan import make_plan

    plan = make_plan(config.load("distributed_knockoff"), data.load("mnist5k"))
    assert [(c.actor_id, c.accounts, c.budget, c.split, c.strategy) for c in plan.of(role="benign")] == [
        ("benign-0", ["benign-0"], 300, "round_robin", None), ("benign-1", ["benign-1"], 300, "round_robin", None)]


def test_replica_trained_on_victim_soft_labels_agrees_with_the_victim():
    ds = data.load("mnist5k")
    from sim import models
    from sim.training import train_classifier

    victim = train_classifier(models.build("lenet", (1, 28, 28), 10), ds.x_train[:1000], ds.y_train[:1000],
                              epochs=3, seed=0)
    soft = predict_probs(victim, ds.x_train[1000:2000])
    replica = train_replica(ds.x_train[1000:2000], soft, arch="lenet", input_shape=(1, 28, 28),
                            num_classes=10, cfg=ReplicaConfig(epochs=5), seed=0)
    rep = predict_probs(replica, ds.x_test).argmax(1)
    vic = predict_probs(victim, ds.x_test).argmax(1)
    assert fidelity(rep, vic) > 0.85 and accuracy(rep, ds.y_test) > 0.8


def test_accuracy_and_fidelity_on_known_inputs():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert fidelity(np.array([0, 0]), np.array([0, 1])) == 0.5


def test_replica_training_is_deterministic_for_a_seed():
    ds = data.load("digits")
    x, probs = ds.x_train[:200], np.eye(10, dtype=np.float32)[ds.y_train[:200]]
    kw = dict(arch="lenet", input_shape=(1, 28, 28), num_classes=10, cfg=ReplicaConfig(epochs=1))
    a = train_replica(x, probs, seed=3, **kw)
    b = train_replica(x, probs, seed=3, **kw)
    c = train_replica(x, probs, seed=4, **kw)
    pa, pb, pc_ = (predict_probs(m, ds.x_test) for m in (a, b, c))
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(pa, pc_)


def test_coarse_groups_separate_distinct_images_and_are_seeded():
    from actors.attacks.knockoff import coarse_groups

    rng = np.random.default_rng(0)
    kinds = np.repeat(np.arange(3), 30)  # three kinds of image: dark, mid-grey, bright, plus noise
    pool = np.clip(kinds[:, None, None, None] * 100 + rng.integers(0, 20, (90, 1, 28, 28)), 0, 255).astype(np.uint8)
    groups = coarse_groups(pool, 3, seed=1)
    assert len(set(zip(kinds, groups))) == 3  # each kind is exactly one group
    assert np.array_equal(groups, coarse_groups(pool, 3, seed=1))
    with pytest.raises(ValueError, match="100 groups asked of 90 pool images"):
        coarse_groups(pool, 100)


def test_adaptive_knockoff_over_coarse_groups_of_an_unlabelled_pool():
    from actors.attacks.knockoff import KnockoffAdaptive, coarse_groups

    pool = data.load("digits").all_images()[:300]
    groups = coarse_groups(pool, 5, seed=0)
    att = KnockoffAdaptive(pool, groups, 120, arch="lenet", num_classes=10, seed=0)
    sent = []
    while att.remaining:
        x = att.propose(32)
        probs = np.random.default_rng(len(sent)).dirichlet(np.ones(10), len(x)).astype(np.float32)
        att.observe(x, probs, np.ones(len(x), bool))
        sent.append(x)
    assert sum(map(len, sent)) == 120 and len(att.stats()["policy"]) == 5
    assert np.isclose(sum(att.stats()["policy"]), 1, atol=1e-3)


def test_a_pool_of_several_datasets_keeps_their_classes_apart():
    pool, labels = data.load_pool("mnist5k+digits")
    assert len(pool) == 5000 + 1797 and pool.shape[1:] == (1, 28, 28)
    assert set(labels[:5000]) == set(range(10)) and set(labels[5000:]) == set(range(10, 20))


def test_the_mad_code_replica_reports_the_epoch_of_best_test_accuracy_beside_the_last():
    """replica.variant=mad_code: the task scores the replica after every epoch and keeps the best (ties: the later
    epoch, as the code's >=), reported beside the last epoch's numbers."""
    from actors.remote import train_replica_task

    ds = data.load("mnist5k")
    x, y = ds.x_train[:200], ds.y_train[:200]
    posted = {}

    class Board:  # the ProgressBoard's update, recorded
        class update:
            @staticmethod
            def remote(key, epoch, value):
                posted[epoch] = value

    job = {"arch": "lenet", "input_shape": (1, 28, 28), "num_classes": 10, "seed": 0, "key": "a",
           "post_accuracy": True, "cfg": ReplicaConfig(epochs=6, variant="mad_code")}
    eval_set = (ds.x_test[:300], ds.y_test[:300], ds.y_test[:300])
    out = train_replica_task._function(job, eval_set, Board, None, (x, np.eye(10, dtype=np.float32)[y]))
    assert sorted(posted) == list(range(1, 7)) and out["test_accuracy"] == posted[6]
    top = max(posted.values())
    assert out["best"]["test_accuracy"] == top and out["best"]["epoch"] == max(e for e, v in posted.items() if v == top)
    default = train_replica_task._function({**job, "cfg": ReplicaConfig(epochs=2)}, eval_set, None, None,
                                           (x, np.eye(10, dtype=np.float32)[y]))
    assert "best" not in default


def test_a_client_refuses_what_an_attack_of_the_users_own_proposes_unless_it_is_uint8_images():
    from actors.client import Client
    from sim.errors import ConfigError

    class FloatSource:
        remaining = 8

        def propose(self, n):
            return np.zeros((n, 1, 28, 28), np.float32)

    client = Client("a-actor0", FloatSource(), ["k"], "round_robin", 8, 8, seed=0,
                    query=lambda *a: pytest.fail("nothing may be sent"), solve=None)
    with pytest.raises(ConfigError, match=r"actor a-actor0: its attack's propose\(8\) returned float32 \(8, 1, 28, "
                                          r"28\); expected uint8 images \(N, C, H, W\)"):
        client.run()


def test_queries_a_source_did_not_propose_stay_the_accounts_to_send():
    s = AccountSplitter(["a", "b"], "blocks", 8, 0)
    pick = s.next(3)
    assert (pick.key, pick.n) == ("a", 3)
    s.unsent("a", 2)  # only one was proposed (a Jacobian round's end): a's block still holds 3
    assert [(p.key, p.n) for p in (s.next(8), s.next(8))] == [("a", 3), ("b", 4)]


def test_a_request_is_sent_again_when_its_replica_dies_with_it_or_serve_sheds_it(monkeypatch):
    """A client does not stop when the Serve replica holding its request is killed (Ray says the actor is
    unavailable) or when Serve's queues are full: it waits a little and sends the request again."""
    import time

    from ray.exceptions import ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    from actors.remote import _patiently

    monkeypatch.setattr(time, "sleep", lambda s: None)
    failures = [ActorUnavailableError("the replica died", None), BackPressureError(num_queued_requests=3,
                                                                             max_queued_requests=2)]

    def call():
        if failures:
            raise failures.pop(0)
        return "answer"

    assert _patiently(call) == "answer" and not failures
    with pytest.raises(ValueError):  # anything else is not retried
        _patiently(lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_an_idle_account_does_not_bank_its_rate_and_a_burned_blocks_account_hands_over_to_the_last_live_one():
    now = [100.0]
    paced = AccountSplitter(["a"], "round_robin", 1000, 0, max_rate=10.0, clock=lambda: now[0])
    paced.next(5)
    now[0] = 110.0  # ten idle seconds: the next request goes at once, and the one after waits its own 0.5 s
    assert paced.next(5).delay == 0.0 and paced.next(5).delay == pytest.approx(0.5)
    blocks = AccountSplitter(["a", "b", "c"], "blocks", 9, 0)
    blocks.next(3)
    blocks.next(3)
    blocks.burn("c")
    assert blocks.next(3).key == "b"


def test_a_benign_stream_sends_its_images_in_a_shuffled_order():
    images = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
    got = BenignStream(images, 50, seed=0).propose(50).ravel().tolist()
    assert sorted(got) == list(range(50)) and got != list(range(50))

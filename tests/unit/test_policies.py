"""Response policies in the victim service (Ray-free): proof of work, perturbation, per-query refusal."""

import hashlib
import json

import numpy as np
import pyarrow.compute as pc
import pytest

from sim import data, defenses, detectors, models, pow, querylog
from sim.policy import Rule
from sim.protocol import Account
from sim.service import VictimService


def _service(tmp_path, rule: Rule, threshold: float = 0.0):
    """A victim whose max-softmax detector flags every query scoring above ``threshold``."""
    model = models.build("lenet", (1, 28, 28), 10)  # untrained: unsure about everything (score ~0.9)
    keys = {"k-att": Account("att-0", "attacker", "jbda", "att-c0"), "k-ben": Account("ben-0", "benign")}
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w", detectors=["msp"])
    perturbers = {"msp": defenses.from_spec(rule.perturb, victim=model)} if rule.action == "perturb" else {}
    svc = VictimService(model=model, victim="v", run_id="r", accounts=keys, input_shape=(1, 28, 28),
                        detectors={"msp": detectors.build("msp", threshold=threshold)}, rules={"msp": rule},
                        perturbers=perturbers, writer=writer, max_images=16)
    return svc, writer


def test_proof_of_work_answers_only_after_a_right_solution(tmp_path):
    svc, writer = _service(tmp_path, Rule("proof_of_work", threshold=0.0, saturate=1.0, bits_min=4, bits_max=6))
    x = data.load("mnist5k").x_test[:4]
    first = svc.query("k-att", x, "actor-0")
    assert first.status == 202 and first.actions == ["challenged"] * 4
    assert np.isnan(first.probs).all() and (first.labels == -1).all()  # nothing is answered yet
    ch = first.challenge
    assert ch["indices"] == [0, 1, 2, 3] and 6 <= ch["bits"] <= 8  # 4 puzzles of 4-6 bits: 6-8 bits of work
    assert json.loads(json.dumps(first.to_json()))["challenge"]["bits"] == ch["bits"]

    counter, _ = pow.solve(ch["nonce"], ch["bits"])
    assert svc.solve("k-ben", ch["id"], counter).status == 404  # another account cannot redeem it
    solved = svc.solve("k-att", ch["id"], counter, "actor-0", seconds=0.5)
    assert solved.status == 200 and solved.answered.all()
    np.testing.assert_allclose(solved.probs.sum(1), 1, atol=1e-5)
    assert svc.solve("k-att", ch["id"], counter).status == 404  # a challenge is spent once
    writer.close()
    table = querylog.read(str(tmp_path))
    # sorted by account: att-0's challenge, its answers, its spent retry; then ben-0's refused attempt
    assert table.column("action").to_pylist() == ["challenged"] * 4 + ["answered"] * 4 + ["refused"] * 2
    rows = table.filter(pc.equal(table.column("account_id"), "att-0")).to_pylist()
    assert all(r["returned_probs"] is None and r["pow_bits"] >= 4 for r in rows[:4])
    assert [r["resubmission"] for r in rows] == [False] * 4 + [True] * 4 + [False]
    assert sum(r["pow_seconds"] for r in rows[4:8]) == pytest.approx(0.5)
    assert rows[0]["msp_score"] > 0 and rows[0]["msp_flagged"] and rows[0]["cohort"] == "att-c0"


def test_a_wrong_solution_is_refused_and_never_answered(tmp_path):
    svc, writer = _service(tmp_path, Rule("proof_of_work", threshold=0.0, bits_min=12, bits_max=12))
    x = data.load("mnist5k").x_test[:2]
    ch = svc.query("k-att", x).challenge
    # one zero bit short, worked out without pow.verify (which is what is under test)
    zeros = lambda c: 256 - int.from_bytes(hashlib.sha256(f"{ch['nonce']}:{c}".encode()).digest(), "big").bit_length()  # noqa: E731
    wrong = next(c for c in range(10**6) if zeros(c) == ch["bits"] - 1)
    reply = svc.solve("k-att", ch["id"], wrong)
    assert reply.status == 403 and not reply.answered.any() and np.isnan(reply.probs).all()
    assert reply.reasons == ["wrong proof-of-work solution"] * 2
    assert svc.solve("k-att", ch["id"], pow.solve(ch["nonce"], ch["bits"])[0]).status == 404  # spent
    writer.close()
    table = querylog.read(str(tmp_path))
    assert pc.sum(pc.is_in(table.column("action"), pc.cast(np.array(querylog.ANSWERED), "string"))).as_py() in (0, None)
    assert table.column("returned_probs").null_count == table.num_rows


def test_http_body_can_carry_a_solution(tmp_path):
    svc, writer = _service(tmp_path, Rule("proof_of_work", threshold=0.0, bits_min=3, bits_max=3))
    body = json.dumps({"images": (data.load("mnist5k").x_test[:1] / 255).tolist()}).encode()
    ch = svc.query_json("k-att", body).challenge
    # malformed answers: 400 naming the field, and the challenge stays open for the right one
    for bad, field in (({}, "solution is missing"), ({"solution": None}, "solution is missing"),
                       ({"solution": "12"}, "solution '12' is not one"), ({"solution": 1.5}, "solution 1.5"),
                       ({"solution": True}, "solution True"), ({"solution": -1}, "solution -1"),
                       ({"solution": 10 ** 400}, "solution 1000000000000000000000000000000000000... is not one"),
                       ({"solution": 1, "seconds": "lots"}, "seconds 'lots'"),
                       ({"solution": 1, "seconds": -2}, "seconds -2")):
        reply = svc.query_json("k-att", json.dumps({"challenge": ch["id"], **bad}).encode())
        assert reply.status == 400 and reply.reason.startswith(field) and "stays open" in reply.reason, reply.reason
    reply = svc.query_json("k-att", json.dumps({"challenge": None, "solution": 1}).encode())
    assert reply.status == 400 and reply.reason.startswith("challenge None: expected the id of a challenge")
    body = {"challenge": ch["id"], "solution": pow.solve(ch["nonce"], ch["bits"])[0], "seconds": 0.01}
    assert svc.query_json("k-att", json.dumps(body).encode()).status == 200
    writer.close()


def test_perturb_routes_only_flagged_queries_through_its_defense(tmp_path):
    rule = Rule("perturb", perturb={"name": "labels_only"})
    svc, writer = _service(tmp_path, rule, threshold=0.5)
    x = data.load("mnist5k").x_test[:8]
    reply = svc.query("k-ben", x)
    probs = svc.model(__import__("torch").as_tensor(x / 255.0).float()).softmax(1)
    flagged = 1 - probs.max(1).values.detach().numpy() > 0.5
    assert reply.status == 200 and reply.answered.all()
    assert reply.actions == ["answered"] * 8
    one_hot = (reply.probs.max(1) == 1.0)
    assert (one_hot == flagged).all() and flagged.any()
    writer.close()
    acts = querylog.read(str(tmp_path)).column("action").to_pylist()
    assert acts == ["perturbed" if f else "answered" for f in flagged]


def test_a_stateless_refusal_refuses_the_flagged_query_itself(tmp_path):
    svc, writer = _service(tmp_path, Rule("refuse"), threshold=-1.0)  # every query scores above -1
    reply = svc.query("k-ben", data.load("mnist5k").x_test[:3])
    assert reply.status == 403 and reply.reasons == ["query flagged by msp"] * 3 and np.isnan(reply.probs).all()
    writer.close()


def test_a_perturb_that_fired_beside_proof_of_work_shapes_the_answer_the_solution_brings(tmp_path):
    model = models.build("lenet", (1, 28, 28), 10)  # untrained: every query scores ~0.9, above both thresholds
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w", detectors=["pw", "soft"])
    rules = {"pw": Rule("proof_of_work", threshold=0.0, bits_min=3, bits_max=3),
             "soft": Rule("perturb", perturb={"name": "labels_only"})}
    svc = VictimService(model=model, victim="v", run_id="r", accounts={"k": Account("a", "attacker")},
                        input_shape=(1, 28, 28), detectors={n: detectors.build("msp", threshold=0.0) for n in rules},
                        rules=rules, perturbers={"soft": defenses.from_spec({"name": "labels_only"}, victim=model)},
                        writer=writer, max_images=16)
    first = svc.query("k", data.load("mnist5k").x_test[:3])
    assert first.status == 202 and first.actions == ["challenged"] * 3  # the strictest wins now
    ch = first.challenge
    solved = svc.solve("k", ch["id"], pow.solve(ch["nonce"], ch["bits"])[0])
    assert solved.status == 200 and solved.actions == ["answered"] * 3 and (solved.probs.max(1) == 1.0).all()
    writer.close()
    assert querylog.read(str(tmp_path)).column("action").to_pylist() == ["challenged"] * 3 + ["perturbed"] * 3


def test_calibration_sets_the_threshold_at_1_minus_fpr_and_proof_of_work_saturation_at_1_minus_fpr_over_10():
    """A calibrated detector flags ``target_fpr`` of benign images, and its proof of work reaches ``bits_max`` only at
    the 1 - target_fpr / 10 quantile (not at the threshold itself, where every flagged query would pay the most).
    Benign msp scores 0, 0.005, ..., 0.495 (100 of them): the 0.9 quantile lies at position 99 * 0.9 = 89.1, i.e.
    0.445 + 0.1 * 0.005 = 0.4455; the 0.99 quantile at 98.01, i.e. 0.49 + 0.01 * 0.005 = 0.49005."""
    s = np.arange(100) / 200.0
    probs = np.stack([1 - s, s], 1)  # msp's score: 1 - the largest probability, = s
    det = detectors.build("msp", target_fpr=0.1)
    got = det.calibrate(np.zeros((100, 1, 28, 28), np.uint8), probs)
    assert got["threshold"] == pytest.approx(0.4455, abs=1e-12) == det.threshold()
    assert got["saturate"] == pytest.approx(0.49005, abs=1e-12) == det.saturation()
    assert got["images"] == 100 and got["target_fpr"] == 0.1
    assert detectors.build("msp", threshold=0.3).calibrate(np.zeros((1, 1, 28, 28)), probs[:1]) is None  # given


def test_the_calibration_split_holds_out_a_seeded_tenth():
    """The defender's held-out images: 10% of them, disjoint from the training part, the same for a seed and another
    for another seed (so the held-out set follows the scenario's seed)."""
    train, cal = detectors.calibration_split(1000, seed=3)
    assert len(cal) == 100 and len(train) == 900
    assert np.array_equal(np.sort(np.r_[train, cal]), np.arange(1000))
    assert np.all(np.diff(cal) > 0) and np.all(np.diff(train) > 0)
    again_train, again_cal = detectors.calibration_split(1000, seed=3)
    assert np.array_equal(again_cal, cal) and np.array_equal(again_train, train)
    others = [detectors.calibration_split(1000, seed=s)[1] for s in (4, 5)]
    assert all(not np.array_equal(o, cal) for o in others) and not np.array_equal(*others)
    assert len(detectors.calibration_split(5, seed=0)[1]) == 1  # at least one image held out


def test_a_stateless_detector_flags_scores_strictly_above_its_threshold_and_nothing_before_it_has_one():
    probs = np.array([[0.75, 0.25], [0.7, 0.3], [0.8, 0.2]])  # msp scores 0.25 (exactly), 0.3 and 0.2
    x, labels = np.zeros((3, 1, 28, 28), np.uint8), probs.argmax(1)
    assert detectors.build("msp", threshold=0.25).score("a", x, labels, probs).flags.tolist() == [False, True, False]
    unset = detectors.build("msp", target_fpr=0.05).score("a", x, labels, probs)
    assert not unset.flags.any() and unset.scores == pytest.approx([0.25, 0.3, 0.2])

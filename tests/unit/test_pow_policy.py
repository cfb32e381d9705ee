import hashlib

import numpy as np
import pytest

from sim import pow
from sim.policy import ACTIONS, Rule, acted_on, combine
from sim.protocol import Account


def _zeros(nonce: str, counter: int) -> int:
    """Leading zero bits of SHA-256(nonce ":" counter), worked out here without sim.pow."""
    return 256 - int.from_bytes(hashlib.sha256(f"{nonce}:{counter}".encode()).digest(), "big").bit_length()


def test_a_solution_verifies_and_wrong_ones_are_refused():
    nonce = "fixed-nonce-for-the-test"
    counter, hashes = pow.solve(nonce, 10)
    assert pow.verify(nonce, 10, counter) and hashes == counter + 1
    assert pow.leading_zero_bits(pow.digest(nonce, counter)) >= 10 and _zeros(nonce, counter) >= 10
    assert all(_zeros(nonce, c) < 10 for c in range(counter))  # solve returns the first solution
    wrong = next(c for c in range(counter + 1, 10**6) if _zeros(nonce, c) < 10)  # chosen without verify
    assert not pow.verify(nonce, 10, wrong)
    assert not pow.verify(pow.new_nonce(), 24, counter)  # another puzzle, far harder
    for junk in (-1, "7", 1.5, None, True):
        assert not pow.verify(nonce, 10, junk)


def test_one_zero_bit_short_is_not_a_solution():
    """A digest with exactly bits-1 leading zeros fails, one with exactly bits passes, for a fixed puzzle: verify
    asks for the full difficulty (one bit less would halve a client's cost)."""
    nonce = "fixed-nonce-for-the-test"
    for bits in (1, 6, 8):
        short = next(c for c in range(10**6) if _zeros(nonce, c) == bits - 1)
        exact = next(c for c in range(10**6) if _zeros(nonce, c) == bits)
        assert not pow.verify(nonce, bits, short), bits
        assert pow.verify(nonce, bits, exact), bits


def test_leading_zero_bits_and_combined_difficulty():
    assert pow.leading_zero_bits(bytes([0, 0, 0b00010000]) + b"\xff") == 19
    assert pow.leading_zero_bits(b"\xff") == 0
    assert pow.combined_bits(np.array([10, 10])) == 11  # twice the work: one more bit
    assert pow.combined_bits(np.array([8, 8, 8, 8, 0])) == 10
    assert pow.combined_bits(np.array([0, 0])) == 0
    # 2^10 + 2^8 = 1280 hashes: more than 10 bits' worth (log2 = 10.32), so 11 bits (rounded up, never down)
    assert pow.combined_bits(np.array([10, 8])) == 11
    with pytest.raises(ValueError, match="bits must be in"):
        pow.solve("n", 99)


def test_difficulty_grows_linearly_with_the_score_and_saturates():
    rule = Rule(action="proof_of_work", threshold=1.0, saturate=3.0, bits_min=8, bits_max=16)
    assert rule.pow_bits(np.array([1.0, 2.0, 3.0, 10.0, np.nan, 0.0])).tolist() == [8, 12, 16, 16, 8, 8]


def test_difficulty_between_whole_bits_is_rounded_to_the_nearest():
    """Scores whose linear difficulty falls between whole bits get the nearest one (rounded, neither floor nor
    ceiling): 8 + 8 * (score - 1) / 2 bits."""
    rule = Rule(action="proof_of_work", threshold=1.0, saturate=3.0, bits_min=8, bits_max=16)
    # 1.15 -> 8.6 bits, 2.1 -> 12.4, 2.15 -> 12.6, 2.9 -> 15.6
    assert rule.pow_bits(np.array([1.15, 2.1, 2.15, 2.9])).tolist() == [9, 12, 13, 16]


def test_stateful_flags_act_from_the_next_query_stateless_on_the_query_itself():
    flags = np.array([False, True, True])
    assert acted_on(flags, False, stateful=True).tolist() == [False, False, True]
    assert acted_on(flags, True, stateful=True).tolist() == [True, False, True]
    assert acted_on(flags, False, stateful=False).tolist() == [False, True, True]


def test_the_strictest_action_wins():
    refuse, pw, perturb = Rule("refuse"), Rule("proof_of_work", threshold=0, saturate=1), Rule("perturb", perturb={})
    level, bits, which = combine([("p", perturb, np.array([1, 1, 0, 0], bool), np.zeros(4)),
                                  ("w", pw, np.array([0, 1, 1, 0], bool), np.array([0, 0.5, 1, 0])),
                                  ("r", refuse, np.array([0, 0, 1, 0], bool), np.zeros(4))], 4)
    assert [ACTIONS[i] for i in level] == ["perturb", "proof_of_work", "refuse", "answer"]
    assert bits.tolist() == [0, 12, 16, 0]
    assert which == ["p", "p", None, None]


def test_several_rules_on_one_query_ask_the_hardest_puzzle_and_the_first_perturbation():
    """Two proof-of-work rules on one query: it gets the larger of their difficulties, in whichever order the
    detectors come. Two perturb rules: the first detector (in the service's detector order) shapes the answer."""
    hard = Rule("proof_of_work", threshold=0, saturate=1, bits_min=14, bits_max=14)
    easy = Rule("proof_of_work", threshold=0, saturate=1, bits_min=10, bits_max=10)
    both, only_first = np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)
    for decisions in ([("h", hard, both, np.zeros(3)), ("e", easy, both, np.zeros(3))],
                      [("e", easy, both, np.zeros(3)), ("h", hard, both, np.zeros(3))]):
        level, bits, _ = combine(decisions, 3)
        assert bits.tolist() == [14, 14, 0]
        assert [ACTIONS[i] for i in level] == ["proof_of_work", "proof_of_work", "answer"]
    mad, noise = Rule("perturb", perturb={"name": "mad"}), Rule("perturb", perturb={"name": "noise"})
    _, bits, which = combine([("mad", mad, only_first, np.zeros(3)), ("noise", noise, both, np.zeros(3))], 3)
    assert which == ["mad", "noise", None] and not bits.any()
    _, _, which = combine([("noise", noise, both, np.zeros(3)), ("mad", mad, only_first, np.zeros(3))], 3)
    assert which == ["noise", "noise", None]


def test_history_keys_follow_the_grouping():
    acct = Account("a-1", "attacker", "jbda", "a-c0")
    assert Rule(group="account").key(acct, "actor-3") == "a-1"
    assert Rule(group="actor").key(acct, "actor-3") == "actor:actor-3"
    assert Rule(group="cohort").key(acct, "actor-3") == "cohort:a-c0"
    assert Rule(group="all").key(acct, "actor-3") == "all"
    # an account of no cohort is a cohort of its own: never pooled with the other cohort-less accounts
    assert Rule(group="cohort").key(Account("a", "benign"), None) == "cohort:a"
    assert Rule(group="cohort").key(Account("b", "external"), None) == "cohort:b"
    with pytest.raises(ValueError, match="group must be one of"):
        Rule(group="ip")

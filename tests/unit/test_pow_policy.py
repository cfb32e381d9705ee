import numpy as np
import pytest

from sim import pow
from sim.policy import ACTIONS, Rule, acted_on, combine
from sim.protocol import Account


def test_a_solution_verifies_and_wrong_ones_are_refused():
    nonce = pow.new_nonce()
    counter, hashes = pow.solve(nonce, 10)
    assert pow.verify(nonce, 10, counter) and hashes == counter + 1
    assert pow.leading_zero_bits(pow.digest(nonce, counter)) >= 10
    wrong = next(c for c in range(counter) if not pow.verify(nonce, 10, c)) if counter else counter + 1
    assert not pow.verify(nonce, 10, wrong)
    assert not pow.verify(pow.new_nonce(), 24, counter)  # another puzzle, far harder
    for junk in (-1, "7", 1.5, None, True):
        assert not pow.verify(nonce, 10, junk)


def test_leading_zero_bits_and_combined_difficulty():
    assert pow.leading_zero_bits(bytes([0, 0, 0b00010000]) + b"\xff") == 19
    assert pow.leading_zero_bits(b"\xff") == 0
    assert pow.combined_bits(np.array([10, 10])) == 11  # twice the work: one more bit
    assert pow.combined_bits(np.array([8, 8, 8, 8, 0])) == 10
    assert pow.combined_bits(np.array([0, 0])) == 0
    with pytest.raises(ValueError, match="bits must be in"):
        pow.solve("n", 99)


def test_difficulty_grows_linearly_with_the_score_and_saturates():
    rule = Rule(action="proof_of_work", threshold=1.0, saturate=3.0, bits_min=8, bits_max=16)
    assert rule.pow_bits(np.array([1.0, 2.0, 3.0, 10.0, np.nan, 0.0])).tolist() == [8, 12, 16, 16, 8, 8]


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


def test_history_keys_follow_the_grouping():
    acct = Account("a-1", "attacker", "jbda", "a-c0")
    assert Rule(group="account").key(acct, "actor-3") == "a-1"
    assert Rule(group="actor").key(acct, "actor-3") == "actor:actor-3"
    assert Rule(group="cohort").key(acct, "actor-3") == "cohort:a-c0"
    assert Rule(group="all").key(acct, "actor-3") == "all"
    with pytest.raises(ValueError, match="group must be one of"):
        Rule(group="ip")

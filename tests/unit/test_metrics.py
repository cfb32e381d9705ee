import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from analysis.metrics import MetricError, detection_metrics, fpr_at_tpr


def test_metrics_match_scikit_learn_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = rng.normal(size=500) + labels  # attackers score higher on average
    m = detection_metrics(labels, scores)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["aupr"] == pytest.approx(average_precision_score(labels, scores))
    assert m["positives"] == labels.sum() and m["negatives"] == (~labels).sum()
    assert 0 < m["fpr90"] <= m["fpr95"] < 1


def test_fpr_at_tpr_on_a_hand_worked_example():
    # positives 0.9 0.8 0.4 0.3; negatives 0.7 0.5 0.2 0.1
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.7, 0.5, 0.2, 0.1])
    # catching 3 of 4 positives (threshold 0.4) flags 2 negatives; catching all 4 (0.3) also flags 2
    assert fpr_at_tpr(labels, scores, 0.75) == 0.5
    assert fpr_at_tpr(labels, scores, 0.95) == 0.5
    assert fpr_at_tpr(labels, scores, 0.5) == 0.0  # 0.8 catches two positives and no negative
    perfect = detection_metrics(labels, np.r_[labels[:4] * 1.0 + 1, labels[4:] * 1.0])
    assert perfect["auroc"] == 1 and perfect["aupr"] == 1 and perfect["fpr95"] == 0


def test_fpr_at_tpr_with_ties_of_attacker_and_benign_items():
    """Twenty score values, each one attacker's and one benign item's: the threshold that first catches 95% of the
    attackers (the 19th value from the top) flags 95% of the benign items, not all of them."""
    scores = np.repeat(np.arange(20.0), 2)
    labels = np.tile([True, False], 20)
    assert fpr_at_tpr(labels, scores, 0.95) == 0.95 and fpr_at_tpr(labels, scores, 0.90) == 0.90
    # a realistic mix: 4 attacker and 2 benign items on each of 5 tied values, above 80 attackers and 100 benign
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(80, bool), np.zeros(100, bool), np.tile([1, 1, 1, 1, 0, 0], 5).astype(bool)]
    scores = np.r_[rng.uniform(2, 3, 80), rng.uniform(0, 1, 100), np.repeat(np.linspace(1.1, 1.9, 5), 6)]
    caught = 80 + 4 * np.arange(1, 6)  # attackers caught as the threshold comes down through the tied values
    first = int(np.argmax(caught >= 0.95 * 100))  # the tied value at which 95% of the 100 attackers are caught
    assert fpr_at_tpr(labels, scores, 0.95) == 2 * (first + 1) / 110


@pytest.mark.parametrize("labels, scores, message", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "needs both attacker \\(positive\\) and benign \\(negative\\) items, got 3 positive "
                                 "and 0 negative"),
    ([0, 0], [0.1, 0.2], "got 0 positive and 2 negative"),
    ([1, 0], [0.1, np.nan], "1 scores are NaN"),
    ([1, 0, 1], [0.1, 0.2], "must be 1-D and alike"),
])
def test_degenerate_inputs_are_clear_errors(labels, scores, message):
    with pytest.raises(MetricError, match=message):
        detection_metrics(np.array(labels), np.array(scores))

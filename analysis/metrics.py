"""Detection quality of a score, with attacker queries (or accounts) as positives and benign as negatives:
AUROC and AUPR (average precision) from scikit-learn, and the false-positive rate at a true-positive rate
(FPR95, FPR90: the fraction of benign items flagged by the highest threshold that catches 95% / 90% of
the attackers' items)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


class MetricError(ValueError):
    """The inputs cannot give the metric (one class only, no scores); the message says why."""


def _check(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise MetricError(f"{what}: labels {labels.shape} and scores {scores.shape} must be 1-D and alike")
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        raise MetricError(f"{what}: needs both attacker (positive) and benign (negative) items, got {pos} "
                          f"positive and {neg} negative")
    if np.isnan(scores).any():
        raise MetricError(f"{what}: {int(np.isnan(scores).sum())} scores are NaN; fill them first")
    return labels, scores


def fpr_at_tpr(labels, scores, tpr: float, what: str = "fpr_at_tpr") -> float:
    """The false-positive rate of the first ROC point whose true-positive rate reaches ``tpr``: every threshold's
    point is kept (scikit-learn by default drops the points inside a straight stretch of the curve, which tied scores
    of attacker and benign items make, and the first point to reach ``tpr`` can be one of them)."""
    labels, scores = _check(labels, scores, what)
    fpr, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[np.searchsorted(tprs, tpr - 1e-12)])


def detection_metrics(labels, scores, what: str = "detection") -> dict:
    """AUROC, AUPR, FPR95 and FPR90 (all in [0, 1]) and the item counts."""
    labels, scores = _check(labels, scores, what)
    return {"auroc": float(roc_auc_score(labels, scores)), "aupr": float(average_precision_score(labels, scores)),
            "fpr95": fpr_at_tpr(labels, scores, 0.95, what), "fpr90": fpr_at_tpr(labels, scores, 0.90, what),
            "positives": int(labels.sum()), "negatives": int((~labels).sum())}

"""PNG figures of a run (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pyarrow as pa

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .detection import _filled, scored_rows  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc_curves(rows: pa.Table, name: str, scores: np.ndarray, path: str) -> str | None:
    """ROC of one detector at query level, one curve per attack against all benign queries."""
    role = np.asarray(rows.column("role").to_pylist())
    attack = np.asarray([a or "" for a in rows.column("attack").to_pylist()])
    benign = role == "benign"
    if not benign.any() or not (role == "attacker").any():
        return None
    s = _filled(scores)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for att in sorted(set(attack[role == "attacker"])):
        keep = benign | ((role == "attacker") & (attack == att))
        fpr, tpr, _ = roc_curve(~benign[keep], s[keep])
        ax.plot(fpr, tpr, label=att)
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    ax.set(xlabel="false-positive rate (benign queries)", ylabel="true-positive rate (attacker queries)",
           title=f"{name}: ROC per attack", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def account_scores(table: pa.Table, name: str, path: str, threshold: float | None = None) -> str | None:
    """A stateful detector's score over each account's queries (attackers red, benign blue), with the score at
    which it flags (PRADA: 1 - W, flagged above 1 - delta)."""
    column = f"{name}_score"
    rows = scored_rows(table)
    if column not in rows.column_names:
        return None
    rows = rows.sort_by([("account_id", "ascending"), ("query_index", "ascending")])
    acc = np.asarray(rows.column("account_id").to_pylist())
    role = np.asarray(rows.column("role").to_pylist())
    idx = rows.column("query_index").to_numpy(zero_copy_only=False)
    score = rows.column(column).to_numpy(zero_copy_only=False).astype(float)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for a in dict.fromkeys(acc):
        m = acc == a
        ax.plot(idx[m], score[m], color="tab:red" if role[m][0] == "attacker" else "tab:blue", lw=0.8, alpha=0.7)
    ax.plot([], [], color="tab:red", label="attacker accounts")
    ax.plot([], [], color="tab:blue", label="benign accounts")
    if threshold is not None:
        ax.axhline(threshold, color="black", ls="--", lw=0.8)
        ax.plot([], [], color="black", ls="--", label=f"flags above {threshold:.3g}")
    ax.set(xlabel="query index within the account", ylabel=f"{name} score (higher: more suspicious)",
           title=f"{name} per account")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def accuracy_vs_queries(points: list[dict], path: str) -> str | None:
    """Replica accuracy against queries spent, one point per attacker and run (``points``: dicts with
    label, queries, accuracy, and optionally fidelity)."""
    points = [p for p in points if p.get("accuracy") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4))
    for label in dict.fromkeys(p["label"] for p in points):
        mine = sorted((p for p in points if p["label"] == label), key=lambda p: p["queries"])
        ax.plot([p["queries"] for p in mine], [p["accuracy"] for p in mine], "o-", label=label)
    ax.set(xlabel="queries spent", ylabel="replica test accuracy", title="What the queries bought")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def tradeoff(rows: list[dict], attackers: list[str], out, target: float | None = None) -> bool:
    """The utility / non-replicability trade-off of a sweep (``rows``: :func:`analysis.sweep.read_sweep`):
    one row of panels per attacker, x = test L1 distortion (left) or defended test accuracy (right),
    y = replica test accuracy, one curve per defense, the Pareto front over all of them circled, the
    replica accuracy without defense (dotted) and ``target`` (dashed). ``out``: a path or a binary file.
    False when no finished trial has the numbers."""
    from .sweep import UNDEFENDED, pareto

    done = [r for r in rows if r.get("status") == "done" and r.get("test_l1_mean") is not None]
    attackers = [a for a in attackers if any(r.get(f"{a}.replica_test_accuracy") is not None for r in done)]
    if not attackers:
        return False
    axes_x = (("test_l1_mean", "mean L1 distortion on the test set", "min"),
              ("defended_test_accuracy", "defended test accuracy (honest users)", "max"))
    fig, axes = plt.subplots(len(attackers), 2, figsize=(10, 3.9 * len(attackers)), squeeze=False)
    curves = list(dict.fromkeys(r["curve"] for r in done))
    colors = {c: f"C{i % 10}" for i, c in enumerate(curves)}
    for row_axes, att in zip(axes, attackers):
        metric = f"{att}.replica_test_accuracy"
        pts = [r for r in done if r.get(metric) is not None]
        base = [r[metric + UNDEFENDED] for r in pts if r.get(metric + UNDEFENDED) is not None]
        for ax, (xkey, xlabel, better) in zip(row_axes, axes_x):
            for c in curves:
                mine = sorted((r for r in pts if r["curve"] == c), key=lambda r: r[xkey])
                ax.plot([r[xkey] for r in mine], [r[metric] for r in mine], "o-", color=colors[c], label=c, ms=4)
            front = [pts[i] for i in pareto([(r[xkey], r[metric]) for r in pts], better)]
            ax.plot([r[xkey] for r in front], [r[metric] for r in front], "o", mfc="none", mec="black", ms=10,
                    mew=1.2, label="Pareto front")
            ax.step([r[xkey] for r in front], [r[metric] for r in front], where="post", color="black", lw=0.7,
                    ls="--")
            if base:
                ax.axhline(float(np.mean(base)), color="gray", ls=":", lw=1, label="no defense")
            if target is not None:
                ax.axhline(target, color="tab:red", ls="--", lw=0.8, label=f"target {target:.0%}")
            ax.set(xlabel=xlabel, ylabel=f"{att}: replica test accuracy")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("What the defense costs honest users vs. what the attacker's replica reaches")
    _save(fig, out)
    return True

"""What each attacker got and paid, and what honest users paid: from the run's summary and query log."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from sklearn.metrics import mutual_info_score

from sim import querylog
from sim.summary import Summary


def perturbation_targets(clean, returned, tol: float = 1e-6) -> dict:
    """Where an output defense moved its answers. For each answer it changed (some class moved by more than
    ``tol``), the target is the class that gained the most probability: MAD's chosen vertex, the class random
    noise pushed toward. Returns the counts, each class's share of the targets (``shares``), the most common
    target and its share, the targets' entropy in bits (0: always the same class; log2 K: uniform), the
    information the target carries about the clean answer's top-1 label (mutual information, bits) and the share
    of targets that are the clean answer's least likely class. The shares and statistics are None when no answer
    changed."""
    clean, returned = np.asarray(clean, np.float64), np.asarray(returned, np.float64)
    if clean.shape != returned.shape or clean.ndim != 2:
        raise ValueError(f"clean {clean.shape} and returned {returned.shape} must both be (N, K)")
    delta = returned - clean
    changed = np.abs(delta).max(1, initial=0) > tol
    out = {"answers": len(clean), "changed": int(changed.sum()), "shares": None, "top_target": None,
           "top_target_share": None, "target_entropy_bits": None, "label_information_bits": None,
           "toward_least_likely": None}
    if not changed.any():
        return out
    target, label = delta[changed].argmax(1), clean[changed].argmax(1)
    shares = np.bincount(target, minlength=clean.shape[1]) / len(target)
    nonzero = shares[shares > 0]
    out.update(shares=[round(float(s), 4) for s in shares], top_target=int(shares.argmax()),
               top_target_share=float(shares.max()), target_entropy_bits=float(-(nonzero * np.log2(nonzero)).sum()),
               label_information_bits=float(mutual_info_score(label, target) / math.log(2)),
               toward_least_likely=float((target == clean[changed].argmin(1)).mean()))
    return out


def replication_report(table: pa.Table, summary: Summary | None) -> dict:
    """Per attacker (and ``benign``, and ``external``: serve mode's clients, together): queries sent, answered
    (directly or after a proof of work), challenged with a proof of work, refused (also for a wrong solution),
    attempts refused over the rate limit (not among the queries: a run's clients send them again), accounts used,
    proof-of-work seconds paid (the solving time the clients reported), and from the summary the accounts flagged
    and burned and the replica's accuracy and fidelity; where the defense moved the answers (``targets``:
    :func:`perturbation_targets` of the answered queries) and how confident the clean answers were
    (``clean_top1_mean``: their mean top-1 probability); plus the defense's cost to honest users."""
    def col(name):
        return np.asarray(table.column(name).to_pylist(), dtype=object)

    role, account, action, attack = col("role"), col("account_id"), col("action"), col("attack")
    resub = col("resubmission").astype(bool) if "resubmission" in table.column_names else np.zeros(len(role), bool)
    seconds = np.array([s or 0.0 for s in table.column("pow_seconds").to_pylist()]) \
        if "pow_seconds" in table.column_names else np.zeros(len(role))

    answered = np.isin(action, querylog.ANSWERED)
    rate = querylog.refused_for(table, [querylog.RATE])  # attempts a run's clients sent again after the wait
    probs = ([querylog.prob_matrix(table.column(name)) for name in ("clean_probs", "returned_probs")]
             if {"clean_probs", "returned_probs"} <= set(table.column_names) else None)

    def answers(mask: np.ndarray) -> tuple[dict | None, float | None]:
        """Where the defense moved these answers, and the clean answers' mean top-1 probability."""
        rows = np.flatnonzero(mask & answered & ~resub)
        if probs is None or not len(rows):
            return None, None
        clean, returned = (p[rows].astype(np.float64) for p in probs)
        return perturbation_targets(clean, returned), float(clean.max(1).mean())

    def entry(mask: np.ndarray, label: str, kind: str | None) -> dict:
        return {"id": label, "attack": kind, "queries": int((mask & ~resub & ~rate).sum()),
                "answered": int((mask & answered).sum()),
                "challenged": int((mask & (action == "challenged")).sum()),
                "refused": int((mask & (action == "refused") & ~rate).sum()), "rate_limited": int((mask & rate).sum()),
                "accounts_used": len(set(account[mask])), "pow_seconds": round(float(seconds[mask].sum()), 3),
                **dict(zip(("targets", "clean_top1_mean"), answers(mask)))}

    out = {"attackers": [], "benign": None, "external": None, "defense": None}
    ids = np.array([str(x).rsplit("-", 1)[0] for x in account])  # accounts are named after their attacker: ID-0000
    if summary is None:  # a log without its summary (a stopped run): one entry per attacker, by its accounts' names
        for aid in sorted(set(ids[role == "attacker"])):
            mask = (role == "attacker") & (ids == aid)
            out["attackers"].append(entry(mask, aid, str(attack[mask][0])))
    else:
        for a in summary.attackers:  # (an id may be another's prefix: kn and kn-2)
            e = entry((role == "attacker") & (ids == a.id), a.id, a.attack)
            e.update(accounts_flagged=a.accounts_flagged, accounts_burned=a.accounts_burned,
                     replica_test_accuracy=a.replica and a.replica.test_accuracy,
                     replica_fidelity=a.replica and a.replica.fidelity,
                     replica_test_accuracy_undefended=a.undefended and a.undefended.test_accuracy)
            out["attackers"].append(e)
    if (role == "benign").any():
        out["benign"] = entry(role == "benign", "benign", None)
        if summary is not None and summary.benign is not None and summary.benign.accounts_flagged is not None:
            out["benign"]["accounts_flagged"] = summary.benign.accounts_flagged
    if (role == "external").any():  # serve mode's clients: who they are is not known
        out["external"] = entry(role == "external", "external", None)
    if summary is not None:
        v, d = summary.victim, summary.defense
        out["defense"] = {"name": d.name, "victim_accuracy": v.test_accuracy,
                          "defended_accuracy": v.defended_test_accuracy, "test_l1": d.test_l1_mean,
                          "top1_preserved": d.test_top1_preserved_rate}
    return out

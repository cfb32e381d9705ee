"""Detection quality per detector and per attack, from a run's query log, at query and account level.

Items: every scored query (resubmissions after a proof of work are the same query again and are left
out) of a known account. Positives are attacker queries, negatives benign ones; per attack, the
positives are that attack's queries and the negatives all benign queries.
- Query level: the query's score. A stateful detector has no score before it has enough history (PRADA:
  ``min_pool`` queries); such queries get the lowest score seen, i.e. "no evidence".
- Account level: an account's score is the highest its queries reached.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sim import querylog
from sim.errors import SimError

from .metrics import MetricError, detection_metrics


def scored_rows(table: pa.Table) -> pa.Table:
    """The rows the detectors scored: every query whose images were read (not a request refused before
    that), of any role, less those a limit refused (before the detectors saw them) and resubmissions (a challenged
    query answered after its proof of work). Detection metrics then judge the attacker and benign ones among them."""
    querylog.check_table(table, ("input_sha1", "role", "attack", "account_id"), "the detection analysis")
    keep = table.column("input_sha1").is_valid().to_numpy(zero_copy_only=False) \
        & ~querylog.refused_for(table, querylog.LIMITS)
    if "resubmission" in table.column_names:
        keep &= ~pc.fill_null(table.column("resubmission"), False).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(keep))


def _filled(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if np.isnan(scores).all():
        return np.zeros_like(scores)
    return np.where(np.isnan(scores), np.nanmin(scores), scores)


def _per_account(accounts: np.ndarray, scores: np.ndarray, attacker: np.ndarray):
    if not len(accounts):
        return accounts, scores, attacker
    order = np.argsort(accounts, kind="stable")
    acc, s, a = accounts[order], scores[order], attacker[order]
    starts = np.r_[0, np.flatnonzero(acc[1:] != acc[:-1]) + 1]
    return acc[starts], np.maximum.reduceat(s, starts), a[starts]


def _metrics_or_reason(labels, scores, what) -> dict:
    try:
        return detection_metrics(labels, scores, what)
    except MetricError as exc:
        labels = np.asarray(labels, bool)
        return {"error": str(exc), "positives": int(labels.sum()), "negatives": int((~labels).sum())}


def detection_report(table: pa.Table, detectors: list[str] | None = None,
                     scores: dict[str, np.ndarray] | None = None, flags: dict[str, np.ndarray] | None = None) -> dict:
    """detector -> {"query": {attack -> metrics}, "account": {attack -> metrics}, "flagged": counts}.
    ``attack`` is each attack in the log and ``"all"``. ``scores`` and ``flags``: extra score and flag columns
    (e.g. replayed) aligned with ``scored_rows(table)``. Only attacker and benign queries are judged. Metrics that
    cannot be computed (no benign traffic, no queries at all) carry an ``error`` saying why."""
    rows = scored_rows(table)
    logged = querylog.detector_names(table.schema)
    detectors = list(detectors if detectors is not None else logged)
    unknown = [d for d in detectors if f"{d}_score" not in rows.column_names]
    if unknown:
        raise SimError(f"detectors={unknown!r}: the log has no scores of {', '.join(unknown)}; expected detectors of "
                       f"the run ({', '.join(logged) or 'it logged none'}), or replayed scores through scores=")
    columns = {d: rows.column(f"{d}_score").to_numpy(zero_copy_only=False) for d in detectors}
    columns.update(scores or {})
    role = np.asarray(rows.column("role").to_pylist(), dtype=object)
    judged = (role == "attacker") | (role == "benign")  # external users (serve mode) have no ground truth
    columns = {name: np.asarray(col)[judged] for name, col in columns.items()}
    role = role[judged]
    attack = np.asarray([a or "" for a in rows.column("attack").to_pylist()], dtype=object)[judged].astype(str)
    accounts = np.asarray(rows.column("account_id").to_pylist(), dtype=object)[judged].astype(str)
    attacker = role == "attacker"
    attacks = ["all"] + sorted(str(a) for a in set(attack[attacker]))
    out = {}
    for name, raw in columns.items():
        s = _filled(raw)
        entry = {"query": {}, "account": {}}
        for att in attacks:
            keep = ~attacker | (attack == att) if att != "all" else np.ones(len(s), bool)
            entry["query"][att] = _metrics_or_reason(attacker[keep], s[keep], f"{name} on {att} queries")
            _, acc_scores, acc_attacker = _per_account(accounts[keep], s[keep], attacker[keep])
            entry["account"][att] = _metrics_or_reason(acc_attacker, acc_scores, f"{name} on {att} accounts")
        flag_col, hit = f"{name}_flagged", (flags or {}).get(name)
        if hit is None and flag_col in rows.column_names:
            hit = pc.fill_null(rows.column(flag_col), False).to_numpy(zero_copy_only=False)
        if hit is not None:
            hit = np.asarray(hit, bool)[judged]
            flagged = set(accounts[hit])
            entry["flagged"] = {
                "attacker_accounts": len(flagged & set(accounts[attacker])),
                "attacker_total": len(set(accounts[attacker])),
                "benign_accounts": len(flagged & set(accounts[~attacker])),
                "benign_total": len(set(accounts[~attacker])),
                "attacker_queries": int(hit[attacker].sum()), "benign_queries": int(hit[~attacker].sum()),
                "attacker_queries_total": int(attacker.sum()), "benign_queries_total": int((~attacker).sum()),
            }
        out[name] = entry
    return out

"""What each attacker got and paid, and what honest users paid: from the run's summary and query log."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sim import querylog
from sim.summary import Summary


def replication_report(table: pa.Table, summary: Summary | None) -> dict:
    """Per attacker (and ``benign``): queries sent, answered (directly or after a proof of work), challenged
    with a proof of work, refused (also for a wrong solution), accounts used, proof-of-work seconds paid (the
    solving time the clients reported), and from the summary the accounts flagged and burned and the
    replica's accuracy and fidelity; plus the defense's cost to honest users."""
    def col(name):
        return np.asarray(table.column(name).to_pylist(), dtype=object)

    role, account, action, attack = col("role"), col("account_id"), col("action"), col("attack")
    resub = col("resubmission").astype(bool) if "resubmission" in table.column_names else np.zeros(len(role), bool)
    seconds = np.array([s or 0.0 for s in table.column("pow_seconds").to_pylist()]) \
        if "pow_seconds" in table.column_names else np.zeros(len(role))

    def entry(mask: np.ndarray, label: str, kind: str | None) -> dict:
        return {"id": label, "attack": kind, "queries": int((mask & ~resub).sum()),
                "answered": int((mask & np.isin(action, querylog.ANSWERED)).sum()),
                "challenged": int((mask & (action == "challenged")).sum()),
                "refused": int((mask & (action == "refused")).sum()),
                "accounts_used": len(set(account[mask])), "pow_seconds": round(float(seconds[mask].sum()), 3)}

    out = {"attackers": [], "benign": None, "defense": None}
    if summary is None:  # a log without its summary (a crashed run): one entry per attack
        for kind in sorted(set(attack[role == "attacker"])):
            out["attackers"].append(entry((role == "attacker") & (attack == kind), kind, kind))
    else:
        for a in summary.attackers:  # accounts are named after their attacker: ID-0000
            e = entry((role == "attacker") & np.array([str(x).startswith(f"{a.id}-") for x in account]), a.id, a.attack)
            e.update(accounts_flagged=a.accounts_flagged, accounts_burned=a.accounts_burned,
                     replica_test_accuracy=a.replica and a.replica.test_accuracy,
                     replica_fidelity=a.replica and a.replica.fidelity,
                     replica_test_accuracy_undefended=a.undefended and a.undefended.test_accuracy)
            out["attackers"].append(e)
    if (role == "benign").any():
        out["benign"] = entry(role == "benign", "benign", None)
    if summary is not None:
        v, d = summary.victim, summary.defense
        out["defense"] = {"name": d.name, "victim_accuracy": v.test_accuracy,
                          "defended_accuracy": v.defended_test_accuracy, "test_l1": d.test_l1_mean,
                          "top1_preserved": d.test_top1_preserved_rate}
    return out

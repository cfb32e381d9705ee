"""Multi-account strategies in a real run: per-account caps, and churn past refused accounts."""

import pyarrow.compute as pc

import analysis
import sim


def test_cap_and_churn_show_in_the_log_and_the_summary(ray_serve, small_overrides, tmp_path):
    # delta = 1 flags an account as soon as PRADA has a score (min_pool 10), so it is refused from then on
    overrides = small_overrides + [
        "detectors.prada.action=refuse", "detectors.prada.delta=1.0", "detectors.prada.min_pool=10",
        "benign.users=0", "attackers.single.accounts=8", "attackers.single.split=blocks",
        "attackers.single.batch_size=8", "attackers.single.churn=true",
        "attackers.capped.budget=160", "attackers.capped.accounts=20", "attackers.capped.account_cap=8",
        "attackers.capped.batch_size=8", "attackers.capped.replica.epochs=2",
    ]
    s = sim.run("single_knockoff", overrides, quiet=True)
    table = analysis.read_run(str(tmp_path / "run"))

    capped = s.attacker("capped")  # 8 queries per account: PRADA (min_pool 10) never gets a statistic
    assert capped.accounts_used == 20 and capped.accounts_flagged == 0 and capped.refused == 0
    counts = analysis.per_account_counts(table.filter(pc.equal(table.column("attack"), "knockoff")))
    assert all(n == 8 for a, n in counts.items() if a.startswith("capped-"))

    churn = s.attacker("single")  # blocks of 20 queries: each account is flagged, refused once, then retired
    assert churn.accounts_burned >= 1 and churn.refused >= 1
    assert churn.accounts_burned <= churn.accounts_flagged <= churn.accounts_used
    assert churn.queries + churn.unspent == 160
    for account in {a for a in counts if a.startswith("single-")}:
        rows = table.filter(pc.equal(table.column("account_id"), account)).sort_by("query_index")
        actions = rows.column("action").to_pylist()
        if "refused" in actions:  # a burned account's refused queries are its last request, nothing after
            first = actions.index("refused")
            assert set(actions[first:]) == {"refused"} and len(actions) - first <= 8

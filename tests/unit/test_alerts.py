"""The alerts table: one row per detector flag (stateful: an account's first; stateless: per request) and per limit
hit, derived from the query log."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sim import alerts, data, detectors, models, querylog
from sim.limits import Limits
from sim.protocol import Account
from sim.service import VictimService


def test_alerts_record_each_flag_and_each_limit_hit_with_the_accounts_queries_so_far(tmp_path):
    keys = {"k-att": Account("att-0", "attacker", "knockoff", cohort="c1"), "k-ben": Account("ben-0", "benign")}
    dets = {"prada": detectors.build("prada", min_pool=10), "msp": detectors.build("msp", threshold=0.85)}
    writer = querylog.QueryLogWriter(str(tmp_path / "queries"), (1, 28, 28), "w", detectors=list(dets))
    svc = VictimService(model=models.build("lenet", (1, 28, 28), 10), victim="v", run_id="r", accounts=keys,
                        input_shape=(1, 28, 28), detectors=dets, writer=writer, max_images=8,
                        limits=Limits(quota=100))
    ds = data.load("mnist5k")
    seed = ds.x_test[:1].astype(np.float32) / 255
    xs = np.clip(seed + 0.02 * np.random.default_rng(0).choice([-1, 1], size=(120, 1, 28, 28)), 0, 1)
    replies = [svc.query("k-att", xs[i:i + 8]) for i in range(0, 120, 8)]  # 100 answered, then the quota
    svc.query("k-ben", ds.x_test[:8])
    writer.close()
    querylog.compact(str(tmp_path / "queries"))
    assert alerts.write(str(tmp_path), list(dets)) > 0
    table = alerts.read(str(tmp_path))
    log = querylog.read(str(tmp_path / "queries"))

    prada = table.filter(pc.equal(table.column("source"), "prada")).to_pylist()
    att = log.filter(pc.equal(log.column("account_id"), "att-0"))
    first = att.column("prada_flagged").to_pylist().index(True)
    assert len(prada) == 1 and prada[0]["account_id"] == "att-0" and prada[0]["cohort"] == "c1"
    assert prada[0]["queries"] == first + 1 and prada[0]["kind"] == "detector"  # when it tripped, in queries
    assert prada[0]["score"] == att.column("prada_score")[first].as_py()

    quota = table.filter(pc.equal(table.column("source"), "quota")).to_pylist()
    refused = sum(r.actions.count("refused") for r in replies)
    assert refused == 20 and [a["kind"] for a in quota] == ["limit"] * 3  # the cut request and two refused whole
    assert sum(a["flagged"] for a in quota) == 20 and quota[-1]["queries"] == 120 and quota[0]["score"] is None

    msp = table.filter(pc.equal(table.column("source"), "msp"))
    flagged = log.filter(pc.fill_null(log.column("msp_flagged"), False))
    assert 0 < msp.num_rows == len(set(flagged.column("request_id").to_pylist()))  # one per request with flags
    assert pc.sum(msp.column("flagged")).as_py() == flagged.num_rows
    assert table.column("time").to_pylist() == sorted(table.column("time").to_pylist())
    summary = {s["source"]: s for s in alerts.summary(table)}
    assert summary["prada"]["accounts"] == 1 and summary["quota"]["alerts"] == 3
    # two requests of one account may reach the log in the other order than its shard scored them: the alert is the
    # first flagged query in the shard's order
    stamps = log.column("timestamp").cast(pa.int64()).to_numpy()
    flipped = log.set_column(log.schema.get_field_index("timestamp"), "timestamp",
                             pa.array(stamps.max() + stamps.min() - stamps).cast(log.schema.field("timestamp").type))
    alert = [a for a in alerts.from_log(flipped).to_pylist() if a["source"] == "prada"]
    assert len(alert) == 1 and alert[0]["request_id"] == att.column("request_id")[first].as_py()
    # a log of schema 3 and older has no per-key positions: its detectors' alerts are per request, as a stateless one's
    older = alerts.from_log(log.drop_columns(["prada_seq", "msp_seq"]))
    requests = log.filter(pc.fill_null(log.column("prada_flagged"), False)).column("request_id").unique()
    assert pc.sum(pc.equal(older.column("source"), "prada")).as_py() == len(requests) > 1


def test_an_accounts_queries_so_far_leave_out_the_answers_to_challenges_and_rate_limited_attempts(tmp_path):
    """Under proof of work each challenged query has a second row, its answer once solved (``resubmission``), and
    under a rate limit a refused attempt is sent again: neither is a new query. The alert's "queries so far" and
    per_account_counts count queries (they counted rows: 136 for an account's 72nd query under proof of work)."""
    import pyarrow as pa

    keys = {"k-att": Account("att-0", "attacker", "knockoff")}
    dets = {"prada": detectors.build("prada", min_pool=10)}
    writer = querylog.QueryLogWriter(str(tmp_path / "queries"), (1, 28, 28), "w", detectors=list(dets))
    svc = VictimService(model=models.build("lenet", (1, 28, 28), 10), victim="v", run_id="r", accounts=keys,
                        input_shape=(1, 28, 28), detectors=dets, writer=writer, max_images=8)
    seed = data.load("mnist5k").x_test[:1].astype(np.float32) / 255
    xs = np.clip(seed + 0.02 * np.random.default_rng(0).choice([-1, 1], size=(120, 1, 28, 28)), 0, 1)
    for i in range(0, 120, 8):
        svc.query("k-att", xs[i:i + 8])
    writer.close()
    log = querylog.read(str(tmp_path / "queries")).sort_by("query_index")
    first = log.column("prada_flagged").to_pylist().index(True)
    assert alerts.from_log(log).column("queries").to_pylist() == [first + 1]
    rows = []  # each query before the flag followed by its answer to a challenge, and a rate-limited attempt
    for r in log.to_pylist():
        rows.append(r)
        if r["query_index"] < first:
            rows.append({**r, "resubmission": True, "prada_flagged": False})
            rows.append({**r, "action": "refused", "refusal_reason": querylog.RATE, "prada_flagged": None,
                         "prada_score": None, "prada_seq": None})
    for i, r in enumerate(rows):
        r["query_index"] = i
    padded = pa.Table.from_pylist(rows, schema=log.schema)
    assert alerts.from_log(padded).filter(pc.equal(alerts.from_log(padded).column("source"), "prada")) \
        .column("queries").to_pylist() == [first + 1]
    assert querylog.per_account_counts(padded) == querylog.per_account_counts(log) == {"att-0": 120}


def test_a_stateless_detectors_alert_carries_its_requests_highest_score_and_the_queries_so_far(tmp_path):
    """One alert per request of single-query flags: the highest flagged score, how many were flagged, and the account's
    queries up to its last flagged one; and the summary's median of the accounts' queries at their first alert."""
    import pyarrow as pa

    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w", detectors=["msp"])
    probs = np.full((3, 10), 0.1, np.float32)
    writer.write(run_id="r", victim="v", request_id="req-1", account_id="a", actor_id="c", role="attacker",
                 attack="x", actions=["answered"] * 3, refusal_reason=[None] * 3, latency_ms=1.0, clean_probs=probs,
                 returned_probs=probs, returned_label=probs.argmax(1), input_sha1=["h"] * 3,
                 detections={"msp": detectors.Detection(np.array([0.9, 0.2, 0.5]), np.array([True, False, True]))})
    writer.close()
    found = alerts.from_log(querylog.read(str(tmp_path))).to_pylist()
    assert [(a["source"], round(a["score"], 6), a["flagged"], a["queries"]) for a in found] == [("msp", 0.9, 2, 3)]
    table = pa.table({"source": ["p"] * 4, "kind": ["detector"] * 4, "account_id": ["a", "b", "c", "a"],
                      "queries": [10, 20, 90, 95]})
    assert alerts.summary(table) == [{"source": "p", "kind": "detector", "alerts": 4, "accounts": 3,
                                      "median_queries_at_first": 20}]

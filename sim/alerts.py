"""The alerts of a run: one row per detector flag and per limit hit, the record a provider's security team reads.

Derived from the query log when a run (or ``serve`` mode) ends, and written beside it as ``RUN/alerts.parquet``:

- a stateful detector (PRADA, linking) flags an account for good: one alert at the account's first flagged query;
- a stateless detector (SAME, maximum softmax) flags queries: one alert per request with flagged queries (its
  highest score, how many it flagged);
- a limit (``serve.rate``, ``serve.quota``): one alert per request it refused queries of.

Each alert says when, which account and cohort, which detector or limit, the score (a detector's; a limit has none),
how many queries the account had sent by then (:func:`sim.querylog.queries`: a challenge's answer and an attempt
refused over the rate, sent again after the wait, are no new query) and how many queries of the request the alert
covers. Only what the provider sees: no role or attack, which the log keeps as the simulation's ground truth.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import querylog, storage

SCHEMA = pa.schema([
    ("time", pa.timestamp("us", tz="UTC")),
    ("account_id", pa.string()),
    ("cohort", pa.string()),
    ("kind", pa.string()),  # detector or limit
    ("source", pa.string()),  # the detector's name, or the limit (rate, quota)
    ("score", pa.float32()),
    ("queries", pa.int64()),  # the account's queries so far, this request's included
    ("flagged", pa.int64()),  # queries of the request the alert covers
    ("request_id", pa.string()),
])
BASE = ["request_id", "account_id", "cohort", "timestamp", "query_index", "refusal_reason", "writer", "seq"]


def from_log(table: pa.Table) -> pa.Table:
    """The alerts of a query log (with the columns of :data:`BASE` and each detector's ``_score``, ``_flagged`` and
    ``_seq``), in time order."""
    if table.num_rows == 0:
        return SCHEMA.empty_table()
    df = table.select([c for c in table.column_names if c in BASE or c.endswith(("_score", "_flagged", "_seq"))])
    df = df.to_pandas()
    df["is_query"] = querylog.queries(table)  # (a challenge's answer and a rate-limited attempt are no new query)
    df = df.sort_values(["account_id", "query_index"], kind="stable")
    df["queries"] = df.groupby("account_id", sort=False, dropna=False)["is_query"].cumsum()  # its queries so far
    df = df.sort_values(["timestamp", "writer", "seq"], kind="stable")
    parts = []
    for name in querylog.detector_names(table.schema):
        flagged = df[df[f"{name}_flagged"].fillna(False).astype(bool)]
        if flagged.empty:
            continue
        stateful = (f"{name}_seq" in table.column_names  # (a log of schema 3 and older has no _seq: per request)
                    and table.column(f"{name}_seq").null_count < table.num_rows)
        if stateful:  # flagged for good: the account's first flagged query, in its key's order in the tier (two
            # requests of one account may reach the log in the other order)
            first = flagged.sort_values(f"{name}_seq", kind="stable").drop_duplicates("account_id")
            parts.append(first.assign(source=name, kind="detector", score=first[f"{name}_score"], flagged=1))
        else:  # single queries: one alert per request
            per = flagged.groupby("request_id", sort=False).agg(
                timestamp=("timestamp", "first"), account_id=("account_id", "first"), cohort=("cohort", "first"),
                score=(f"{name}_score", "max"), flagged=(f"{name}_score", "size"),
                queries=("queries", "max")).reset_index()
            parts.append(per.assign(source=name, kind="detector"))
    limited = df[df["refusal_reason"].isin(querylog.LIMITS)]
    if not limited.empty:
        per = limited.groupby("request_id", sort=False).agg(
            timestamp=("timestamp", "first"), account_id=("account_id", "first"), cohort=("cohort", "first"),
            source=("refusal_reason", "first"), flagged=("refusal_reason", "size"),
            queries=("queries", "max")).reset_index()
        parts.append(per.assign(kind="limit", score=float("nan")))
    if not parts:
        return SCHEMA.empty_table()
    import pandas as pd

    out = pd.concat(parts, ignore_index=True).rename(columns={"timestamp": "time"}).sort_values("time", kind="stable")
    return pa.Table.from_pandas(out[SCHEMA.names], schema=SCHEMA, preserve_index=False)


def path_of(run_dir: str) -> str:
    return storage.join(run_dir, "alerts.parquet")


def columns(detectors) -> list[str]:
    """The log columns :func:`from_log` reads, for detectors named ``detectors``."""
    return BASE + [f"{name}_{col}" for name in detectors for col in ("score", "flagged", "seq")]


def write(run_dir: str, detectors) -> int:
    """Derive the alerts of ``RUN/queries`` (with ``detectors``, their names) and write ``RUN/alerts.parquet``;
    returns how many."""
    alerts = from_log(querylog.read(storage.join(run_dir, "queries"), columns=columns(detectors)))
    fs, path = storage.resolve(path_of(run_dir))
    pq.write_table(alerts, path, filesystem=fs)
    return alerts.num_rows


def read(run_dir: str) -> pa.Table:
    fs, path = storage.resolve(path_of(run_dir))
    return pq.read_table(path, filesystem=fs)


def summary(alerts: pa.Table) -> list[dict]:
    """Per source: alerts, accounts alerted, and the median of the accounts' queries at their first alert."""
    out = []
    for source in sorted(set(alerts.column("source").to_pylist())):
        rows = alerts.filter(pc.equal(alerts.column("source"), source))
        firsts = rows.to_pandas().drop_duplicates("account_id")["queries"]
        out.append({"source": source, "kind": rows.column("kind")[0].as_py(), "alerts": rows.num_rows,
                    "accounts": len(firsts), "median_queries_at_first": int(firsts.median())})
    return out

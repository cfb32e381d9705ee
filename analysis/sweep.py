"""A sweep directory, offline: one row per trial, the utility / non-replicability trade-off, ``sweep.md``.

A sweep directory (written by ``python -m sim sweep=NAME``) holds ``sweep.yaml`` (the resolved sweep),
``sweep.json`` (trial statuses and the driver's sessions) and ``runs/<trial id>/``: each trial's run
directory (config.yaml, queries/, summary.json once it finished) plus ``trial.json`` (its curve, its
sampled defense, the node it ran on and, while replicas trained, the last accuracies it reported).
Everything here reads those files alone, so a sweep can be re-analysed anywhere.
"""

from __future__ import annotations

import io
import json
import math

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from sim import storage
from sim.errors import ConfigError
from sim.summary import Summary
from sim.summary import read as read_summary

UNDEFENDED = "_undefended"


def flat_metrics(summary: Summary) -> dict:
    """The numbers a trial reports (to Tune and to the table) from a run summary, flat."""
    d, v = summary.defense, summary.victim
    out = {
        "victim_test_accuracy": v.test_accuracy,
        "victim_robust_accuracy": v.robust_accuracy,
        "defended_test_accuracy": v.defended_test_accuracy,
        "test_l1_mean": d.test_l1_mean,
        "test_top1_preserved_rate": d.test_top1_preserved_rate,
        "answered_l1_mean": d.l1_mean,
        "attacker_l1_mean": d.by_role["attacker"].l1_mean if "attacker" in d.by_role else None,  # what they got
        "queries_total": summary.queries.total,
        "queries_refused": summary.queries.refused,
        "queries_challenged": summary.queries.challenged,
        "benign_refused": summary.benign.refused,
        "wall_seconds": summary.wall_seconds,
    }
    for a in summary.attackers:
        for name, replica in (("", a.replica), (UNDEFENDED, a.undefended)):
            out[f"{a.id}.replica_test_accuracy{name}"] = replica and replica.test_accuracy
            out[f"{a.id}.replica_fidelity{name}"] = replica and replica.fidelity
            out[f"{a.id}.replica_robust_accuracy{name}"] = replica and replica.robust_accuracy
            if replica is not None and replica.best is not None:  # replica.variant=mad_code
                out[f"{a.id}.replica_best_test_accuracy{name}"] = replica.best.test_accuracy
        angle = a.replica and a.replica.gradient_angle
        out[f"{a.id}.gradient_angle"] = angle and angle.mean
        out.update({f"{a.id}.{key}": getattr(a, key) for key in ("refused", "accounts_flagged", "accounts_burned",
                                                                  "unspent")})
        out.update({f"{a.id}.limit_waits": a.limited.waits, f"{a.id}.limit_seconds": a.limited.seconds,
                    f"{a.id}.quota_spent": a.limited.quota_spent})
    accs = [a.replica.test_accuracy for a in summary.attackers if a.replica]
    out["replica_accuracy_max"] = max(accs) if accs else None
    for name, det in summary.detection.items():
        out[f"{name}.query_auroc"] = det.query_level.auroc
        out[f"{name}.account_auroc"] = det.account_level.auroc
        out[f"{name}.flagged_attacker_accounts"] = det.flagged_attacker_accounts
        out[f"{name}.flagged_benign_accounts"] = det.flagged_benign_accounts
    return out


def _read_json(path: str) -> dict:
    try:
        return json.loads(storage.read_text(path)) if storage.exists(path) else {}
    except ValueError:
        return {}


def is_sweep_dir(path: str) -> bool:
    return storage.exists(storage.join(path, "sweep.yaml"))


def read_sweep(sweep_dir: str) -> tuple[dict, list[dict]]:
    """(the sweep's settings, one row per trial). A row: trial id, curve, defense, its swept parameters
    (``param.NAME``), the scenario settings it varied (``vary.KEY``), status (done / stopped early / error /
    unfinished), node, and :func:`flat_metrics` of the trial's summary (for a trial stopped early: the replica
    accuracies it last reported). A sweep that varies scenario keys has one curve per defense curve and setting
    (``mad [victim.quantization=ptq]``)."""
    if not is_sweep_dir(sweep_dir):
        raise ConfigError(f"sweep_dir={sweep_dir!r} holds no sweep.yaml; expected a directory written by "
                          f"python -m sim sweep=NAME")
    settings = yaml.safe_load(storage.read_text(storage.join(sweep_dir, "sweep.yaml"))) or {}
    statuses = _read_json(storage.join(sweep_dir, "sweep.json")).get("trials", {})
    rows = []
    trial_ids = list(dict.fromkeys([*storage.listdir(storage.join(sweep_dir, "runs")), *statuses]))
    for trial_id in trial_ids:
        run_dir = storage.join(sweep_dir, "runs", trial_id)
        info = _read_json(storage.join(run_dir, "trial.json")) or statuses.get(trial_id)
        if not info or "curve" not in info:
            continue  # a folder that is no trial's, or a trial that failed before it began
        summary = read_summary(run_dir)
        status = "done" if summary else statuses.get(trial_id, {}).get("status", "unfinished")
        vary = info.get("vary") or {}
        curve = info["curve"] + (" [" + ", ".join(f"{k}={v}" for k, v in vary.items()) + "]" if vary else "")
        row = {"trial_id": trial_id, "curve": curve, "defense": info["defense"]["name"],
               **{f"param.{k}": v for k, v in info["defense"].items() if k != "name"},
               **{f"vary.{k}": v for k, v in vary.items()},
               "status": status, "error": statuses.get(trial_id, {}).get("error"),
               "node_ip": info.get("node_ip"), "node_id": info.get("node_id"), "run_dir": run_dir}
        row.update(flat_metrics(summary) if summary else info.get("last", {}))
        rows.append(row)
    return settings, rows


def pareto(points: list[tuple[float, float]], x_better: str = "min") -> list[int]:
    """Indices of the points no other point beats: y (replica accuracy) lower is better; x lower
    (distortion, ``x_better="min"``) or higher (defended accuracy, ``"max"``) is better."""
    sign = 1 if x_better == "min" else -1
    keep = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(sign * xj <= sign * xi and yj <= yi and (sign * xj < sign * xi or yj < yi)
                        for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: sign * points[i][0])


def distortion_to_reach(rows: list[dict], metric: str, target: float,
                        distortion: str = "test_l1_mean") -> tuple[float, bool] | None:
    """The least L1 distortion (``distortion``: on the test set, or ``attacker_l1_mean`` on the attacker's queries)
    at which ``metric`` (a replica accuracy) falls below ``target`` along one curve, in order of L1: interpolated
    linearly between the last trial above the target and the first below it, as ``(l1, True)``; ``(l1, False)``
    when the curve's least-distorting trial is already below (an upper bound); None when no trial gets below it.
    Finished trials count, and trials stopped early whose replica was already at or above the target (it would
    only have gone higher)."""
    pts = sorted((r[distortion], r[metric]) for r in rows
                 if r.get(distortion) is not None and r.get(metric) is not None
                 and (r.get("status", "done") == "done" or r[metric] >= target))
    for k, (x, y) in enumerate(pts):
        if y < target:
            if k == 0:
                return x, False
            (x0, y0) = pts[k - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y), True
    return None


def format_need(need: tuple[float, bool] | None) -> str:
    """A :func:`distortion_to_reach` result for a table: the L1, "≤ L1" for an upper bound, or "not reached"."""
    return "not reached" if need is None else f"{need[0]:.3f}" if need[1] else f"≤ {need[0]:.3f}"


def attackers_of(rows: list[dict]) -> list[str]:
    """Attacker ids with a replica accuracy column, in first-seen order."""
    suffix = ".replica_test_accuracy"
    return list(dict.fromkeys(k[:-len(suffix)] for r in rows for k in r if k.endswith(suffix)))


def write_table(rows: list[dict], sweep_dir: str) -> tuple[str, str]:
    """``results.parquet`` and ``results.csv`` of all trials; returns their paths."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({k: _column([r.get(k) for r in rows]) for k in keys})
    parquet, csv = storage.join(sweep_dir, "results.parquet"), storage.join(sweep_dir, "results.csv")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(parquet, buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    storage.write_bytes(csv, buf.getvalue())
    return parquet, csv


def _column(values: list) -> pa.Array:
    """One table column; a parameter that is a word in one curve and a number in another becomes text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values])


def _fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):  # counts
        return str(v)
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def write_report(sweep_dir: str) -> dict:
    """Table, trade-off plot and ``sweep.md`` of a sweep directory; returns their paths and the rows."""
    from . import plots

    settings, rows = read_sweep(sweep_dir)
    parquet, csv = write_table(rows, sweep_dir)
    target = settings.get("target", 0.8)
    attackers = attackers_of(rows)
    buf = io.BytesIO()
    png = storage.join(sweep_dir, "frontier.png")
    if plots.tradeoff(rows, attackers, buf, target=target):
        storage.write_bytes(png, buf.getvalue())
    else:
        png = None
    md = storage.join(sweep_dir, "sweep.md")
    storage.write_text(md, _markdown(settings, rows, attackers, target, png is not None,
                                     _read_json(storage.join(sweep_dir, "sweep.json"))))
    return {"rows": rows, "parquet": parquet, "csv": csv, "plot": png, "markdown": md}


def _markdown(settings: dict, rows: list[dict], attackers: list[str], target: float, plot: bool,
              state: dict) -> str:
    params = sorted({k for r in rows for k in r if k.startswith("param.")})
    done = [r for r in rows if r["status"] == "done"]
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    seconds = sum(s.get("seconds", 0) for s in state.get("sessions", []))
    lines = [f"# Sweep `{settings.get('name', '?')}`", "",
             settings.get("description", "").strip(), "",
             f"- **Base scenario**: `{settings.get('scenario')}`"
             + (f", with {', '.join(f'`{o}`' for o in settings.get('overrides', []))}" if settings.get("overrides")
                else ""),
             "- **Search space**: " + "; ".join(f"`{label}`: {yaml.safe_dump(spec, default_flow_style=True).strip()}"
                                               for label, spec in settings.get("space", {}).items())
             + (", crossed with " + "; ".join(f"`{k}`: {v}" for k, v in settings["vary"].items())
                if settings.get("vary") else ""),
             f"- **Trials**: {len(rows)} ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none'}), "
             f"scheduler {settings.get('scheduler', 'fifo')}, up to {settings.get('max_concurrent')} at once",
             ]
    if seconds:
        lines.append(f"- **Time**: {seconds / 60:.1f} min over {len(state['sessions'])} session(s): "
                     f"{len(done) / (seconds / 3600):.1f} finished trials per hour")
    lines += ["", "Utility is what honest users keep (defended test accuracy, mean L1 distortion of the returned "
              "vectors on the test set); non-replicability is what the attacker's replica reaches on the test set. "
              "Attacker-query L1 is the mean distortion of the answers the attackers got.", ""]
    if plot:
        lines += ["![trade-off](frontier.png)", ""]
    columns = [("victim acc", "victim_test_accuracy"), ("defended acc", "defended_test_accuracy"),
               ("test L1", "test_l1_mean"), ("attacker-query L1", "attacker_l1_mean")]
    for a in attackers:
        columns += [(f"{a} replica acc", f"{a}.replica_test_accuracy"), (f"{a} fidelity", f"{a}.replica_fidelity"),
                    (f"{a} undefended acc", f"{a}.replica_test_accuracy{UNDEFENDED}"),
                    (f"{a} gradient angle", f"{a}.gradient_angle")]
    columns.append(("victim robust acc", "victim_robust_accuracy"))
    columns += [(f"{a} replica robust acc", f"{a}.replica_robust_accuracy") for a in attackers]
    columns = [(title, key) for title, key in columns if any(r.get(key) is not None for r in rows)]
    limits = [(f"{a} {what}", f"{a}.{key}") for a in attackers for what, key in (
        ("waited s", "limit_seconds"), ("accounts out of quota", "quota_spent"), ("unspent", "unspent"))]
    columns += [(title, key) for title, key in limits if any(r.get(key) for r in rows)]  # where a limit bit
    detectors = dict.fromkeys(k[:-len(".flagged_attacker_accounts")] for r in rows for k in r
                              if k.endswith(".flagged_attacker_accounts"))
    columns += [(f"{d} {what}", f"{d}.{key}") for d in detectors for what, key in (
        ("flagged attacker accounts", "flagged_attacker_accounts"), ("flagged benign accounts",
                                                                     "flagged_benign_accounts"),
        ("query AUROC", "query_auroc")) if any(r.get(f"{d}.{key}") is not None for r in rows)]
    head = ["curve", *[p[len("param."):] for p in params], "status", *[title for title, _ in columns]]
    lines += ["## Trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["curve"], [_sort_key(r.get(p)) for p in params])):
        cells = [r["curve"], *[_fmt(r.get(p)) for p in params], r["status"],
                 *[_fmt(r.get(k), ".0f" if k.endswith("_accounts") else ".3f") for _, k in columns]]
        lines.append("| " + " | ".join(cells) + " |")
    for a in attackers:
        metric = f"{a}.replica_test_accuracy"
        scored = [r for r in done if r.get(metric) is not None and r.get("test_l1_mean") is not None]
        if not scored:
            continue
        stopped = [r for r in rows if r["status"] == "stopped early" and r.get(metric) is not None
                   and r.get("test_l1_mean") is not None]
        front = pareto([(r["test_l1_mean"], r[metric]) for r in scored])
        lines += ["", f"## Attacker `{a}`", "",
                  "Pareto front (least distortion for the lowest replica accuracy): "
                  + ", ".join(" ".join(filter(None, (scored[i]["curve"], _params(scored[i], params))))
                              + f" (L1 {scored[i]['test_l1_mean']:.3f}, replica {scored[i][metric]:.3f})"
                              for i in front) + ".", "",
                  f"| curve | L1 distortion to push the replica below {target:.0%} |", "|---|---:|"]
        for curve in dict.fromkeys(r["curve"] for r in scored):
            need = distortion_to_reach([r for r in scored + stopped if r["curve"] == curve], metric, target)
            lines.append(f"| {curve} | {format_need(need)} |")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- `{r['trial_id']}` ({r['curve']}): {r.get('error')}" for r in errors]
    return "\n".join(lines) + "\n"


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _params(row: dict, params: list[str]) -> str:
    shown = [f"{p[len('param.'):]}={_fmt(row.get(p))}" for p in params if row.get(p) is not None]
    return ", ".join(shown)

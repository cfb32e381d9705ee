"""``report.md`` of a run: what ran, what the attackers got and paid, how well each detector did, figures.
Everything comes from the run directory (query log, summary.json, config.yaml), never from Ray."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sim import alerts, querylog, storage
from sim.errors import ConfigError
from sim.summary import action_text, params_text, stopped
from sim.summary import read as read_summary

from . import plots
from .detection import detection_report, scored_rows
from .replication import replication_report

ROLE_ORDER = ["attacker", "benign", "external"]  # listed first, then any other role an accounts file gave


def _role_rank(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _metrics_cell(m: dict) -> str:
    if "auroc" not in m:
        return "n/a"
    return f"{100 * m['auroc']:.2f} / {100 * m['aupr']:.2f} / {100 * m['fpr95']:.2f} / {100 * m['fpr90']:.2f}"


def _flagged_cell(f: dict) -> str:
    """What a detector flagged, attackers' then benign users': accounts of all, then the share of their queries."""
    return (f"accounts {f['attacker_accounts']}/{f['attacker_total']} / {f['benign_accounts']}/{f['benign_total']}; "
            f"queries {f['attacker_queries'] / max(f['attacker_queries_total'], 1):.1%} / "
            f"{f['benign_queries'] / max(f['benign_queries_total'], 1):.1%}")


def analyse(run_dir: str, replays: dict[str, dict] | None = None, table: pa.Table | None = None) -> dict:
    """Everything the report shows, as data: ``replication``, ``detection`` (detector -> report), the table,
    the summary. ``replays``: name -> the output of :func:`analysis.replay.replay`, added as detectors. ``table``:
    the run's query log, if read already."""
    table = table if table is not None else querylog.read(storage.join(run_dir, "queries"))
    summary = read_summary(run_dir)
    scores = {name: r["scores"] for name, r in (replays or {}).items()}
    flags = {name: r["flags"] for name, r in (replays or {}).items()}
    return {"table": table, "summary": summary, "replication": replication_report(table, summary),
            "detection": detection_report(table, scores=scores, flags=flags) if table.num_rows else {}}


def _alerts_section(run_dir: str, table) -> list[str]:
    """What the run's alerts table (``RUN/alerts.parquet``; derived from the log for runs without one) holds, per
    detector and limit, with the alerted accounts' roles (the log's ground truth)."""
    found = storage.exists(alerts.path_of(run_dir))
    table_ = alerts.read(run_dir) if found else alerts.from_log(table)
    if not table_.num_rows:
        return []
    role = dict(zip(table.column("account_id").to_pylist(), table.column("role").to_pylist()))
    lines = ["## Alerts", "",
             f"The alerts table{' (`alerts.parquet`)' if found else ' (derived from the log)'}: one row per detector "
             f"flag (a stateful detector: an account's first flagged query; a stateless one: each request with "
             f"flagged queries) and per request a limit refused, with the account's queries so far. What a "
             f"provider's security team would read; the attacker/benign split is the simulation's ground truth.", "",
             "| source | kind | alerts | accounts (by role) | median queries at an account's first alert |",
             "|---|---|---:|---:|---:|"]
    for s in alerts.summary(table_):
        accounts = set(table_.filter(pc.equal(table_.column("source"), s["source"])).column("account_id").to_pylist())
        roles = Counter(role.get(a) or "unknown" for a in accounts)
        by_role = ", ".join(f"{roles[r]} {r}" for r in sorted(roles, key=_role_rank))
        lines.append(f"| {s['source']} | {s['kind']} | {s['alerts']:,} | {s['accounts']} ({by_role}) "
                     f"| {s['median_queries_at_first']:,} |")
    return lines + [""]


def _replay_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "report", "replays", f"{name}.npz")


def kept_replays(run_dir: str, rows: int) -> dict[str, dict]:
    """The replays earlier reports of this run kept (``RUN/report/replays/NAME.npz``), as :func:`write_report` takes
    them; one whose length is not the log's ``rows`` scored rows is left out."""
    folder = os.path.dirname(_replay_path(run_dir, "x"))
    out = {}
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if file.endswith(".npz"):
            with np.load(os.path.join(folder, file)) as z:
                if len(z["scores"]) == rows:
                    out[file[:-4]] = {"scores": z["scores"], "flags": z["flags"], "about": str(z["about"])}
    return out


def write_report(run_dir: str, replays: dict[str, dict] | None = None) -> str:
    """Write ``RUN/report.md`` and its figures under ``RUN/report/``; returns the report's path. ``replays`` (name ->
    :func:`analysis.replay.replay`'s output, with ``about``: what was replayed) are kept under
    ``RUN/report/replays/``, so that the report also shows those of earlier calls (a name given again replaces
    its replay)."""
    if "://" in run_dir:
        raise ConfigError(f"run_dir={run_dir!r}: reports are written to local run directories only; expected a "
                          f"local path (copy the run directory here first)")
    for name, r in (replays or {}).items():
        os.makedirs(os.path.dirname(_replay_path(run_dir, name)), exist_ok=True)
        np.savez(_replay_path(run_dir, name), scores=np.asarray(r["scores"], float),
                 flags=np.asarray(r["flags"], bool), about=r.get("about", name))
    table = querylog.read(storage.join(run_dir, "queries"))
    replays = {**kept_replays(run_dir, scored_rows(table).num_rows), **(replays or {})}
    a = analyse(run_dir, replays, table)
    table, summary, rep, det = a["table"], a["summary"], a["replication"], a["detection"]
    fig_dir = os.path.join(run_dir, "report")
    os.makedirs(fig_dir, exist_ok=True)
    logged_ids = table.column("run_id").unique().to_pylist() if "run_id" in table.column_names else []
    scenario, run_id = ((summary.scenario, summary.run_id) if summary else
                        (os.path.basename(run_dir), ", ".join(map(str, logged_ids)) or "?"))
    lines = [f"# Run report: {scenario}", ""]
    marker = None if summary else stopped(run_dir)
    why = (f"its summary.json marks it interrupted during {marker.interrupted}" if marker else
           "it has no readable summary.json")
    lines += [f"Run `{run_id}` in `{run_dir}`: {table.num_rows:,} rows in the query log. "
              "Written by `python -m analysis` from the run directory alone "
              + ("(query log, summary.json)." if summary else
                 f"(the query log alone: {why}, so replicas and flags are not shown)."), ""]
    if summary:
        v, d = summary.victim, summary.defense
        params = params_text(d.params)
        quant = (f"; int8 ({v.quantization}), {v.size_bytes / 1e6:.2f} MB and {v.latency_ms:.1f} ms per "
                 f"{v.latency_batch} images against the float model's {_pct(v.float_test_accuracy)}%, "
                 f"{v.float_size_bytes / 1e6:.2f} MB, {v.float_latency_ms:.1f} ms" if v.quantization != "none" else "")
        robust = (f"; {_pct(v.robust_accuracy)}% under PGD (eps {v.robustness['eps']}, {v.robustness['steps']} "
                  f"steps, {v.robustness['samples']} test images)"
                  if v.robust_accuracy is not None and v.robustness else "")
        lines += ["## What ran", "",
                  f"- **Victim**: {v.arch} trained on {v.dataset} ({v.training}"
                  f"{f', {v.train_threads} torch threads' if v.train_threads else ''}), test accuracy "
                  f"{_pct(v.test_accuracy)}%{robust}{quant}.",
                  f"- **Output defense**: {d.name}{f' ({params})' if params else ''}. Honest users get "
                  f"{_pct(v.defended_test_accuracy)}% accuracy on the test set, mean L1 distortion "
                  f"{d.test_l1_mean:.3f}.",
                  f"- **Clients**: {len(summary.attackers)} attacker(s), {summary.benign.users} benign "
                  f"user(s) with {summary.benign.accounts or summary.benign.users} account(s); "
                  f"{summary.queries.total:,} queries sent in {summary.wall_seconds:.0f} s."]
        for name, dd in summary.detection.items():
            cal = dd.calibration
            thr = (f", threshold {cal['threshold']:.4g} (benign false-positive target {cal['target_fpr']})"
                   if cal else "")
            group = f", group by {dd.group}" if dd.stateful else ""
            lines.append(f"- **Detector `{name}`** ({dd.kind}{group}): flagged queries get *{action_text(dd)}*{thr}.")
        lines.append("")
    clients = rep["attackers"] + [e for e in (rep["benign"], rep.get("external")) if e]
    undefended = any(e.get("replica_test_accuracy_undefended") is not None for e in clients)
    lines += ["## What the attackers got and what everyone paid", "",
              "Replica accuracy and fidelity are on the victim's test set (attack seeds left out)"
              + ("; the undefended accuracy is a replica's trained on the victim's clean answers to the same "
                 "queries, what the defense denied it" if undefended else "") + ". Proof-of-work "
              "seconds are the solving time the clients spent before their challenged queries were answered.", "",
              "| client | attack | queries | answered | challenged | refused | accounts | flagged | burned "
              "| replica acc % | fidelity % |" + (" undefended acc % |" if undefended else "") + " PoW s |",
              "|---|---|" + "---:|" * (10 + bool(undefended))]
    for e in clients:
        lines.append(f"| {e['id']} | {e['attack'] or '–'} | {e['queries']:,} | {e['answered']:,} | {e['challenged']:,} "
                     f"| {e['refused']:,} | {e['accounts_used']} | {e.get('accounts_flagged', '–')} "
                     f"| {e.get('accounts_burned', '–')} "
                     f"| {_pct(e.get('replica_test_accuracy'))} | {_pct(e.get('replica_fidelity'))} "
                     + (f"| {_pct(e.get('replica_test_accuracy_undefended'))} " if undefended else "")
                     + f"| {e['pow_seconds']:.2f} |")
    limited = [e for e in clients if e.get("rate_limited")]
    if limited:
        lines += ["", "Refused over the rate limit (`serve.rate`) and sent again after the wait, not counted above: "
                  + ", ".join(f"{e['id']} {e['rate_limited']:,} attempts" for e in limited) + "."]
    lines.append("")
    moved = [e for e in clients if e.get("targets") and e["targets"]["changed"]]
    if moved:
        lines += ["## Where the defense moved the answers", "",
                  "For each answer the defense changed, its target is the class that gained the most probability "
                  "(MAD's chosen vertex). A low entropy means most answers were pushed toward the same class whatever "
                  "the query; the information about the label (at most the entropy) says how far the target "
                  "follows the clean answer's top-1 class, a consistent wrong mapping a replica can learn.", "",
                  "| client | answers changed | most common target (share) | target entropy (bits) "
                  "| information about the label (bits) | toward the least likely class |",
                  "|---|---:|---:|---:|---:|---:|"]
        for e in moved:
            t = e["targets"]
            lines.append(f"| {e['id']} | {t['changed']:,} of {t['answers']:,} | class {t['top_target']} "
                         f"({_pct(t['top_target_share'])}%) | {t['target_entropy_bits']:.2f} "
                         f"| {t['label_information_bits']:.2f} | {_pct(t['toward_least_likely'])}% |")
        lines.append("")
    if summary and any(a.replica and (a.replica.robust_accuracy is not None or a.replica.gradient_angle)
                       for a in summary.attackers):
        lines += ["## Robustness and gradient deviation", "",
                  "Robust accuracy: the replica's accuracy under PGD with the victim's adversarial settings, on the "
                  "first images of the test set (a quantized victim's through its fake-quantized twin). Gradient "
                  "angle: how far the answers the attacker got turned its loss gradient from the one the clean "
                  "answers give (degrees, over all replica parameters, the mean over 64 fixed queries after each "
                  "epoch, then over epochs; MAD's angular deviation).", "",
                  "| attacker | replica acc % | robust acc % | undefended robust acc % | gradient angle (deg) |",
                  "|---|---:|---:|---:|---:|"]
        for a in summary.attackers:
            r, u = a.replica, a.undefended
            angle = r and r.gradient_angle
            lines.append(f"| {a.id} | {_pct(r and r.test_accuracy)} | {_pct(r and r.robust_accuracy)} | "
                         f"{_pct(u and u.robust_accuracy)} | {f'{angle.mean:.1f}' if angle else '–'} |")
        lines.append("")
    rows = scored_rows(table)
    figures = []
    judged = rows.filter(pc.is_in(rows.column("role"), pa.array(["attacker", "benign"]))).num_rows if det else 0
    if det and not judged:  # serve mode: whose queries were an attack is not known
        lines += ["## Detection", "", "Detection quality needs to know which queries were an attack: this log has no "
                  "attacker or benign account (serve mode's clients are external), so only the alerts below say what "
                  "the detectors did.", ""]
    elif det:
        lines += ["## Detection", "",
                  "Positives are attacker queries (or accounts), negatives benign ones. Cells: AUROC / AUPR / "
                  "FPR95 / FPR90 in %. AUROC 100 is perfect, 50 chance; FPR95 is the share of benign queries "
                  "flagged at the threshold that catches 95% of the attacker's. Account level scores each "
                  "account by its most suspicious query. A stateful detector's queries before it has enough "
                  "history count as least suspicious.", ""]
        if replays:
            lines += ["Replays (`python -m analysis RUN --replay …`, kept under `report/replays/`: delete a file "
                      "there to drop its row): " + "; ".join(f"{n}: {r.get('about', n)}" for n, r in replays.items())
                      + ".", ""]
        attacks = list(next(iter(det.values()))["query"])
        lines += ["| detector | level | " + " | ".join(attacks) + " | flagged (attacker / benign) |",
                  "|---|---|" + "---|" * len(attacks) + "---|"]
        for name, d in det.items():
            flagged = _flagged_cell(d["flagged"]) if d.get("flagged") else "–"
            for level in ("query", "account"):
                lines.append(f"| {name} | {level} | " + " | ".join(_metrics_cell(d[level][a]) for a in attacks)
                             + f" | {flagged if level == 'query' else ''} |")
        errors = {m["error"] for d in det.values() for lv in ("query", "account") for m in d[lv].values()
                  if "error" in m}
        lines += [""] + [f"- n/a: {e}" for e in sorted(errors)] + ([""] if errors else [])
        for name in det:  # ROC curves
            col = f"{name}_score"
            s = (replays or {}).get(name, {}).get("scores")
            s = s if s is not None else rows.column(col).to_numpy(zero_copy_only=False).astype(float)
            p = plots.roc_curves(rows, name, s, os.path.join(fig_dir, f"roc_{name}.png"))
            if p:
                figures.append((f"ROC of {name} per attack (query level)", p))
    lines += _alerts_section(run_dir, table)
    # per account, the scores of the detectors that flag accounts (of every detector, without a summary to say)
    per_account = ({n: d.threshold for n, d in summary.detection.items() if d.stateful} if summary
                   else dict.fromkeys(querylog.detector_names(table.schema)))
    for name, threshold in per_account.items():
        p = plots.account_scores(table, name, os.path.join(fig_dir, f"scores_{name}.png"), threshold)
        if p:
            figures.append((f"{name}'s score over each account's queries: an account is flagged for good once "
                            f"it crosses the threshold", p))
    points = [{"label": e["id"], "queries": e["queries"], "accuracy": e.get("replica_test_accuracy")}
              for e in rep["attackers"]]
    p = plots.accuracy_vs_queries(points, os.path.join(fig_dir, "accuracy_vs_queries.png"))
    if p:
        figures.append(("Replica accuracy against the queries each attacker spent", p))
    if figures:
        lines += ["## Figures", ""]
        for caption, path in figures:
            lines += [f"**{caption}**", "", f"![{caption}](report/{os.path.basename(path)})", ""]
    out = os.path.join(run_dir, "report.md")
    with open(out, "w") as fh:
        fh.write("\n".join(lines))
    return out


def comparison(run_dirs: list[str]) -> tuple[str, list[dict]]:
    """A Markdown table comparing runs (one row per attacker per run) and the accuracy-vs-queries points."""
    lines = ["| run | attacker | queries | replica acc % | fidelity % | flagged | defended acc % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    points = []
    for run in run_dirs:
        s = read_summary(run)
        for a in s.attackers if s else []:
            acc = a.replica and a.replica.test_accuracy
            lines.append(f"| {os.path.basename(run.rstrip('/'))} | {a.id} | {a.queries:,} | {_pct(acc)} | "
                         f"{_pct(a.replica and a.replica.fidelity)} | {a.accounts_flagged}/{a.accounts} | "
                         f"{_pct(s.victim.defended_test_accuracy)} |")
            points.append({"label": f"{a.id} ({a.attack})", "queries": a.queries, "accuracy": acc})
    return "\n".join(lines), points


__all__ = ["analyse", "write_report", "comparison"]

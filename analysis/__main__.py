"""python -m analysis RUN_DIR [RUN_DIR ...] [--replay KIND [--param KEY=VALUE ...] [--group G]]

A sweep directory (python -m sim sweep=NAME) in place of a run: rewrites its table (results.parquet/csv),
trade-off plot and sweep.md from the trials' run directories, and stands for its finished trials' runs
(each gets its report, and ``--replay`` runs over each).

Writes RUN_DIR/report.md (and figures under RUN_DIR/report/) for each run, and prints a line per run on its alerts
(RUN_DIR/alerts.parquet: each detector flag and limit hit).
With several runs, also prints a comparison; ``--out DIR`` writes it (comparison.md and a plot) there.
``--replay prada --param delta=0.9 --group all`` re-runs a detector over each run's logged queries (with the
settings of the run's first detector of that kind, or of ``--order``'s, where it has one; ``--param`` and
``--group`` over them) and adds it to the report as ``replay_prada`` (``--name`` to choose; ``--order prada`` to
follow the per-key order the run's detector ``prada`` saw, exact for a run with several Serve replicas). Replays
are kept under RUN_DIR/report/replays/, so the report shows those of earlier calls too (the same name replaces
one). SAME replays load the run's models from the victim zoo (training them if the cache lacks them).
"""

from __future__ import annotations

import os
import re
import sys

import yaml


def _brief(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, dict)) or "none"


def _stopped_before_logging(run: str) -> str:
    """Why a run directory has no log, where its summary says (a run stopped before any query was logged)."""
    from sim.summary import stopped

    marker = stopped(run)
    return f" (the run was interrupted during {marker.interrupted}, before any query was logged)" if marker else ""


def main(argv: list[str] | None = None) -> int:
    from sim.cli import OneLineParser

    ap = OneLineParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory, or a sweep directory")
    ap.add_argument("--replay", metavar="KIND",
                    help="a detector kind to re-run over the logs (python -m sim help lists them)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a replayed detector's parameter")
    ap.add_argument("--group", help="history key of the replay: account (default), actor, cohort or all")
    ap.add_argument("--order", metavar="NAME", help="follow the per-key order of the run's stateful detector NAME "
                                                   "(exact over many Serve replicas; default: arrival order)")
    ap.add_argument("--name", help="the replay's name in the report (default replay_KIND)")
    ap.add_argument("--out", help="directory for the comparison of several runs")
    args = ap.parse_args(argv)

    from sim import alerts, storage
    from sim import detectors as detector_kinds
    from sim.errors import SimError, first_line
    from sim.querylog import detector_names, exists
    from sim.summary import SERVED

    from . import comparison, plots, read_summary, sweep, write_report
    from .metrics import MetricError
    from .replay import calibration_images, check_order, prepare, replay, run_settings

    try:
        replay_only = [flag for flag, given in (("--param", args.param), ("--group", args.group),
                                                ("--order", args.order), ("--name", args.name)) if given]
        if replay_only and not args.replay:
            one = len(replay_only) == 1
            raise SimError(f"{', '.join(replay_only)} {'is a setting' if one else 'are settings'} of a replay; "
                           f"expected --replay KIND with {'it' if one else 'them'}")
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise SimError(f"--out {args.out!r} is a file; expected a directory for the comparison")
        if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", args.name):
            raise SimError(f"--name {args.name!r} names a file under RUN_DIR/report/replays; expected letters, digits, "
                           f"'_', '-' and '.' (not first), such as replay_prada_strict")
        params = {}
        for item in args.param:
            if "=" not in item:
                raise SimError(f"--param {item!r} must look like KEY=VALUE")
            key, val = item.split("=", 1)
            try:
                params[key] = yaml.safe_load(val)
            except yaml.YAMLError:
                raise SimError(f"--param {item!r}: {val!r} is not a value; expected a number, true/false or "
                               f"a word") from None
        runs, trials = [], set()  # trials: the runs a sweep directory named
        for run in args.runs:
            if sweep.is_sweep_dir(run):
                out = sweep.write_report(run)
                print(f"{run}: {out['markdown']} ({len(out['rows'])} trials; table {out['parquet']})")
                if "://" in run:  # run reports are written to local directories only
                    print(f"{run}: a URI; the trials' own reports need a local copy of the sweep directory")
                else:
                    done = [r["run_dir"] for r in out["rows"] if r["status"] == "done"]
                    runs += done
                    trials.update(done)
            else:
                runs.append(run)
        args.runs = runs
        if args.out and len(runs) < 2:
            raise SimError(f"--out {args.out!r} is where several runs' comparison goes, and {len(runs)} run "
                           f"{'is' if len(runs) == 1 else 'are'} given; expected two or more RUN_DIRs (a run's own "
                           f"report is written in its directory)")
        for run in list(args.runs):
            missing = not storage.exists(run) or os.path.isfile(run)
            logged = not missing and exists(storage.join(run, "queries"))
            if run in trials and not logged:  # one trial's lost directory does not cost the others their reports
                why = "its directory is gone" if missing else f"it holds no query log{_stopped_before_logging(run)}"
                print(f"{run}: a finished trial of the sweep, skipped: {why}")
                args.runs.remove(run)
            elif missing:
                raise SimError(f"RUN_DIR={run!r} {'is a file' if os.path.isfile(run) else 'does not exist'}; expected "
                               f"a run directory (runs/<scenario>/<time>)")
            elif not logged:
                stopped = _stopped_before_logging(run)
                raise SimError(f"RUN_DIR={run!r} holds no query log{stopped}; expected a run directory "
                               f"(runs/<scenario>/<time>) whose clients sent queries")
        if args.out and len(args.runs) < 2:  # trials skipped above
            raise SimError(f"--out {args.out!r}: {len(args.runs)} of the runs given hold a query log; expected two or "
                           f"more to compare")
        for run in args.runs:
            replays = {}
            if args.replay:
                from . import read_run

                if args.group and params.get("group", args.group) != args.group:
                    raise SimError(f"--group {args.group} and --param group={params['group']} disagree; expected "
                                   f"one grouping")
                like, base = run_settings(run, args.replay, args.order)
                settings = {**base, **params, **({"group": args.group} if args.group and "group" in base else {})}
                if "threshold" in base and "threshold" not in params and set(params) - {"group"}:
                    settings["threshold"] = None  # calibrated for the run's settings: calibrated again for these
                values = _check_replay(args.replay, settings)  # before saying what it replays
                if args.group and not detector_kinds.get(args.replay).stateful:
                    raise SimError(f"--group {args.group}: {args.replay} scores each query alone (it keeps no history "
                                   f"per key); expected --group with a stateful detector (prada, link, …)")
                calibrates = "target_fpr" in values and values["threshold"] is None and values["target_fpr"] is not None
                name, table = args.name or f"replay_{args.replay}", read_run(run)
                check_order(table, args.order)  # before saying what it replays
                if name in detector_names(table.schema):
                    raise SimError(f"--name {name!r} is a detector of the run {run!r}; expected another name (a "
                                   f"replay is shown beside the run's own detectors, not in place of one)")
                print(f"{run}: replaying {args.replay} with "
                      + (f"the settings of the run's detector {like!r}" if like else "its default settings")
                      + (" and --param over them" if params else "") + f": {_brief(settings)}")
                done = replay(table, args.replay, settings, args.group, args.order,
                              calibration=calibration_images(run) if calibrates else None,
                              models=prepare(run, args.replay, settings))
                if calibrates:
                    print(f"{run}: {name}: threshold {done['threshold']:.4g}, calibrated as the run calibrates: for "
                          f"target_fpr={values['target_fpr']} on the benign images of the victim's calibration split")
                    settings = {**settings, "threshold": round(done["threshold"], 6)}
                if done["gaps"]:
                    shown_gaps = ", ".join(f"{k} at {v}" for k, v in list(done["gaps"].items())[:5])
                    print(f"{run}: {name}: {len(done['gaps'])} keys' histories in the run's detection tier hold "
                          f"queries the log lacks (scored, then not logged: a Serve replica killed mid-request), "
                          f"so the replay is exact for them only up to the first: {shown_gaps}"
                          + (", …" if len(done["gaps"]) > 5 else ""))
                replays[name] = {**done, "about": f"{args.replay} ({_brief(settings)}"
                                 + (f", in the order of {args.order}" if args.order else "") + ")"}
            path = write_report(run, replays)
            print(f"{run}: {path}")
            try:
                read_summary(run)
            except SimError as exc:
                served = storage.exists(storage.join(run, SERVED))  # serve mode writes none: not a failed run
                print(f"{run}: " + ("a serve-mode run, which writes no summary" if served else str(exc))
                      + " (the report comes from the query log alone)")
            if storage.exists(alerts.path_of(run)):
                found = alerts.summary(alerts.read(run))
                print(f"{run}: alerts: " + (", ".join(f"{s['source']} {s['alerts']} on {s['accounts']} accounts"
                                                      for s in found) or "none"))
        if len(args.runs) > 1:
            text, points = comparison(args.runs)
            print(text)
            if args.out:
                try:
                    os.makedirs(args.out, exist_ok=True)
                    with open(os.path.join(args.out, "comparison.md"), "w") as fh:
                        fh.write(text + "\n\n![accuracy vs queries](accuracy_vs_queries.png)\n")
                    plots.accuracy_vs_queries(points, os.path.join(args.out, "accuracy_vs_queries.png"))
                except OSError as exc:
                    raise SimError(f"--out {args.out!r} cannot be written ({first_line(exc)}); expected a directory "
                                   f"this user can write") from None
    except (SimError, MetricError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_replay(kind: str, settings: dict) -> dict:
    """Every setting of the replay (a one-line error for a detector kind that is not one, or settings it refuses,
    named as --param gave them)."""
    from sim import detectors
    from sim.errors import ConfigError, SimError

    try:
        return detectors.get(kind, "--replay").resolve(settings)
    except ConfigError as exc:
        text = str(exc)
        raise SimError(f"--param {text[len(kind) + 1:]}" if text.startswith(f"{kind}.") else text) from None


if __name__ == "__main__":
    sys.exit(main())

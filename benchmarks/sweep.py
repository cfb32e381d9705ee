"""Defense sweeps on this machine: trials per hour, and the frontier against the MAD paper's claim.

    python benchmarks/sweep.py [--sweeps mad_eps reverse_sigmoid_beta random_noise_eps] [--out benchmarks/results]
                               [--name sweep] [key=value ...]

Runs each shipped sweep in turn (``python -m sim sweep=NAME`` with its defaults: LeNet on mnist5k, two Knockoff
Nets attackers of 1,500 queries, soft and top-1 labels) into OUT/sweeps/NAME, then compares the curves:
for each attacker, the least mean L1 distortion at which each defense pushes the replica below the target
accuracy (80%, and 70%, 60%, 50%), and MAD's distortion there as a multiple of reverse sigmoid's and random
noise's. Orekondy et al. (2020) report that MAD needs about 0.63x the distortion of those defenses to push the
replica below 80% on MNIST. ``--report-only`` rebuilds the report from the sweep directories already in OUT (they
are not committed: it works where the sweeps ran; a sweep run again replaces its directory first).
Any ``key=value`` is passed to every sweep (``sweep.max_concurrent=3``, ``victim.epochs=…``).
Writes OUT/NAME.json, OUT/NAME.md and OUT/NAME.png (all curves on one figure); ``--name defense_frontier --sweeps
defense_frontier`` writes the defense_frontier report beside the default one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys

from analysis import plots
from analysis.sweep import attackers_of, distortion_to_reach, format_need, read_sweep
from sim import sweep
from sim.cli import OneLineParser, description, script

PAPER_RATIO = 0.63
TARGETS = (0.8, 0.7, 0.6, 0.5)  # replica accuracies; the undefended replica here is only just above 0.8
MARGIN = 0.05  # replica accuracy moves by a few points from trial to trial (thread timing, which queries)
BASELINES = ("reverse_sigmoid", "random_noise")


def main() -> int:
    ap = OneLineParser(prog="python benchmarks/sweep.py", description=description(__doc__))
    ap.add_argument("--sweeps", nargs="+", default=["mad_eps", "reverse_sigmoid_beta", "random_noise_eps"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--name", default="sweep", help="the report's file name, without extension (default: sweep)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the sweeps already in OUT")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    for name in [] if args.report_only else args.sweeps:
        sweep_dir = os.path.join(out, "sweeps", name)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        print(f"== {name}", file=sys.stderr, flush=True)
        sweep.run(name, [f"sweep.dir={sweep_dir}", *args.overrides])
    report, attackers = build(out, args.sweeps, os.path.join(out, f"{args.name}.png"))
    with open(os.path.join(out, f"{args.name}.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    text = markdown(report, attackers)
    with open(os.path.join(out, f"{args.name}.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


def build(out: str, names: list[str], figure: str) -> tuple[dict, list[str]]:
    """The report, from the sweep directories alone: per sweep its trials per hour (the driver's time in Tune,
    from sweep.json), all finished trials, and per attacker and target the distortion each defense needs; the
    curves drawn into ``figure``."""
    rows, runs = [], {}
    for name in names:
        sweep_dir = os.path.join(out, "sweeps", name)
        settings, mine = read_sweep(sweep_dir)
        with open(os.path.join(sweep_dir, "sweep.json")) as fh:
            seconds = max(sum(s["seconds"] for s in json.load(fh)["sessions"]), 1e-9)
        done = [r for r in mine if r["status"] == "done"]
        runs[name] = {"trials": len(mine), "done": len(done), "seconds": round(seconds, 1),
                      "trials_per_hour": round(len(done) / (seconds / 3600), 1),
                      "trial_seconds_mean": round(sum(r["wall_seconds"] for r in done) / max(len(done), 1), 1),
                      "max_concurrent": settings.get("max_concurrent"), "overrides": settings.get("overrides") or []}
        # the reference (identity) curve is in every sweep: keep it once
        rows += [r for r in done if r["curve"] != "none" or not any(x["curve"] == "none" for x in rows)]
    attackers = attackers_of(rows)
    frontier = {}
    for a in attackers:
        metric = f"{a}.replica_test_accuracy"
        curves = [c for c in dict.fromkeys(r["curve"] for r in rows) if c != "none"]
        undefended = next((r[metric] for r in rows if r["curve"] == "none"), None)
        frontier[a] = {"undefended": undefended, "targets": {}}
        # a target within MARGIN of the undefended replica measures noise, not the defense
        for target in [t for t in TARGETS if undefended is None or t < undefended - MARGIN]:
            need = {c: distortion_to_reach([r for r in rows if r["curve"] == c], metric, target) for c in curves}
            ratios = {b: need["mad"][0] / need[b][0] for b in BASELINES
                      if need.get("mad") and need.get(b) and need["mad"][1] and need[b][1]}
            frontier[a]["targets"][str(target)] = {
                "l1": {c: (None if v is None else {"l1": round(v[0], 4), "interpolated": v[1]})
                       for c, v in need.items()},
                "mad_over": {b: round(r, 3) for b, r in ratios.items()}}
    plots.tradeoff(rows, attackers, figure, target=TARGETS[0])
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "sweeps": runs,
              "frontier": frontier, "paper_ratio": PAPER_RATIO,
              "trials": [{k: v for k, v in r.items() if k not in ("run_dir", "node_id", "node_ip", "error")}
                         for r in rows]}
    return report, attackers


def markdown(report: dict, attackers: list[str]) -> str:
    lines = ["| sweep | trials done | time in Tune | mean trial wall time | trials / hour |",
             "|---|---:|---:|---:|---:|"]
    for name, r in report["sweeps"].items():
        at_once = f" ({r['max_concurrent']} at once)" if r.get("max_concurrent") else ""
        lines.append(f"| `{name}` | {r['done']}/{r['trials']} | {r['seconds'] / 60:.1f} min | "
                     f"{r['trial_seconds_mean']:.0f} s{at_once} | {r['trials_per_hour']:.0f} |")
    lines += [f"\n`{name}` ran with " + " ".join(f"`{o}`" for o in r["overrides"]) + "."
              for name, r in report["sweeps"].items() if r.get("overrides")]
    params = sorted({k for t in report["trials"] for k in t if k.startswith("param.") and k != "param.gamma"
                     and k != "param.norm"})
    lines += ["", "| curve | " + " | ".join(p[6:] for p in params) + " | defended acc | test L1 | attacker-query L1 | "
              + " | ".join(f"{a} replica acc" for a in attackers) + " |",
              "|---|" + "---:|" * (len(params) + 3 + len(attackers))]
    for t in sorted(report["trials"], key=lambda t: (t["curve"], t.get("test_l1_mean") or 0)):
        cells = [t["curve"], *[_num(t.get(p), ".3g") for p in params], _num(t.get("defended_test_accuracy")),
                 _num(t.get("test_l1_mean")), _num(t.get("attacker_l1_mean")),
                 *[_num(t.get(f"{a}.replica_test_accuracy")) for a in attackers]]
        lines.append("| " + " | ".join(cells) + " |")
    curves = [c for c in dict.fromkeys(t["curve"] for t in report["trials"]) if c != "none"]
    lines += ["", "Mean L1 distortion at which the replica falls below the target accuracy, interpolated between "
              "neighbouring trials (≤: already below at the curve's least-distorting trial); only targets at least "
              f"{MARGIN:.0%} below the undefended replica:", "",
              "| attacker (undefended) | target | " + " | ".join(curves)
              + " | MAD ÷ reverse sigmoid | MAD ÷ random noise |", "|---|---:|" + "---:|" * (len(curves) + 2)]
    for a, f in report["frontier"].items():
        for target, t in f["targets"].items():
            cells = [_l1(t["l1"].get(c)) for c in curves]
            cells += [_num(t["mad_over"].get(b), ".2f") for b in BASELINES]
            lines.append(f"| {a} ({_num(f['undefended'])}) | {float(target):.0%} | " + " | ".join(cells) + " |")
    lines.append(f"\nThe MAD paper's claim: MAD needs about {report['paper_ratio']}x the distortion of reverse sigmoid "
                 "or random noise to push a Knockoff replica below 80% on MNIST.")
    return "\n".join(lines) + "\n"


def _l1(v: dict | None) -> str:
    return format_need(None if v is None else (v["l1"], v["interpolated"]))


def _num(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


if __name__ == "__main__":
    script(main)

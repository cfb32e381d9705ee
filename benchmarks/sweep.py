"""Defense sweeps on this machine: trials per hour, and the frontier against the MAD paper's claim.

    python benchmarks/sweep.py [--sweeps mad_eps reverse_sigmoid_beta random_noise_eps] [--out benchmarks/results]
                               [key=value ...]

Runs each shipped sweep in turn (``python -m sim sweep=NAME`` with its defaults: LeNet on mnist5k, two Knockoff
Nets attackers of 1,500 queries, soft and top-1 labels) into OUT/sweeps/NAME, then compares the curves:
for each attacker, the least mean L1 distortion at which each defense pushes the replica below the target
accuracy (80%), and MAD's distortion there as a multiple of reverse sigmoid's and random noise's. Orekondy et
al. (2020) report that MAD needs about 0.63x the distortion of those defenses to do so on MNIST.
Any ``key=value`` is passed to every sweep (``sweep.max_concurrent=3``, ``victim.epochs=…``).
Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep_frontier.png (all curves on one figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

from analysis import plots
from analysis.sweep import attackers_of, distortion_to_reach
from sim import sweep

PAPER_RATIO = 0.63
BASELINES = ("reverse_sigmoid", "random_noise")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", nargs="+", default=["mad_eps", "reverse_sigmoid_beta", "random_noise_eps"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    rows, runs = [], {}
    for name in args.sweeps:
        sweep_dir = os.path.join(out, "sweeps", name)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        result = sweep.run(name, [f"sweep.dir={sweep_dir}", *args.overrides])
        seconds = time.perf_counter() - t0
        done = [r for r in result["rows"] if r["status"] == "done"]
        runs[name] = {"trials": len(result["rows"]), "done": len(done), "seconds": round(seconds, 1),
                      "tune_seconds": result["seconds"],
                      "trials_per_hour": round(len(done) / (seconds / 3600), 1), "dir": sweep_dir}
        # the reference (identity) curve is the same in every sweep: keep it once
        rows += [r for r in done if r["curve"] != "none" or not any(x["curve"] == "none" for x in rows)]
    target = 0.8
    attackers = attackers_of(rows)
    frontier = {}
    for a in attackers:
        metric = f"{a}.replica_test_accuracy"
        need = {c: distortion_to_reach([r for r in rows if r["curve"] == c], metric, target)
                for c in dict.fromkeys(r["curve"] for r in rows) if c != "none"}
        ratios = {b: need["mad"][0] / need[b][0] for b in BASELINES
                  if need.get("mad") and need.get(b) and need["mad"][1] and need[b][1]}
        frontier[a] = {"l1_to_target": {c: (None if v is None else {"l1": round(v[0], 4), "interpolated": v[1]})
                                        for c, v in need.items()},
                       "mad_over": {b: round(r, 3) for b, r in ratios.items()}}
    plot = os.path.join(out, "sweep_frontier.png")
    plots.tradeoff(rows, attackers, plot, target=target)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "sweeps": runs, "target": target, "frontier": frontier, "paper_ratio": PAPER_RATIO,
              "trials": [{k: v for k, v in r.items() if k not in ("run_dir", "node_id", "error")} for r in rows]}
    with open(os.path.join(out, "sweep.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(out, "sweep.md"), "w") as fh:
        fh.write(markdown(report, attackers))
    print(markdown(report, attackers))
    return 0


def markdown(report: dict, attackers: list[str]) -> str:
    lines = ["| sweep | trials | wall time | trials / hour |", "|---|---:|---:|---:|"]
    for name, r in report["sweeps"].items():
        lines.append(f"| `{name}` | {r['done']}/{r['trials']} | {r['seconds'] / 60:.1f} min | {r['trials_per_hour']:.0f} |")
    params = sorted({k for t in report["trials"] for k in t if k.startswith("param.") and k != "param.gamma"})
    lines += ["", "| curve | " + " | ".join(p[6:] for p in params) + " | defended acc | test L1 | "
              + " | ".join(f"{a} replica acc" for a in attackers) + " |",
              "|---|" + "---:|" * (len(params) + 2 + len(attackers))]
    for t in sorted(report["trials"], key=lambda t: (t["curve"], t.get("test_l1_mean") or 0)):
        cells = [t["curve"], *[_num(t.get(p), ".3g") for p in params], _num(t.get("defended_test_accuracy")),
                 _num(t.get("test_l1_mean")), *[_num(t.get(f"{a}.replica_test_accuracy")) for a in attackers]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"L1 distortion at which the replica falls below {report['target']:.0%} (interpolated between "
              "neighbouring trials; ≤: already below at the least-distorting trial):", "",
              "| attacker | " + " | ".join(c for c in next(iter(report["frontier"].values()))["l1_to_target"])
              + " | MAD ÷ reverse sigmoid | MAD ÷ random noise |",
              "|---|" + "---:|" * (len(next(iter(report["frontier"].values()))["l1_to_target"]) + 2)]
    for a, f in report["frontier"].items():
        cells = ["not reached" if v is None else f"{v['l1']:.3f}" if v["interpolated"] else f"≤ {v['l1']:.3f}"
                 for v in f["l1_to_target"].values()]
        cells += [_num(f["mad_over"].get(b), ".2f") for b in BASELINES]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines.append(f"\nThe MAD paper's claim: MAD needs about {report['paper_ratio']}x the distortion of reverse sigmoid "
                 "or random noise to push a Knockoff replica below 80% on MNIST.")
    return "\n".join(lines) + "\n"


def _num(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())

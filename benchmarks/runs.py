"""Scenario runs whose summaries make the result tables of the docs (docs/results.md links them).

    python benchmarks/runs.py [--studies splits_knockoff splits_jbda defenses limits scenarios] [--seeds 0 1 2]
                              [--fresh] [--report-only] [--out benchmarks/results/runs.json]

Each study is a list of runs: a shipped scenario with overrides, run by ``sim.run`` exactly as
``python -m sim scenario=NAME key=value …`` runs it (one local Ray for all of them), in its own run directory under
``runs/`` beside ``--out`` (``benchmarks/results/runs/``, not committed). Every run's summary is kept in ``--out`` as it
finishes, and the Markdown tables (``--out`` with ``.md``) are rewritten from the summaries, so an interrupted
benchmark keeps what it measured; runs already in ``--out`` are not run again unless ``--fresh`` (which runs the chosen
studies at the chosen seeds again and keeps every other run). ``--report-only`` rewrites the tables.

- ``splits_knockoff``: ``distributed_knockoff`` with the distributed attacker's budget over 1 to 100 accounts;
- ``splits_jbda``: ``distributed_jbda``, the same with JBDA;
- ``defenses``: ``mad_vs_knockoff`` (and ``reverse_sigmoid_vs_knockoff``) behind each output defense, and with a
  DP-SGD victim;
- ``limits``: ``distributed_knockoff`` without limits, with a per-account rate limit and with a per-account quota;
- ``scenarios``: the other shipped scenarios at their defaults (but those the replication table measures), and the
  README's default run.

The tables show seed 0. ``--seeds`` runs each run of the chosen studies at each seed too (``seed=S``: the victim's
training, the attack and the account keys all change), and each study's table is followed by the spread: per
run and attacker, the replica's mean, standard deviation and range, and the accounts flagged at each seed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time

from sim.cli import OneLineParser, description, machine, nonnegative, output_file, read_results, script

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STUDIES: dict[str, list[tuple[str, str, list[str]]]] = {  # study -> (label, scenario, overrides) per run
    "splits_knockoff": [(f"{n} accounts", "distributed_knockoff",  # 4 actors, or 1 for a single account
                         [f"attackers.distributed.accounts={n}", f"attackers.distributed.actors={min(n, 4)}"])
                        for n in (1, 10, 20, 40, 100)],
    "splits_jbda": [(f"{n} accounts", "distributed_jbda", [f"attackers.distributed.accounts={n}"])
                    for n in (5, 10, 20, 50, 100)],
    "defenses": [
        ("mad eps=0.8", "mad_vs_knockoff", []),
        ("mad_argmax eps=1", "mad_vs_knockoff", ["defense=mad_argmax", "defense.eps=1.0"]),
        ("reverse_sigmoid beta=0.7", "reverse_sigmoid_vs_knockoff", []),
        ("random_noise eps=0.8", "mad_vs_knockoff", ["defense=random_noise", "defense.eps=0.8"]),
        ("confidence_gated", "mad_vs_knockoff", ["defense=confidence_gated"]),
        ("adaptive_misinformation, OE victim", "mad_vs_knockoff",
         ["defense=adaptive_misinformation", "victim.training=outlier_exposure"]),
        ("none, DP-SGD victim", "mad_vs_knockoff", ["defense=identity", "victim.training=dp_sgd"]),
    ],
    "limits": [
        ("no limit", "distributed_knockoff", []),
        ("rate 20/s", "distributed_knockoff", ["serve.rate=20"]),
        ("quota 300", "distributed_knockoff", ["serve.quota=300"]),
    ],
    "scenarios": [
        ("distributed_knockoff", "distributed_knockoff", []),
        ("single_knockoff", "single_knockoff", []),
        ("single_knockoff, adaptive", "single_knockoff", ["attackers.single.strategy=adaptive"]),
        ("label_only_knockoff", "label_only_knockoff", []),
        ("single_jbda", "single_jbda", []),
        ("jbtop3", "jbtop3", []),
        ("dfme", "dfme", []),
        ("same_detection", "same_detection", []),
        ("distributed_jbda, cross-account detectors", "distributed_jbda",
         ["detectors.link.enabled=true", "detectors.pooled_prada.enabled=true", "detectors.pooled_prada.group=cohort",
          "attackers.distributed.cohort_size=25"]),
        ("sybil_vs_prada", "sybil_vs_prada", []),
        ("fashion_knockoff", "fashion_knockoff", []),
        ("crowd", "crowd", []),
    ],
}


LEADS = {
    "splits_knockoff": "Knockoff Nets through one account, and the same attack and budget spread over N accounts.",
    "splits_jbda": "JBDA through one account, and the same attack and budget spread round robin over N accounts.",
    "defenses": "Two Knockoff attackers (soft labels, top-1 labels) behind each output defense; the undefended "
                "replica trains on the clean answers to the same queries.",
    "scenarios": "The shipped scenarios at their defaults (`adversarial_victim`, `mad_evasion` and "
                 "`quantized_vs_knockoff` are measured in the replication table, `benchmarks/replicate.py`).",
    "limits": "The single-account and the 20-account Knockoff attacker of `distributed_knockoff` (the same budget) "
              "against per-account limits: a rate limit (each account may send 20 queries a second, in bursts of "
              "serve.max_images) and a quota (300 queries per account). The attackers wait out each 429 as told; an "
              "account out of quota retires.",
}


def command(scenario: str, overrides: list[str]) -> str:
    return " ".join(["python -m sim", f"scenario={scenario}", *overrides])


def run_one(scenario: str, overrides: list[str], run_dir: str) -> dict:
    import sim

    start = time.perf_counter()
    s = sim.run(scenario, [*overrides, f"run_dir={run_dir}"], quiet=True)
    return {"summary": json.loads(s.model_dump_json()), "seconds": round(time.perf_counter() - start, 1)}


def printed_text(entry: dict) -> str:
    """What ``python -m sim`` printed for a run: its summary as the CLI formats it (a pure function of the summary,
    so a change of format reaches every recorded run with ``--report-only``)."""
    from sim.summary import format_summary, parse

    return format_summary(parse(entry["summary"]))


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _flagged(a) -> str:
    """Accounts flagged for good (by any stateful detector), and by each detector when there are several (a
    stateless one: accounts with a flagged query)."""
    by = ", ".join(f"{name} {n}" for name, n in a.accounts_flagged_by.items())
    return f"{a.accounts_flagged} / {a.accounts}" + (f" ({by})" if len(a.accounts_flagged_by) > 1 else "")


def _replica(a) -> str:
    return "–" if a.replica is None else f"{_pct(a.replica.test_accuracy)} / {_pct(a.replica.fidelity)}"


def forget(runs: dict, studies: list[str], seeds: list[int]) -> dict:
    """``runs`` without the runs of ``studies`` at ``seeds`` (what ``--fresh`` measures again)."""
    drop = {(study, seeded(label, sd)) for study in studies for label, *_ in STUDIES[study] for sd in seeds}
    return {study: {k: v for k, v in entries.items() if (study, k) not in drop} for study, entries in runs.items()}


def measured(entries) -> str:
    """When runs were measured: one date, or the first and the last (from each run id's timestamp,
    ``NAME-YYYYmmddHHMMSS-xxxxxx``)."""
    dates = {e["summary"]["run_id"].rsplit("-", 2)[-2][:8] for e in entries}
    first, last = (f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in (min(dates), max(dates)))
    return first if first == last else f"{first} to {last}"


def seeded(label: str, seed: int) -> str:
    """The key of a run at another seed than 0."""
    return label if seed == 0 else f"{label} (seed {seed})"


def _cut(a) -> float | None:
    """Points the defense took off an attacker's replica: its undefended twin's test accuracy minus its own."""
    if a.replica is None or a.undefended is None:
        return None
    return 100 * (a.undefended.test_accuracy - a.replica.test_accuracy)


def spread(study: str, runs: dict) -> list[str]:
    """Per run of ``study`` measured at more than one seed: each attacker's replica accuracy (mean ± sd, range)
    and its accounts flagged per seed, and the benign accounts flagged per seed; where the attackers have undefended
    twins (the defenses study), what the defense cut from each replica at each seed."""
    from analysis.claims import spread as mean_sd
    from sim.summary import parse

    mine = runs.get(study, {})
    rows = []
    for label, scenario, overrides in STUDIES[study]:
        at = {v.get("seed", 0): parse(v["summary"]) for k, v in mine.items() if k == seeded(label, v.get("seed", 0))}
        if len(at) < 2:
            continue
        seeds = sorted(at)
        for i, a in enumerate(at[seeds[0]].attackers):
            per_seed = [next(x for x in at[sd].attackers if x.id == a.id) for sd in seeds]
            accs = [100 * x.replica.test_accuracy for x in per_seed if x.replica is not None]
            flagged = [x.accounts_flagged for x in per_seed]
            benign = [at[sd].benign.accounts_flagged for sd in seeds]
            cuts = [_cut(x) for x in per_seed]
            stats = mean_sd(accs) if len(accs) > 1 else "–"
            lead = f"`{command(scenario, overrides)}` | {', '.join(map(str, seeds))}" if i == 0 else " |"
            tail = " / ".join(map(str, benign)) if i == 0 else ""
            cut = " / ".join("–" if c is None else f"{c:+.1f}" for c in cuts)
            rows.append((f"| {lead} | {a.id} | {stats} | {' / '.join(map(str, flagged))} of {a.accounts} | {tail} |",
                         cut, any(c is not None for c in cuts)))
    if not rows:
        return []
    intro = ("Spread over seeds (victim, attack and keys): replica accuracy % as mean ± standard deviation (range); "
             "accounts flagged at each seed, in the order of the seeds column")
    header = "| command | seeds | attacker | replica accuracy | accounts flagged | benign flagged |"
    rule = "|---|---|---|---:|---:|---:|"
    if any(has for *_, has in rows):
        intro += ("; the cut: the undefended replica's accuracy minus the defended one's, in points, at each seed "
                  "(the same queries, answered clean; negative: the defense helped the attacker)")
        header, rule = header + " cut |", rule + "---:|"
        rows = [(f"{line} {cut} |", cut, has) for line, cut, has in rows]
    return ["", intro + ":", "", header, rule, *(line for line, *_ in rows)]


def tables(runs: dict) -> str:
    """Markdown tables of every study with runs in ``runs`` (study -> label -> {"summary", "seconds", …})."""
    from sim.summary import parse

    out = []
    for study, entries in STUDIES.items():
        done = [(label, scenario, overrides, {**runs[study][label], "summary": parse(runs[study][label]["summary"])})
                for label, scenario, overrides in entries if label in runs.get(study, {})]
        if not done:
            continue
        out += [f"## {study}", "", f"{LEADS[study]} Replica accuracy / fidelity in % on the victim's test set (attack "
                f"seeds left out); accounts flagged for good by a stateful detector (in brackets, per detector: for a "
                f"stateless one, accounts with a flagged query); seed 0. One row per run. Measured "
                f"{measured(runs[study].values())}.", ""]
        if study.startswith("splits"):
            out += ["| command | attacker | accounts | queries / account | accounts flagged | replica / fidelity "
                    "| benign flagged | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
            for label, scenario, overrides, r in done:
                s = r["summary"]
                for i, a in enumerate(s.attackers):
                    lead = f"`{command(scenario, overrides)}`" if i == 0 else ""
                    benign = s.benign.accounts or s.benign.users
                    tail = f"{s.benign.accounts_flagged} / {benign} | {r['seconds']:.0f}" if i == 0 else " |"
                    out.append(f"| {lead} | {a.id} | {a.accounts} | {a.queries // a.accounts:,} | "
                               f"{a.accounts_flagged} / {a.accounts} | {_replica(a)} | {tail} |")
        elif study == "limits":
            out += ["| command | attacker | accounts | queries answered | waited s (requests) | accounts out of quota "
                    "| attacker's wall s | replica / fidelity |", "|---|---|---:|---:|---:|---:|---:|---:|"]
            for label, scenario, overrides, r in done:
                s = r["summary"]
                for i, a in enumerate(s.attackers):
                    lead = f"`{command(scenario, overrides)}`" if i == 0 else ""
                    wall = max((c.seconds for c in s.clients if c.attacker == a.id), default=0.0)
                    out.append(f"| {lead} | {a.id} | {a.accounts} | {a.queries - a.refused:,} | "
                               f"{a.limited.seconds:.1f} ({a.limited.waits}) | {a.limited.quota_spent} | {wall:.1f} | "
                               f"{_replica(a)} |")
        elif study == "defenses":
            out += ["| command | defended acc % | test L1 | L1 / top-1 kept on attacker queries | attacker "
                    "| replica / fidelity | undefended replica / fidelity |", "|---|---:|---:|---:|---|---:|---:|"]
            for label, scenario, overrides, r in done:
                s = r["summary"]
                att = s.defense.by_role.get("attacker")
                dist = (f"{att.l1_mean:.3f} / {att.top1_preserved_rate:.3f}" if att and att.l1_mean is not None
                        else "–")
                for i, a in enumerate(s.attackers):
                    lead = (f"`{command(scenario, overrides)}` | {_pct(s.victim.defended_test_accuracy)} | "
                            f"{s.defense.test_l1_mean:.3f} | {dist}") if i == 0 else " | | |"
                    undefended = "–" if a.undefended is None else (f"{_pct(a.undefended.test_accuracy)} / "
                                                                   f"{_pct(a.undefended.fidelity)}")
                    out.append(f"| {lead} | {a.id} | {_replica(a)} | {undefended} |")
            dp = [r["summary"].victim for *_, r in done if r["summary"].victim.dp_epsilon is not None]
            for v in dp:
                out += ["", f"The DP-SGD victim: test accuracy {_pct(v.test_accuracy)}%, epsilon {v.dp_epsilon:.2f} "
                        f"at delta {v.dp['delta']:g} (noise {v.dp['noise_multiplier']:g}, clipping "
                        f"{v.dp['max_grad_norm']:g})."]
        else:
            out += ["| command | victim acc % | attacker | queries | replica / fidelity | accounts flagged "
                    "| benign flagged | wall s |", "|---|---:|---|---:|---:|---:|---:|---:|"]
            for label, scenario, overrides, r in done:
                s = r["summary"]
                for i, a in enumerate(s.attackers):
                    lead = (f"`{command(scenario, overrides)}` | {_pct(s.victim.test_accuracy)}" if i == 0
                            else " |")
                    benign = s.benign.accounts or s.benign.users
                    tail = f"{s.benign.accounts_flagged} / {benign} | {r['seconds']:.0f}" if i == 0 else " |"
                    out.append(f"| {lead} | {a.id} | {a.queries:,} | {_replica(a)} | {_flagged(a)} | {tail} |")
            if "distributed_knockoff" in runs[study]:
                out += ["", "What `python -m sim scenario=distributed_knockoff` printed:", "", "```",
                        printed_text(runs[study]["distributed_knockoff"]), "```"]
        detectors = {(label, name): d for label, *_, r in done for name, d in r["summary"].detection.items()
                     if len(r["summary"].detection) > 1}  # the runs with more than the default PRADA
        if detectors:
            out += ["", "Detectors: query-level AUROC over all attacks, and what they flagged (a stateful detector: "
                    "accounts, for good; a stateless one: single queries):", "",
                    "| run | detector | kind | query AUROC % | flagged, attackers | flagged, benign |",
                    "|---|---|---|---:|---:|---:|"]
            for (label, name), d in detectors.items():
                auroc = "–" if d.query_level.auroc is None else f"{100 * d.query_level.auroc:.1f}"
                if d.stateful:
                    flagged = (f"{d.flagged_attacker_accounts} / {d.attacker_accounts} accounts | "
                               f"{d.flagged_benign_accounts} / {d.benign_accounts} accounts")
                else:
                    q = d.flagged_queries
                    flagged = " | ".join(f"{100 * q[f'{who}_queries'] / max(q[f'{who}_queries_total'], 1):.1f}% of "
                                         f"queries" for who in ("attacker", "benign"))
                out.append(f"| {label} | {name} | {d.kind} | {auroc} | {flagged} |")
        out += spread(study, runs)
        out.append("")
    return "\n".join(out)


README = os.path.join(os.path.dirname(RESULTS), "..", "README.md")
MARK = "<!-- printed:"  # the README's sample output follows this line, as a fenced block


def readme_sample(result: dict) -> str | None:
    """What the README's default run printed, as this benchmark recorded it."""
    entry = result["runs"].get("scenarios", {}).get("distributed_knockoff")
    return None if entry is None else printed_text(entry)


def replace_sample(text: str, printed: str) -> str:
    """``text`` (the README) with the fenced block after the marker line replaced by ``printed``."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(MARK)) + 1
    end = lines.index("```", start + 1)
    return "\n".join(lines[:start] + ["```", *printed.split("\n"), "```"] + lines[end + 1:])


def write_tables(path: str, result: dict) -> None:
    text = (f"# Scenario runs\n\nWritten by `python benchmarks/runs.py` on {result['machine']} (last "
            f"{result['updated']}; each study says when its runs were measured, and a run measured with an "
            f"older version of the code may differ from what the same command gives now). Every row is one run "
            f"of the command shown.\n\n{tables(result['runs'])}")
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:  # opened once the text is made
        fh.write(text)
    printed = readme_sample(result)
    if printed and os.path.abspath(path) == os.path.join(RESULTS, "runs.json"):  # the README shows the default
        with open(README) as fh:
            text = fh.read()
        with open(README, "w") as fh:
            fh.write(replace_sample(text, printed))


def main() -> None:
    ap = OneLineParser(prog="python benchmarks/runs.py", description=description(__doc__))
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--seeds", nargs="+", type=nonnegative, default=[0],
                    help="run each run at these seeds (seed 0: the tables; the others: the spread)")
    ap.add_argument("--fresh", action="store_true",
                    help="run the chosen studies' runs at the chosen seeds again (the others' are kept)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from --out")
    ap.add_argument("--out", default=os.path.join(RESULTS, "runs.json"))
    args = ap.parse_args()
    if args.report_only:
        write_tables(args.out, read_results(args.out, ("runs", "machine", "updated"), "benchmarks/runs.py"))
        return
    args.out = output_file(args.out)
    result = read_results(args.out, ("runs",), "benchmarks/runs.py") if os.path.exists(args.out) else {"runs": {}}
    if args.fresh:  # only what this call runs again: every other run stays until its replacement is measured
        result["runs"] = forget(result["runs"], args.studies, args.seeds)

    todo = [(study, sd, seeded(label, sd), scenario, overrides + ([f"seed={sd}"] if sd else []))
            for sd in args.seeds for study in args.studies for label, scenario, overrides in STUDIES[study]
            if seeded(label, sd) not in result["runs"].get(study, {})]
    if not todo:
        print(f"every chosen run is in {args.out} already; nothing written (--fresh runs them again, --report-only "
              f"rewrites the tables)", file=sys.stderr)
        return

    from sim import engine, serving
    from sim.errors import DataError

    engine.init_local_ray()
    serving.start_serve(0, http=True)
    for i, (study, seed, label, scenario, overrides) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {study}: {command(scenario, overrides)}", file=sys.stderr, flush=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            entry = run_one(scenario, overrides, os.path.join(os.path.dirname(args.out), "runs", f"{study}-{stamp}"))
        except DataError as exc:  # a dataset this machine lacks (fashion_knockoff): say so and go on
            print(f"    skipped: {exc}", file=sys.stderr, flush=True)
            continue
        print(printed_text(entry), file=sys.stderr, flush=True)
        result["runs"].setdefault(study, {})[label] = {**entry, "seed": seed}
        result["machine"] = machine()
        result["updated"] = dt.date.today().isoformat()
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        write_tables(args.out, result)
    print(f"written to {args.out} and {os.path.splitext(args.out)[0]}.md", file=sys.stderr)


if __name__ == "__main__":
    script(main)

"""Replica accuracy and fidelity of every attack against the undefended LeNet, versus the query budget.

    python benchmarks/attacks.py [--datasets fashion_mnist mnist5k] [--attacks knockoff jbda jb_self jb_top3 dfme]
                                 [--budgets 1000 5000 10000 50000] [--variant default|mad_code]
                                 [--without QUIRK ...] [--replica default|mad_code] [--clean-settings NAME ...]
                                 [--seeds 0 1 2]
                                 [--replica-epochs N] [--pool-sizes N ...] [--pools SPEC ...]
                                 [--out benchmarks/results/attacks.json]

Each cell is one attacker built exactly as a scenario builds it (``fashion_knockoff`` for ``fashion_mnist``,
``single_knockoff`` for ``mnist5k``, with ``attack=`` switched), driven in this process against the victim's
clean answers (no Serve, no log: this measures the attacks, not the service), then a replica trained on its
transfer set and evaluated on the victim's test split minus any attack seeds. Settings per attack:
- knockoff: random strategy, pool ``mnist5k+digits`` (Fashion-MNIST victim) or ``digits`` (mnist5k victim),
  drawn with replacement and augmented, so every budget is possible;
- jbda / jb_self / jb_top3: 150 seeds from the victim's test split, lambda 0.1, tau 3, up to 20 rounds (the
  budget ends the attack), substitute 10 epochs per round;
- dfme: B = 64, m = 1, 1 generator and 5 student steps per iteration (448 queries per iteration).
Replicas: the victim's LeNet, soft labels, Adam 1e-3, batch 64, 20 epochs (10 at budgets above 10,000), unless
--replica-epochs (the main tables show the default; other schedules are listed below them).

``--variant mad_code`` measures the reference mode instead (the MAD authors' code, docs/attacks.md): the Jacobian
attacks with ``jacobian.variant=mad_code`` and the code's settings (100 seeds from the victim's training split,
lambda 0.1, tau 5, substitute 20 epochs), every replica with ``replica.variant=mad_code`` (SGD 0.01, 100 epochs,
or ``--replica-epochs``) and the epoch of best test accuracy reported beside the last, as the code keeps it.
``--without QUIRK ...`` turns quirks of the code off (``jacobian.without``; an attack whose code lacks one of them is
skipped), ``--replica default`` trains the reference mode's transfer set with the clean replica, and
``--clean-settings seed_size tau substitute_epochs`` runs the reference mode with the clean mode's value of those
settings instead of the code's: the ablation, rows of their own in the reference table. ``--seeds`` measures each
cell at several seeds (victim, attack and replica); the tables show seed 0, and a spread table gives the mean,
standard deviation and range of every cell measured at more than one seed.
Knockoff's pool is the one above (the paper's EMNIST is not available here); ``--pool-sizes 1000 2500`` measures
Knockoff with only that many distinct pool images (``pool_size``), ``--pools mnist5k+digits+glyphs`` with another
pool (here with typeset letters added, a stand-in for EMNIST's): the pool study, rows of their own.
Results are written after every cell (JSON at --out, a Markdown table next to it), so an interrupted run
keeps what it measured; cells already in --out are skipped unless --fresh (which measures the chosen ones again). A
cell is its dataset, attack, budget, seed, mode, replica epochs, pool and pool size: the reference mode's cells at
``--replica-epochs 30`` (the ablation rows) and at its default 100 are separate cells, the one beside the other.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from actors.attacks.jacobian import seeds_spend_all
from actors.attacks.jacobian_mad_code import APPLIES, OPTIONAL
from analysis.claims import attack_cell_key, attack_key, default_replica_epochs, replica_pct, spread
from sim import config, data, registry, zoo
from sim.cli import OneLineParser, count, description, machine, nonnegative, output_file, read_results, script
from sim.errors import ConfigError, DataError
from sim.plan import derive_seed, make_plan
from sim.training import accuracy, fidelity, predict_probs

SCENARIO = {  # dataset -> (scenario, its attacker id, Knockoff's pool)
    "fashion_mnist": ("fashion_knockoff", "knockoff", "mnist5k+digits"),
    "mnist5k": ("single_knockoff", "single", "digits"),
}
PAPER = {"jbda": 38.7, "jb_self": 45.8, "jb_top3": 68.7, "knockoff": 69.2}  # MAD paper, Fashion-MNIST, 50k queries


MAD_CODE = {"jacobian.variant": "mad_code", "jacobian.seed_size": 100, "jacobian.lam": 0.1, "jacobian.tau": 5,
            "jacobian.substitute_epochs": 20}  # the MAD code's Jacobian settings (docs/attacks.md)
SETTINGS = tuple(k.split(".", 1)[1] for k in MAD_CODE if k != "jacobian.variant")  # --clean-settings' choices


def cell_config(dataset: str, attack: str, budget: int, seed: int = 0, variant: str = "default",
                epochs: int | None = None, without: tuple[str, ...] = (), replica: str | None = None,
                clean: tuple[str, ...] = (), pool_size: int | None = None, pool: str | None = None):
    """(the scenario config of one cell, its attacker's id): see :func:`run_cell`."""
    scenario, aid, own_pool = SCENARIO[dataset]
    declared = registry.get("attack", attack).params
    own = {"pool": pool or own_pool, "sample_with_replacement": "true", "augment": "true",
           **({k: v for k, v in MAD_CODE.items() if k.split(".", 1)[1] not in clean} if variant == "mad_code"
              else {"jacobian.rounds": 20}),  # the code's mode runs as many rounds as the budget allows
           **({"jacobian.without": "[" + ",".join(without) + "]"} if without else {}),
           **({"pool_size": pool_size} if pool_size else {})}
    replica = replica or variant
    epochs = epochs or default_replica_epochs(budget, replica)
    return config.load(scenario, [
        f"seed={seed}", "benign.users=0", f"attackers.{aid}.attack={attack}", f"attackers.{aid}.budget={budget}",
        f"attackers.{aid}.replica.epochs={epochs}", f"attackers.{aid}.replica.variant={replica}",
        *[f"attackers.{aid}.{k}={v}" for k, v in own.items() if k in declared]]), aid


def run_cell(dataset: str, attack: str, budget: int, seed: int = 0, variant: str = "default",
             epochs: int | None = None, without: tuple[str, ...] = (), replica: str | None = None,
             clean: tuple[str, ...] = (), pool_size: int | None = None, pool: str | None = None) -> dict:
    """One cell; ``replica`` is the replica's variant (default: ``variant``'s); ``clean``: the reference mode's
    settings (``SETTINGS``) left at the clean mode's value; ``pool_size``: Knockoff's distinct pool images (None: the
    whole pool); ``pool``: Knockoff's pool (None: ``SCENARIO``'s for the dataset)."""
    from actors.replica import keep_best, score, train_replica

    cfg, aid = cell_config(dataset, attack, budget, seed, variant, epochs, without, replica, clean, pool_size, pool)
    replica = replica or variant
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    ds = victim.dataset
    plan = make_plan(cfg, ds)
    (client,) = plan.of(attacker=aid)
    source, start = client.source, time.perf_counter()
    while source.remaining:
        x = source.propose(256)
        source.observe(x, predict_probs(victim.model, x), np.ones(len(x), bool))
    attack_seconds = time.perf_counter() - start
    x, y = source.transfer_set()
    att = cfg.attackers[aid]
    start = time.perf_counter()
    keep = plan.eval_indices(len(ds.x_test))
    victim_pred = predict_probs(victim.model, ds.x_test[keep]).argmax(1)
    built, best = {}, {}

    def on_epoch(epoch, loss):
        keep_best(best, epoch, score(built["model"], (ds.x_test[keep], ds.y_test[keep], victim_pred)))

    model = train_replica(x, y, arch=cfg.replica_arch(aid), input_shape=ds.input_shape, num_classes=ds.num_classes,
                          cfg=att.replica, seed=derive_seed(cfg.seed, "replica", aid),
                          on_epoch=on_epoch if replica == "mad_code" else None,
                          on_build=lambda m: built.update(model=m))
    pred = predict_probs(model, ds.x_test[keep]).argmax(1)
    own = (score(source.extracted(), (ds.x_test[keep], ds.y_test[keep], victim_pred))
           if hasattr(source, "extracted") else None)  # the model the attack trained itself (DFME's student)
    return {"dataset": dataset, "attack": attack, "budget": budget, "seed": seed, "variant": variant,
            **({"without": list(without)} if without else {}),
            **({"replica_variant": replica} if replica != variant else {}),
            **({"clean_settings": list(clean)} if clean else {}), **({"pool_size": pool_size} if pool_size else {}),
            **({"pool": pool} if pool else {}),
            "queries": int(len(x)),
            "victim_accuracy": round(victim.test_accuracy, 4),
            "replica_accuracy": round(accuracy(pred, ds.y_test[keep]), 4),
            "fidelity": round(fidelity(pred, victim_pred), 4), "replica_epochs": att.replica.epochs,
            "attack_seconds": round(attack_seconds, 1), "replica_seconds": round(time.perf_counter() - start, 1),
            **({"best": best} if best else {}), **({"extracted": own} if own else {}), "stats": source.stats()}


def turned_off(c: dict) -> str:
    """What a reference-mode cell turned off: its quirks, the code's replica where the clean one trained, and the
    code's settings left at the clean mode's value."""
    parts = [", ".join(c.get("without", []))] if c.get("without") else []
    parts += ["the code's replica"] if c.get("replica_variant") == "default" else []
    return "; ".join(parts + (["the code's " + ", ".join(c["clean_settings"])] if c.get("clean_settings") else []))


def best_text(c: dict) -> str:
    b = c.get("best")
    return f"{100 * b['test_accuracy']:.1f} ({b['epoch']})" if b else "– (the clean replica keeps its last)"


def pool_text(c: dict) -> str:
    """The pool study's change to a cell: "pool SPEC", "pool of N images", "pool SPEC, N images of it", or ""."""
    size = c.get("pool_size") and f"{c['pool_size']:,} images"
    if c.get("pool"):
        return f"pool {c['pool']}" + (f", {size} of it" if size else "")
    return f"pool of {size}" if size else ""


def mode(c: dict) -> str:
    return (c.get("variant", "default") + (f" without {turned_off(c)}" if turned_off(c) else "")
            + (f", {pool_text(c)}" if pool_text(c) else ""))


def spread_table(cells: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["attack"], mode(c), c["budget"], c["replica_epochs"]), []).append(c)
    lines = []
    for (dataset, attack, how, budget, epochs), mine in groups.items():
        if len(mine) < 2:
            continue
        mine.sort(key=lambda c: c.get("seed", 0))
        lines.append(f"| {dataset} | {attack} | {how} | {budget:,} | {epochs} | "
                     f"{', '.join(str(c.get('seed', 0)) for c in mine)} | {spread([replica_pct(c) for c in mine])} |")
    if not lines:
        return []
    return ["Spread over seeds (victim, attack and replica): replica accuracy %, mean ± standard deviation (range); "
            "the reference mode at its best epoch", "",
            "| dataset | attack | mode | queries | replica epochs | seeds | replica |",
            "|---|---|---|---:|---:|---|---:|", *lines, ""]


def table(cells: list[dict]) -> str:
    spread = spread_table(cells)
    cells = [c for c in cells if c.get("seed", 0) == 0]
    default = [c for c in cells if c.get("variant", "default") == "default"]
    others = [c for c in default if c["replica_epochs"] != default_replica_epochs(c["budget"]) or pool_text(c)]
    default = [c for c in default if c not in others]  # the tables show the default settings; the others below
    reference = [c for c in cells if c.get("variant") == "mad_code"]
    order = {a: i for i, a in enumerate(dict.fromkeys(c["attack"] for c in reference))}
    reference.sort(key=lambda c: (c["dataset"], order[c["attack"]], c["budget"], len(c.get("without", [])),
                                  c.get("without", []), c.get("replica_variant", ""), c.get("clean_settings", []),
                                  c["replica_epochs"], c.get("pool") or "", c.get("pool_size") or 0))
    lines = []
    for dataset in dict.fromkeys(c["dataset"] for c in default):
        mine = [c for c in default if c["dataset"] == dataset]
        budgets = sorted({c["budget"] for c in mine})
        paper = dataset == "fashion_mnist"
        lines += [f"**{dataset}** (victim LeNet, test accuracy {mine[0]['victim_accuracy']:.3f}): replica accuracy / "
                  f"fidelity, %", "",
                  "| attack | " + " | ".join(f"{b:,}" for b in budgets) + (" | MAD paper, 50k |" if paper else " |"),
                  "|---|" + "---:|" * (len(budgets) + paper)]
        for attack in dict.fromkeys(c["attack"] for c in mine):
            row = {c["budget"]: c for c in mine if c["attack"] == attack}
            vals = [f"{100 * row[b]['replica_accuracy']:.1f} / {100 * row[b]['fidelity']:.1f}" if b in row else "–"
                    for b in budgets]
            extra = [f"{PAPER[attack]:.1f}" if attack in PAPER else "–"] if paper else []
            lines.append(f"| {attack} | " + " | ".join(vals + extra) + " |")
        lines.append("")
        for attack in dict.fromkeys(c["attack"] for c in mine if "extracted" in c):  # DFME: its student too
            own = {c["budget"]: c["extracted"] for c in mine if c["attack"] == attack and "extracted" in c}
            lines += [f"{attack}'s row is a replica trained afresh on its queries; the model {attack} trained itself "
                      f"while it queried (its student, the one its paper scores), accuracy / fidelity %: "
                      + "; ".join(f"{b:,} queries {100 * o['test_accuracy']:.1f} / {100 * o['fidelity']:.1f}"
                                  for b, o in sorted(own.items())), ""]
    if others:
        lines += ["Clean mode at other settings than the default: "
                  + "; ".join(f"{c['dataset']} {c['attack']} {c['budget']:,} queries, {c['replica_epochs']} epochs"
                              f"{', ' + pool_text(c) if pool_text(c) else ''}: "
                              f"{100 * c['replica_accuracy']:.1f} / {100 * c['fidelity']:.1f}" for c in others), ""]
    if reference:
        lines += ["**Reference mode** (`--variant mad_code`: the MAD authors' code, docs/attacks.md): replica accuracy "
                  "%, last epoch / best epoch (the code keeps the best)", "",
                  "| dataset | attack | quirks turned off; other changes | queries | "
                  "distinct images in the transfer set | replica epochs | last | best (epoch) | MAD paper, 50k |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for c in reference:
            paper = f"{PAPER[c['attack']]:.1f}" if c["dataset"] == "fashion_mnist" and c["attack"] in PAPER else "–"
            distinct = c.get("stats", {}).get("distinct_images")
            changed = "; ".join(t for t in (turned_off(c), pool_text(c)) if t)
            lines.append(f"| {c['dataset']} | {c['attack']} | {changed or 'none'} | "
                         f"{c['budget']:,} | "
                         f"{'–' if distinct is None else format(distinct, ',')} | {c['replica_epochs']} | "
                         f"{100 * c['replica_accuracy']:.1f} | {best_text(c)} | {paper} |")
        lines.append("")
    return "\n".join(lines + spread)


def main() -> None:
    ap = OneLineParser(prog="python benchmarks/attacks.py", description=description(__doc__))
    ap.add_argument("--datasets", nargs="+", default=["fashion_mnist", "mnist5k"], choices=list(SCENARIO))
    ap.add_argument("--attacks", nargs="+", default=["knockoff", "jbda", "jb_self", "jb_top3", "dfme"])
    ap.add_argument("--budgets", nargs="+", type=count, default=[1000, 5000, 10000, 50000])
    ap.add_argument("--variant", default="default", choices=["default", "mad_code"],
                    help="mad_code: the MAD authors' code (reference mode)")
    ap.add_argument("--without", nargs="+", default=[], choices=OPTIONAL,
                    help="with --variant mad_code: turn these quirks of the code off (the per-quirk ablation)")
    ap.add_argument("--replica", default=None, choices=["default", "mad_code"],
                    help="the replica's variant (default: --variant's); --variant mad_code --replica default measures "
                         "the code's transfer set with the clean replica")
    ap.add_argument("--clean-settings", nargs="+", default=[], choices=SETTINGS,
                    help="with --variant mad_code: these settings at the clean mode's value, not the code's")
    ap.add_argument("--seeds", nargs="+", type=nonnegative, default=[0], help="seeds (victim, attack and replica)")
    ap.add_argument("--replica-epochs", type=count, default=None,
                    help="replica epochs (default: by budget and variant)")
    ap.add_argument("--pool-sizes", nargs="+", type=count, default=[None],
                    help="Knockoff only: distinct pool images, one cell per size (default: the whole pool)")
    ap.add_argument("--pools", nargs="+", default=[None],
                    help="Knockoff only: pools (dataset names joined by +), one cell per pool (default: the one above)")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--fresh", action="store_true", help="measure the chosen cells again (the others are kept)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attacks.json"))
    args = ap.parse_args()
    for name in args.attacks:  # refused now, not when its first cell comes up (module:attr of your own loads here)
        try:
            registry.check_name("attack", "--attacks", name)
        except ConfigError as exc:
            ap.error(str(exc))
    if (args.without or args.clean_settings) and args.variant != "mad_code":
        ap.error("--without and --clean-settings turn off parts of the MAD code; expected them with --variant mad_code")
    if args.replica == "mad_code" and args.variant != "mad_code":
        ap.error("--replica mad_code: expected it with --variant mad_code (the clean attacks with the code's replica "
                 "are not a mode of this benchmark)")
    for flag, given in (("--pool-sizes", args.pool_sizes), ("--pools", args.pools)):
        if given != [None] and set(args.attacks) != {"knockoff"}:
            ap.error(f"{flag} applies to Knockoff's pool; expected --attacks knockoff, got {' '.join(args.attacks)}")
    args.seeds, args.budgets, args.pool_sizes, args.pools = (list(dict.fromkeys(v))  # a value given twice is one cell
                                                             for v in (args.seeds, args.budgets, args.pool_sizes,
                                                                       args.pools))
    for spec in {p or SCENARIO[d][2] for d in args.datasets for p in args.pools}:  # refused before hours of work
        try:
            whole = len(data.load_pool(spec)[0])
        except (ConfigError, DataError) as exc:
            ap.error(f"--pools {spec}: {exc}")
        bad = [n for n in args.pool_sizes if n is not None and not 1 <= n <= whole]
        if bad:
            ap.error(f"--pool-sizes {' '.join(map(str, bad))}: Knockoff's pool {spec!r} has {whole:,} images; "
                     f"expected sizes from 1 to {whole}")
    without, clean = tuple(args.without), tuple(args.clean_settings)
    for dataset in args.datasets:  # a budget a Jacobian attack's seeds would spend alone fails its cell: refused now
        for attack in args.attacks:
            cfg, aid = cell_config(dataset, attack, min(args.budgets), variant=args.variant, clean=clean)
            params = cfg.attackers[aid].params()
            seeds = seeds_spend_all(params, min(args.budgets)) if "jacobian.seed_size" in params else None
            if seeds is not None:
                low = [b for b in args.budgets if b <= seeds]
                ap.error(f"--budgets {' '.join(map(str, low))}: {attack} on {dataset} would spend it all on its "
                         f"{seeds} seeds (jacobian.seed_size); expected budgets above that")
    torch.set_num_threads(args.threads)
    args.out = output_file(args.out)
    cells = []
    if os.path.exists(args.out):
        cells = read_results(args.out, ("cells", "machine", "torch_threads"), "benchmarks/attacks.py")["cells"]

    replica = args.replica if args.replica not in (None, args.variant) else None

    skipped = [a for a in args.attacks if without and set(without) - set(APPLIES.get(a, ()))]
    if skipped:
        print(f"skipped: {', '.join(skipped)} (its code has no quirk {', '.join(without)})")
    def chosen(dataset: str, attack: str, budget: int, seed: int, size: int | None, pool: str | None) -> tuple:
        return attack_key(dataset, attack, budget, seed, args.variant, without, replica, clean,  # a cell this run
                          args.replica_epochs, size, pool)  # measures

    done = set() if args.fresh else {attack_cell_key(c) for c in cells}
    def changed(dataset: str, pool: str | None) -> str | None:  # a dataset's own pool is no change
        return None if pool == SCENARIO[dataset][2] else pool

    todo = list(dict.fromkeys(
        (d, a, b, s, n, changed(d, p)) for s in args.seeds for b in sorted(args.budgets) for p in args.pools  # small
        for n in args.pool_sizes for d in args.datasets for a in args.attacks  # budgets first
        if a not in skipped and chosen(d, a, b, s, n, changed(d, p)) not in done))
    for i, (dataset, attack, budget, seed, size, pool) in enumerate(todo, 1):
        other = pool_text({"pool_size": size, "pool": pool})
        print(f"[{i}/{len(todo)}] {dataset} {attack} {budget:,} queries, seed {seed} ({args.variant}"
              f"{', without ' + ', '.join(without) if without else ''}{', clean replica' if replica else ''}"
              f"{', clean ' + ', '.join(clean) if clean else ''}{', ' + other if other else ''}) ...", flush=True)
        cell = run_cell(dataset, attack, budget, seed=seed, variant=args.variant, epochs=args.replica_epochs,
                        without=without, replica=replica, clean=clean, pool_size=size, pool=pool)
        print(f"    replica {cell['replica_accuracy']:.4f}, fidelity {cell['fidelity']:.4f} "
              f"(attack {cell['attack_seconds']} s, replica {cell['replica_seconds']} s)", flush=True)
        if args.fresh:  # replace the cell measured before, if any
            cells = [c for c in cells if attack_cell_key(c) != chosen(dataset, attack, budget, seed, size, pool)]
        cells.append(cell)
        with open(args.out, "w") as fh:
            json.dump({"machine": machine(),
                       "torch_threads": args.threads, "cells": cells}, fh, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
            fh.write(f"Last written by `python benchmarks/attacks.py` on {machine()}, {args.threads} torch threads "
                     f"(cells kept from earlier runs were measured where those ran).\n\n"
                     + table(cells))
    print(table(cells))


if __name__ == "__main__":
    script(main)

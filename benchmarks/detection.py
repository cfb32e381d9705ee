"""Detection quality of SAME and the baselines per attack, and PRADA against account splitting.

    python benchmarks/detection.py [--parts same sybil population prada_sizes] [--budgets 1000 4000]
                                   [--accounts 1 10 50 100] [--seeds 0 1 2] [--variant default|same_code]
                                   [--mae cpu|patch2|wide|authors] [--without full_view|all_pixel_loss]
                                   [--out benchmarks/results/detection.json]

Part 1 (the SAME paper's MNIST table): the ``same_detection`` scenario's victim (LeNet on mnist5k), SAME's
models (MAE and auxiliary model, trained and cached by the zoo as a run would) and its attackers, each built
as the scenario builds it and driven in this process against the victim's clean answers (8-bit images, no
Serve). Positives: the attacker's queries at each budget; negatives: the victim's 1,000 test images (benign
traffic). Scores: SAME (z-scored reconstruction + deviation, weight 1), SAME-X (reconstruction only), SAME-Y
(deviation only), maximum softmax of the victim (MSP) and of an outlier-exposure copy (MSP-OE). AUROC, AUPR
and FPR95 from scikit-learn (analysis.metrics).

``--variant same_code`` measures part 1 in the reference mode instead (the SAME authors' code, docs/detection.md),
into the result's ``same_code`` entry: full-view reconstruction, KL deviation, score alpha * MSE + (1 - alpha) * KL
on raw scales with alpha 0.99, the auxiliary model trained 80 epochs on masked reconstructions, JBDA seeded from the
attacker's own digits (``jacobian.seed_pool``, as the code's evaluation gives its JBDA the proxy set), and an MAE of
``--mae cpu`` (this project's default size and 100 epochs, 10 of warm-up: a quarter of an hour on 2 cores),
``patch2`` (the authors' patch of 2 pixels on that size), ``wide`` (patch 2, width 128, 6 + 2 blocks, 50 epochs)
or ``authors`` (patch 2, width 192, 12 + 4 blocks of 3 heads, 500 epochs, 50 of warm-up, learning rate 0.01: for a
GPU, half a day or more on 2 cores; docs/detection.md); a size other than ``cpu`` goes into
``same_code_mae_<size>``, the reference mode by MAE size. ``--without full_view`` / ``all_pixel_loss`` turns one of
the code's choices off (``detectors.same.without``), into ``same_code_without_<choice>``: the per-choice ablation.
The reference mode's table adds "SAME ±1", the same score on the code's pixel range ([-1, 1], where each
reconstruction's MSE is 4 times as large), and the MAE's mean reconstruction MSE of the honest images and of each
attack's queries (with its training loss by epoch, recorded when a run with the same settings trained it).

Part 2 (account splitting): ``distributed_jbda``'s attacker (1,500 JBDA queries, round robin, 16 per request)
over N accounts, with two benign users (300 test images each), all through one in-process victim service
(sim.service.VictimService: the code a Serve replica runs) with per-account PRADA, PRADA pooled per account
cohort (the attacker's accounts signed up in batches of ``--cohort`` accounts) and account linking. Reported:
attacker accounts flagged, benign accounts flagged.

Part 3 (``population``): the same detectors against a realistic honest population, per seed (``--seeds``: victim,
attack and population): 240 benign accounts held by 4 benign actors, with varied query counts, shared popular
images, and some signed up in the attacker's sign-up batches (``benign.*`` settings, docs/configuration.md).
Reported: accounts flagged per detector over all seeds, with the false-positive rate's 95% Wilson interval.

Part 4 (``prada_sizes``): per-account PRADA's flag rate by account size, Knockoff accounts beside benign accounts
with the same number of queries, per seed: the false-positive rate an evasion claim must be read against.

Results are written to --out (JSON) and a Markdown table next to it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from actors.attacks.jacobian import seeds_spend_all
from analysis.claims import MAE_SIZES, same_entry
from analysis.metrics import detection_metrics
from sim import config, detectors, zoo
from sim.cli import OneLineParser, count, description, machine, nonnegative, output_file, read_results, script
from sim.detectors.link import REASONS
from sim.detectors.same import WITHOUT, Same
from sim.plan import derive_seed, make_plan
from sim.training import predict_probs

PAPER_1K = {"jbda": 93.30, "knockoff": 99.37, "dfme": 100.00}  # SAME paper, MNIST, 1k queries, AUROC %
PAPER_4K = {"jbda": 93.10, "knockoff": 99.19, "dfme": 99.91}


def attack_queries(cfg, victim, aid: str) -> np.ndarray:
    """Every query attacker ``aid`` sends, driven against the victim's clean answers."""
    plan = make_plan(cfg, victim.dataset)
    (client,) = plan.of(attacker=aid)
    source, sent = client.source, []
    while source.remaining:
        x = source.propose(64)
        source.observe(x, predict_probs(victim.model, x), np.ones(len(x), bool))
        sent.append(x)
    return np.concatenate(sent)


SAME_CODE = ["detectors.same.variant=same_code", "detectors.same.alpha=0.99", "detectors.same.aux_epochs=80",
             # the code's JBDA is given the attacker's proxy set (evaluate_main.py), not the defender's test images
             "attackers.jbda.jacobian.seed_pool=digits"]


def same_overrides(variant: str, mae: str, without: tuple[str, ...] = ()) -> list[str]:
    if variant != "same_code":
        return []
    return SAME_CODE + MAE_SIZES[mae] + ([f"detectors.same.without=[{','.join(without)}]"] if without else [])


def _tenth(epoch: int, epochs: int) -> bool:
    """Whether ``epoch`` ends a tenth of a schedule of ``epochs`` (or the schedule)."""
    return epoch == epochs or epoch % max(1, epochs // 10) == 0


def _progress(stage: str, epoch: int, epochs: int, loss: float) -> None:
    """Training SAME's models takes from minutes to hours: a line every tenth of a stage."""
    if _tenth(epoch, epochs):
        print(f"  {stage}: epoch {epoch}/{epochs}, loss {loss:.4f} ({time.strftime('%H:%M:%S')})", flush=True)


def code_scores(r: np.ndarray, kl: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """The reference mode's scores from each query's raw reconstruction MSE ``r`` (pixels in [0, 1]) and KL
    deviation: SAME = alpha r + (1 - alpha) KL, its two terms, and "SAME ±1", the same score on the code's pixels,
    in [-1, 1] (its victim wrapper clamps every query there), where the same reconstruction has 4 times the MSE: the
    terms' balance moves, and with it the ranking."""
    return {"SAME": alpha * r + (1 - alpha) * kl, "SAME-X": r, "SAME-Y": kl,
            "SAME ±1": alpha * 4 * r + (1 - alpha) * kl}


def part_same(budgets: list[int], seed: int = 0, variant: str = "default", mae: str = "cpu",
              without: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """The cells (budget, attack, detector: AUROC, AUPR, FPR95), and what the reference mode's table says of its MAE:
    the mean reconstruction MSE (pixels in [0, 1]) of the honest test images and of each attack's queries per budget,
    and, when the MAE was trained in this run rather than read from the cache, its training loss at each tenth of
    its schedule."""
    cfg = config.load("same_detection", [f"seed={seed}", *same_overrides(variant, mae, without)])
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    t0 = time.perf_counter()
    mae_loss = []

    def on_epoch(stage: str, epoch: int, epochs: int, loss: float) -> None:
        if stage == "training SAME mae" and _tenth(epoch, epochs):
            mae_loss.append([epoch, round(loss, 5)])
        _progress(stage, epoch, epochs, loss)

    ctx = zoo.ModelContext.of(cfg, victim, on_epoch=on_epoch)
    params = cfg.detectors["same"].params()
    same = Same(Same.prepare(params, ctx), **params)
    print(f"SAME models ready in {time.perf_counter() - t0:.0f} s", flush=True)
    oe = ctx.victim_variant(training="outlier_exposure")
    benign = victim.dataset.x_test

    def scores(x):
        probs = predict_probs(victim.model, x)
        if variant == "same_code":  # raw scales, mixed with alpha as the code does
            r, kl = same.models.signals(x, probs, same.full_view)
            return code_scores(r, kl, same.values["alpha"])
        zr, zd = same.components(x, probs)
        return {"SAME": zr + zd, "SAME-X": zr, "SAME-Y": zd, "MSP": 1 - probs.max(1),
                "MSP-OE": 1 - predict_probs(oe.model, x).max(1)}

    neg = scores(benign)
    mse = {"honest": round(float(neg["SAME-X"].mean()), 6)}
    cells = []
    for budget in budgets:
        for aid in cfg.attackers:
            run_cfg = config.load(cfg, [f"attackers.{aid}.budget={budget}"])
            x = attack_queries(run_cfg, victim, aid)
            pos = scores(x)
            mse.setdefault(str(budget), {})[cfg.attackers[aid].attack] = round(float(pos["SAME-X"].mean()), 6)
            for name in pos:
                m = detection_metrics(np.r_[np.ones(len(x)), np.zeros(len(benign))], np.r_[pos[name], neg[name]])
                cells.append({"budget": budget, "attack": cfg.attackers[aid].attack, "detector": name,
                              **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}})
                print(f"  {budget:>5} {aid:<9} {name:<7} AUROC {m['auroc']:.4f} AUPR {m['aupr']:.4f} "
                      f"FPR95 {m['fpr95']:.4f}", flush=True)
    info = {"mse": mse} if variant == "same_code" else {}
    return cells, {**info, **({"mae_loss": mae_loss} if mae_loss else {})}


def cross_account_service(cfg, victim, plan, skip_repeats: bool = False, unspared: bool = False):
    """The victim service (the code a Serve replica runs, in-process) with per-account PRADA, PRADA pooled per
    sign-up cohort and account linking, at the scenario's PRADA and linking settings; ``skip_repeats`` also adds
    per-account PRADA that skips exact repeats (``prada_skip``) and turns it on for the pooled one (its default);
    ``unspared`` adds linking without its ``spare`` rule (``link_unspared``, left out of ``any``)."""
    from sim.policy import Rule
    from sim.service import VictimService

    p = cfg.detectors["prada"]
    prada = {"prada": detectors.build("prada", delta=p.delta, min_pool=p.min_pool),
             "cohort_prada": detectors.build("prada", delta=p.delta, min_pool=p.min_pool, skip_repeats=skip_repeats)}
    if skip_repeats:
        prada["prada_skip"] = detectors.build("prada", delta=p.delta, min_pool=p.min_pool, skip_repeats=True)
    link = {"link": detectors.build("link", **cfg.detectors["link"].params())}
    if unspared:
        link["link_unspared"] = detectors.build("link", **{**cfg.detectors["link"].params(), "spare": False})
    return VictimService(
        model=victim.model, victim="v", run_id="bench", accounts=plan.accounts, input_shape=victim.dataset.input_shape,
        detectors={**prada, **link}, rules={"cohort_prada": Rule(group="cohort")})


def drive(svc, clients, seed: int) -> dict[str, set]:
    """One request per client in turn (the victim sees the traffic interleaved), each through its accounts as its
    split says, until every budget is spent; the accounts each detector flagged (``any``: by one of them)."""
    from actors.accounts import AccountSplitter

    splitters = {c.actor_id: AccountSplitter(c.keys, c.split, c.budget, seed, sizes=(c.strategy or {}).get("sizes"))
                 for c in clients}
    live = list(clients)
    while live:
        for c in list(live):
            if not c.source.remaining:
                live.remove(c)
                continue
            pick = splitters[c.actor_id].next(min(c.batch_size, c.source.remaining))
            x = c.source.propose(pick.n)
            reply = svc.query(pick.key, x, c.actor_id)
            c.source.observe(x, reply.probs, reply.answered)
    cohorts = {a.account_id: f"cohort:{a.cohort}" for a in svc.accounts.values()}
    flagged = {name: d.flagged_accounts() for name, d in svc.detectors.items() if name != "cohort_prada"}
    flagged["cohort_prada"] = {a for a, k in cohorts.items() if svc.detectors["cohort_prada"].is_flagged(k)}
    flagged["any"] = set().union(*(v for k, v in flagged.items() if k != "link_unspared"))
    return flagged


def part_sybil(accounts_list: list[int], cohort: int, seed: int = 0) -> list[dict]:
    rows = []
    for n in accounts_list:
        cfg = config.load("distributed_jbda", [f"seed={seed}", f"attackers.distributed.accounts={n}",
                                               f"attackers.distributed.cohort_size={cohort}"])
        victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
        plan = make_plan(cfg, victim.dataset)
        clients = plan.of(attacker="distributed") + plan.of(role="benign")
        svc = cross_account_service(cfg, victim, plan)
        t0 = time.perf_counter()
        flagged = drive(svc, clients, seed)
        role = {a.account_id: a.role for a in plan.accounts.values()}
        row = {"accounts": n, "queries_per_account": 1500 // n, "seconds": round(time.perf_counter() - t0, 1)}
        for name, accts in flagged.items():
            row[f"{name}_attacker"] = sum(role.get(a) == "attacker" for a in accts)
            row[f"{name}_benign"] = sum(role.get(a) == "benign" for a in accts)
        row["attacker_accounts"], row["benign_accounts"] = n, cfg.benign.users
        rows.append(row)
        print(f"  {n:>4} accounts: " + ", ".join(f"{k} {row[k + '_attacker']}/{n} (benign {row[k + '_benign']})"
                                               for k in flagged), flush=True)
    return rows


def wilson(k: int, n: int) -> list[float]:
    """The 95% Wilson interval of a rate of k in n (scipy)."""
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(ci.low, 4), round(ci.high, 4)]


POPULATION = ["benign.users=4", "benign.accounts=240", "benign.queries=20", "benign.queries_max=600",
              "benign.popular=0.2", "benign.shared_signup=0.1", "benign.batch_size=16"]


def part_population(seeds: list[int], cohort: int) -> list[dict]:
    """The cross-account detectors against a realistic honest population: ``distributed_jbda``'s attacker over 50
    accounts (signed up in batches of ``cohort``) beside 240 benign accounts held by 4 benign actors, 20 to 600
    queries each (log-uniform), a fifth of their queries from 20 popular images every account shares, and a tenth
    of them signed up inside the attacker's sign-up batches. Per seed (victim, attack and population), the
    accounts each detector flags."""
    rows = []
    for seed in seeds:
        cfg = config.load("distributed_jbda", [f"seed={seed}", "attackers.distributed.accounts=50",
                                               f"attackers.distributed.cohort_size={cohort}", *POPULATION])
        victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
        plan = make_plan(cfg, victim.dataset)
        t0 = time.perf_counter()
        svc = cross_account_service(cfg, victim, plan, skip_repeats=True, unspared=True)
        flagged = drive(svc, plan.of(attacker="distributed") + plan.of(role="benign"), seed)
        benign = {a.account_id for a in plan.accounts.values() if a.role == "benign"}
        in_batches = {a.account_id for a in plan.accounts.values()
                      if a.role == "benign" and not a.cohort.startswith("benign-")}
        attacker = {a.account_id for a in plan.accounts.values() if a.account_id.startswith("distributed-")}
        row = {"seed": seed, "benign_accounts": len(benign), "benign_in_attacker_batches": len(in_batches),
               "attacker_accounts": len(attacker), "seconds": round(time.perf_counter() - t0, 1)}
        for name, accts in flagged.items():
            row[f"{name}_attacker"] = len(accts & attacker)
            row[f"{name}_benign"] = len(accts & benign)
            row[f"{name}_benign_in_batches"] = len(accts & in_batches)
        for name in ("link", "link_unspared"):  # why linking flagged each benign account
            why = svc.detectors[name].flag_reasons()
            row[f"{name}_benign_why"] = {r: sum(why[a] == r for a in benign & why.keys()) for r in REASONS}
        rows.append(row)
        print(f"  seed {seed}: " + ", ".join(f"{k} attacker {row[k + '_attacker']}/{len(attacker)}, benign "
                                            f"{row[k + '_benign']}/{len(benign)}" for k in flagged), flush=True)
    return rows


SIZES = [50, 100, 200, 500, 1500]  # queries per account


def part_prada_sizes(seeds: list[int], accounts: int = 10) -> list[dict]:
    """Per-account PRADA's flag rate by account size: ``distributed_knockoff``'s Knockoff queries (digits pool)
    cut into ``accounts`` accounts of each size, beside as many benign accounts of the same size sending test
    images (each in its own seeded order), per seed (victim and attack). A benign account of a given size is what
    an attacker account of that size must be told apart from."""
    from actors.benign import BenignStream
    from sim.protocol import Account, make_keys
    from sim.service import VictimService

    rows = []
    for seed in seeds:
        for size in SIZES:
            cfg = config.load("distributed_knockoff", [
                f"seed={seed}", f"attackers.distributed.budget={size * accounts}",
                "attackers.distributed.sample_with_replacement=true", "attackers.distributed.actors=1"])
            victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
            ds = victim.dataset
            (attack,) = make_plan(cfg, ds).of(attacker="distributed")
            streams = {f"attacker-{j}": attack.source for j in range(accounts)}
            streams |= {f"benign-{j}": BenignStream(ds.x_test, size, derive_seed(seed, "size", size, j))
                        for j in range(accounts)}
            keys = make_keys([Account(a, a.split("-")[0]) for a in streams], seed=seed)
            key_of = {a.account_id: k for k, a in keys.items()}
            p = cfg.detectors["prada"]
            svc = VictimService(model=victim.model, victim="v", run_id="bench", accounts=keys,
                                input_shape=ds.input_shape,
                                detectors={"prada": detectors.build("prada", delta=p.delta, min_pool=p.min_pool)})
            for account, stream in streams.items():  # each account's queries in requests of 16, in its order
                for start in range(0, size, 16):
                    x = stream.propose(min(16, size - start))
                    reply = svc.query(key_of[account], x, account)
                    stream.observe(x, reply.probs, reply.answered)
            flagged = svc.detectors["prada"].flagged_accounts()
            row = {"seed": seed, "size": size, "accounts": accounts,
                   "attacker_flagged": sum(a.startswith("attacker") for a in flagged),
                   "benign_flagged": sum(a.startswith("benign") for a in flagged)}
            rows.append(row)
            print(f"  seed {seed}, {size:>5} queries/account: attacker {row['attacker_flagged']}/{accounts}, "
                  f"benign {row['benign_flagged']}/{accounts}", flush=True)
    return rows


def same_table(result: dict, key: str) -> list[str]:
    cells = result.get(key, [])
    if not cells:
        return []
    names = list(dict.fromkeys(c["detector"] for c in cells))
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    head = "AUROC / AUPR / FPR95 in %, attacker queries vs the victim's 1,000 test images"
    if key.startswith("same_code"):
        st = result.get(f"{key}_settings", {})
        off = st.get("without")
        head = (f"Reference mode (the SAME authors' code{', without ' + ' and '.join(off) if off else ''}; "
                f"MAE size `{st.get('mae')}`, measured on "
                f"{st.get('device')}: {' '.join(st.get('overrides', []))}). SAME = 0.99 MSE + 0.01 KL on raw "
                f"scales, SAME-X = MSE, SAME-Y = KL (pixels in [0, 1])"
                + ("; SAME ±1 = the same score on the code's pixel range, [−1, 1], where a reconstruction's MSE is 4 "
                   "times as large" if "SAME ±1" in names else "") + ". " + head)
    lines = [head + ":", "", "| budget | detector | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    for budget in sorted({c["budget"] for c in cells}):
        for name in names:
            row = {c["attack"]: c for c in cells if c["budget"] == budget and c["detector"] == name}
            lines.append(f"| {budget:,} | {name} | " + " | ".join(
                f"{100 * row[a]['auroc']:.2f} / {100 * row[a]['aupr']:.2f} / {100 * row[a]['fpr95']:.2f}"
                if a in row else "–" for a in attacks) + " |")
        paper = PAPER_1K if budget == 1000 else PAPER_4K if budget == 4000 else None
        if paper:
            lines.append(f"| {budget:,} | SAME paper (AUROC) | " + " | ".join(
                f"{paper[a]:.2f}" if a in paper else "–" for a in attacks) + " |")
    st = result.get(f"{key}_settings", {})
    if "mse" in st:
        per_budget = "; ".join(f"{int(b):,} queries of " + ", ".join(f"{a} {v:.4f}" for a, v in by.items())
                               for b, by in st["mse"].items() if b != "honest")
        lines += ["", f"The MAE's mean reconstruction MSE (pixels in [0, 1]): honest test images "
                      f"{st['mse']['honest']:.4f}; {per_budget}" + ("; its training loss by epoch: " + ", ".join(
                          f"{e}: {loss:.4f}" for e, loss in st["mae_loss"]) if st.get("mae_loss") else "") + "."]
    return lines + [""]


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({100 * k / max(n, 1):.1f}%, CI {100 * lo:.1f}–{100 * hi:.1f})"


def population_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    seeds = ", ".join(str(r["seed"]) for r in rows)
    n_b, n_a = sum(r["benign_accounts"] for r in rows), sum(r["attacker_accounts"] for r in rows)
    n_in = sum(r["benign_in_attacker_batches"] for r in rows)
    lines = [f"Cross-account detectors against an honest population (seeds {seeds}; per seed 240 benign accounts of "
             f"4 benign actors, 20–600 queries each, a fifth of them from 20 shared popular images, a tenth signed up "
             f"in the attacker's batches; the attacker: distributed JBDA, 1,500 queries over 50 accounts). Accounts "
             f"flagged over all seeds, with the 95% Wilson interval:", "",
             "`prada`: per-account PRADA as configured by default; `prada_skip`: the same skipping exact repeats "
             "(`skip_repeats=true`); `cohort_prada`: pooled per sign-up cohort, skipping repeats (its default); "
             "`link`: account linking as configured by default; `link_unspared`: the same with `spare=false` (when "
             "two parts of a cluster fail PRADA only pooled, every account of both is flagged, even those that clear "
             "themselves on their own stream; not in `any`).", "",
             "| detector | attacker accounts | benign accounts (false-positive rate) | benign flagged per seed "
             "| benign accounts in attacker sign-up batches |", "|---|---:|---:|---:|---:|"]
    names = [n for n in ("prada", "prada_skip", "cohort_prada", "link", "link_unspared", "any")
             if f"{n}_benign" in rows[0]]
    for name in names:
        k = {key: sum(r[f"{name}_{key}"] for r in rows) for key in ("attacker", "benign", "benign_in_batches")}
        per_seed = " / ".join(str(r[f"{name}_benign"]) for r in rows)
        lines.append(f"| {name} | {k['attacker']}/{n_a} | {rate(k['benign'], n_b)} | {per_seed} | "
                     f"{rate(k['benign_in_batches'], n_in)} |")
    for name in ("link", "link_unspared"):
        if f"{name}_benign_why" in rows[0]:
            why = "; ".join(f"seed {r['seed']}: " + ", ".join(f"{w} {n}" for w, n in r[f"{name}_benign_why"].items())
                            for r in rows)
            lines += ["", f"Why `{name}` flagged the benign accounts it flagged ({', '.join(REASONS)}): {why}."]
    return lines + [""]


def sizes_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    seeds = ", ".join(map(str, sorted({r["seed"] for r in rows})))
    lines = [f"Per-account PRADA by account size (seeds {seeds}; per seed and size, {rows[0]['accounts']} Knockoff "
             f"accounts cut from `distributed_knockoff`'s attacker and as many benign accounts of test images; "
             f"`mnist5k` has 1,000 test images, so a benign account of more queries repeats some). Accounts flagged "
             f"over all seeds, with the 95% Wilson interval:", "",
             "| queries per account | Knockoff accounts flagged | benign accounts flagged (false-positive rate) |",
             "|---:|---:|---:|"]
    for size in sorted({r["size"] for r in rows}):
        mine = [r for r in rows if r["size"] == size]
        n = sum(r["accounts"] for r in mine)
        lines.append(f"| {size:,} | {rate(sum(r['attacker_flagged'] for r in mine), n)} | "
                     f"{rate(sum(r['benign_flagged'] for r in mine), n)} |")
    return lines + [""]


def tables(result: dict) -> str:
    lines = [f"Last written by `python benchmarks/detection.py` on {result.get('machine', 'an unrecorded machine')} "
             f"(parts kept from earlier runs were measured where those ran). SAME's tables and the sybil table are one "
             f"run each (seed 0).", ""]
    for key in ("same", "same_code", *sorted(k for k in result if k.startswith(("same_code_mae_", "same_code_without_"))
                                              and not k.endswith(("_settings", "_seconds")))):
        lines += same_table(result, key)
    lines += population_table(result.get("population", [])) + sizes_table(result.get("prada_sizes", []))
    rows = result.get("sybil", [])
    if rows:
        lines += ["Attacker accounts flagged (benign accounts flagged), distributed JBDA, 1,500 queries:", "",
                  "| accounts | queries/account | per-account PRADA | PRADA pooled per cohort | account linking "
                  "| any |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            def cell(k, r=r):
                return f"{r[k + '_attacker']}/{r['attacker_accounts']} ({r[k + '_benign']}/{r['benign_accounts']})"

            lines.append(f"| {r['accounts']} | {r['queries_per_account']} | {cell('prada')} | {cell('cohort_prada')} | "
                         f"{cell('link')} | {cell('any')} |")
    return "\n".join(lines)


def main() -> None:
    ap = OneLineParser(prog="python benchmarks/detection.py", description=description(__doc__))
    ap.add_argument("--budgets", nargs="+", type=count, default=[1000, 4000])
    ap.add_argument("--accounts", nargs="+", type=count, default=[1, 10, 50, 100])
    ap.add_argument("--cohort", type=count, default=25, help="attacker accounts per sign-up cohort")
    ap.add_argument("--parts", nargs="+", default=["same", "sybil", "population", "prada_sizes"],
                    choices=["same", "sybil", "population", "prada_sizes"])
    ap.add_argument("--seeds", nargs="+", type=nonnegative, default=[0, 1, 2],
                    help="population and prada_sizes: the seeds")
    ap.add_argument("--variant", default="default", choices=["default", "same_code"],
                    help="same_code: part 1 in the SAME authors' code's reference mode, into the 'same_code' entry "
                         "(with --mae other than cpu: 'same_code_mae_<size>')")
    ap.add_argument("--mae", default="cpu", choices=list(MAE_SIZES), help="same_code's MAE size and schedule")
    ap.add_argument("--without", nargs="+", default=[], choices=WITHOUT,
                    help="with --variant same_code: turn these choices of the code off (into 'same_code_without_...')")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "detection.json"))
    args = ap.parse_args()
    if args.without and args.variant != "same_code":
        ap.error("--without turns off choices of the SAME authors' code; expected it with --variant same_code")
    if args.mae != "cpu" and (args.variant != "same_code" or args.without):
        ap.error(f"--mae {args.mae} sizes the reference mode's MAE; expected it with --variant same_code and "
                 f"without --without (the ablation runs at the CPU size)")
    if args.variant != "default" and "same" not in args.parts:
        ap.error(f"--variant {args.variant} is part same's reference mode; expected --parts same with it, got "
                 f"--parts {' '.join(args.parts)}")
    without = tuple(sorted(args.without))
    if "same" in args.parts:  # a budget JBDA's seeds would spend alone fails its cell: refused before any work
        for aid, a in config.load("same_detection", same_overrides(args.variant, args.mae, without)).attackers.items():
            p = a.params()
            low = [b for b in args.budgets if "jacobian.seed_size" in p and seeds_spend_all(p, b) is not None]
            if low:
                ap.error(f"--budgets {' '.join(map(str, low))}: attacker {aid} would spend it all on its "
                         f"{p['jacobian.seed_size']} seeds (jacobian.seed_size); expected budgets above that")
    torch.set_num_threads(args.threads)
    args.out = output_file(args.out)
    result = read_results(args.out, ("machine",), "benchmarks/detection.py") if os.path.exists(args.out) else {}
    result["machine"] = machine()
    for part in args.parts:
        print(f"part {part}", flush=True)
        t0 = time.perf_counter()
        if part == "same" and args.variant == "same_code":
            part = same_entry("same_code", without, args.mae)
            result[part], info = part_same(args.budgets, variant="same_code", mae=args.mae, without=without)
            overrides, before = same_overrides("same_code", args.mae, without), result.get(f"{part}_settings", {})
            if "mae_loss" not in info and before.get("overrides") == overrides and "mae_loss" in before:
                info["mae_loss"] = before["mae_loss"]  # the cached MAE's, recorded when the same settings trained it
            result[f"{part}_settings"] = {"mae": args.mae, "overrides": overrides, **info,
                                          **({"without": list(without)} if without else {}),
                                          "measured": time.strftime("%Y-%m-%d"),
                                          "device": "cuda" if torch.cuda.is_available() else "cpu"}
        elif part == "population":
            result[part] = part_population(args.seeds, args.cohort)
        elif part == "prada_sizes":
            result[part] = part_prada_sizes(args.seeds)
        else:
            result[part] = part_same(args.budgets)[0] if part == "same" else part_sybil(args.accounts, args.cohort)
        result[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
            fh.write(tables(result))
    print(tables(result))


if __name__ == "__main__":
    script(main)

"""A run's numbers, from what its parts left behind: the Ray-free half of the run core.

The engine hands over plain results (the plan with each client's report, each replica's scores, the query
log, the detectors' settings, what the defense does to the test set) and :func:`summarize` turns them into the
typed :class:`sim.summary.Summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import defenses, querylog
from . import summary as S
from .adversarial import robust_accuracy_on
from .config import ScenarioConfig
from .plan import Plan, derive_seed
from .training import accuracy


@dataclass
class DetectorInfo:
    """What the summary records of a deployed detector, beyond its scenario settings."""

    kind: str
    stateful: bool
    group: str
    params: dict  # its one-line description (Component.describe)
    threshold: float | None = None
    calibration: dict | None = None


@dataclass
class Outcome:
    """Everything a run produced that goes into its summary."""

    run_id: str
    victim: object  # sim.zoo.Victim
    plan: Plan  # with every client's result
    replicas: dict[str, S.Replica]  # attacker id (and "ID:undefended") -> scores
    log: pa.Table  # the query log (the columns of :data:`LOG_COLUMNS` and each detector's)
    logged: int
    defended: dict  # evaluate_defense() on the test set
    victim_measures: dict = field(default_factory=dict)  # measure_victim()
    detectors: dict[str, DetectorInfo] = field(default_factory=dict)
    nodes: int | None = None
    serve: S.Serve | None = None
    timings: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0


LOG_COLUMNS = ["account_id", "role", "attack", "action", "refusal_reason", "input_sha1", "resubmission", "defense_l1",
               "top1_changed", "writer"]


def robustness_settings(cfg) -> dict | None:
    """PGD settings and sample size of the robust accuracy every model is scored with, or None (switched off)."""
    if not cfg.robustness.enabled:
        return None
    return {**cfg.victim.adversarial.model_dump(), "samples": cfg.robustness.samples,
            "seed": derive_seed(cfg.seed, "robustness")}


def measure_victim(cfg, victim, eval_x: np.ndarray, eval_y: np.ndarray) -> dict:
    """The victim's robust accuracy on the first of the replicas' evaluation images (for a quantized victim: the int8
    model on PGD examples crafted through its fake-quantized twin), its size and latency
    (:meth:`sim.zoo.Victim.footprint`)."""
    out = victim.footprint()
    settings = robustness_settings(cfg)
    if settings is not None:
        out["robustness"] = dict(settings)
        out["robust_accuracy"] = round(robust_accuracy_on(victim.differentiable, eval_x, eval_y, settings,
                                                          scored=victim.model), 4)
    return out


def log_columns(detectors) -> list[str]:
    """The log columns :func:`summarize` reads, for a run with these detector names."""
    return [*LOG_COLUMNS, *[f"{d}_{c}" for d in detectors for c in ("score", "flagged")]]


def evaluate_defense(defense, clean: np.ndarray, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
    """What honest users get: ``defense`` applied to the victim's clean answers ``clean`` on test images ``x``
    (labels ``y``): defended accuracy, mean L1 distortion, share of top-1 labels kept."""
    returned = np.concatenate([defense(clean[i:i + batch_size], x[i:i + batch_size])
                               for i in range(0, len(clean), batch_size)])
    return {
        "defended_test_accuracy": round(accuracy(returned.argmax(1), y), 4),
        "test_l1_mean": round(float(np.abs(returned - clean).sum(1).mean()), 4),
        "test_top1_preserved_rate": round(float(np.mean(returned.argmax(1) == clean.argmax(1))), 4),
    }


def distortion(table: pa.Table) -> S.Distortion:
    """Mean L1 distortion and top-1-preserved rate over the answered rows of a log table."""
    answered = table.filter(pc.is_in(table.column("action"), pa.array(querylog.ANSWERED)))
    if answered.num_rows == 0 or answered.column("defense_l1").null_count == answered.num_rows:
        return S.Distortion(answered=answered.num_rows)  # none, or no clean answers to compare with (remote victim)
    l1 = answered.column("defense_l1").to_numpy(zero_copy_only=False)
    changed = answered.column("top1_changed").to_numpy(zero_copy_only=False)
    return S.Distortion(answered=answered.num_rows, l1_mean=round(float(np.nanmean(l1)), 4),
                        top1_preserved_rate=round(1 - float(np.mean(changed.astype(bool))), 4))


def pow_paid(results: list[dict]) -> S.ProofOfWork:
    """Proof of work the clients of ``results`` did: puzzles, queries covered, hashes, seconds, hardest."""
    out = {"puzzles": 0, "queries": 0, "hashes": 0, "seconds": 0.0, "max_bits": 0}
    for r in results:
        for k, v in r.get("pow", {}).items():
            out[k] = max(out[k], v) if k == "max_bits" else out[k] + v
    out["seconds"] = round(out["seconds"], 3)
    return S.ProofOfWork(**out)


def limited(results: list[dict]) -> S.Limited:
    """What the victim's limits cost the clients of ``results``."""
    parts = [r.get("limited", {}) for r in results]
    return S.Limited(waits=sum(p.get("waits", 0) for p in parts),
                     seconds=round(sum(p.get("seconds", 0.0) for p in parts), 3),
                     quota_spent=sum(p.get("quota_spent", 0) for p in parts))


def summarize(cfg: ScenarioConfig, out: Outcome) -> S.Summary:
    from analysis.detection import detection_report

    from . import zoo

    table, plan, victim = out.log, out.plan, out.victim
    actions = {a: int(pc.sum(pc.equal(table.column("action"), a)).as_py() or 0)
               for a in ("answered", "perturbed", "challenged", "refused")}
    rate_limited = int(querylog.refused_for(table, [querylog.RATE]).sum())  # attempts the clients sent again
    report = detection_report(table, list(out.detectors)) if table.num_rows else {}
    flagged_by: dict[str, set] = {}
    for name in out.detectors:
        mask = pc.fill_null(table.column(f"{name}_flagged"), False)
        flagged_by[name] = set(pc.unique(table.filter(mask).column("account_id")).to_pylist()) - {None}
    # an account is flagged for good by a stateful detector; a stateless one flags single queries
    flagged_any = set().union(*(f for name, f in flagged_by.items() if out.detectors[name].stateful))
    role_of = {a.account_id: a.role for a in plan.accounts.values()}

    attackers = []
    for aid, att in cfg.attackers.items():
        mine = [c.result for c in plan.of(attacker=aid)]
        accts = {a for c in plan.of(attacker=aid) for a in c.accounts}
        attackers.append(S.Attacker(
            id=aid, attack=att.attack, params=att.params(), accounts=att.accounts, actors=att.actors, split=att.split,
            account_cap=att.account_cap, max_rate=att.max_rate, churn=att.churn,
            queries=sum(r["sent"] for r in mine), refused=sum(r["refused"] for r in mine),
            unspent=sum(r["unspent"] for r in mine), actors_failed=sum(bool(r.get("failed")) for r in mine),
            accounts_used=len({a for r in mine for a, n in r["per_account"].items() if n}),
            accounts_flagged=len(flagged_any & accts),
            accounts_flagged_by={name: len(f & accts) for name, f in flagged_by.items()},
            pow=pow_paid(mine), limited=limited(mine), accounts_burned=sum(len(r["burned"]) for r in mine),
            labels=att.replica.labels,
            replica=out.replicas.get(aid), undefended=out.replicas.get(f"{aid}:undefended"),
            stats=[r["stats"] for r in mine]))

    benign = [c.result for c in plan.of(role="benign")]
    benign_accounts = {a for c in plan.of(role="benign") for a in c.accounts}
    v, ds = victim, victim.dataset
    defended = dict(out.defended)
    return S.Summary(
        run_id=out.run_id, scenario=cfg.name, run_dir=cfg.run_dir, seed=cfg.seed,
        victim=S.Victim(name=cfg.victim.name, dataset=v.dataset.name, arch=v.arch or f"({v.source} model)",
                        source=v.source,
                        test_accuracy=round(v.test_accuracy, 4), trained_now=v.trained_now,
                        train_seconds=round(v.train_seconds, 1), training=v.training, dp_epsilon=v.dp_epsilon,
                        train_threads=zoo.threads_spec(cfg.victim).get("threads") if v.source == "zoo" else None,
                        dp=cfg.victim.dp.model_dump() if v.training == "dp_sgd" else None, checkpoint=str(v.path),
                        defended_test_accuracy=defended.pop("defended_test_accuracy"),
                        adversarial=cfg.victim.adversarial.model_dump() if v.training == "adversarial" else None,
                        quantization=cfg.victim.quantization, quant=_quant_settings(cfg.victim),
                        float_test_accuracy=v.float_test_accuracy and round(v.float_test_accuracy, 4),
                        **out.victim_measures),
        defense=S.Defense(name=cfg.defense.name, params=defenses.resolved(cfg.defense.spec()),
                          **distortion(table).model_dump(exclude={"answered"}), **defended,
                          by_role={role: distortion(table.filter(pc.equal(table.column("role"), role)))
                                   for role in ("attacker", "benign")}),
        evaluation=S.Evaluation(replica_test_images=len(plan.eval_indices(len(ds.x_test))),
                                held_out_attack_seeds=len(plan.held_out)),
        queries=S.Queries(total=sum(c.result["sent"] for c in plan.clients),
                          answered=actions["answered"] + actions["perturbed"], perturbed=actions["perturbed"],
                          challenged=actions["challenged"], refused=actions["refused"] - rate_limited,
                          rate_limited=rate_limited, logged=out.logged),
        attackers=attackers,
        benign=S.Benign(users=cfg.benign.users, accounts=len(benign_accounts), queries=sum(r["sent"] for r in benign),
                        refused=sum(r["refused"] for r in benign), accounts_flagged=len(flagged_any & benign_accounts),
                        pow=pow_paid(benign), limited=limited(benign)),
        clients=[S.Client(actor_id=c.actor_id, role=c.role, attacker=c.attacker, queries=c.result["sent"],
                          refused=c.result["refused"], seconds=round(c.result["seconds"], 2),
                          per_account=c.result["per_account"], failed=c.result.get("failed")) for c in plan.clients],
        ray=S.Ray(nodes=out.nodes, client_nodes=len({c.result["node_id"] for c in plan.clients} - {None})),
        detection={name: _detector(info, cfg.detectors[name], flagged_by[name], role_of, report.get(name, {}))
                   for name, info in out.detectors.items()},
        serve=out.serve and out.serve.model_copy(update={"writers": len(pc.unique(table.column("writer")))}
                                                 if "writer" in table.column_names else {}),
        timings=out.timings, wall_seconds=out.wall_seconds,
    )


def _quant_settings(victim_cfg) -> dict | None:
    if victim_cfg.quantization == "none":
        return None
    out = {"mode": victim_cfg.quantization, **victim_cfg.quant.model_dump()}
    if victim_cfg.quantization == "divqat":
        out["divqat"] = victim_cfg.divqat.model_dump()
    return out


def _response(dcfg) -> dict | None:
    """The settings of what a detector's flag does: the perturbing defense (its defaults filled in), the puzzle."""
    if dcfg.action == "perturb":
        return {"name": dcfg.perturb.name, **defenses.resolved(dcfg.perturb.spec())}
    if dcfg.action == "proof_of_work":
        return dcfg.pow.model_dump()
    return None


def _detector(info: DetectorInfo, dcfg, flagged: set, role_of: dict, report: dict) -> S.Detector:
    """One detector's part of the summary: its settings, the accounts it flagged, AUROC/AUPR/FPR95/FPR90 at query and
    account level over all attacks (per attack: ``python -m analysis RUN_DIR``)."""
    def quality(m: dict) -> S.Quality:
        if "auroc" in m:
            return S.Quality(**{k: round(m[k], 4) for k in ("auroc", "aupr", "fpr95", "fpr90")})
        return S.Quality(error=m.get("error"))

    return S.Detector(
        kind=info.kind, stateful=info.stateful, action=dcfg.action, response=_response(dcfg), group=info.group,
        params=info.params,
        threshold=info.threshold, calibration=info.calibration, flagged_accounts=len(flagged),
        flagged_attacker_accounts=sum(role_of.get(a) == "attacker" for a in flagged),
        flagged_benign_accounts=sum(role_of.get(a) == "benign" for a in flagged),
        attacker_accounts=sum(r == "attacker" for r in role_of.values()),
        benign_accounts=sum(r == "benign" for r in role_of.values()),
        flagged_queries={k: val for k, val in report.get("flagged", {}).items() if "queries" in k},
        query_level=quality(report.get("query", {}).get("all", {})),
        account_level=quality(report.get("account", {}).get("all", {})),
    )

"""The run summary: the project's second data contract (the query log's schema is the first).

:class:`Summary` is written by the run core (:mod:`sim.summarize`) as ``RUN/summary.json`` and read back through
the same definition by the offline analysis, the sweeps and the benchmarks (:func:`read`). It carries its
``version``; a version-1 summary (written before the version field existed) is upgraded on reading.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from . import storage
from .errors import ConfigError

SUMMARY_VERSION = 2
SERVED = "served.json"  # a serve-mode run's record (it writes no summary.json: nothing of its clients is known)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Victim(_Part):
    name: str
    dataset: str
    arch: str
    test_accuracy: float
    trained_now: bool
    train_seconds: float
    training: str
    train_threads: int | None = None  # torch threads it trained on, where not the default one (victim.train_threads)
    dp_epsilon: float | None = None  # DP-SGD victims: epsilon spent at dp.delta
    dp: dict[str, Any] | None = None
    checkpoint: str
    source: str = "zoo"  # zoo (trained here, cached), checkpoint (victim.checkpoint), python (sim.run(victim=…))
    defended_test_accuracy: float  # what honest users get on the test set, through the defense
    adversarial: dict[str, Any] | None = None  # adversarially trained victims: the PGD settings
    robust_accuracy: float | None = None  # accuracy under PGD (robustness section), on its first `samples` images
    robustness: dict[str, Any] | None = None  # the PGD settings and sample size of every robust accuracy
    quantization: str = "none"
    quant: dict[str, Any] | None = None  # quantized victims: calibration and fine-tuning (and DivQAT's) settings
    float_test_accuracy: float | None = None  # quantized victims: the float model they were made from
    size_bytes: int | None = None  # serialised weights
    float_size_bytes: int | None = None
    latency_ms: float | None = None  # one forward pass over latency_batch test images, one thread
    float_latency_ms: float | None = None
    latency_batch: int | None = None


class GradientAngle(_Part):
    """Angle (degrees) between the replica's loss gradients under the returned and the clean answers, averaged over
    a fixed sample of its queries after each epoch (MAD's angular deviation), and on the replica as built, before
    any training (``at_start``; None in summaries written before it was measured)."""

    mean: float
    by_epoch: list[float]
    queries: int
    at_start: float | None = None


class Distortion(_Part):
    """What the defense did to answered queries: mean L1 between clean and returned vectors, top-1 kept."""

    answered: int | None = None
    l1_mean: float | None = None
    top1_preserved_rate: float | None = None


class Defense(_Part):
    name: str
    params: dict[str, Any]
    l1_mean: float | None = None  # over the answered queries of the run
    top1_preserved_rate: float | None = None
    test_l1_mean: float | None  # over the victim's test set (None: a remote victim, whose clean answers are unknown)
    test_top1_preserved_rate: float | None
    by_role: dict[str, Distortion] = {}


class Evaluation(_Part):
    replica_test_images: int  # test images replicas are evaluated on (all but attack seeds)
    held_out_attack_seeds: int


class Queries(_Part):
    total: int  # what the clients say they sent
    answered: int  # including perturbed ones and those answered after a proof of work
    perturbed: int
    challenged: int
    refused: int  # for good (a detector's policy, a spent quota): not answered
    logged: int  # rows in the query log
    rate_limited: int = 0  # attempts refused over serve.rate, which the clients sent again after the wait


class ProofOfWork(_Part):
    """Proof of work the clients did: puzzles solved, queries they covered, hashes, seconds, hardest puzzle."""

    puzzles: int = 0
    queries: int = 0
    hashes: int = 0
    seconds: float = 0.0
    max_bits: int = 0


class Limited(_Part):
    """What the victim's per-key limits (serve.quota, serve.rate) cost the clients: requests that waited out a 429
    and the seconds waited, accounts whose quota ran out."""

    waits: int = 0
    seconds: float = 0.0
    quota_spent: int = 0


class BestEpoch(_Part):
    """The epoch of best test accuracy (replica.variant=mad_code: the checkpoint the MAD code keeps)."""

    epoch: int
    test_accuracy: float
    fidelity: float


class Replica(_Part):
    test_accuracy: float  # after the last epoch
    fidelity: float  # top-1 agreement with the victim on its test set
    robust_accuracy: float | None = None  # under PGD with the victim's adversarial settings
    gradient_angle: GradientAngle | None = None  # a defense was on: how far its answers turned the gradient
    best: BestEpoch | None = None  # replica.variant=mad_code: its best epoch on the test set


class Attacker(_Part):
    id: str
    attack: str
    params: dict[str, Any] = {}  # the attack's own parameters
    accounts: int
    actors: int
    split: str
    account_cap: int | None = None
    max_rate: float | None = None
    churn: bool = False
    queries: int
    refused: int
    unspent: int  # budget left when every account had retired, or when an actor died
    actors_failed: int = 0  # actors that died mid-run (killed, out of memory, node lost); the run went on
    accounts_used: int
    accounts_flagged: int  # flagged for good by any stateful detector
    accounts_flagged_by: dict[str, int] = {}  # per detector (a stateless one: accounts with a flagged query)
    pow: ProofOfWork = ProofOfWork()
    limited: Limited = Limited()
    accounts_burned: int = 0
    labels: str  # what the replica trained on: soft (the returned vectors) or hard (top-1 labels)
    replica: Replica | None = None  # None when every query was refused
    undefended: Replica | None = None  # the same queries and training on the clean answers (a defense was on)
    stats: list[dict[str, Any]] = []  # per actor: what the method did


class Benign(_Part):
    users: int
    accounts: int | None = None  # (None in summaries written before benign.accounts existed: one per user)
    queries: int
    refused: int
    accounts_flagged: int | None = None  # by any stateful detector (unknown in version-1 summaries)
    pow: ProofOfWork = ProofOfWork()
    limited: Limited = Limited()


class Client(_Part):
    actor_id: str
    role: str
    attacker: str | None = None
    queries: int
    refused: int
    seconds: float
    per_account: dict[str, int]
    failed: str | None = None  # why its actor died mid-run (its report then comes from the log)


class Quality(_Part):
    """Detection quality over all attacks: AUROC, AUPR, FPR95, FPR90 in [0, 1], or why there is none."""

    auroc: float | None = None
    aupr: float | None = None
    fpr95: float | None = None
    fpr90: float | None = None
    error: str | None = None


class Detector(_Part):
    kind: str
    stateful: bool  # flags keys for good (else single queries)
    action: str
    response: dict[str, Any] | None = None  # the action's settings: perturb's defense spec, proof of work's bits
    group: str
    params: dict[str, Any]  # the parameters of its one-line description
    threshold: float | None = None  # the score at which it flags
    calibration: dict[str, Any] | None = None  # a threshold calibrated for a benign false-positive rate
    flagged_accounts: int
    flagged_attacker_accounts: int
    flagged_benign_accounts: int
    attacker_accounts: int
    benign_accounts: int
    flagged_queries: dict[str, int] = {}
    query_level: Quality = Quality()
    account_level: Quality = Quality()


class Ray(_Part):
    nodes: int | None = None
    client_nodes: int


class Serve(_Part):
    app: str
    port: int | None = None
    url: str | None = None
    tier: dict | None = None  # the detection tier: shards, and per shard its requests, queries, keys, memory
    replicas: int | None = None  # serve.replicas (None: autoscaling)
    writers: int | None = None  # Serve replica processes that wrote the log: more than replicas when one was replaced


class Summary(_Part):
    version: int = SUMMARY_VERSION
    run_id: str
    scenario: str
    run_dir: str
    seed: int
    victim: Victim
    defense: Defense
    evaluation: Evaluation
    queries: Queries
    attackers: list[Attacker]
    benign: Benign
    clients: list[Client]
    ray: Ray
    detection: dict[str, Detector]
    serve: Serve | None = None
    timings: dict[str, float] = {}
    wall_seconds: float = 0.0

    def attacker(self, aid: str) -> Attacker:
        found = next((a for a in self.attackers if a.id == aid), None)
        if found is None:
            raise ConfigError(f"attacker {aid!r} is not in run {self.run_id}; expected one of: "
                              f"{', '.join(a.id for a in self.attackers) or 'none (the run had no attackers)'}")
        return found

    def write(self, run_dir: str) -> None:
        storage.write_text(storage.join(run_dir, "summary.json"), self.model_dump_json(indent=2))


class Stopped(_Part):
    """``summary.json`` of a run stopped before its results, by Ctrl-C or by a fault: where it stopped (the phase),
    the rows its log kept, and for a fault why (``error``)."""

    version: int = SUMMARY_VERSION
    interrupted: str
    run_id: str
    scenario: str
    run_dir: str
    logged: int
    error: str | None = None


def write_interrupted(run_dir: str, run_id: str, scenario: str, phase: str, logged: int,
                      error: str | None = None) -> None:
    """Write a :class:`Stopped` run's ``summary.json`` (no results; :func:`read` gives None for it, so a report is
    built from the log alone)."""
    stopped_run = Stopped(interrupted=phase, run_id=run_id, scenario=scenario, run_dir=run_dir, logged=logged,
                          error=error)
    storage.write_text(storage.join(run_dir, "summary.json"), stopped_run.model_dump_json(indent=2, exclude_none=True))


def stopped(run_dir: str) -> Stopped | None:
    """The :class:`Stopped` marker of a run stopped before its results, or None (a finished run, no summary, or one
    that cannot be read)."""
    try:
        return Stopped.model_validate_json(storage.read_text(storage.join(run_dir, "summary.json")))
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


class SummaryError(ValueError):
    """A file that is not a run summary this version can read."""


def parse(data: dict) -> Summary:
    """A summary from its JSON mapping, upgraded from version 1 if need be."""
    if not isinstance(data, dict):
        raise SummaryError(f"a run summary is a JSON object, got {type(data).__name__}")
    if "interrupted" in data:
        why = f" ({data['error']})" if data.get("error") else ""
        raise SummaryError(f"run {data.get('run_id')} was interrupted during {data['interrupted']}{why}: it has no "
                           f"results")  # a Stopped marker (read loosely: its message is all that is wanted here)
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise SummaryError(f"summary version {version!r} is not an integer")
    if version > SUMMARY_VERSION:
        raise SummaryError(f"summary version {version} is newer than this mlsim reads ({SUMMARY_VERSION})")
    if version == 1:
        data = _upgrade_v1(data)
    try:
        return Summary.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SummaryError(f"not a run summary: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def load(run_dir: str) -> Summary:
    """The finished run's ``summary.json`` (``sim.read_summary``); a :class:`ConfigError` saying why when there is
    none to read (no such file, an interrupted or failed run's marker, not a run summary)."""
    path = storage.join(run_dir, "summary.json")
    if not storage.exists(path):
        raise ConfigError(f"run_dir={run_dir!r} has no summary.json; expected the directory of a finished run")
    try:
        return parse(json.loads(storage.read_text(path)))
    except ValueError as exc:  # a SummaryError too
        raise ConfigError(f"{path}: {exc}; expected the summary of a finished run") from None


def read(run_dir: str) -> Summary | None:
    """The run's ``summary.json``, or None when it is missing or is not a run summary (a crashed run: a report
    is then built from the log alone); :func:`load` says why."""
    try:
        return load(run_dir)
    except ConfigError:
        return None


def _upgrade_v1(old: dict) -> dict:
    """Version 1 had each replica's numbers as flat keys (``replica_test_accuracy``, ``…_undefended``), the
    Knockoff pool as a key of every attacker, and no flag threshold or statefulness per detector."""
    from . import registry

    data = {**old, "version": SUMMARY_VERSION}
    attackers = []
    for a in old.get("attackers", []):
        a = dict(a)
        for name, suffix in (("replica", ""), ("undefended", "_undefended")):
            acc, fid = a.pop(f"replica_test_accuracy{suffix}", None), a.pop(f"replica_fidelity{suffix}", None)
            a[name] = {"test_accuracy": acc, "fidelity": fid} if acc is not None else None
        pool = a.pop("pool", None)  # every attacker had one; only the attacks that declare it used it
        declares = a.get("attack") in registry.names("attack") and "pool" in registry.get("attack", a["attack"]).params
        a["params"] = {"pool": pool} if declares and pool else {}
        attackers.append(a)
    data["attackers"] = attackers
    data["detection"] = {name: {**d, **_v1_detector(d)} for name, d in old.get("detection", {}).items()}
    return data


def _v1_detector(d: dict) -> dict:
    """What version 1 did not record of a detector, asked of its kind's declaration: whether it is stateful, and
    the score at which it flagged (calibrated, given, or the kind's own for its parameters)."""
    from . import detectors, registry

    if d.get("kind") not in registry.names("detector"):
        return {"stateful": True}
    kind = detectors.get(d["kind"])
    threshold = (d.get("calibration") or {}).get("threshold", (d.get("params") or {}).get("threshold"))
    if threshold is None and kind.stateful:
        try:
            threshold = kind(**{k: v for k, v in (d.get("params") or {}).items() if k in kind.params}).threshold()
        except (ValueError, TypeError):
            threshold = None
    return {"stateful": kind.stateful, "threshold": threshold}


def tier_line(tier: dict) -> str:
    """One line on the detection tier: its shards, how the keys spread over them, and linking's delay."""
    shards = tier["per_shard"]
    names = sorted({n for sh in shards for n in sh.get("keys", {})})
    spread = ", ".join(f"{n} " + "/".join(str(sh.get("keys", {}).get(n, 0)) for sh in shards) for n in names)
    line = f"detection tier: {tier['shards']} shard{'s' if tier['shards'] > 1 else ''}"
    line += f"; keys per shard: {spread}" if spread else ""
    rounds: dict[str, int] = {}
    for sh in shards:
        for name, n in sh.get("link_rounds", {}).items():
            rounds[name] = max(rounds.get(name, 0), n)
    line += "".join(f"; {name} re-clustered {n} time{'' if n == 1 else 's'}" for name, n in rounds.items())
    lags = [lag for sh in shards for lag in sh.get("link_lags", [])]
    if lags:
        line += (f"; linking's flags reached the shards {sum(lags) / len(lags):.0f} queries (max {max(lags)}) "
                 f"after the data they judge")
    for i, sh in enumerate(shards):  # a shard that died was restarted by Ray from its snapshot and journal
        if restarted(sh):
            back = sh["restored"]
            line += (f"; shard {i} was restarted and restored its state ("
                     f"{'a snapshot and ' if back.get('snapshot') else ''}{back.get('changes', 0)} journaled changes)")
    return line


def restarted(shard: dict) -> bool:
    """Whether a shard's statistics come from a restart that restored its state."""
    back = shard.get("restored") or {}
    return bool(back.get("snapshot") or back.get("changes"))


def params_text(params: dict[str, Any]) -> str:
    """``k=v, …`` of a component's parameters; a chain's members as ``member: k=v, …; member: …``."""
    if params and all(isinstance(v, dict) for v in params.values()):
        return "; ".join(f"{member}: {params_text(p)}" if p else member for member, p in params.items())
    return ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}" for k, val in params.items()
                     if val is not None)


def action_text(det: "Detector") -> str:
    """What a detector's flag does, with the settings of its response."""
    r = det.response or {}
    if det.action == "perturb" and r:
        params = params_text({k: v for k, v in r.items() if k != "name"})
        return f"perturb through {r.get('name')}{f' ({params})' if params else ''}"
    if det.action == "proof_of_work" and r:
        return f"proof_of_work of {r.get('bits_min')} to {r.get('bits_max')} bits"
    return det.action


GROUP_TEXT = {"cohort": "a whole cohort (a sign-up batch)", "actor": "every account of a client actor",
              "all": "all traffic"}


def format_summary(s: Summary) -> str:
    """The summary as a small text table for the terminal."""
    w = max([14, *(len(a.id) + 2 for a in s.attackers)])  # the attacker column
    aw = max([10, *(len(a.attack) + 2 for a in s.attackers)])  # the attack column (a plug-in's name may be long)
    v, q, d = s.victim, s.queries, s.defense
    params = params_text(d.params)
    dp = f", DP-SGD epsilon {v.dp_epsilon:.2f}" if v.dp_epsilon is not None else ""
    if v.quantization != "none":
        dp += f", int8 {v.quantization}: float model {v.float_test_accuracy:.4f}"
    if v.train_threads is not None:
        dp += f", {v.train_threads} torch threads"
    lines = [
        f"run {s.run_id}  ->  {s.run_dir}",
        f"victim {v.arch} on {v.dataset} ({f'{v.training} training' if v.source == 'zoo' else 'trained elsewhere'}"
        f"{dp}): test accuracy {v.test_accuracy:.4f}"
        f"{' (trained now)' if v.trained_now else ' (cached)' if v.source == 'zoo' else f' (given: {v.checkpoint})'}"
        if v.source != "remote" else
        f"victim at {v.checkpoint} (remote): test accuracy {v.test_accuracy:.4f} on {v.dataset}'s test split, "
        f"through its API",
        f"defense {d.name}{f' ({params})' if params else ''}: defended test accuracy "
        f"{v.defended_test_accuracy:.4f}, test L1 {d.test_l1_mean:.3f}, top-1 kept {d.test_top1_preserved_rate:.3f}"
        if d.test_l1_mean is not None else
        "defense: the remote victim's own, unknown here: its answers are what the table measures (no clean answers, "
        "so no distortion and no undefended baseline)",
        f"queries: {q.total} sent, {q.answered} answered ({q.perturbed} perturbed on a detector's flag), "
        f"{q.challenged} challenged with proof of work, {q.refused} refused"
        f"{f' (and {q.rate_limited} attempts over the rate limit, sent again)' if q.rate_limited else ''}, "
        f"{q.logged} log rows",
        "",
        f"{'attacker':<{w}}{'attack':<{aw}}{'accounts':>9}{'actors':>7}{'queries':>9}{'refused':>8}"
        f"{'flagged':>8}{'replica acc':>12}{'fidelity':>9}{'undefended acc':>15}",
    ]

    def num(value):
        return "-" if value is None else f"{value:.4f}"

    for a in s.attackers:
        replica, undefended = a.replica, a.undefended
        accounts = a.accounts if a.accounts_used >= a.accounts else f"{a.accounts_used}/{a.accounts}"  # some never sent
        lines.append(f"{a.id:<{w}}{a.attack:<{aw}}{accounts:>9}{a.actors:>7}{a.queries:>9}{a.refused:>8}"
                     f"{a.accounts_flagged:>8}{num(replica and replica.test_accuracy):>12}"
                     f"{num(replica and replica.fidelity):>9}{num(undefended and undefended.test_accuracy):>15}")
    b = s.benign
    flagged = "-" if b.accounts_flagged is None else b.accounts_flagged
    lines += [f"{'benign':<{w}}{'-':<{aw}}{b.accounts or b.users:>9}{b.users:>7}{b.queries:>9}{b.refused:>8}"
              f"{flagged:>8}{'-':>12}{'-':>9}{'-':>15}", ""]
    if any(a.accounts_used < a.accounts for a in s.attackers):
        lines += ["accounts u/n: u of the attacker's n accounts sent queries (the budget or the live accounts ran "
                  "out first)", ""]
    best = []
    for a in s.attackers:  # replica.variant=mad_code: the checkpoint the MAD code would keep, beside the last epoch
        for label, r in (("replica", a.replica), ("undefended replica", a.undefended)):
            if r is not None and r.best is not None:
                best.append(f"{a.id} {label}: best test accuracy {r.best.test_accuracy:.4f} at epoch {r.best.epoch} "
                             f"(fidelity {r.best.fidelity:.4f}); the table shows the last epoch")
    lines += [*best, ""] if best else []
    own = [f"{a.id} (actor {i}): the model {a.attack} trained itself while it queried: test accuracy "
           f"{st['extracted']['test_accuracy']:.4f}, fidelity {st['extracted']['fidelity']:.4f}; the table's replica "
           f"is trained afresh on its queries"
           for a in s.attackers for i, st in enumerate(a.stats) if "extracted" in st]
    lines += [*own, ""] if own else []
    if len(s.detection) > 1:  # who flagged what
        names, head = list(s.detection), "accounts flagged by"
        fw = max(w, len(head) + 2)
        lines.append(f"{head:<{fw}}" + "".join(f"{n:>{max(len(n) + 2, 8)}}" for n in names))
        for a in s.attackers:
            lines.append(f"{a.id:<{fw}}" + "".join(f"{a.accounts_flagged_by.get(n, 0):>{max(len(n) + 2, 8)}}"
                                                   for n in names) + f"  of {a.accounts}")
        for n, det in s.detection.items():  # a flag on a group: its accounts count as they query after it
            if det.stateful and det.group != "account":
                lines.append(f"({n} flags {GROUP_TEXT.get(det.group, det.group)} at once: an account counts once "
                             f"it sends a query after that flag)")
        lines.append("")
    for name, det in s.detection.items():
        shown = {**det.params, **({"threshold": det.calibration["threshold"]} if det.calibration else {})}
        params = params_text(shown)
        ql, fq = det.query_level, det.flagged_queries
        quality = f"; query AUROC {ql.auroc:.3f}, FPR95 {ql.fpr95:.3f}" if ql.auroc is not None else ""
        if det.stateful:  # an account is flagged for good
            flagged = (f"flagged {det.flagged_attacker_accounts}/{det.attacker_accounts} attacker accounts, "
                       f"{det.flagged_benign_accounts}/{det.benign_accounts} benign")
        else:  # queries are flagged one by one
            def rate(k):
                return fq[f"{k}_queries"] / max(fq[f"{k}_queries_total"], 1)

            flagged = (f"flagged {rate('attacker'):.1%} of attacker queries, {rate('benign'):.1%} of benign"
                       if fq else "flagged nothing")
        group = f", group={det.group}" if det.stateful else ""  # a stateless detector keeps no history per key
        lines.append(f"{name} ({params}; action={action_text(det)}{group}): {flagged}{quality}")
    if not s.detection:
        lines.append("no detectors")
    sv = s.serve
    if sv and sv.replicas and sv.writers and sv.writers > sv.replicas:  # a replica died and Serve started another
        lines.append(f"serve: {sv.writers} replica processes wrote the log for serve.replicas={sv.replicas}: "
                     f"{sv.writers - sv.replicas} replaced after a crash (each one's rows are under its own writer)")
    tier = s.serve and s.serve.tier
    if tier and (tier["shards"] > 1 or any(sh.get("link_rounds") or restarted(sh) for sh in tier["per_shard"])):
        lines.append(tier_line(tier))  # one shard, no linking and no restart: nothing to say
    paid = [(a.id, a.pow) for a in s.attackers] + [("benign", s.benign.pow)]
    if any(p.puzzles for _, p in paid):
        lines.append("proof of work paid: " + ", ".join(f"{who} {p.seconds:.2f} s ({p.queries} queries, "
                                                         f"{p.hashes:,} hashes)" for who, p in paid))
    held = [(a.id, a.limited) for a in s.attackers] + [("benign", s.benign.limited)]
    limited = [f"{who} " + " and ".join(
        ([f"waited {h.seconds:.1f} s over {h.waits} requests"] if h.waits else [])
        + ([f"ran {h.quota_spent} account(s) out of quota"] if h.quota_spent else []))
        for who, h in held if h.waits or h.quota_spent]
    if limited:
        lines.append("limits: " + "; ".join(limited))
    for c in s.clients:
        if c.failed:
            unspent = ", and its unspent budget in the summary (attackers' unspent)" if c.attacker else \
                " (an honest user's queries not sent are not counted)"
            lines.append(f"client actor {c.actor_id} died after {c.queries} queries ({c.failed}); its answered "
                         f"queries are in the log{unspent}")
    lines.append(f"wall time {s.wall_seconds:.1f} s")
    return "\n".join(lines)

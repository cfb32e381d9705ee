"""One scenario run, end to end: victim -> Serve app -> concurrent clients -> replicas -> evaluation."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from . import config as config_mod
from . import data, querylog, storage, zoo
from .config import ScenarioConfig
from .errors import ConfigError, SimError
from .protocol import Account, make_keys
from .training import accuracy, fidelity, predict_probs

log = logging.getLogger(__name__)


def derive_seed(seed: int, *names: object) -> int:
    """A child seed for a named random choice, stable across runs and processes."""
    digest = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


# Serve handles over gRPC: ~1.5x the handle throughput of the default transport on 2 cores. Serve kills an HTTP
# proxy not ready within 5 s; on 2 busy cores (a benchmark beside a run) its start-up takes longer than that.
LOCAL_RAY_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                 "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}
_RAY_INIT = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def init_local_ray(num_cpus: int | None = None, object_store_mb: int = 512) -> None:
    """Start a fresh local Ray (never a stale cluster recorded by an earlier crash)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb << 20, **_RAY_INIT)


def _check_reachable(address: str) -> None:
    """Fail fast on HOST:PORT that nothing listens on (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if address in ("auto", "local") or address.startswith("ray://") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise SimError(f"ray.address={address!r}: cannot connect ({exc.strerror or exc}); expected a running "
                       f"cluster's HOST:PORT (ray start --head) or 'auto'") from None


@contextlib.contextmanager
def ray_session(cfg: ScenarioConfig):
    """Use the Ray already initialised in this process, join ``ray.address``/RAY_ADDRESS, or start a
    local one (and stop it afterwards)."""
    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **_RAY_INIT)
        except ConnectionError as exc:
            raise SimError(f"ray.address={address!r}: no Ray cluster found ({str(exc).splitlines()[0]}); "
                           f"expected a running cluster's HOST:PORT or 'auto'") from None
    else:
        init_local_ray(cfg.ray.num_cpus, cfg.ray.object_store_mb)
    try:
        yield
    finally:
        from .serving import forget_serve

        forget_serve()
        ray.shutdown()


def _progress(desc: str, total: int, disable: bool):
    return tqdm(total=total, desc=desc, unit="q" if desc.startswith("query") else "ep", file=sys.stderr,
                disable=disable, dynamic_ncols=True, leave=True, mininterval=1.0)


def _wait_with_progress(refs: list, board, bar, on_poll=None) -> list:
    """Wait for ``refs`` while showing the sum of the board's counters on ``bar`` (and calling
    ``on_poll(board)`` after each look)."""
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        done = sum(ray.get(board.snapshot.remote()).values())
        bar.update(done - bar.n)
        if on_poll is not None:
            on_poll(board)
    if bar.total:
        bar.update(bar.total - bar.n)
    bar.close()
    return ray.get(refs)


@dataclass
class ClientPlan:
    """One client actor: who it is, which accounts it drives, what it sends; ``result`` once it ran."""

    actor_id: str
    role: str  # attacker / benign
    attacker: str | None  # the attacker id in the scenario, None for benign users
    accounts: list[str]  # account ids
    budget: int
    batch_size: int
    split: str
    source: object  # a pure query source (actors.base.PoolStream)
    keys: list[str] | None = None  # the accounts' API keys
    strategy: dict | None = None  # account_cap, max_rate, churn
    result: dict | None = None


@dataclass
class Plan:
    """Who queries through which accounts: the accounts table and the client actors."""

    accounts: dict[str, Account]  # api key -> account
    clients: list[ClientPlan]
    held_out: set[int] = dataclasses.field(default_factory=set)  # test images used as attack seeds

    def of(self, attacker: str | None = None, role: str | None = None) -> list[ClientPlan]:
        return [c for c in self.clients if (attacker is None or c.attacker == attacker)
                and (role is None or c.role == role)]


def load_pools(cfg: ScenarioConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The query pools of the scenario's Knockoff attackers: pool name -> (images, labels)."""
    return {att.pool: data.load_pool(att.pool, cfg.data.root, cfg.data.download)
            for att in cfg.attackers.values() if att.attack == "knockoff"}


def plan_clients(cfg: ScenarioConfig, ds: data.Dataset, pools: dict | None = None) -> Plan:
    """Accounts, keys and client actors of a scenario; checks each attacker's pool against its budget.
    ``pools``: query pools already loaded (:func:`load_pools`), to share them between runs."""
    from actors.accounts import split_evenly
    from actors.benign import BenignStream

    seed = cfg.seed
    clients: list[ClientPlan] = []
    accounts: list[Account] = []
    for u in range(cfg.benign.users):
        acct = Account(f"benign-{u}", "benign", cohort=f"benign-{u}")  # honest users sign up one by one
        accounts.append(acct)
        clients.append(ClientPlan(f"benign-{u}", "benign", None, [acct.account_id], cfg.benign.queries,
                                  cfg.benign.batch_size, "round_robin",
                                  BenignStream(ds.x_test, cfg.benign.queries, derive_seed(seed, "benign", u))))
    held_out: set[int] = set()
    for aid, att in cfg.attackers.items():
        per_cohort = att.cohort_size or att.accounts
        accts = [Account(f"{aid}-{j:04d}", "attacker", att.attack, f"{aid}-c{j // per_cohort}")
                 for j in range(att.accounts)]
        accounts += accts
        budgets = split_evenly(att.budget, att.actors)
        shares = split_evenly(att.accounts, att.actors)
        if att.attack == "knockoff":
            sources = _knockoff_sources(cfg, aid, att, ds, budgets, (pools or {}).get(att.pool))
        elif att.attack == "dfme":
            sources = _dfme_sources(cfg, aid, att, ds, budgets)
        else:
            sources, seeds = _jacobian_sources(cfg, aid, att, ds, budgets)
            held_out |= seeds
        first = 0
        for i, (share, source) in enumerate(zip(shares, sources)):
            mine = [a.account_id for a in accts[first:first + share]]
            first += share
            clients.append(ClientPlan(f"{aid}-actor{i}", "attacker", aid, mine, budgets[i], att.batch_size,
                                      att.split, source,
                                      strategy={"cap": att.account_cap, "max_rate": att.max_rate, "churn": att.churn}))
    keys = make_keys(accounts, seed=derive_seed(seed, "keys"))
    key_of = {a.account_id: k for k, a in keys.items()}
    for c in clients:
        c.keys = [key_of[a] for a in c.accounts]
    return Plan(keys, clients, held_out)


def _knockoff_sources(cfg: ScenarioConfig, aid: str, att, ds: data.Dataset, budgets: list[int],
                      loaded: tuple | None = None) -> list:
    """One Knockoff source per actor, each with its own shard of the shuffled pool (``loaded``: the pool's
    (images, labels) if already in memory)."""
    from actors.knockoff import KnockoffAdaptive, KnockoffRandom, coarse_groups

    pool, labels = loaded if loaded is not None else data.load_pool(att.pool, cfg.data.root, cfg.data.download)
    if pool.shape[1:] != ds.x_train.shape[1:]:
        raise ConfigError(f"attackers.{aid}.pool={att.pool!r} has images of shape {pool.shape[1:]}, but the "
                          f"victim takes {ds.x_train.shape[1:]}; expected a pool with the victim's image shape")
    if att.budget > len(pool) and not att.sample_with_replacement:
        raise ConfigError(f"attackers.{aid}.budget={att.budget} exceeds the {len(pool)} images of pool "
                          f"{att.pool!r} (Knockoff samples without replacement); expected at most {len(pool)}, or "
                          f"attackers.{aid}.sample_with_replacement=true")
    if att.strategy == "adaptive":  # each actor its own bandit over its own shard of the pool
        if att.adaptive.arms == "clusters":
            if att.adaptive.clusters > len(pool):
                raise ConfigError(f"attackers.{aid}.adaptive.clusters={att.adaptive.clusters} exceeds the {len(pool)} "
                                  f"images of pool {att.pool!r}; expected at most {len(pool)}")
            labels = coarse_groups(pool, att.adaptive.clusters, derive_seed(cfg.seed, "groups", aid))
        order = np.random.default_rng(derive_seed(cfg.seed, "pool", aid)).permutation(len(pool))
        shards = [order[i::att.actors] for i in range(att.actors)]
        return [KnockoffAdaptive(pool[sh], labels[sh], b, arch=cfg.replica_arch(aid),
                                 num_classes=ds.num_classes, seed=derive_seed(cfg.seed, "bandit", aid, i),
                                 lr=att.adaptive.lr, rewards=tuple(att.adaptive.rewards), window=att.adaptive.window)
                for i, (sh, b) in enumerate(zip(shards, budgets))]
    return [KnockoffRandom(pool, b, seed=derive_seed(cfg.seed, "pool", aid), shard=(i, att.actors),
                           replacement=att.sample_with_replacement, augment=att.augment)
            for i, b in enumerate(budgets)]


def _dfme_sources(cfg: ScenarioConfig, aid: str, att, ds: data.Dataset, budgets: list[int]) -> list:
    """One DFME source per actor: its own generator and student, its share of the budget."""
    from actors.dfme import DFME

    d = att.dfme
    return [DFME(ds.input_shape, b, arch=cfg.replica_arch(aid), num_classes=ds.num_classes,
                 batch_size=d.batch, directions=d.directions, step=d.step, generator_steps=d.generator_steps,
                 student_steps=d.student_steps, lr_student=d.lr_student, lr_generator=d.lr_generator, nz=d.nz,
                 seed=derive_seed(cfg.seed, "dfme", aid, i))
            for i, b in enumerate(budgets)]


def _jacobian_sources(cfg: ScenarioConfig, aid: str, att, ds: data.Dataset, budgets: list[int]) -> tuple[list, set]:
    """One Jacobian-attack source per actor, each growing its own shard of the seed set; the seeds come from
    the victim's test split (which it never trained on) and are left out of the replicas' evaluation."""
    from actors.jacobian import JacobianAttack

    jc = att.jacobian
    if jc.seed_size > len(ds.x_test) // 2:
        raise ConfigError(f"attackers.{aid}.jacobian.seed_size={jc.seed_size} would take more than half of the "
                          f"{len(ds.x_test)} test images; expected at most {len(ds.x_test) // 2}")
    if jc.seed_size < att.actors:
        raise ConfigError(f"attackers.{aid}.jacobian.seed_size={jc.seed_size} is less than actors={att.actors}; "
                          f"expected at least one seed per actor")
    idx = np.random.default_rng(derive_seed(cfg.seed, "seeds", aid)).choice(len(ds.x_test), jc.seed_size,
                                                                             replace=False)
    sources = [JacobianAttack(att.attack, ds.x_test[idx[i::att.actors]], ds.y_test[idx[i::att.actors]], b,
                              arch=cfg.replica_arch(aid), num_classes=ds.num_classes, lam=jc.lam,
                              rounds=jc.rounds, tau=jc.tau, substitute_epochs=jc.substitute_epochs,
                              seed=derive_seed(cfg.seed, "jacobian", aid, i))
               for i, b in enumerate(budgets)]
    return sources, set(idx.tolist())

def prepare_run_dir(cfg: ScenarioConfig) -> str:
    """Create the run directory (``run_dir`` or ``runs/<scenario>/<time>``), write the resolved config,
    and return the log directory."""
    if not cfg.run_dir:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run_dir = os.path.join("runs", cfg.name, f"{stamp}-{uuid.uuid4().hex[:4]}")
    if "://" not in cfg.run_dir:  # replicas on other nodes or in other folders resolve it the same way
        cfg.run_dir = os.path.abspath(os.path.expanduser(cfg.run_dir))
    log_dir = storage.join(cfg.run_dir, "queries")
    try:
        if querylog.exists(log_dir):
            raise ConfigError(f"run_dir={cfg.run_dir!r} already holds a run's query log; expected a new or "
                              f"empty directory (or leave run_dir unset for a fresh one)")
        storage.makedirs(cfg.run_dir)
        storage.write_text(storage.join(cfg.run_dir, "config.yaml"), config_mod.to_yaml(cfg))
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"run_dir={cfg.run_dir!r} cannot be written ({str(exc).splitlines()[0]}); expected a "
                          f"writable directory path or a URI pyarrow knows (file://, s3://, gs://, hdfs://)") from None
    return log_dir


def new_run_id(cfg: ScenarioConfig) -> str:
    return f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"


def train_victim(cfg: ScenarioConfig, quiet: bool = False) -> zoo.Victim:
    """The cached victim, or train it with a progress bar."""
    bar = None

    def on_epoch(epoch, loss):
        nonlocal bar
        if bar is None:
            bar = _progress("training victim", cfg.victim.epochs, quiet)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir, on_epoch=on_epoch)
    if bar is not None:
        bar.close()
    return victim


def defense_models(cfg: ScenarioConfig, victim: zoo.Victim) -> dict:
    """The models the scenario's defense needs beyond the victim (adaptive misinformation's model)."""
    from . import defenses

    if "adaptive_misinformation" not in defenses.names_in(cfg.defense.spec()):
        return {}
    return {"misinformation": zoo.get_misinformation_model(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)}


def train_detectors(cfg: ScenarioConfig, victim: zoo.Victim, quiet: bool = False):
    """The scenario's detectors (:func:`sim.detection.setup`), with a progress bar while SAME trains."""
    from . import detection

    bars: dict[str, object] = {}

    def on_epoch(stage, epoch, loss):
        if stage not in bars:
            total = cfg.detectors.same.epochs if stage == "mae" else cfg.detectors.same.aux_epochs
            bars[stage] = _progress(f"training SAME {stage}", total, quiet)
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{loss:.4f}")

    try:
        return detection.setup(cfg, victim, on_epoch=on_epoch)
    finally:
        for bar in bars.values():
            bar.close()


def deploy_victim(cfg: ScenarioConfig, victim: zoo.Victim, run_id: str, keys: dict[str, Account],
                  log_dir: str, http: bool = True, dets=None, app: str | None = None) -> tuple[str, int | None]:
    """Start Serve if needed and deploy the victim's app; returns (app name, HTTP port).
    ``dets``: the :class:`sim.detection.DetectorSetup` (built here if not given); ``app``: the Serve app
    name (default the victim's name, suffixed with the run id if another app has it)."""
    from ray import serve

    from .serving import VictimSpec, deploy, start_serve

    dets = dets if dets is not None else train_detectors(cfg, victim, quiet=True)
    port = start_serve(cfg.serve.port, http)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # after Serve has set up its own logger
    if app is None:
        taken = set(serve.status().applications)
        app = cfg.victim.name if cfg.victim.name not in taken else f"{cfg.victim.name}-{run_id[-6:]}"
    mis = defense_models(cfg, victim).get("misinformation")
    spec = VictimSpec(
        victim=cfg.victim.name, run_id=run_id, arch=victim.arch, input_shape=victim.dataset.input_shape,
        num_classes=victim.dataset.num_classes, state=victim.state_bytes(), accounts=keys,
        detectors=dets.detectors, rules=dets.rules, detector_models=dets.models,
        defense=cfg.defense.spec(), log_dir=log_dir, log_inputs=cfg.log.inputs,
        max_images=cfg.serve.max_images, threads=cfg.serve.threads,
        misinformation=mis and zoo.state_bytes(mis),
    )
    deploy(spec, app, replicas=cfg.serve.replicas, replica_cpus=cfg.serve.replica_cpus,
           max_ongoing_requests=cfg.serve.max_ongoing_requests)
    return app, port


def run(scenario, overrides=None, *, quiet: bool = False, victim: zoo.Victim | None = None,
        pools: dict | None = None, app: str | None = None, on_replica_epoch=None) -> dict:
    """Run a scenario (name, YAML path, mapping or ScenarioConfig) with overrides; returns the summary.

    A sweep shares work between its runs: ``victim`` (the trained victim of this config) and ``pools``
    (:func:`load_pools`) skip loading them again; ``app`` names the Serve app; ``on_replica_epoch(accuracies)``
    is called while replicas train with ``{attacker id: {epoch: replica test accuracy}}`` so far, for every
    attacker whose replica trains (``{}`` until its first epoch ends)."""
    cfg = config_mod.load(scenario, overrides)
    start = time.perf_counter()
    ds = victim.dataset if victim is not None else data.load(cfg.victim.dataset, cfg.data.root, cfg.data.download)
    plan = plan_clients(cfg, ds, pools)  # before any training: a pool too small for a budget fails fast
    log_dir = prepare_run_dir(cfg)
    run_id = new_run_id(cfg)
    victim = victim if victim is not None else train_victim(cfg, quiet)
    timings = {"victim_seconds": round(time.perf_counter() - start, 2)}
    t0 = time.perf_counter()
    dets = train_detectors(cfg, victim, quiet)
    timings["detector_seconds"] = round(time.perf_counter() - t0, 2)

    with ray_session(cfg):
        from ray import serve

        try:
            nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
            t0 = time.perf_counter()
            app, port = deploy_victim(cfg, victim, run_id, plan.accounts, log_dir, http=cfg.serve.http, dets=dets,
                                      app=app)
            timings["serve_seconds"] = round(time.perf_counter() - t0, 2)
            try:
                _query(cfg, plan, app, nodes, quiet)
            finally:  # the victim is not needed while replicas train: its CPUs go to them
                serve.delete(app)
            timings["query_seconds"] = round(time.perf_counter() - t0 - timings["serve_seconds"], 2)
        finally:  # also after Ctrl-C or a failure: the run directory keeps a readable log
            logged = querylog.compact(log_dir)
        t0 = time.perf_counter()
        replicas = _train_replicas(cfg, victim, plan, quiet, on_replica_epoch)
        timings["replica_seconds"] = round(time.perf_counter() - t0, 2)
    summary = summarize(cfg, victim, run_id, plan, replicas, log_dir, logged, dets)
    summary["serve"] = {"app": app, "port": port, "url": f"http://127.0.0.1:{port}/{app}" if port else None}
    summary["ray"]["nodes"] = len(nodes)
    summary["timings"] = timings
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    storage.write_text(storage.join(cfg.run_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _query(cfg: ScenarioConfig, plan: Plan, app: str, nodes: list[str], quiet: bool) -> None:
    """All clients query the victim at once; each client's result lands in its plan entry."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.client import ClientActor
    from actors.progress import ProgressBoard

    board = ProgressBoard.options(scheduling_strategy="DEFAULT").remote()
    actors = [  # clients dealt round-robin over the nodes that were alive at the start
        ClientActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False))
        .remote(c.actor_id, c.source, c.keys, c.split, c.budget, c.batch_size, app,
                board, derive_seed(cfg.seed, "split", c.actor_id), **(c.strategy or {}))
        for i, c in enumerate(plan.clients)
    ]
    bar = _progress("querying", sum(c.budget for c in plan.clients), quiet)
    for client, result in zip(plan.clients, _wait_with_progress([a.run.remote() for a in actors], board, bar)):
        client.result = result


def _eval_indices(ds: data.Dataset, plan: Plan) -> np.ndarray:
    """The test images replicas are evaluated on: all but the attack seeds taken from the test split."""
    return np.setdiff1d(np.arange(len(ds.x_test)), sorted(plan.held_out))


def _train_replicas(cfg: ScenarioConfig, victim: zoo.Victim, plan: Plan, quiet: bool, on_epoch=None) -> dict:
    """Pool each attacker's transfer sets over its actors and train its replica; with a defense on (and
    ``undefended_baseline``), also a replica on the victim's clean answers to the same queries, under the
    key ``ID:undefended``. All in parallel. ``on_epoch``: see :func:`run`. Returns key -> state_dict.

    Tasks and board are scheduled explicitly ("DEFAULT"), so that inside a Tune trial they are not held to
    the trial's own placement group (which reserves only what the trial itself uses)."""
    from actors.progress import ProgressBoard
    from actors.replica import train_replica_task

    from . import defenses

    ds = victim.dataset
    baseline = cfg.undefended_baseline and not defenses.is_identity(cfg.defense.spec())
    board = ProgressBoard.options(scheduling_strategy="DEFAULT").remote()
    keep = _eval_indices(ds, plan)
    eval_set = ray.put((ds.x_test[keep], ds.y_test[keep])) if on_epoch is not None else None
    refs, order, epochs = [], [], 0
    for aid, att in cfg.attackers.items():
        parts = [c.result["transfer"] for c in plan.of(attacker=aid)]
        parts = [p for p in parts if len(p[0])]
        if not parts:  # every query refused: nothing to train on
            continue
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        sets = {aid: y}
        if baseline:
            sets[f"{aid}:undefended"] = predict_probs(victim.model, x)
        for key, targets in sets.items():
            task = train_replica_task.options(scheduling_strategy="DEFAULT")
            refs.append(task.remote(x, targets, cfg.replica_arch(aid), ds.input_shape, ds.num_classes, att.replica,
                                    derive_seed(cfg.seed, "replica", aid), board, key,
                                    eval_set if key == aid else None))
            order.append(key)
            epochs += att.replica.epochs
    bar = _progress("training replicas", epochs, quiet)
    training = {key: {} for key in order if key in cfg.attackers}  # the attackers' own replicas post accuracies
    poll = (lambda b: on_epoch({**training, **ray.get(b.values.remote())})) if on_epoch is not None else None
    return dict(zip(order, _wait_with_progress(refs, board, bar, poll)))


def evaluate_defense(cfg: ScenarioConfig, victim: zoo.Victim, clean: np.ndarray | None = None,
                     batch_size: int = 256) -> dict:
    """The scenario's defense applied to the victim's test set (``clean``: the victim's probabilities on it,
    if already computed): what honest users get."""
    from . import defenses

    ds = victim.dataset
    defense = defenses.from_spec(cfg.defense.spec(), victim=victim.model, **defense_models(cfg, victim))
    clean = predict_probs(victim.model, ds.x_test) if clean is None else clean
    returned = np.concatenate([defense(clean[i:i + batch_size], ds.x_test[i:i + batch_size])
                               for i in range(0, len(clean), batch_size)])
    return {
        "defended_test_accuracy": round(accuracy(returned.argmax(1), ds.y_test), 4),
        "test_l1_mean": round(float(np.abs(returned - clean).sum(1).mean()), 4),
        "test_top1_preserved_rate": round(float(np.mean(returned.argmax(1) == clean.argmax(1))), 4),
    }


def _distortion(table) -> dict:
    """Mean L1 distortion and top-1-preserved rate over the answered rows of a log table."""
    import pyarrow.compute as pc

    answered = table.filter(pc.is_in(table.column("action"), pa.array(querylog.ANSWERED)))
    if answered.num_rows == 0:
        return {"answered": 0, "l1_mean": None, "top1_preserved_rate": None}
    l1 = answered.column("defense_l1").to_numpy(zero_copy_only=False)
    changed = answered.column("top1_changed").to_numpy(zero_copy_only=False)
    return {"answered": answered.num_rows, "l1_mean": round(float(np.nanmean(l1)), 4),
            "top1_preserved_rate": round(1 - float(np.mean(changed.astype(bool))), 4)}


def summarize(cfg: ScenarioConfig, victim: zoo.Victim, run_id: str, plan: Plan, replicas: dict,
              log_dir: str, logged: int, dsetup=None) -> dict:
    import pyarrow.compute as pc

    from . import models

    ds = victim.dataset
    clean_test = predict_probs(victim.model, ds.x_test)
    victim_test = clean_test.argmax(1)
    keep = _eval_indices(ds, plan)  # replicas never see attack seeds
    defended = evaluate_defense(cfg, victim, clean_test)
    defended_accuracy = defended.pop("defended_test_accuracy")
    from analysis.detection import detection_report

    dets = cfg.detectors.enabled()
    table = querylog.read(log_dir, columns=["account_id", "role", "attack", "action", "input_sha1", "resubmission",
                                            "defense_l1", "top1_changed", *[f"{d}_{c}" for d in dets
                                                                            for c in ("score", "flagged")]])
    actions = {a: int(pc.sum(pc.equal(table.column("action"), a)).as_py() or 0)
               for a in ("answered", "perturbed", "challenged", "refused")}
    answered = actions["answered"] + actions["perturbed"]
    report = detection_report(table, list(dets)) if table.num_rows else {}
    flagged_by: dict[str, set] = {}
    for name in dets:
        mask = pc.fill_null(table.column(f"{name}_flagged"), False)
        flagged_by[name] = set(pc.unique(table.filter(mask).column("account_id")).to_pylist()) - {None}
    flagged = flagged_by.get("prada", set())
    role_of = {a.account_id: a.role for a in plan.accounts.values()}
    total = sum(c.result["sent"] for c in plan.clients)

    attackers = []
    for aid, att in cfg.attackers.items():
        mine = [c.result for c in plan.of(attacker=aid)]
        accts = {a for c in plan.of(attacker=aid) for a in c.accounts}
        entry = {
            "id": aid, "attack": att.attack, "pool": att.pool, "accounts": att.accounts, "actors": att.actors,
            "split": att.split, "account_cap": att.account_cap, "max_rate": att.max_rate, "churn": att.churn,
            "queries": sum(r["sent"] for r in mine), "refused": sum(r["refused"] for r in mine),
            "unspent": sum(r["unspent"] for r in mine),
            "accounts_used": len({a for r in mine for a, n in r["per_account"].items() if n}),
            "accounts_flagged": len(flagged & accts),
            "accounts_flagged_by": {name: len(f & accts) for name, f in flagged_by.items()},
            "pow": _pow_paid(mine),
            "accounts_burned": sum(len(r["burned"]) for r in mine),
            "labels": att.replica.labels, "replica_test_accuracy": None, "replica_fidelity": None,
            "stats": [r["stats"] for r in mine],  # what the method did, per actor
        }
        for key, suffix in ((aid, ""), (f"{aid}:undefended", "_undefended")):
            if key in replicas:
                model = models.build(cfg.replica_arch(aid), ds.input_shape, ds.num_classes)
                model.load_state_dict(replicas[key])
                pred = predict_probs(model, ds.x_test[keep]).argmax(1)
                entry[f"replica_test_accuracy{suffix}"] = round(accuracy(pred, ds.y_test[keep]), 4)
                entry[f"replica_fidelity{suffix}"] = round(fidelity(pred, victim_test[keep]), 4)
        attackers.append(entry)

    benign = [c.result for c in plan.of(role="benign")]
    clients = [{"actor_id": c.actor_id, "role": c.role, "attacker": c.attacker, "queries": c.result["sent"],
                "refused": c.result["refused"], "seconds": round(c.result["seconds"], 2),
                "per_account": c.result["per_account"]} for c in plan.clients]
    return {
        "run_id": run_id,
        "scenario": cfg.name,
        "run_dir": cfg.run_dir,
        "seed": cfg.seed,
        "victim": {"name": cfg.victim.name, "dataset": cfg.victim.dataset, "arch": cfg.victim.arch,
                   "test_accuracy": round(victim.test_accuracy, 4), "trained_now": victim.trained_now,
                   "train_seconds": round(victim.train_seconds, 1),
                   "training": victim.training, "dp_epsilon": victim.dp_epsilon,
                   "dp": cfg.victim.dp.model_dump() if victim.training == "dp_sgd" else None,
                   "checkpoint": str(victim.path),
                   "defended_test_accuracy": defended_accuracy},
        "defense": {"name": cfg.defense.name, "params": {k: v for k, v in cfg.defense.spec().items() if k != "name"},
                    **{k: v for k, v in _distortion(table).items() if k != "answered"},
                    **defended,
                    "by_role": {role: _distortion(table.filter(pc.equal(table.column("role"), role)))
                                for role in ("attacker", "benign")}},
        "evaluation": {"replica_test_images": int(len(keep)), "held_out_attack_seeds": len(plan.held_out)},
        "queries": {"total": total, "answered": answered, **{k: v for k, v in actions.items() if k != "answered"},
                    "logged": logged},
        "attackers": attackers,
        "benign": {"users": cfg.benign.users, "queries": sum(r["sent"] for r in benign),
                   "refused": sum(r["refused"] for r in benign), "pow": _pow_paid(benign)},
        "clients": clients,
        "ray": {"client_nodes": len({c.result["node_id"] for c in plan.clients})},
        "detection": {name: _detection_entry(det, flagged_by[name], role_of, report.get(name, {}),
                                             dsetup.calibration.get(name) if dsetup else None)
                      for name, det in dets.items()},
    }


def _pow_paid(results: list[dict]) -> dict:
    """Proof of work the clients of ``results`` did: puzzles, queries covered, hashes, seconds."""
    out = {"puzzles": 0, "queries": 0, "hashes": 0, "seconds": 0.0, "max_bits": 0}
    for r in results:
        for k, v in r.get("pow", {}).items():
            out[k] = max(out[k], v) if k == "max_bits" else out[k] + v
    out["seconds"] = round(out["seconds"], 3)
    return out


def _detection_entry(det, flagged: set, role_of: dict, report: dict, calibration: dict | None) -> dict:
    """One detector's part of the summary: its settings, accounts it flagged, AUROC/AUPR/FPR95 at query and
    account level over all attacks (per attack: ``python -m analysis RUN_DIR``)."""
    def brief(m):
        return ({k: round(m[k], 4) for k in ("auroc", "aupr", "fpr95", "fpr90")} if "auroc" in m
                else {"error": m.get("error")})

    return {
        "kind": det.kind, "action": det.action, "group": getattr(det, "group", "account"),
        "params": det.params(), "calibration": calibration,
        "flagged_accounts": len(flagged),
        "flagged_attacker_accounts": sum(role_of.get(a) == "attacker" for a in flagged),
        "flagged_benign_accounts": sum(role_of.get(a) == "benign" for a in flagged),
        "attacker_accounts": sum(r == "attacker" for r in role_of.values()),
        "benign_accounts": sum(r == "benign" for r in role_of.values()),
        "flagged_queries": {k: v for k, v in report.get("flagged", {}).items() if "queries" in k},
        "query_level": brief(report.get("query", {}).get("all", {})),
        "account_level": brief(report.get("account", {}).get("all", {})),
    }


def format_summary(s: dict) -> str:
    """The summary as a small text table for the terminal."""
    v, q, d = s["victim"], s["queries"], s["defense"]
    params = ", ".join(f"{k}={val}" for k, val in d["params"].items())
    dp = f", DP-SGD epsilon {v['dp_epsilon']:.2f}" if v.get("dp_epsilon") is not None else ""
    lines = [
        f"run {s['run_id']}  ->  {s['run_dir']}",
        f"victim {v['arch']} on {v['dataset']} ({v['training']} training{dp}): test accuracy {v['test_accuracy']:.4f}"
        f"{' (trained now)' if v['trained_now'] else ' (cached)'}",
        f"defense {d['name']}{f' ({params})' if params else ''}: defended test accuracy "
        f"{v['defended_test_accuracy']:.4f}, test L1 {d['test_l1_mean']:.3f}, top-1 kept "
        f"{d['test_top1_preserved_rate']:.3f}",
        f"queries: {q['total']} sent, {q['answered']} answered ({q['perturbed']} perturbed), {q['challenged']} "
        f"challenged with proof of work, {q['refused']} refused, {q['logged']} log rows",
        "",
        f"{'attacker':<14}{'attack':<10}{'accounts':>9}{'actors':>7}{'queries':>9}{'refused':>8}"
        f"{'flagged':>8}{'replica acc':>12}{'fidelity':>9}{'undefended acc':>15}",
    ]

    def num(value):
        return "-" if value is None else f"{value:.4f}"

    for a in s["attackers"]:
        lines.append(f"{a['id']:<14}{a['attack']:<10}{a['accounts']:>9}{a['actors']:>7}{a['queries']:>9}"
                     f"{a['refused']:>8}{a['accounts_flagged']:>8}{num(a['replica_test_accuracy']):>12}"
                     f"{num(a['replica_fidelity']):>9}{num(a.get('replica_test_accuracy_undefended')):>15}")
    b = s["benign"]
    lines += [
        f"{'benign':<14}{'-':<10}{b['users']:>9}{b['users']:>7}{b['queries']:>9}{b['refused']:>8}"
        f"{s['detection'].get('prada', {}).get('flagged_benign_accounts', 0):>8}{'-':>12}{'-':>9}{'-':>15}",
        "",
    ]
    for name, det in s["detection"].items():
        shown = {**det["params"], **({"threshold": det["calibration"]["threshold"]} if det.get("calibration") else {})}
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
                           if v is not None)
        ql, fq = det["query_level"], det.get("flagged_queries") or {}
        quality = (f"; query AUROC {ql['auroc']:.3f}, FPR95 {ql['fpr95']:.3f}" if "auroc" in ql else "")
        if det["kind"] in ("prada", "link"):  # stateful: an account is flagged for good
            flagged = (f"flagged {det['flagged_attacker_accounts']}/{det['attacker_accounts']} attacker accounts, "
                       f"{det['flagged_benign_accounts']}/{det['benign_accounts']} benign")
        else:  # stateless: queries are flagged one by one
            rate = lambda k: fq[f"{k}_queries"] / max(fq[f"{k}_queries_total"], 1)
            flagged = (f"flagged {rate('attacker'):.1%} of attacker queries, {rate('benign'):.1%} of benign"
                       if fq else "flagged nothing")
        lines.append(f"{name} ({params}; action={det['action']}, group={det['group']}): {flagged}{quality}")
    if not s["detection"]:
        lines.append("no detectors")
    paid = [(a["id"], a["pow"]) for a in s["attackers"]] + [("benign", s["benign"]["pow"])]
    if any(p["puzzles"] for _, p in paid):
        lines.append("proof of work paid: " + ", ".join(f"{who} {p['seconds']:.2f} s ({p['queries']} queries, "
                                                         f"{p['hashes']:,} hashes)" for who, p in paid))
    lines.append(f"wall time {s['wall_seconds']:.1f} s")
    return "\n".join(lines)

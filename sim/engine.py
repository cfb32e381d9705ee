"""One scenario run, end to end: the orchestrator of the Ray parts around the Ray-free run core.

plan (:mod:`sim.plan`) -> victim and detector models (:mod:`sim.zoo`, :mod:`sim.detection`) -> Serve app
(:mod:`sim.serving`) -> concurrent client actors -> replica tasks -> summary (:mod:`sim.summarize`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm import tqdm

from . import alerts, defenses, detection, devices, models, querylog, registry, storage, zoo
from . import config as config_mod
from .config import ScenarioConfig
from .errors import ConfigError, Interrupted, RunFailed, SimError, first_line
from .plan import Plan, derive_seed, make_plan
from .protocol import Account
from .summarize import Outcome, evaluate_defense, log_columns, measure_victim, robustness_settings, summarize
from .summary import Replica, Serve, Summary, write_interrupted
from .training import predict_probs

log = logging.getLogger(__name__)

# Serve handles over gRPC: ~1.5x the handle throughput of the default transport on 2 cores. Serve kills an HTTP
# proxy not ready within 5 s; on 2 busy cores (a benchmark beside a run) its start-up takes longer than that. Serve
# replaces a dead proxy after three failed health checks: every 2 s, not 10, it is back in seconds, not half a minute.
LOCAL_RAY_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                 "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2"}
_RAY_INIT = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def init_local_ray(num_cpus: int | None = None, object_store_mb: int = 512) -> None:
    """Start a fresh local Ray (never a stale cluster recorded by an earlier crash)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb << 20, **_RAY_INIT)


def _cluster_address(cfg: ScenarioConfig) -> tuple[str | None, str]:
    """The cluster to join (``ray.address``, else RAY_ADDRESS; None: none) and the setting that named it, for
    errors."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    return address, f"ray.address={address!r}" if cfg.ray.address else f"RAY_ADDRESS={address!r}"


def check_ray_address(cfg: ScenarioConfig) -> None:
    """Fail fast, before any work, on a cluster address (``ray.address`` or RAY_ADDRESS) that is not one or that
    nothing listens on (ray.init would retry for minutes)."""
    address, where = _cluster_address(cfg)
    if not address or ray.is_initialized():
        return
    if not config_mod.is_ray_address(address):
        raise SimError(f"{where} is not a cluster address; expected HOST:PORT (ray start --head prints it), auto, "
                       f"or ray://HOST:PORT")
    if address == "auto":  # the cluster this machine belongs to, as ray.init would find it
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise SimError(f"{where}: no Ray cluster runs on this machine; expected one started with ray start, or "
                           f"HOST:PORT of a cluster") from None
    host, _, port = address.rpartition(":")
    if address == "local" or address.startswith("ray://"):
        return
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise SimError(f"{where}: cannot connect ({exc.strerror or exc}); expected a running "
                       f"cluster's HOST:PORT (ray start --head) or 'auto'") from None


def check_victim_url(cfg: ScenarioConfig) -> None:
    """Fail fast, before any work, on a ``victim.url`` whose host and port nothing listens on."""
    if cfg.victim.url is None:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(cfg.victim.url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise SimError(f"victim.url={cfg.victim.url!r}: cannot connect ({getattr(exc, 'strerror', None) or exc}); "
                       f"expected the URL of a running victim (python -m sim serve prints one)") from None


def ray_stopped(wait_s: float = 2.0) -> bool:
    """Whether the Ray this process is connected to has stopped (its GCS refuses connections within ``wait_s``).
    A SIGTERM sent to a whole process group (``timeout``, systemd, a batch scheduler) stops a local Ray's processes
    together with this one: Ray shields them from SIGINT only."""
    if not ray.is_initialized():
        return False
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@ray.remote(num_cpus=0)
class _Probe:
    def ping(self) -> bool:
        return True


def _check_cluster_reaches_us(where: str) -> None:
    """A one-line SimError unless the cluster just joined can call back into this process, as the actors a run owns
    need: a client whose RAY_AUTH_MODE is not the cluster's gets in, but the cluster refuses the calls of what it
    owns, and the first actor it starts dies before it runs."""
    try:
        ray.get(_Probe.options(scheduling_strategy="DEFAULT").remote().ping.remote(), timeout=120)
    except ray.exceptions.ActorDiedError:
        mode = os.environ.get("RAY_AUTH_MODE")
        ray.shutdown()
        raise SimError(f"{where}: the cluster cannot call back into this process (an actor started there died "
                       f"before it ran): this process has {f'RAY_AUTH_MODE={mode!r}' if mode else 'no RAY_AUTH_MODE'}"
                       f", the cluster another; expected the RAY_AUTH_MODE the cluster was started with "
                       f"(docs/cluster.md)") from None
    except ray.exceptions.GetTimeoutError:  # a cluster too busy to start a worker in time: the run will tell
        log.warning("%s: the cluster did not start a probe actor within 120 s", where)


@contextlib.contextmanager
def ray_session(cfg: ScenarioConfig):
    """Use the Ray already initialised in this process, join ``ray.address``/RAY_ADDRESS, or start a
    local one (and stop it afterwards)."""
    if ray.is_initialized():
        unused = [f"ray.{k}={v}" for k, v in cfg.ray.model_dump(exclude_defaults=True).items()]
        if unused and ray.get_runtime_context().get_actor_id() is None:  # a driver's Ray (a sweep's trial: its own)
            log.warning("%s: not applied; this process is connected to a Ray already (ray.shutdown() first to start "
                        "or join another)", ", ".join(unused))
        yield
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    address, where = _cluster_address(cfg)
    if address:
        check_ray_address(cfg)
        try:
            ray.init(address=address, **_RAY_INIT)
        except ConnectionError as exc:
            token = ("; a cluster with token authentication answers only clients started with RAY_AUTH_MODE=token "
                     "(docs/cluster.md)" if "RAY_AUTH_MODE" not in os.environ else "")
            raise SimError(f"{where}: no Ray cluster found ({first_line(exc)}){token}; "
                           f"expected a running cluster's HOST:PORT or 'auto'") from None
        _check_cluster_reaches_us(where)
        print(f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}: {len(_alive_nodes())} nodes, "
              f"{ray.cluster_resources().get('CPU', 0):g} CPUs", file=sys.stderr, flush=True)
    else:
        init_local_ray(cfg.ray.num_cpus, cfg.ray.object_store_mb)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # the run's own (it cleans up) over ray.init's (it exits at once)
    try:
        yield
    finally:
        from .serving import forget_serve

        forget_serve()
        ray.shutdown()


def _progress(desc: str, total: int, disable: bool):
    return tqdm(total=total, desc=desc, unit="q" if desc.startswith("query") else "ep", file=sys.stderr,
                disable=disable, dynamic_ncols=True, leave=True, mininterval=1.0)


def _wait_with_progress(refs: list, board, keys: list[str], bar, on_poll=None) -> None:
    """Wait until ``refs`` are ready (done or failed) while showing the sum of the board's counters of ``keys`` on
    ``bar`` (and calling ``on_poll(board)`` after each look)."""
    pending = list(refs)
    try:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            snapshot = ray.get(board.snapshot.remote())
            done = sum(snapshot.get(key, 0) for key in keys)
            bar.update(done - bar.n)
            if on_poll is not None:
                on_poll(board)
        if bar.total:
            bar.update(bar.total - bar.n)
    finally:  # Ctrl-C too: the bar ends its line, so what is printed next starts on its own
        bar.close()


class _Bars:
    """Progress bars of model training, one per stage (``on_epoch(stage, epoch, epochs, loss)``)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bars = quiet, {}

    def __call__(self, stage: str, epoch: int, epochs: int, loss: float) -> None:
        if stage not in self.bars:
            self.bars[stage] = _progress(stage, epochs, self.quiet)
        self.bars[stage].update(1)
        self.bars[stage].set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def prepare_run_dir(cfg: ScenarioConfig, run_id: str) -> str:
    """Create the run directory (``run_dir``, or ``runs/<scenario>/<date>-<time>-<suffix>`` with the time and random
    suffix of ``run_id``, :func:`new_run_id`), write the resolved config, and return the log directory."""
    if not cfg.run_dir:
        *_, stamp, suffix = run_id.rsplit("-", 2)
        cfg.run_dir = os.path.join("runs", cfg.name, f"{stamp[:8]}-{stamp[8:]}-{suffix}")
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
        raise ConfigError(f"run_dir={cfg.run_dir!r} cannot be written ({first_line(exc)}); expected a "
                          f"writable directory path or a URI pyarrow knows (file://, s3://, gs://, hdfs://)") from None
    return log_dir


def new_run_id(cfg: ScenarioConfig) -> str:
    """``<scenario>-<date><time>-<random suffix>``; a run directory made for it ends with the same time and suffix."""
    return f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"


def train_victim(cfg: ScenarioConfig, quiet: bool = False) -> zoo.Victim:
    """The cached victim, or train it with a progress bar."""
    bars = _Bars(quiet)
    try:
        return zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir,
                              on_epoch=lambda epoch, loss: bars("training victim", epoch, cfg.victim.epochs, loss),
                              device=devices.local(cfg.device))
    finally:
        bars.close()


def prepare_models(cfg: ScenarioConfig, victim: zoo.Victim, quiet: bool = False):
    """The scenario's detectors (:func:`sim.detection.setup`) and the trained models its defenses need (the
    victim's, and those detectors answer flagged queries through), with progress bars while models train."""
    bars = _Bars(quiet)
    ctx = zoo.ModelContext.of(cfg, victim, on_epoch=bars, device=devices.local(cfg.device))
    try:  # the models of the victim's defense and of the detectors' perturbations, by defense name
        dets, made = detection.setup(cfg, ctx), {name: made for spec in cfg.defense_specs().values()
                                                 for name, made in defenses.prepare(spec, ctx).items()}
    finally:
        bars.close()
    x = victim.dataset.x_test[:8]
    for field, spec in cfg.defense_specs().items():  # a defense of the user's own: does it answer probabilities?
        if not all(registry.is_builtin("defense", name) for name in defenses.names_in(spec)):
            defense = defenses.from_spec(spec, victim=victim.float_victim, models=made)
            defenses.check_outputs(defense, predict_probs(victim.model, x), x, field)
    return dets, made


def defended_test_set(cfg: ScenarioConfig, victim: zoo.Victim, defense_models: dict | None = None,
                      clean: np.ndarray | None = None) -> dict:
    """What honest users get from the scenario's defense on the victim's test set (``defense_models``: what
    :func:`sim.defenses.prepare` made, if done already; ``clean``: the victim's probabilities there, likewise)."""
    ds = victim.dataset
    if defense_models is None:
        ctx = zoo.ModelContext.of(cfg, victim, device=devices.local(cfg.device))
        defense_models = defenses.prepare(cfg.defense.spec(), ctx)
    clean = predict_probs(victim.model, ds.x_test) if clean is None else clean
    defense = defenses.from_spec(cfg.defense.spec(), victim=victim.float_victim, models=defense_models)
    return evaluate_defense(defense.to(devices.local(cfg.device)), clean, ds.x_test, ds.y_test)


def deploy_victim(cfg: ScenarioConfig, victim: zoo.Victim, run_id: str, keys: dict[str, Account], log_dir: str,
                  dets: detection.DetectorSetup, defense_models: dict, http: bool = True,
                  app: str | None = None):
    """Start Serve if needed and deploy the victim's app; returns (app name, HTTP port, its
    :class:`sim.service.VictimSpec`). ``app``: the Serve app name (default the victim's name, suffixed with the
    run id if another app has it)."""
    from ray import serve

    from .serving import VictimSpec, deploy, start_serve

    port = start_serve(cfg.serve.port, http, cfg.serve.request_timeout_s)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # after Serve has set up its own logger
    if app is None:
        taken = set(serve.status().applications)
        app = cfg.victim.name if cfg.victim.name not in taken else f"{cfg.victim.name}-{run_id[-6:]}"
    gpus = ray.cluster_resources().get("GPU", 0)
    device = "cpu" if victim.quantization != "none" else devices.resolve(cfg.device, gpus)  # int8 runs on the CPU
    auto = cfg.serve.autoscaling
    replica_gpus = 0.0 if device == "cpu" else (cfg.serve.replica_gpus if cfg.serve.replica_gpus is not None
                                                 else min(1.0, gpus / cfg.serve.most_replicas))
    spec = VictimSpec(
        victim=cfg.victim.name, run_id=run_id, model=victim.to_bytes(), input_shape=victim.dataset.input_shape,
        accounts=keys, detectors=dets.detectors, rules=dets.rules,
        detector_models=dets.models, defense=cfg.defense.spec(), defense_models=defense_models, log_dir=log_dir,
        log_inputs=cfg.log.inputs, max_images=cfg.serve.max_images, threads=cfg.serve.threads,
        shards=cfg.serve.shards_for(ray.cluster_resources().get("CPU", 1)),
        state_dir=_tier_dir(cfg.run_dir), device=device,
        limits=cfg.serve.limits(), max_body_bytes=cfg.serve.max_body_bytes, runtime_env=plugin_env(cfg),
    )
    try:
        deploy(spec, app, replicas=cfg.serve.replicas, replica_cpus=cfg.serve.replica_cpus,
               replica_gpus=replica_gpus, max_ongoing_requests=cfg.serve.max_ongoing_requests,
               max_queued_requests=cfg.serve.max_queued_requests, autoscaling=auto and auto.model_dump())
    except BaseException:  # a cluster outlives the run: leave no half-deployed app or tier on it
        with contextlib.suppress(Exception):
            from .serving import delete

            delete(spec, app)
        raise
    return app, port, spec


def _tier_dir(run_dir: str) -> str | None:
    """Where the detection tier journals: ``RUN/tier`` when the run directory is a path on this machine (a
    ``file://`` URI included); else None, a temporary directory on each shard's node, removed with the tier."""
    local = storage.local_path(run_dir)
    return os.path.join(local, "tier") if local else None


def plugin_env(cfg: ScenarioConfig) -> dict | None:
    """The Ray runtime environment the scenario's plug-ins need in workers (None: it uses none)."""
    return registry.runtime_env(cfg.components(), [cfg.victim.client] if cfg.victim.client else [])


@ray.remote(num_cpus=0)
def _plugins_in_worker(components: list) -> dict:
    return registry.broken(components)


def check_plugins_in_workers(cfg: ScenarioConfig) -> None:
    """A one-line ConfigError when one of the scenario's plug-ins, which load here, does not load in a Ray worker
    given :func:`plugin_env` (a module found on this process's path only, say)."""
    env = plugin_env(cfg)
    if env is None:
        return
    components = [(c, n) for c, n in cfg.components() if not registry.is_builtin(c, n)]
    if not components:
        return
    try:
        broken = ray.get(_plugins_in_worker.options(runtime_env=env, scheduling_strategy="DEFAULT")
                         .remote(components))
    except ray.exceptions.RuntimeEnvSetupError as exc:
        raise ConfigError(f"the plug-ins' runtime environment cannot be set up in Ray workers "
                          f"({str(exc).strip().splitlines()[-1][:300]})") from None
    if broken:
        (category, name), why = next(iter(broken.items()))
        raise ConfigError(f"{category} {name!r} loads here but not in Ray workers: {why}; expected its module "
                          f"importable there too (install it on every node, or keep it in a folder Ray can ship)")


def run(scenario, overrides=None, *, quiet: bool = False, victim=None, test_set: tuple | None = None,
        train_set: tuple | None = None, plan: Plan | None = None, app: str | None = None,
        on_replica_epoch=None) -> Summary:
    """Run a scenario (name, YAML path, mapping or ScenarioConfig) with overrides; returns the summary, also
    written to ``RUN/summary.json``.

    ``victim`` may be a live ``nn.Module`` (nothing trained), measured on ``test_set=(x, y)`` (default: the test
    split of ``victim.dataset``; images uint8 or float in [0, 1]), with ``train_set=(x, y)`` the defender's own data
    (default: the training split of ``victim.dataset``), which detectors train and calibrate on.

    A sweep shares work between its runs: ``victim`` (the trained victim of this config) and ``plan`` (the
    scenario's :func:`sim.plan.make_plan`, which does not depend on the defense) skip making them again; ``app``
    names the Serve app; ``on_replica_epoch(accuracies)`` is called while replicas train with
    ``{attacker id: {epoch: replica test accuracy}}`` so far, for every attacker whose replica trains (``{}``
    until its first epoch ends)."""
    cfg = config_mod.load(scenario, overrides)
    cfg.check_run()
    devices.local(cfg.device)  # device=cuda where there is none: an error before any work
    check_ray_address(cfg)  # and a cluster that is not there
    if victim is not None and not isinstance(victim, zoo.Victim):  # a live module (the Python API)
        victim = zoo.live_victim(victim, cfg.victim, cfg.data, test_set, train_set)
    start = time.perf_counter()
    ds = victim.dataset if victim is not None else zoo.load_data(cfg.victim, cfg.data)
    check_architectures(cfg, ds, victim is None)
    warn_idle_linking(cfg)
    plan = plan if plan is not None else make_plan(cfg, ds)  # before any training: a pool too small fails fast
    run_id = new_run_id(cfg)
    log_dir = prepare_run_dir(cfg, run_id)
    progress = {"phase": "victim training", "logged": 0}

    def stop_without_ray():  # SIGTERM stopped Ray's processes too: nothing there can be asked to stop or answer
        if progress.get("log_detectors") is not None:  # the log is still the streams the replicas wrote
            querylog.stop_writers(log_dir)  # Serve replicas outlive Ray's own processes briefly, and go on writing
            progress["logged"] = _compact(cfg, log_dir, progress["log_detectors"])
        write_interrupted(cfg.run_dir, run_id, cfg.name, progress["phase"], progress["logged"])
        print(f"\n{Interrupted(progress['phase'], cfg.run_dir, progress['logged'])}", file=sys.stderr, flush=True)
        os._exit(130)

    try:
        with _second_interrupt_exits(log_dir, stop_without_ray):
            outcome = (_run_remote(cfg, ds, plan, log_dir, run_id, progress, quiet, on_replica_epoch)
                       if cfg.victim.remote() else
                       _run(cfg, ds, plan, log_dir, run_id, start, progress, quiet, victim, app, on_replica_epoch))
            outcome.wall_seconds = round(time.perf_counter() - start, 2)
            summary = summarize(cfg, outcome)
            summary.write(cfg.run_dir)
            return summary
    except KeyboardInterrupt:  # the log is compacted already (the query phase's own cleanup); say where it stopped
        write_interrupted(cfg.run_dir, run_id, cfg.name, progress["phase"], progress["logged"])
        raise Interrupted(progress["phase"], cfg.run_dir, progress["logged"]) from None
    except _VictimStopped as exc:
        write_interrupted(cfg.run_dir, run_id, cfg.name, progress["phase"], progress["logged"], error=str(exc))
        raise RunFailed(progress["phase"], str(exc), cfg.run_dir, progress["logged"]) from None
    except SimError:  # a mistake found before any query (a detector's setting that does not fit the data, …)
        if progress["phase"] in _BEFORE_QUERIES:
            _remove_stub(cfg.run_dir)  # nothing ran: leave no directory that holds only its config
        raise


_BEFORE_QUERIES = ("victim training", "detector training", "deploying the victim")


def _remove_stub(run_dir: str) -> None:
    """Delete what :func:`prepare_run_dir` wrote (config.yaml, and the folders if nothing else is in them)."""
    try:
        storage.remove(storage.join(run_dir, "config.yaml"))
        for folder in (storage.join(run_dir, "queries"), run_dir):
            if not storage.listdir(folder):
                storage.remove_tree(folder)
    except (OSError, pa.ArrowException):  # not worth more than the error being reported
        pass


class _VictimStopped(Exception):
    """The victim refused whole requests for a reason no client handles (its query log cannot be written)."""


def check_architectures(cfg, ds, victim_trains: bool) -> None:
    """Every architecture the run will build (the victim's when it trains here, each replica's) made once for the
    data, so that one that does not fit it (too small images for VGG, a factory of the user's that fails) is an
    error before any work rather than after the queries."""
    fields = {f"attackers.{aid}.replica.arch" if a.replica.arch else "victim.arch": cfg.replica_arch(aid)
              for aid, a in cfg.attackers.items()}  # a replica without its own takes the victim's: named as set
    if victim_trains and cfg.victim.checkpoint is None and cfg.victim_arch() is not None:
        fields = {"victim.arch": cfg.victim_arch(), **fields}
    checked = set()
    for field, arch in fields.items():
        if arch is not None and arch not in checked:
            models.build(arch, ds.input_shape, ds.num_classes, field)
            checked.add(arch)


def warn_idle_linking(cfg: ScenarioConfig) -> None:
    """Account linking re-clusters once every ``every`` queries of all traffic: a scenario that sends fewer in all
    never runs it, and its summary would show it flagging nothing. Say so before the run."""
    b = cfg.benign
    most = (sum(a.budget for a in cfg.attackers.values())
            + ((b.accounts or b.users) * (b.queries_max or b.queries) if b.users else 0))
    for name, det in cfg.enabled_detectors().items():
        every = det.params().get("every")
        if registry.get("detector", det.kind).population and every is not None and every > most:
            log.warning("detectors.%s.every=%d is more than the %d queries this scenario sends at most: %s never "
                        "re-clusters and flags nothing (a smaller every, or a larger budget, runs it)", name, every,
                        most, name)


@contextlib.contextmanager
def _second_interrupt_exits(log_dir: str, stop_without_ray=None):
    """Ctrl-C (or SIGTERM, as a batch scheduler stops a job) once: KeyboardInterrupt, and the run cleans up (deletes
    its Serve app, compacts its log). Either again while it does: exit at once with status 130, the log left as
    streams (every row written is there, and :func:`sim.querylog.read` reads them). A SIGTERM that stopped Ray's own
    processes as well (sent to the whole process group) calls ``stop_without_ray()`` instead, which cleans up
    what needs no Ray and exits. Only where signals can be handled (the main thread), and each signal only where
    nobody else handles it (a process started in the background of a shell ignores SIGINT)."""
    ours = {sig: default for sig, default in ((signal.SIGINT, signal.default_int_handler),
                                              (signal.SIGTERM, signal.SIG_DFL))
            if signal.getsignal(sig) == default}
    if threading.current_thread() is not threading.main_thread() or not ours:
        yield
        return
    seen = []

    def handler(signum, frame):
        if seen:
            left = (f"; the query log in {log_dir} is left uncompacted (readable as it is)"
                    if querylog.exists(log_dir) else "")
            print(f"\nstopped at once{left}", file=sys.stderr, flush=True)
            os._exit(130)
        seen.append(signum)
        if signum == signal.SIGTERM and stop_without_ray is not None and ray_stopped():
            stop_without_ray()
        raise KeyboardInterrupt

    for sig in ours:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, default in ours.items():
            signal.signal(sig, default)


def _alive_nodes() -> list[str]:
    """The cluster's live nodes, by id: the clients are dealt over them."""
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def _run(cfg, ds, plan, log_dir, run_id, start, progress, quiet, victim, app, on_replica_epoch) -> Outcome:
    """:func:`run`'s phases; ``progress`` says which one it is in and how many rows the log kept."""
    victim = victim if victim is not None else train_victim(cfg, quiet)
    progress["phase"] = "detector training"
    timings = {"victim_seconds": round(time.perf_counter() - start, 2)}
    t0 = time.perf_counter()
    dets, defense_models = prepare_models(cfg, victim, quiet)
    timings["detector_seconds"] = round(time.perf_counter() - t0, 2)
    clean_test = predict_probs(victim.model, ds.x_test)

    with ray_session(cfg):
        from actors.remote import ProgressBoard

        from . import serving

        try:
            progress["phase"] = "deploying the victim"
            progress["log_detectors"] = list(dets.detectors)
            check_plugins_in_workers(cfg)
            _warm_up_replica_worker(cfg)
            nodes = _alive_nodes()
            t0 = time.perf_counter()
            app, port, spec = deploy_victim(cfg, victim, run_id, plan.accounts, log_dir, dets, defense_models,
                                            http=cfg.serve.http, app=app)
            progress["phase"] = "querying"
            timings["serve_seconds"] = round(time.perf_counter() - t0, 2)
            board = ProgressBoard.options(scheduling_strategy="DEFAULT").remote()  # progress of everything below
            try:
                transfers, died = _query(plan, app, nodes, board, quiet, run_id, plugin_env(cfg))
            finally:  # the victim is not needed while replicas train: its CPUs go to them
                tier = serving.delete(spec, app)
            timings["query_seconds"] = round(time.perf_counter() - t0 - timings["serve_seconds"], 2)
        finally:  # also after Ctrl-C or a failure: the run directory keeps a readable log, and its alerts
            logged = progress["logged"] = _compact(cfg, log_dir, progress.pop("log_detectors"))
        transfers.update(_rebuild_from_log(plan, died, log_dir, ds.input_shape))
        progress["phase"] = "replica training"
        t0 = time.perf_counter()
        # a defense, or a response that perturbs flagged queries: what would the same queries have given undefended?
        baseline = cfg.undefended_baseline and not all(map(defenses.is_identity, cfg.defense_specs().values()))
        table = querylog.read(log_dir, columns=[*log_columns(dets.detectors), *(["clean_probs"] if baseline else [])])
        replicas = _train_replicas(cfg, victim, plan, transfers, table if baseline else None, clean_test, board,
                                   quiet, on_replica_epoch)
        timings["replica_seconds"] = round(time.perf_counter() - t0, 2)
    progress["phase"] = "evaluation"
    keep = plan.eval_indices(len(ds.x_test))
    return Outcome(run_id=run_id, victim=victim, plan=plan, replicas=replicas, log=table, logged=logged,
                   defended=defended_test_set(cfg, victim, defense_models, clean_test), detectors=dets.info,
                   victim_measures=measure_victim(cfg, victim, ds.x_test[keep], ds.y_test[keep]),
                   nodes=len(nodes), serve=Serve(app=app, port=port, url=f"http://127.0.0.1:{port}/{app}"
                                                 if port else None, tier=tier,
                                                 replicas=None if cfg.serve.autoscaling else cfg.serve.replicas),
                   timings=timings)


def _remote_keys(cfg: ScenarioConfig, plan: Plan) -> str:
    """Give the plan's accounts the remote victim's keys (``victim.key_file``, in file order: one per account, then
    one for evaluation), in place; returns the evaluation account's key. Without a key file the plan's own keys are
    sent (an API that needs none ignores them)."""
    from .cli import load_keys
    from .protocol import HASHED

    if cfg.victim.key_file is None:
        return "evaluation"
    path = cfg.victim.key_file
    given = [k for k in load_keys(os.path.expanduser(path)) if not k.startswith(HASHED)]
    needed = len(plan.accounts) + 1
    if len(given) < needed:
        raise ConfigError(f"victim.key_file={path!r} has {len(given)} usable keys (entries with the key itself); the "
                          f"scenario needs {needed}: one per account ({len(plan.accounts)}) and one for evaluation; "
                          f"expected at least {needed} (python -m sim serve … serve.accounts={needed})")
    new = dict(zip(plan.accounts, given))
    plan.accounts = {new[k]: a for k, a in plan.accounts.items()}
    for c in plan.clients:
        c.keys = [new[k] for k in c.keys]
    return given[len(new)]


def _remote_answers(cfg: ScenarioConfig, ds, key: str, remote: dict) -> np.ndarray:
    """The remote victim's answers on the test set, through the evaluation account (logged with role evaluation);
    NaN rows where it refused."""
    from .remote import RemoteVictim

    victim = RemoteVictim(**{**remote, "accounts": {key: Account("evaluation", "evaluation")}}, writer_id="evaluation")
    out = []
    try:
        for i in range(0, len(ds.x_test), cfg.serve.max_images):
            reply = victim.query(key, ds.x_test[i:i + cfg.serve.max_images], "evaluation")
            if reply.status >= 400 and not len(reply.answered):
                raise _VictimStopped(f"the victim answered the evaluation account {reply.status}: {reply.reason}")
            probs = np.full((len(reply.answered), max(ds.num_classes, reply.probs.shape[-1])), np.nan, np.float32)
            probs[reply.answered, :reply.probs.shape[-1]] = reply.probs[reply.answered]
            out.append(probs)
    finally:
        victim.close()
    return np.concatenate(out)


def _run_remote(cfg, ds, plan, log_dir, run_id, progress, quiet, on_replica_epoch) -> Outcome:
    """:func:`run` against a victim this tool does not serve (:mod:`sim.remote`): its answers on the test set come
    first, through an evaluation account (which tries the way to it before any client starts); then the clients query
    it and log what they sent and got back; the replicas train as usual. Nothing is trained, served, defended or
    detected here."""
    from .remote import RemoteError

    eval_key = _remote_keys(cfg, plan)
    check_victim_url(cfg)  # before Ray starts: a URL nothing answers for is the user's to fix
    remote = {"run_id": run_id, "victim": cfg.victim.name, "url": cfg.victim.url, "log_dir": log_dir,
              "input_shape": ds.input_shape, "log_inputs": cfg.log.inputs, "accounts": plan.accounts,
              **({"client": cfg.victim.client} if cfg.victim.client else {})}
    timings = {"victim_seconds": 0.0}
    with ray_session(cfg):
        from actors.remote import ProgressBoard

        progress["phase"], progress["log_detectors"] = "evaluation", []
        check_plugins_in_workers(cfg)
        _warm_up_replica_worker(cfg)
        nodes = _alive_nodes()
        board = ProgressBoard.options(scheduling_strategy="DEFAULT").remote()
        t0 = time.perf_counter()
        try:
            try:  # first: the way to the victim (its URL, the user's adapter) is tried before any client starts
                clean_test = _remote_answers(cfg, ds, eval_key, remote)
            except RemoteError as exc:
                if isinstance(exc, SimError):  # the user's adapter: one line, status 2
                    raise
                raise _VictimStopped(str(exc)) from None
            progress["phase"] = "querying"
            try:
                transfers, died = _query(plan, None, nodes, board, quiet, run_id, plugin_env(cfg), remote)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, RemoteError):
                    raise _VictimStopped(str(exc.cause)) from None
                raise
            timings["query_seconds"] = round(time.perf_counter() - t0, 2)
        finally:
            logged = progress["logged"] = _compact(cfg, log_dir, progress.pop("log_detectors"))
        transfers.update(_rebuild_from_log(plan, died, log_dir, ds.input_shape))
        answered = ~np.isnan(clean_test).any(1)
        accuracy = float(np.mean(answered & (np.nan_to_num(clean_test).argmax(1) == ds.y_test)))
        victim = zoo.Victim(None, None, ds, accuracy, cfg.victim.url or cfg.victim.client, False, 0.0,
                            source="remote")
        progress["phase"] = "replica training"
        t0 = time.perf_counter()
        replicas = _train_replicas(cfg, victim, plan, transfers, None, np.nan_to_num(clean_test), board, quiet,
                                   on_replica_epoch)
        timings["replica_seconds"] = round(time.perf_counter() - t0, 2)
    table = querylog.read(log_dir, columns=log_columns([]))
    table = table.filter(pc.invert(pc.equal(table.column("role"), "evaluation")))
    return Outcome(run_id=run_id, victim=victim, plan=plan, replicas=replicas, log=table, logged=logged,
                   defended={"defended_test_accuracy": round(accuracy, 4), "test_l1_mean": None,
                             "test_top1_preserved_rate": None}, nodes=len(nodes), timings=timings)


def _compact(cfg: ScenarioConfig, log_dir: str, detectors: list[str]) -> int:
    """Compact the query log and write the alerts; returns the log's rows. Where the run directory cannot take them
    (a full disk), the log stays as the streams the service wrote, which :func:`sim.querylog.read` reads as well."""
    try:
        logged = querylog.compact(log_dir)
        alerts.write(cfg.run_dir, detectors)
        return logged
    except OSError as exc:
        log.warning("the query log in %s is left as written, uncompacted (%s)", log_dir, first_line(exc))
        return querylog.read(log_dir, columns=["seq"]).num_rows


def _query(plan: Plan, app: str | None, nodes: list[str], board, quiet: bool, run_id: str,
           env: dict | None = None, remote: dict | None = None) -> tuple[dict, dict]:
    """All clients query the victim at once; each client's report lands in its plan entry. Returns each client's
    transfer set as an object reference (actor id -> ref, left in the object store), and the clients whose actor
    died (actor id -> why): the run goes on without them (see :func:`_rebuild_from_log`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.client import VictimRefused
    from actors.remote import ClientActor

    actors = [  # clients dealt round-robin over the nodes that were alive at the start; named for Ray's tools
        ClientActor.options(name=f"{run_id}:{c.actor_id}", **({"runtime_env": env} if env else {}),
                            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False))
        .remote(c.actor_id, c.source, c.keys, c.split, c.budget, c.batch_size, app, board, c.seed, remote,
                **(c.strategy or {}))
        for i, c in enumerate(plan.clients)
    ]
    refs = [a.run.remote() for a in actors]
    bar = _progress("querying", sum(c.budget for c in plan.clients), quiet)
    keys = [f"query:{c.actor_id}" for c in plan.clients]  # the clients' posts (replicas post under their key)
    try:
        _wait_with_progress([r for r, _ in refs], board, keys, bar)
    except BaseException:  # Ctrl-C, a failure: stop every client, or they query on (a later app of the same name)
        for a in actors:
            ray.kill(a)
        raise
    transfers, died, refused = {}, {}, []
    for client, (report, transfer) in zip(plan.clients, refs):
        try:
            client.result = ray.get(report)
            transfers[client.actor_id] = transfer
        except ray.exceptions.RayActorError as exc:  # its process died: killed, out of memory, its node lost
            died[client.actor_id] = first_line(getattr(exc, "cause", None) or exc)  # a task's error: its cause
            log.warning("client actor %s died (%s); the run goes on without it", client.actor_id,
                        died[client.actor_id])
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, SimError):  # the user's mistake (an attack of their own): one line
                raise SimError(str(exc.cause)) from None
            if not isinstance(exc.cause, VictimRefused):
                raise
            refused.append(exc.cause)
    if refused:
        raise _stopped(plan, refused[0])
    return transfers, died


def _stopped(plan: Plan, refused) -> Exception:
    """What stops a run whose client the victim refused (``refused``: its :class:`actors.client.VictimRefused`): a
    400 is the sender's mistake (the images of an attack of the user's own, or of a victim elsewhere that takes
    another shape), a one-line error naming the attacker; anything else is the victim's, and stops the run."""
    if refused.status == 400:
        who = next(c for c in plan.clients if c.actor_id == refused.actor_id)
        where = f"attackers.{who.attacker}.attack" if who.attacker else "benign"
        return SimError(f"{where}: the victim refused the images of actor {refused.actor_id} ({refused.reason}); "
                        f"expected images the victim takes")
    return _VictimStopped(f"the victim answered {refused.status}: {refused.reason}")


def _rebuild_from_log(plan: Plan, died: dict[str, str], log_dir: str, input_shape: tuple) -> dict[str, object]:
    """The reports of the clients whose actor died (``died``: actor id -> why), rebuilt from the log, which has every
    query the service answered them (each row is written before its answer): queries sent and refused, per account,
    the budget left unspent. Returns their transfer sets (actor id -> ref), rebuilt likewise from the answered rows
    when the log keeps inputs (``log.inputs``). What only the actor knew (its method's statistics, proof of work
    and limits) died with it."""
    if not died:
        return {}
    table = querylog.read(log_dir, columns=["actor_id", "account_id", "action", "resubmission", "timestamp",
                                            "returned_probs", "input"])
    transfers = {}
    for client in plan.clients:
        if client.actor_id not in died:
            continue
        rows = table.filter(pc.equal(table.column("actor_id"), client.actor_id)).sort_by("timestamp")
        fresh = rows.filter(pc.invert(rows.column("resubmission")))  # a solved challenge's answer is no new query
        answered = rows.filter(pc.is_in(rows.column("action"), pa.array(querylog.ANSWERED)))
        stamps = rows.column("timestamp").to_pylist()
        client.result = {
            "actor_id": client.actor_id, "sent": fresh.num_rows, "refused": fresh.num_rows - answered.num_rows,
            "per_account": querylog.per_account_counts(fresh), "burned": [],
            "unspent": client.budget - fresh.num_rows, "node_id": None, "failed": died[client.actor_id],
            "seconds": (stamps[-1] - stamps[0]).total_seconds() if stamps else 0.0, "stats": {}}
        if answered.num_rows and answered.column("input").null_count == 0:
            probs = querylog.prob_matrix(answered.column("returned_probs"))
            transfers[client.actor_id] = ray.put((querylog.decode_inputs(answered, input_shape), probs))
    return transfers


def _warm_up_replica_worker(cfg: ScenarioConfig) -> None:
    """A worker for the replica tasks, readied while the victim deploys and the clients query (a fresh worker
    spends seconds of CPU importing torch before it trains); nothing waits for it."""
    from actors.remote import warm_up_replica_worker

    warm_up_replica_worker.options(scheduling_strategy="DEFAULT", runtime_env=plugin_env(cfg) or None).remote()


def _train_replicas(cfg: ScenarioConfig, victim: zoo.Victim, plan: Plan, transfers: dict, log: pa.Table | None,
                    clean_test: np.ndarray, board, quiet: bool, on_epoch=None) -> dict[str, Replica]:
    """Each attacker's replica on the transfer sets of its actors; given the query ``log`` (a defense is on and
    ``undefended_baseline``), also a replica on the victim's clean answers to the same queries, as the log holds
    them, under the key ``ID:undefended``. All in parallel; ``on_epoch``: see :func:`run`.

    Tasks and board are scheduled explicitly ("DEFAULT"), so that inside a Tune trial they are not held to
    the trial's own placement group (which reserves only what the trial itself uses)."""
    from actors.remote import train_replica_task

    ds = victim.dataset
    keep = plan.eval_indices(len(ds.x_test))
    evaluation = (ds.x_test[keep], ds.y_test[keep], clean_test[keep].argmax(1))
    eval_set = ray.put(evaluation)
    robustness = robustness_settings(cfg)
    gpus = ray.cluster_resources().get("GPU", 0)
    device = devices.resolve(cfg.device, gpus)
    jobs = sum(1 + (log is not None) for _ in cfg.attackers)
    task_gpus = {"num_gpus": min(1.0, gpus / max(jobs, 1))} if device == "cuda" else {}
    env = plugin_env(cfg)
    if env:
        task_gpus["runtime_env"] = env
    refs, order, epochs = [], [], 0
    for aid, att in cfg.attackers.items():
        clients = plan.of(attacker=aid)
        parts = [transfers[c.actor_id] for c in clients
                 if c.actor_id in transfers and c.result["sent"] > c.result["refused"]]
        if not parts:
            continue  # every query refused (or its actors died and the log keeps no inputs): nothing to train on
        clean = (ray.put(querylog.clean_answers(log, {a for c in clients for a in c.accounts}))
                 if log is not None else None)
        runs = {aid: False} if clean is None else {aid: False, f"{aid}:undefended": True}
        for key, on_clean in runs.items():
            job = {"arch": cfg.replica_arch(aid), "input_shape": ds.input_shape, "num_classes": ds.num_classes,
                   "cfg": att.replica, "seed": derive_seed(cfg.seed, "replica", aid), "key": key,
                   "post_accuracy": on_epoch is not None and not on_clean, "on_clean": on_clean,
                   "robustness": robustness, "angles": not on_clean, "device": device}
            task = train_replica_task.options(scheduling_strategy="DEFAULT", **task_gpus)
            refs.append(task.remote(job, eval_set, board, clean, *parts))
            order.append(key)
            epochs += att.replica.epochs
    bar = _progress("training replicas", epochs, quiet)
    training = {key: {} for key in order if key in cfg.attackers}  # the attackers' own replicas post accuracies
    poll = (lambda b: on_epoch({**training, **ray.get(b.values.remote())})) if on_epoch is not None else None
    _wait_with_progress(refs, board, order, bar, poll)
    _score_extracted(plan, evaluation, robustness)
    return {key: Replica(**scores) for key, scores in zip(order, ray.get(refs))}


def _score_extracted(plan: Plan, eval_set: tuple, robustness: dict | None) -> None:
    """The model an attack trained itself while it queried (DFME's student), scored as the replicas are, into its
    actor's ``stats.extracted``; the model itself is dropped from the result."""
    from actors.replica import score

    for client in plan.clients:
        model = (client.result or {}).pop("extracted", None)
        if model is not None:
            client.result["stats"]["extracted"] = score(model, eval_set, robustness)

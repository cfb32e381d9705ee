"""Ray Serve wrapper around :class:`sim.service.VictimService`: one Serve application per victim.

HTTP: ``POST http://127.0.0.1:PORT/<app>`` with header ``X-API-Key`` and body ``{"images": [...]}``.
Python: ``handle.query.remote(api_key, images, actor_id)`` returns a :class:`sim.service.Reply`.
Both go through ``VictimService``, so validation, detection, policy and logging are the same code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import socket
import time

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import defenses, tier_actors
from .errors import ConfigError, SimError
from .protocol import ACTOR_HEADER, API_KEY_HEADER, HASHED, MAX_ACTOR_ID, Account, Reply, hash_key, hashed
from .service import VictimSpec, build_defense, build_service

log = logging.getLogger(__name__)


QUEUE_RETRY_AFTER_S = 1.0  # the wait Serve suggests (Retry-After) with a 503 when a replica's queue is full


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None as soon as it is known to be larger than ``limit`` bytes (from its declared
    length, else while it streams in): never more than ``limit`` bytes are held."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


@serve.deployment
class VictimDeployment:
    def __init__(self, spec: VictimSpec):
        torch.set_num_threads(spec.threads)
        context = serve.get_replica_context()
        self.spec = spec
        self.defense = spec.defense  # the spec of the defense in use
        tier = tier_actors.RayTier(context.app_name, spec.shards) if tier_actors.needs_tier(spec) else None
        self.service = build_service(spec, writer_id=f"{spec.victim}-{context.replica_id.unique_id}", tier=tier)

    async def __call__(self, request: Request) -> JSONResponse:
        key, actor = request.headers.get(API_KEY_HEADER), request.headers.get(ACTOR_HEADER)
        if actor is not None and len(actor) > MAX_ACTOR_ID:  # logged in every row of the request: bounded first
            call = functools.partial(self.service.reject, key, 400, f"header {ACTOR_HEADER} is {len(actor)} characters "
                                     f"long; expected at most {MAX_ACTOR_ID}")
        elif request.method != "POST":
            call = functools.partial(self.service.reject, key, 405,
                                     f"method {request.method} not allowed; use POST", actor)
        elif (refused := self.service.key_error(key)) is not None:  # before the body: an unknown caller's is not read
            call = functools.partial(self.service.reject, key, refused.status, refused.reason, actor)
        else:
            body = await _read_body(request, self.spec.body_limit)
            if body is None:
                call = functools.partial(self.service.reject, key, 413, f"request body larger than "
                                         f"serve.max_body_bytes={self.spec.body_limit}", actor)
            else:
                call = functools.partial(self.service.query_json, key, body, actor,
                                         request.headers.get("content-type"))
        # the service (model, lock, log) runs off the event loop, which keeps accepting requests meanwhile
        reply = await asyncio.to_thread(call)
        wait = reply.retry_after_header
        headers = {**({"Retry-After": wait} if wait else {}), **({"Allow": "POST"} if reply.status == 405 else {})}
        return JSONResponse(reply.to_json(), status_code=reply.status, headers=headers or None)

    # The handle path's methods are coroutines that hand the service to the replica's thread pool, as __call__ does,
    # rather than plain methods, which Serve runs in threads of its own (anyio's) that come and go under load: the
    # pool's few lasting threads served more images per second (benchmarks/serving.py's pipeline, 2026-12-05).
    async def query(self, api_key: str, images, actor_id: str | None = None) -> Reply:
        return await asyncio.to_thread(self.service.query, api_key, images, actor_id)

    async def solve(self, api_key: str, challenge_id: str, counter: int, actor_id: str | None = None,
                    seconds: float | None = None) -> Reply:
        return await asyncio.to_thread(self.service.solve, api_key, challenge_id, counter, actor_id, seconds)

    async def reconfigure(self, config: dict) -> None:
        """Serve's live update (``user_config``): ``{"defense": spec}`` swaps the output defense in every
        replica without restarting it. The spec was checked by :func:`update_defense` before. The new defense is built
        and swapped in off the event loop, which keeps taking requests meanwhile (building MAD's surrogate takes a
        while, and the swap waits for the request that holds the service's lock)."""
        if "defense" in config and config["defense"] != self.defense:  # Serve also calls it right after __init__
            defense = await asyncio.to_thread(build_defense, self.spec, config["defense"])
            await asyncio.to_thread(self.service.set_defense, defense)
            self.defense = config["defense"]
        if "keys" in config:
            added = {k: Account(**fields) for k, fields in config["keys"].get("added", {}).items()}
            revoked = set(config["keys"].get("revoked", []))
            self.service.set_keys(self.spec.accounts, added, revoked)
            if added or revoked:
                log.info("keys: %d added, %d revoked; %d accounts now", len(added), len(revoked),
                         len(self.service.accounts))

    def info(self) -> dict:
        """This replica's process id, log writer and rows written (diagnostics)."""
        writer = self.service.writer
        return {"pid": os.getpid(), "writer": writer and writer.writer_id, "rows": writer.rows if writer else 0,
                "defense": self.service.defense.describe() if self.service.defense is not None else None}

    def __del__(self):
        writer = getattr(getattr(self, "service", None), "writer", None)
        if writer is not None:
            writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> int:
    """``port`` if it is free on 127.0.0.1, else a one-line user error."""
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    except OSError as exc:
        raise SimError(f"serve.port={port} cannot be used on 127.0.0.1 ({exc.strerror}); "
                       f"expected a free port, or 0 for any free one") from None
    return port


def start_serve(port: int, http: bool = True, request_timeout_s: float | None = None) -> int | None:
    """Start Serve (once per Ray session) with its proxy on 127.0.0.1; returns the HTTP port in use.
    ``request_timeout_s``: the proxy answers 408 to a request still unfinished after it (a body that trickles in
    included); it is set when Serve starts, so a Serve already running keeps its own."""
    client = serve.context._get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        cfg = client.http_config
        location = getattr(getattr(cfg, "location", None), "value", None)
        return cfg.port if cfg and location not in ("Disabled", "NoServer") else None
    if not http:
        serve.start(http_options={"location": "NoServer"})
        return None
    port = check_port(port) if port else free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": request_timeout_s})
    return port


def forget_serve() -> None:
    """Drop this process's cached Serve client before its Ray shuts down. Serve keys the cache by job id, which
    starts again at the same value in the next local Ray this process starts, so a second run (or sweep) in
    the same process would otherwise take that Ray's Serve as already running."""
    serve.context._disconnect()


def spec_version(spec: VictimSpec) -> str:
    """Serve's code version for a spec: a hash of everything but the defense, which travels in
    ``user_config``. Redeploying the same spec with another defense is then a lightweight update
    (``reconfigure`` on the running replicas, no restart); any other change restarts them."""
    blob = pickle.dumps(dataclasses.replace(spec, defense={}, key_changes={}))
    return hashlib.sha1(blob).hexdigest()[:16]


_OPTIONS: dict[str, dict] = {}  # app -> the options it was deployed with here (what its live updates keep)


def deploy(spec: VictimSpec, app_name: str, *, replicas: int = 1, replica_cpus: float = 0.5,
           max_ongoing_requests: int = 128, max_queued_requests: int = -1, autoscaling: dict | None = None,
           replica_gpus: float = 0.0) -> DeploymentHandle:
    """Deploy (or update) the victim app. Calling it again with only ``spec.defense`` changed reconfigures
    the running replicas live (see :func:`update_defense`). ``autoscaling``: Serve's ``autoscaling_config``
    (min_replicas, max_replicas, target_ongoing_requests, ...) in place of a fixed number of ``replicas``.
    ``replica_gpus``: the GPU share each replica reserves (with ``spec.device`` cuda)."""
    import ray

    _OPTIONS[app_name] = dict(replicas=replicas, replica_cpus=replica_cpus, max_ongoing_requests=max_ongoing_requests,
                              max_queued_requests=max_queued_requests, autoscaling=autoscaling,
                              replica_gpus=replica_gpus)

    defenses.check_spec(spec.defense)
    have = ray.cluster_resources().get("CPU", 0)
    first = (autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)) if autoscaling else replicas
    if first * replica_cpus > have:  # Serve would wait forever for replicas that cannot be placed
        what = (f"serve.autoscaling's first {first} replica{'s' * (first != 1)}" if autoscaling
                else f"serve.replicas={first}")
        raise SimError(f"{what} x serve.replica_cpus={replica_cpus} needs "
                       f"{first * replica_cpus:g} CPUs but the Ray cluster has {have:g}; expected at most that")
    tier_up = tier_actors.start(spec, app_name)  # the shards and linkers, unless they run already (a defense update)
    size = {"autoscaling_config": dict(autoscaling)} if autoscaling else {"num_replicas": replicas}
    dep = VictimDeployment.options(
        name="victim", **size, max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": QUEUE_RETRY_AFTER_S},
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus,
                           **({"runtime_env": spec.runtime_env} if spec.runtime_env else {})},
        user_config={"defense": spec.defense, "keys": spec.key_changes},
        # a stopping replica checks for unfinished requests every 0.1 s (Serve's default: 2 s) and still waits for
        # them up to graceful_shutdown_timeout_s; deleting an app whose clients are done takes 1 s instead of 3
        graceful_shutdown_wait_loop_s=0.1,
        # no line per request in Serve's replica logs: the query log records every request, and formatting and
        # writing that line took a few percent of the replicas' time (benchmarks/serving.py)
        logging_config={"enable_access_log": False},
    )
    # Serve has no public way to pin a deployment's version; without one every serve.run restarts the
    # replicas. Pinning it to the spec's hash makes a defense-only change a live reconfigure.
    dep._version = spec_version(spec)
    handle = serve.run(dep.bind(spec), name=app_name, route_prefix=f"/{app_name}")
    ray.get(tier_up)  # up by now (they started beside the replicas); a shard that failed to start fails here
    return handle


def delete(spec: VictimSpec, app_name: str) -> dict | None:
    """Delete the victim app and its detection tier (:func:`remove`); returns what the tier's shards held and did
    (None: no tier, or it could not be read)."""
    tier = tier_actors.stats(spec, app_name)
    remove(app_name)
    return tier


def remove(app_name: str) -> None:
    """Delete an app, once its replicas have stopped (and closed their logs), and its detection tier; an app or a
    tier that is gone already is no error."""
    serve.delete(app_name, _blocking=False)
    _wait_until_deleted(app_name)
    tier_actors.stop(app_name)
    _OPTIONS.pop(app_name, None)


DELETE_POLL_S = 0.1


def _wait_until_deleted(app_name: str, timeout_s: float = 60.0) -> None:
    """Until the app is gone, looking every ``DELETE_POLL_S``: serve.delete's own wait looks once a second, which
    cost every run half a second on average (a TimeoutError, as serve.delete's, after ``timeout_s``)."""
    start = time.monotonic()
    while app_name in serve.status().applications:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"Application {app_name} was not deleted after {timeout_s:g}s.")
        time.sleep(DELETE_POLL_S)


def update_defense(spec: VictimSpec, app_name: str, defense: dict, **options) -> VictimSpec:
    """Switch a running victim app to another defense (or other parameters) without restarting its
    replicas; ``options`` are :func:`deploy`'s (default: those the app was deployed with from this process). A bad
    spec is a one-line ConfigError and changes nothing. Returns the updated spec."""
    defenses.check_spec(defense)
    for name in defenses.names_in(defense):
        missing = [m for m in defenses.get(name).models if m not in spec.defense_models.get(name, {})]
        if missing:
            raise ConfigError(f"defense {name} needs its trained {', '.join(missing)} model, which this app was not "
                              f"deployed with; expected an app deployed with that defense (spec.defense_models)")
    new = dataclasses.replace(spec, defense=dict(defense))
    deploy(new, app_name, **{**_OPTIONS.get(app_name, {}), **options})
    return new


def update_keys(spec: VictimSpec, app_name: str, *, add: dict[str, Account] | None = None,
                revoke: list[str] = (), **options) -> VictimSpec:
    """Add accounts (API key, or its hash, -> account) to a running victim app and revoke keys (or their hashes),
    live, without restarting its replicas; ``options`` are :func:`deploy`'s (default: those the app was deployed with
    from this process). Every change is logged. Revoking a key the app does not know is a one-line ConfigError and
    changes nothing. Returns the updated spec."""
    add, revoke = hashed(add or {}), [k if k.startswith(HASHED) else hash_key(k) for k in revoke]
    added = {**spec.key_changes["added"], **{k: dataclasses.asdict(a) for k, a in add.items()}}
    known = set(spec.accounts) | set(added)
    unknown = [k for k in revoke if k not in known]
    if unknown:
        raise ConfigError(f"cannot revoke {len(unknown)} key(s) this app does not know ({unknown[0][:19]}…); "
                          f"expected keys (or their sha256: hashes) of its accounts")
    revoked = sorted((set(spec.key_changes["revoked"]) - set(add)) | set(revoke))
    new = dataclasses.replace(spec, key_changes={"added": added, "revoked": revoked})
    deploy(new, app_name, **{**_OPTIONS.get(app_name, {}), **options})
    everyone = {**spec.accounts, **{k: Account(**v) for k, v in added.items()}}
    log.warning("app %s: keys of %s added, keys of %s revoked", app_name,
                sorted(a.account_id for a in add.values()) or "none",
                sorted(everyone[k].account_id for k in revoke) or "none")
    return new

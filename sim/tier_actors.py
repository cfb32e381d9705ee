"""The detection tier on Ray: thin actors around :mod:`sim.tier`, and the client a Serve replica uses.

One victim app has ``shards`` :class:`ShardActor` s (named ``APP:shard:I`` in the ``mlsim`` namespace) and, per
account-linking detector, one :class:`LinkerActor` (``APP:link:NAME``). A shard actor handles its calls one at a time
in arrival order, which is each of its keys' history; Ray restarts a killed one (``max_restarts=-1``), which comes
back from its journal with exactly the state it had, and retries the calls that were in flight to it
(``max_task_retries=-1``): the shard answers a retried request with the verdicts it recorded, so no query is answered
without a verdict and none is scored twice. A replica calls each shard its request's keys live on once per request
(:class:`RayTier`), with the images as 8-bit pixels; requests that meet on the way to a shard share one call.

The linker is fed in bulk: each shard tells it how many linking queries it has recorded (every ``every / (2 x
shards)`` queries), and once ``every`` have accumulated it pulls the shards' new rows (one call per shard), re-clusters
and publishes the verdicts to the shards. Its flags therefore reach the shards a little after the query that
completed the round; each shard measures that delay in queries per newly flagged account (``stats()["link_lags"]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future

import ray

from . import detectors
from .tier import Durable, Linker, Shard, by_owner, needed, owner, per_shard

log = logging.getLogger(__name__)

NAMESPACE = "mlsim"
_HELD: dict[str, list] = {}  # app -> handles of its tier actors: a named actor lives while its creator holds one
_TEMPORARY: dict[str, str] = {}  # app -> the temporary directory its tier keeps its state in (no spec.state_dir)
SNAPSHOT_EVERY = 500  # journaled changes between a shard's snapshots


def shard_name(app: str, index: int) -> str:
    return f"{app}:shard:{index}"


def linker_name(app: str, detector: str) -> str:
    return f"{app}:link:{detector}"


def _stateful(spec) -> dict[str, dict]:
    return {name: d for name, d in spec.detectors.items() if detectors.get(d["kind"]).stateful}


def _tier_spec(spec):
    """What the tier's actors need of a victim spec: the stateful detectors and their models, the number of shards
    (small, so that it travels inline with the actor's creation and a restart always finds it)."""
    from types import SimpleNamespace

    names = _stateful(spec)
    return SimpleNamespace(detectors=names, shards=spec.shards, limits=getattr(spec, "limits", None),
                           detector_models={n: m for n, m in spec.detector_models.items() if n in names})


def _links(spec) -> dict[str, int]:
    """The population detectors of the spec (account linking): name -> its ``every``."""
    return {name: d.get("params", {}).get("every", cls.params["every"].default)
            for name, d in _stateful(spec).items() if (cls := detectors.get(d["kind"])).population}


def needs_tier(spec) -> bool:
    """Whether the victim keeps per-key state: a stateful detector, a rule that asks proof of work, or a limit."""
    return needed(bool(_stateful(spec)), (r.get("action") for r in spec.rules.values()), getattr(spec, "limits", None))


def _actor(name: str):
    """A named tier actor; retried briefly, since a replica may start while the tier is being created."""
    for attempt in range(50):
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            if attempt == 49:
                raise
            time.sleep(0.1)


def _preload() -> None:
    """Import what the stateful detectors import on first use (scipy, a second or so) now, while the app starts, rather
    than during a tier actor's first request."""
    import scipy.cluster.hierarchy  # noqa: F401
    import scipy.stats  # noqa: F401


def _sendable(exc: Exception) -> Exception:
    """``exc`` if it pickles, else a RuntimeError (an OSError where it was one) saying what it was."""
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 -- a user's detector may raise what does not pickle
        return (OSError if isinstance(exc, OSError) else RuntimeError)(f"{type(exc).__name__}: {exc}")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ShardActor:
    def __init__(self, app: str, index: int, spec, directory: str):
        _preload()
        self.app, self.index, self.shards, self.directory = app, index, spec.shards, directory
        self.durable = Durable(lambda: Shard(detectors.build_named(spec.detectors, spec.detector_models),
                                             limits=spec.limits), directory, Shard.CHANGES, every=SNAPSHOT_EVERY)
        if self.durable.restored["snapshot"] or self.durable.restored["changes"]:
            log.warning("%s restored: %s", shard_name(app, index), self.durable.restored)
        self.links = _links(spec)
        self.told = dict.fromkeys(self.links, (0, 0))  # (linking rounds that pulled, queries since) last told
        self.linkers: dict = {}  # linking detector -> its linker's handle, looked up once

    def score(self, requests: bytes) -> bytes:
        """Requests' items on this shard, in order (see :class:`RayTier`): pickled both ways. A request whose scoring
        raises gets the exception in place of its verdicts, and the others of the call their verdicts."""
        out = []
        for request in pickle.loads(requests):
            try:
                out.append(self._score(*request))
            except Exception as exc:  # noqa: BLE001 -- the request's caller raises it
                out.append(_sendable(exc))
        return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)

    def _score(self, request_id, items, x, labels, probs) -> dict:
        out = self.durable.apply("score", request_id, items, x, labels, probs)
        for name, every in self.links.items():
            book = self.durable.obj.detectors[name]
            pulled, told = self.told[name]
            if book.pulled != pulled:  # the linker pulled since: count from 0
                told = 0
            if book.since - told >= max(1, every // (2 * self.shards)):
                self.told[name] = (book.pulled, book.since)
                self._tick(name, book.pulled, book.since)
        return out

    def _tick(self, name: str, pulled: int, since: int) -> None:
        """Tell linking detector ``name``'s linker how many queries this shard recorded since the round that pulled it
        last. Fire and forget, never retried: a lost tick only delays the next round (the next one carries the
        count so far), and a linker that cannot be reached costs the requests nothing."""
        try:
            if name not in self.linkers:
                self.linkers[name] = _actor(linker_name(self.app, name))
            self.linkers[name].tick.options(max_task_retries=0).remote(self.index, since, pulled)
        except Exception as exc:  # noqa: BLE001 -- the verdicts are recorded; linking catches up at the next tick
            self.linkers.pop(name, None)
            log.warning("%s: linker %s not told (%s)", shard_name(self.app, self.index), name, exc)

    def admit(self, request_id, key, n):
        return self.durable.apply("admit", request_id, key, n, time.time())  # the time is journaled: replays exactly

    def issue(self, challenge_id, item):
        return self.durable.apply("issue", challenge_id, item, time.time())  # journaled with its time, as admit

    def take(self, challenge_id, account_id, request_id):
        return self.durable.apply("take", challenge_id, account_id, time.time(), request_id)

    def pull(self, name, round_):
        return self.durable.apply("pull", name, round_)

    def publish(self, name, round_, updates):
        return self.durable.apply("publish", name, round_, updates)

    def stats(self):
        return {**self.durable.obj.stats(), "pid": os.getpid(), "restored": self.durable.restored}

    def drop_state(self):
        _drop(self.directory)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LinkerActor:
    def __init__(self, app: str, name: str, spec, directory: str):
        _preload()
        self.app, self.name, self.shards, self.directory = app, name, spec.shards, directory
        self.every = _links(spec)[name]
        made = {name: spec.detectors[name]}
        self.durable = Durable(lambda: Linker(detectors.build_named(made, spec.detector_models)[name]), directory,
                               ("ingest",), every=20)
        self.since: dict[int, int] = {}

    def tick(self, shard: int, since: int, pulled: int) -> None:
        """Shard ``shard`` has recorded ``since`` linking queries since round ``pulled`` pulled it; once the shards
        together have ``every``, pull, re-cluster and publish. A tick sent before the last round pulled its shard
        (it waited here while that round ran) counts queries the round took, and is ignored."""
        linker = self.durable.obj
        if pulled < linker.pulls:
            return
        self.since[shard] = since
        if sum(self.since.values()) < self.every:
            return
        self.since = {}
        round_ = linker.pulls + 1  # the same round again if the linker crashed before ingesting it
        handles = [_actor(shard_name(self.app, i)) for i in range(self.shards)]
        rows = ray.get([h.pull.remote(self.name, round_) for h in handles])
        self.durable.apply("ingest", rows)
        ray.get([h.publish.remote(self.name, round_, verdicts)
                 for h, verdicts in zip(handles, per_shard(linker.verdicts(), self.shards))])

    def stats(self):
        return {"pid": os.getpid(), "pulls": self.durable.obj.pulls, "restored": self.durable.restored}

    def drop_state(self):
        _drop(self.directory)


def _drop(directory: str) -> None:
    """Delete a tier actor's state directory on its node, and the temporary directory above it once empty."""
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(directory))


class _Line:
    """The calls of one Serve replica to one shard. Requests that arrive while a call is in flight wait and go
    together in the next one, in arrival order: under load, one Ray call carries several requests (a call's fixed
    cost is most of what the tier adds); alone, a request goes at once. Requests and their verdicts travel as one
    pickled ``bytes`` each way, which Ray passes more cheaply than the same arrays and objects as separate arguments
    (its serializer visits each object in Python)."""

    MAX_BATCH = 16  # requests per call at most

    def __init__(self, handle):
        self.handle = handle
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._send, daemon=True, name="tier-line")
        self.thread.start()

    def submit(self, request: tuple) -> Future:
        """Send one request's items (request id, items, x, labels, probs); the future gets their verdicts."""
        future: Future = Future()
        self.queue.put((request, future))
        return future

    def _send(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get())
            try:
                blob = pickle.dumps([request for request, _ in batch], protocol=pickle.HIGHEST_PROTOCOL)
                answers = pickle.loads(ray.get(self.handle.score.remote(blob)))
            except BaseException as exc:  # the shard is gone for good, Ray is shutting down: each caller sees it
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for (_, future), answer in zip(batch, answers):
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)


class RayTier:
    """What a Serve replica holds of its app's tier: handles to the shards. One call per shard a request's keys
    live on, all in flight at once (through each shard's :class:`_Line`)."""

    def __init__(self, app: str, shards: int):
        self.handles = [_actor(shard_name(app, i)) for i in range(shards)]
        self.lines = [_Line(h) for h in self.handles]

    def score(self, request_id, items, x, labels, probs) -> dict:
        futures = [self.lines[s].submit((request_id, own, x, labels, probs))
                   for s, own in by_owner(items, len(self.handles)).items()]
        out: dict = {}
        for f in futures:
            out.update(f.result())
        return out

    def admit(self, request_id: str, key: str, n: int):
        return ray.get(self.handles[owner(key, len(self.handles))].admit.remote(request_id, key, n))

    def issue(self, account_id: str, challenge_id: str, item: dict) -> None:
        ray.get(self.handles[owner(account_id, len(self.handles))].issue.remote(challenge_id, item))

    def take(self, account_id: str, challenge_id: str, request_id: str) -> dict | None:
        return ray.get(self.handles[owner(account_id, len(self.handles))].take.remote(challenge_id, account_id,
                                                                                       request_id))


def start(spec, app: str) -> list:
    """Create the app's tier (its shards and linkers) unless it runs already, without waiting for them: they start
    while the Serve replicas do (which find them by name and whose first calls wait for them). Returns what to
    :func:`ray.get` to know they are up ([] when the spec keeps no per-key state)."""
    if not needs_tier(spec) or app in _HELD:  # none needed, or running already (a live update of its app)
        return []
    directory = spec.state_dir or tempfile.mkdtemp(prefix=f"mlsim-tier-{app}-")
    if not spec.state_dir:  # nobody could find it afterwards: removed with the tier
        _TEMPORARY[app] = directory
    opts = {"namespace": NAMESPACE, "get_if_exists": True, "lifetime": None,
            **({"runtime_env": spec.runtime_env} if spec.runtime_env else {})}
    spec = _tier_spec(spec)
    linkers = [LinkerActor.options(name=linker_name(app, name), **opts).remote(
        app, name, spec, os.path.join(directory, f"link-{name}")) for name in _links(spec)]
    shards = [ShardActor.options(name=shard_name(app, i), **opts).remote(
        app, i, spec, os.path.join(directory, f"shard-{i}")) for i in range(spec.shards)]
    _HELD[app] = shards + linkers
    return [h.stats.remote() for h in shards + linkers]


def stats(spec, app: str) -> dict | None:
    """What each shard holds and did (requests, queries, keys per detector, memory, linking's delays)."""
    if not needs_tier(spec):
        return None
    try:
        per_shard = ray.get([_actor(shard_name(app, i)).stats.remote() for i in range(spec.shards)], timeout=60)
    except (ValueError, ray.exceptions.RayError) as exc:
        log.warning("the detection tier's statistics could not be read: %s", exc)
        return None
    return {"shards": spec.shards, "per_shard": per_shard}


def stop(app: str) -> None:
    """Kill the app's tier actors (their state stays in the state directory; a temporary one is removed, on every
    node that holds a part of it)."""
    from ray.util import list_named_actors

    names = sorted((e["name"] for e in list_named_actors(all_namespaces=True)
                    if e["namespace"] == NAMESPACE and e["name"].startswith(f"{app}:")),
                   key=lambda n: ":link:" in n)  # the shards first: nothing calls the linkers after them
    temporary = app in _TEMPORARY
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # gone meanwhile
            continue
        if temporary:  # its journal and snapshots, on the actor's node
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(actor.drop_state.remote(), timeout=30)
        ray.kill(actor, no_restart=True)
    _HELD.pop(app, None)
    if temporary:
        shutil.rmtree(_TEMPORARY.pop(app), ignore_errors=True)

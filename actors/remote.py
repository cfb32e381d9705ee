"""The Ray wrappers of the actors package: the client actor, the progress board and the replica task. Everything
they run is pure and lives beside them (:mod:`actors.client`, :mod:`actors.replica`). Torch is imported only where
it is used, so that client actors that only send queries start fast."""

from __future__ import annotations

import sys

import numpy as np
import ray

from .client import Client


def _patiently(call, tries: int = 100):
    """``call()``, sent again while Serve sheds it because the replicas' queues are full (serve.max_queued_requests:
    BackPressureError), after the wait Serve suggests or a short one; and sent again when the replica it went to died
    with it in flight (RayActorError: killed, out of memory), once Serve routes it to another. The victim then sees
    the request twice if the dead replica had judged it already, as a provider sees a client's retry."""
    import time

    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    for attempt in range(tries):
        try:
            return call()
        except (BackPressureError, RayActorError) as exc:
            if attempt == tries - 1:
                raise
            time.sleep(getattr(exc, "retry_after_s", None) or min(0.05 * 2 ** attempt, 1.0))


@ray.remote(num_cpus=0)
class ClientActor:
    """A :class:`actors.client.Client` whose transport is the Serve app ``app_name``'s DeploymentHandle."""

    def __init__(self, actor_id: str, source, keys: list[str], split: str, budget: int, batch_size: int,
                 app_name: str | None, progress=None, seed: int = 0, remote: dict | None = None, **strategy):
        if "torch" in sys.modules:  # a source that computes with torch shares the cores with everyone
            sys.modules["torch"].set_num_threads(1)
        if remote is not None:  # a victim this tool does not serve (sim.remote): HTTP or the user's adapter
            from sim.remote import RemoteVictim

            self.remote = RemoteVictim(**remote, writer_id=actor_id.replace(":", "-"))
            query, solve = self.remote.query, self.remote.solve
        else:
            from ray import serve

            handle = serve.get_deployment_handle("victim", app_name)
            query = lambda key, x, actor: _patiently(lambda: handle.query.remote(key, x, actor).result())  # noqa: E731
            solve = lambda *args: _patiently(lambda: handle.solve.remote(*args).result())  # noqa: E731
            self.remote = None
        self.client = Client(
            actor_id, source, keys, split, budget, batch_size, seed=seed, **strategy, query=query, solve=solve,
            on_progress=None if progress is None else (lambda done: progress.update.remote(f"query:{actor_id}", done)))

    @ray.method(num_returns=2)
    def run(self) -> tuple[dict, tuple | None]:
        """Spend the budget; returns (the report, the transfer set): two objects, so that the transfer set can
        go to replica training without passing through the driver."""
        try:
            report = self.client.run()
        finally:
            if self.remote is not None:
                self.remote.close()
        report["node_id"] = ray.get_runtime_context().get_node_id()
        return report, self.client.source.transfer_set()


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where every client and trainer posts its progress; the driver polls it and draws the bars."""

    def __init__(self):
        self._done: dict[str, int] = {}
        self._values: dict[str, dict[int, float]] = {}

    def update(self, key: str, done: int, value: float | None = None) -> None:
        """``key`` has done ``done`` units; ``value``: a metric measured at that point (replica accuracy)."""
        self._done[key] = done
        if value is not None:
            self._values.setdefault(key, {})[done] = value

    def snapshot(self) -> dict[str, int]:
        return dict(self._done)

    def values(self) -> dict[str, dict[int, float]]:
        """key -> {units done: metric} for the keys that posted metrics."""
        return {k: dict(v) for k, v in self._values.items()}


@ray.remote(num_cpus=0.5)
def warm_up_replica_worker() -> None:
    """Imports what :func:`train_replica_task` imports and takes one optimizer step (torch loads its compiler stack
    on a process's first step): run while the victim deploys and the clients query, it leaves an idle worker that Ray
    hands the replica tasks later, so that they start training at once instead of spending seconds of CPU first."""
    import torch

    from . import replica  # noqa: F401

    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()


@ray.remote(num_cpus=0.5)
def train_replica_task(job: dict, eval_set: tuple, board=None, clean: dict | None = None, *parts) -> dict:
    """:func:`actors.replica.train_replica` on the transfer sets ``parts`` ((images, returned probabilities) of
    each actor), or, with ``job["on_clean"]``, on the victim's clean answers to the same images (``clean``: the
    log's clean answers by input digest). ``job``: ``arch``, ``input_shape``, ``num_classes``, ``cfg`` (the
    attacker's :class:`sim.config.ReplicaConfig`), ``seed``, ``key`` (what it posts under to the ProgressBoard),
    ``post_accuracy`` (also post the test accuracy after each epoch), ``robustness`` (PGD settings and samples for
    the robust accuracy, or None) and ``angles`` (with ``clean``: measure the gradient angle between returned and
    clean answers at each epoch). ``eval_set``: (test images, labels, the victim's labels). Returns the replica's
    scores (:func:`actors.replica.score`), with ``gradient_angle`` when measured and ``best`` (the best epoch's
    scores) when the replica keeps its best epoch (``replica.variant=mad_code``)."""
    import torch

    from .replica import (
        ANGLE_SAMPLE,
        gradient_angles,
        keep_best,
        score,
        train_replica,
        training_targets,
        undefended_targets,
    )

    torch.set_num_threads(1)
    x = np.concatenate([p[0] for p in parts])
    returned = np.concatenate([p[1] for p in parts])
    truth = undefended_targets(x, clean) if clean is not None else None
    y = truth if job.get("on_clean") else returned
    built, angles = {}, []  # the model, once train_replica has built it; mean angle after each epoch
    if job.get("angles") and truth is not None:
        pick = np.random.default_rng(job["seed"]).permutation(len(x))[:ANGLE_SAMPLE]
        sample = (x[pick], training_targets(returned[pick], job["cfg"].labels),
                  training_targets(truth[pick], job["cfg"].labels))
    else:
        sample = None

    track_best = job["cfg"].variant == "mad_code"  # the MAD code keeps the epoch of best test accuracy
    best: dict = {}

    def on_epoch(epoch, loss):
        if sample is not None:
            angles.append(round(float(gradient_angles(built["model"], *sample).mean()), 3))
        scores = score(built["model"], eval_set) if track_best or job.get("post_accuracy") else None
        if track_best:
            keep_best(best, epoch, scores)
        if board is not None:
            board.update.remote(job["key"], epoch, scores["test_accuracy"] if job.get("post_accuracy") else None)

    def on_build(model):
        built["model"] = model
        if sample is not None:  # the replica as built, before it has fitted any answer
            built["at_start"] = round(float(gradient_angles(model, *sample).mean()), 3)

    model = train_replica(x, y, arch=job["arch"], input_shape=job["input_shape"], num_classes=job["num_classes"],
                          cfg=job["cfg"], seed=job["seed"], on_epoch=on_epoch, on_build=on_build,
                          device=job.get("device", "cpu"))
    out = score(model, eval_set, job.get("robustness"))
    if best:
        out["best"] = best
    if angles:
        out["gradient_angle"] = {"mean": round(float(np.mean(angles)), 3), "by_epoch": angles,
                                 "at_start": built.get("at_start"), "queries": len(sample[0])}
    return out

"""The Ray wrappers of the actors package: the client actor, the progress board and the replica task. Everything
they run is pure and lives beside them (:mod:`actors.client`, :mod:`actors.replica`). Torch is imported only where
it is used, so that client actors that only send queries start fast."""

from __future__ import annotations

import sys

import numpy as np
import ray

from .client import Client


@ray.remote(num_cpus=0)
class ClientActor:
    """A :class:`actors.client.Client` whose transport is the Serve app ``app_name``'s DeploymentHandle."""

    def __init__(self, actor_id: str, source, keys: list[str], split: str, budget: int, batch_size: int,
                 app_name: str, progress=None, seed: int = 0, **strategy):
        from ray import serve

        if "torch" in sys.modules:  # a source that computes with torch shares the cores with everyone
            sys.modules["torch"].set_num_threads(1)
        handle = serve.get_deployment_handle("victim", app_name)
        self.client = Client(
            actor_id, source, keys, split, budget, batch_size, seed=seed, **strategy,
            query=lambda key, x, actor: handle.query.remote(key, x, actor).result(),
            solve=lambda *args: handle.solve.remote(*args).result(),
            on_progress=None if progress is None else (lambda done: progress.update.remote(f"query:{actor_id}", done)))

    @ray.method(num_returns=2)
    def run(self) -> tuple[dict, tuple | None]:
        """Spend the budget; returns (the report, the transfer set): two objects, so that the transfer set can
        go to replica training without passing through the driver."""
        report = self.client.run()
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
def train_replica_task(arch: str, input_shape, num_classes: int, cfg, seed: int, eval_set: tuple,
                       board=None, key: str = "replica", post_accuracy: bool = False,
                       clean: dict | None = None, *parts) -> dict:
    """:func:`actors.replica.train_replica` on the transfer sets ``parts`` ((images, returned probabilities) of
    each actor), or with ``clean`` (the log's clean answers by input digest) on the victim's undefended answers to
    the same images. Posts epochs done to a ProgressBoard (with ``post_accuracy``, also the replica's test
    accuracy after each epoch). ``cfg``: the attacker's :class:`sim.config.ReplicaConfig`; ``eval_set``: (test
    images, labels, the victim's labels). Returns the replica's test accuracy and fidelity."""
    import torch

    from .replica import score, train_replica, undefended_targets

    torch.set_num_threads(1)
    x = np.concatenate([p[0] for p in parts])
    y = undefended_targets(x, clean) if clean is not None else np.concatenate([p[1] for p in parts])
    built = {}  # the model, once train_replica has built it

    def on_epoch(epoch, loss):
        if board is not None:
            board.update.remote(key, epoch, score(built["model"], eval_set)["test_accuracy"] if post_accuracy else None)

    model = train_replica(x, y, arch=arch, input_shape=input_shape, num_classes=num_classes,
                          cfg=cfg, seed=seed, on_epoch=on_epoch, on_build=lambda m: built.update(model=m))
    return score(model, eval_set)

"""A tiny actor where every client and trainer posts its progress; the driver polls it and draws."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
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

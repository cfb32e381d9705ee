"""A tiny actor where every client and trainer posts its progress; the driver polls it and draws."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self):
        self._done: dict[str, int] = {}

    def update(self, key: str, done: int) -> None:
        self._done[key] = done

    def snapshot(self) -> dict[str, int]:
        return dict(self._done)

"""Unit tests never touch Ray: starting it here would be a bug, so make ray.init fail loudly."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray")

    monkeypatch.setattr(ray, "init", forbidden)

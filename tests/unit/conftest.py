"""Unit tests never touch Ray: starting it here would be a bug, so make ray.init fail loudly."""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def forbidden(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray")

    monkeypatch.setattr(ray, "init", forbidden)


def benchmark_module(name: str) -> Iterator:
    """A script of benchmarks/ imported as module ``name`` (for a module-scoped fixture: yields it, then forgets it;
    dataclasses look their module up in sys.modules while a class is built)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)

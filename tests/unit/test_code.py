"""Habits that keep the code so: the linter passes, and the pure cores import no Ray."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the thin Ray layer, and only it
RAY_WRAPPERS = {"sim.engine", "sim.serving", "sim.sweep", "sim.tier_actors", "actors.remote"}


def test_the_code_passes_the_linter():
    """ruff, with the rules configured in pyproject.toml."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-1000:]


def test_everything_but_the_ray_wrappers_imports_no_ray():
    """Defenses, detectors, attacks, the run core (planning, summarising), the service and the offline analysis
    run where Ray is not: importing every one of their modules leaves Ray unimported."""
    code = f"""
import importlib, pkgutil, sys
skip = {sorted(RAY_WRAPPERS)!r} + ["sim.__main__", "analysis.__main__"]
names = []
for pkg in ("sim", "actors", "analysis"):
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if info.name not in skip:
            importlib.import_module(info.name)
            names.append(info.name)
from sim import registry
for category in registry.CATEGORIES:  # and every component they register
    registry.entries(category)
print(len(names), " ".join(names))
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed, imported = proc.stdout.splitlines()
    count, *names = listed.split()
    assert {"sim.plan", "sim.summarize", "sim.summary", "actors.client", "actors.attacks.knockoff",
            "sim.detectors.prada", "analysis.replay"} <= set(names) and int(count) == len(names)
    assert imported == "[]"

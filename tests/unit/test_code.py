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
    run where Ray is not: importing every one of their modules leaves Ray unimported, and so do building and
    querying the victim service in-process and serialising a live model (as ``sim.run(victim=net)`` does)."""
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
import numpy as np, torch
from sim import models
from sim.protocol import Account
from sim.service import VictimSpec, build_service
live = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
spec = VictimSpec(victim="v", run_id="r", model=models.to_bytes(live, None, (1, 28, 28), 10), input_shape=(1, 28, 28),
                  accounts={{"k": Account("a", "attacker", "x")}},
                  detectors={{"p": {{"kind": "prada", "params": {{}}}}}}, rules={{}}, defense={{"name": "mad"}},
                  log_dir=None, log_inputs=False, max_images=8)
assert build_service(spec, "w").query("k", np.zeros((4, 1, 28, 28), np.uint8)).answered.all()
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


def test_a_detection_tier_actor_starts_without_torch():
    """A shard or linker builds its detectors through the registry, which imports every built-in detector module:
    none of them imports torch until a detector with a model is made (SAME's and msp's models live apart), so a
    shard that Ray starts or restarts costs a second or so rather than the four more torch takes on two cores."""
    code = """
import sys
from sim import detectors, limits, tier, tier_actors
tier_actors._preload()
assert "same" in detectors.names() and "msp" in detectors.names()
shard = tier.Shard(detectors.build_named({"p": {"kind": "prada"}, "l": {"kind": "link"}}, {}),
                   limits=limits.Limits(quota=10))
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_the_benchmarks_call_each_others_helpers_as_they_are_defined():
    """The benchmarks run on demand, not in the suite: a call from one into another's helper (defenses.py into
    serving.py's ``served``) with a keyword the helper lacks would fail only then. Checked here from the source."""
    import ast

    trees = {path.stem: ast.parse(path.read_text()) for path in (ROOT / "benchmarks").glob("*.py")}
    defined = {}
    for module, tree in trees.items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                a = node.args
                defined[module, node.name] = ({p.arg for p in a.posonlyargs + a.args + a.kwonlyargs},
                                              a.kwarg is not None)
    wrong, checked = [], 0
    for module, tree in trees.items():
        imported = {alias.asname or alias.name: (node.module, alias.name) for node in tree.body
                    if isinstance(node, ast.ImportFrom) and node.module in trees for alias in node.names}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
            target = imported.get(call.func.id, (module, call.func.id))
            if target in defined:
                names, any_keyword = defined[target]
                checked += 1
                wrong += [f"{module}.py:{call.lineno} {k.arg}=" for k in call.keywords
                          if k.arg and k.arg not in names and not any_keyword]
    assert checked > 20 and not wrong, wrong


def test_a_message_quotes_an_exception_by_its_first_line_even_an_empty_one():
    """One-line errors quote the exception they explain through ``errors.first_line``, which survives an empty
    message (``str(exc).splitlines()[0]`` raised IndexError there, a traceback instead of the error) and drops the
    terminal colours of Ray's and torch's messages; the code quotes no exception another way."""
    import re

    from sim.errors import first_line

    assert first_line(OSError()) == "" and first_line(ValueError("  \n")) == ""
    coloured = RuntimeError("\x1b[36mray::Shard.score()\x1b[39m failed\nTraceback ...")
    assert first_line(coloured) == "ray::Shard.score() failed"
    quoted = re.compile(r"str\(exc\)\.splitlines\(\)\[0\]")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for pkg in ("sim", "actors", "analysis", "benchmarks")
                 for path in sorted((ROOT / pkg).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if quoted.search(line)]
    assert offenders == []

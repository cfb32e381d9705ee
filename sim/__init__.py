"""Model-extraction attack/defense simulator on Ray.

Python API::

    import sim
    summary = sim.run("distributed_knockoff", ["attackers.distributed.accounts=50"])
    det = sim.detectors.build("prada", delta=0.9)
    result = det.score("account-1", images, predicted_labels)   # result.scores, result.flags
    mad = sim.defenses.build("mad", eps=0.5, victim=model)       # returned = mad(probs, images)

Submodules load on first use, so a process that needs only part of the package (a client actor that
only sends queries) does not pay for torch and scipy.
"""

import importlib

from .errors import ConfigError, DataError, Interrupted, RequestError, RunFailed, SimError

_LAZY = {
    "detectors": ("sim.detectors", None),
    "defenses": ("sim.defenses", None),
    "ScenarioConfig": ("sim.config", "ScenarioConfig"),
    "scenario_names": ("sim.config", "scenario_names"),
    "load_config": ("sim.config", "load"),
    "Summary": ("sim.summary", "Summary"),
    "read_summary": ("sim.summary", "load"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


def run(scenario, overrides=None, *, quiet: bool = False, victim=None, test_set=None, train_set=None):
    """Run a scenario (name, path, mapping or ScenarioConfig) with ``key=value`` overrides; returns the
    :class:`sim.summary.Summary` also written to ``RUN/summary.json``. ``victim``: a live ``torch.nn.Module`` to
    serve instead of the scenario's (nothing is trained), measured on ``test_set=(x, y)`` (default: the test split
    of ``victim.dataset``); ``train_set=(x, y)``: the defender's own data for detectors (default: the training
    split of ``victim.dataset``)."""
    from .engine import run as _run

    return _run(scenario, overrides, quiet=quiet, victim=victim, test_set=test_set, train_set=train_set)


__all__ = ["run", "load_config", "scenario_names", "ScenarioConfig", "Summary", "read_summary", "detectors",
           "defenses", "SimError", "ConfigError", "DataError", "RequestError", "RunFailed", "Interrupted"]

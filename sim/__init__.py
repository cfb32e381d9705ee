"""Model-extraction attack/defense simulator on Ray.

Python API::

    import sim
    summary = sim.run("distributed_knockoff", ["attackers.distributed.accounts=50"])
    det = sim.detectors.build("prada", delta=0.9)
    result = det.score("account-1", images, predicted_labels)   # result.scores, result.flags
"""

from . import defenses, detectors
from .config import ScenarioConfig, scenario_names
from .config import load as load_config
from .errors import ConfigError, DataError, RequestError, SimError


def run(scenario, overrides=None, *, quiet: bool = False) -> dict:
    """Run a scenario (name, path, mapping or ScenarioConfig) with ``key=value`` overrides; returns the
    summary dict also written to ``RUN/summary.json``."""
    from .engine import run as _run

    return _run(scenario, overrides, quiet=quiet)


__all__ = ["run", "load_config", "scenario_names", "ScenarioConfig", "detectors", "defenses",
           "SimError", "ConfigError", "DataError", "RequestError"]

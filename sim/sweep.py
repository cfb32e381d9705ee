"""Ray Tune sweeps of defense hyperparameters: each trial is one scenario run with a sampled defense.

A sweep is ``scenarios/sweeps/NAME.yaml`` (or a path to a YAML file)::

    description: …
    scenario: mad_vs_knockoff          # the base scenario every trial runs
    overrides: [undefended_baseline=false]   # scenario key=value for every trial
    space:                             # one curve per entry: a defense and its search space
      mad:       {eps: {grid: [0.1, 0.5, 1.0]}}
      mad_l2:    {name: mad, norm: l2, eps: {loguniform: [0.05, 2.0]}}
    vary:                              # optional: scenario keys crossed with every curve
      victim.quantization: [none, ptq, qat]
    num_samples: 1                     # Tune repeats the grid this often (and samples ranges as often)
    max_concurrent: 2                  # trials at once
    trial_cpus: 0.5                    # CPUs a trial reserves for itself (its replicas and Serve app: their own)
    scheduler: fifo                    # or asha: stop trials early on their replicas' accuracy per epoch
    metric: replica_accuracy_max       # what asha judges (lower is better for the defense: mode min)
    target: 0.8                        # the report's question: what L1 pushes the replica below this?

A parameter is a value (fixed), a list (a grid), or ``{grid: […]}``, ``{choice: […]}``, ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``; ``vary`` takes the same for scenario keys (victim keys: values, lists or choices
only). Each distinct victim is trained (or read from the cache) once by the driver, and the scenario's plan
(accounts, attack sources) made once unless ``vary`` changes more than the victim's training; both reach the
trials through Ray's object store. Each trial writes a
run directory under ``SWEEP_DIR/runs/<trial id>`` like any run; :mod:`analysis.sweep` builds the table, plot and
``sweep.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.resources
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import Field, ValidationError, field_validator

from . import config as config_mod
from . import storage
from . import summary as summary_mod
from .config import _Strict
from .errors import ConfigError, SimError, first_line

SAMPLERS = ("grid", "choice", "uniform", "loguniform")
SWEEP_PREFIX = "sweep."


class AshaConfig(_Strict):
    grace_period: int = Field(2, ge=1, description="replica epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="1/this of the trials go on at each rung")


class SweepConfig(_Strict):
    name: str = "custom"
    description: str = ""
    scenario: str = Field(description="base scenario every trial runs")
    overrides: list[str] = Field([], description="scenario key=value applied to every trial")
    space: dict[str, dict[str, Any]] = Field(description="curve label -> defense name and parameter space")
    vary: dict[str, Any] = Field({}, description="scenario key (dotted) -> value or space, crossed with every "
                                                 "curve: victims, attackers, anything but the defense")
    num_samples: int = Field(1, ge=1, description="Tune's num_samples: grid repeats, samples of ranges")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    trial_cpus: float = Field(0.5, gt=0, description="CPUs a trial reserves for itself")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="asha: stop bad trials early")
    metric: str = Field("replica_accuracy_max", description="metric asha judges")
    mode: Literal["min", "max"] = Field("min", description="min: a lower metric is a better defense")
    asha: AshaConfig = AshaConfig()
    target: float = Field(0.8, gt=0, lt=1, description="replica accuracy the report asks the distortion for")
    dir: str | None = Field(None, description="sweep directory or URI (default runs/sweeps/<name>-<time>)")

    @field_validator("space")
    @classmethod
    def _some_curve(cls, space):
        if not space:
            raise ValueError("must name at least one defense to sweep")
        return space


# ----------------------------------------------------------------------------------------------
# Loading and checking

def _folder():
    return importlib.resources.files("scenarios") / "sweeps"


def sweep_names() -> list[str]:
    return config_mod.yaml_names(_folder())


def _read(name_or_path: str) -> dict:
    raw = config_mod.read_mapping(name_or_path, "sweep", _folder())
    raw.setdefault("name", Path(name_or_path).stem)
    if isinstance(raw.get("scenario"), str):
        raw["scenario"] = config_mod.beside(name_or_path, raw["scenario"])
    return raw


def load(name_or_path: str, overrides: list[str] | None = None, scenario: str | None = None) -> SweepConfig:
    """A sweep by name or path, with ``KEY=VALUE`` overrides of its own keys (without the ``sweep.`` prefix;
    ``space.LABEL=null`` drops a curve) and optionally another base scenario."""
    raw = _read(name_or_path)
    conf = OmegaConf.create(raw)
    vary = {}  # vary.KEY: KEY is a dotted scenario key, one entry of vary (not a path into it)
    for item in overrides or []:
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{SWEEP_PREFIX}{key}={text!r} is not a value; expected a number, a word, "
                              f"[a, list] or {{a: mapping}}") from None
        if key.startswith("vary."):
            vary[key[len("vary."):]] = value
            continue
        try:
            OmegaConf.update(conf, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override {SWEEP_PREFIX}{item}: {first_line(exc)}") from None
    raw = OmegaConf.to_container(conf)
    if vary:  # KEY=null drops a key the file varies
        given = raw.get("vary") if isinstance(raw.get("vary"), dict) else {}
        raw["vary"] = {k: v for k, v in {**given, **vary}.items() if v is not None}
    if scenario:
        if raw.get("description") and scenario != raw.get("scenario"):  # the file's text describes its own base
            raw["description"] = (f"{str(raw['description']).strip()}\n\n(Run here on scenario `{scenario}` in place "
                                  f"of `{raw.get('scenario')}`, which the text above describes.)")
        raw["scenario"] = scenario
    if isinstance(raw.get("space"), dict):
        raw["space"] = {label: spec for label, spec in raw["space"].items() if spec is not None}
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(config_mod._one_line(exc, SweepConfig, SWEEP_PREFIX)) from None
    check_space(cfg.space)
    return cfg


def _domain(where: str, value):
    """(kind, values) of one parameter's spec: fixed, grid, choice, uniform or loguniform."""
    if isinstance(value, list):
        value = {"grid": value}
    if not isinstance(value, dict):
        return "fixed", [value]
    if len(value) != 1 or next(iter(value)) not in SAMPLERS:
        raise ConfigError(f"{where}={value!r} is not a search space; expected a value, a list, or one of "
                          + ", ".join(f"{{{s}: …}}" for s in SAMPLERS))
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}={args!r} must be a non-empty list")
    if kind in ("uniform", "loguniform"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                or args[0] >= args[1]:
            raise ConfigError(f"{where}.{kind}={args!r}; expected [low, high] with low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}.loguniform={args!r}; expected a low bound > 0")
    return kind, args


def check_space(space: dict[str, dict[str, Any]]) -> None:
    """Every curve names a known defense, only its parameters, and values it accepts (each grid or choice
    value, both ends of each range), before any trial starts."""
    from . import defenses

    for label, spec in space.items():
        where = f"{SWEEP_PREFIX}space.{label}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}={spec!r} must be a mapping of a defense's parameters (and optionally "
                              f"name: DEFENSE)")
        name = spec.get("name", label)
        if not isinstance(name, str) or "+" in name:
            raise ConfigError(f"{where}.name={name!r}: expected one defense's name ({', '.join(defenses.names())})")
        defenses.check_name(f"{where}.name" if "name" in spec else f"{where} (a defense name)", name)
        domains = {k: _domain(f"{where}.{k}", v) for k, v in spec.items() if k != "name"}
        params = defenses.get(name).params
        for key, (kind, args) in domains.items():
            param = params.get(key)
            if kind in ("uniform", "loguniform") and param is not None and (param.kind is not float or param.choices):
                raise ConfigError(f"{where}.{key}.{kind}={args!r}: {key} takes {param.expected()}, not a continuous "
                                  f"range; expected a list or {{choice: […]}}")
        first = {k: vals[0] for k, (_, vals) in domains.items()}
        for key, (_, values) in domains.items():
            for value in values:
                defenses.check_spec({"name": name, **first, key: value}, field=where)


def first_point(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A curve's defense at the first value of each parameter's space."""
    return {"name": spec.get("name", label), **{k: _domain(k, v)[1][0] for k, v in spec.items() if k != "name"}}


def param_space(space: dict[str, dict[str, Any]], vary: dict[str, Any] | None = None) -> dict:
    """Tune's search space: a grid over the curves, each with its own parameters' domains, crossed with the
    domains of the scenario keys ``vary`` changes."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a)}

    def domain(key, value):
        kind, args = _domain(key, value)
        return args[0] if kind == "fixed" else make[kind](args)

    curves = []
    for label, spec in space.items():
        defense = {"name": spec.get("name", label)}
        defense.update({key: domain(key, value) for key, value in spec.items() if key != "name"})
        curves.append({"curve": label, "defense": defense})
    return {"trial": tune.grid_search(curves), "vary": {k: domain(k, v) for k, v in (vary or {}).items()}}


VICTIM_KEYS = ("victim.", "data.", "seed", "cache_dir")  # what a trained victim depends on


def _shapes_victim(key: str) -> bool:
    return key.startswith(VICTIM_KEYS[:2]) or key in VICTIM_KEYS[2:]


def victim_settings(vary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the keys in ``vary`` a victim depends on (their grid and choice values): the victims a
    sweep trains before its trials."""
    combos = [{}]
    for key, value in vary.items():
        if _shapes_victim(key):
            combos = [{**c, key: v} for c in combos for v in _domain(key, value)[1]]
    return combos


def shares_plan(vary: dict[str, Any]) -> bool:
    """Whether every trial can use one plan: ``vary`` changes only how the victim is trained."""
    return all(k.startswith("victim.") and k not in ("victim.dataset", "victim.name") for k in vary)


def victim_id(cfg: config_mod.ScenarioConfig) -> str:
    """What tells a sweep's victims apart: the victim settings, data, seed and cache, as JSON."""
    return json.dumps({"victim": cfg.victim.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                       "seed": cfg.seed, "cache_dir": cfg.cache_dir}, sort_keys=True)


def base_config(sweep: SweepConfig, overrides: list[str]) -> config_mod.ScenarioConfig:
    """The scenario every trial starts from: the base scenario, the sweep's overrides, then the command
    line's. The defense is what the sweep varies, and each trial has its own run directory."""
    for item in [*sweep.overrides, *overrides]:
        key = item.split("=", 1)[0]
        if key == "defense" or key.startswith("defense."):
            raise ConfigError(f"{item!r}: the defense is what the sweep varies; expected its space under "
                              f"{SWEEP_PREFIX}space.LABEL.PARAM=… instead")
        if key == "run_dir":
            raise ConfigError(f"{item!r}: each trial has its own run directory under the sweep's; expected "
                              f"{SWEEP_PREFIX}dir=PATH to place the sweep")
    # what the trials put on top, one varied key at a time (each setting an override may need is one key, so no
    # combination of them is needed): a setting of the overrides may need one of them to have effect
    variants = []
    for key, value in sweep.vary.items():
        with contextlib.suppress(ConfigError):  # a malformed space is reported below, with its key
            variants += [config_mod.nest({key: v}) for v in _domain(key, value)[1]]
    base = config_mod.load(sweep.scenario, [*sweep.overrides, *overrides], variants=variants)
    base.check_run()
    if not base.attackers:
        raise ConfigError(f"scenario {base.name!r} has no attackers, so a sweep has no replica to measure; "
                          f"expected a scenario with at least one (attackers.ID.attack=knockoff …)")
    raw = base.model_dump()
    for key, value in sweep.vary.items():
        where = f"{SWEEP_PREFIX}vary.{key}"
        if key == "defense" or key.startswith("defense.") or key in ("run_dir", "name"):
            raise ConfigError(f"{where}: the defense and the run directory are the sweep's own; expected a scenario "
                              f"key such as victim.quantization")
        kind, values = _domain(where, value)
        if _shapes_victim(key) and kind in ("uniform", "loguniform"):
            raise ConfigError(f"{where}.{kind}={values!r}: every victim is trained before the trials start, so its "
                              f"settings must be finite; expected a value, a list or {{choice: […]}}")
        for v in values:
            try:
                config_mod.load(raw, config_mod.nest({key: v}))
            except ConfigError as exc:
                raise ConfigError(f"{where}={v!r}: {exc}") from None
    for label, spec in sweep.space.items():  # what a defense needs of the scenario (a victim kind)
        try:
            config_mod.validate({**raw, "defense": first_point(label, spec)})
        except ConfigError as exc:
            raise ConfigError(f"{SWEEP_PREFIX}space.{label} on scenario {base.name!r}: {exc}") from None
    return base


# ----------------------------------------------------------------------------------------------
# One trial

def trial(config: dict, *, base: dict, victims: dict, plan, sweep_dir: str) -> None:
    """A Tune trial: the base scenario with this trial's defense and ``vary`` settings, run in its own run
    directory on the victim the driver prepared for those settings (``victims``: :func:`victim_id` -> victim).
    Reports the replicas' accuracy after each epoch (for early stopping), then the run's metrics."""
    import ray
    from ray import tune

    from analysis.sweep import flat_metrics

    from . import engine

    trial_id = tune.get_context().get_trial_id()
    run_dir = storage.join(sweep_dir, "runs", trial_id)
    epochs = {aid: a["replica"]["epochs"] for aid, a in base["attackers"].items()}

    def final(summary) -> dict:  # the run's metrics; Tune's schedulers take no None
        return {"replica_epoch": max(epochs.values()), "run_dir": run_dir,
                **{k: v for k, v in flat_metrics(summary).items() if v is not None}}

    finished = summary_mod.read(run_dir)
    if finished is not None:  # the run finished, but the sweep was interrupted before Tune noted it
        tune.report(final(finished))
        return
    storage.remove_tree(run_dir)  # an attempt cut short (interrupted, errored) starts afresh
    storage.makedirs(run_dir)
    vary = dict(config.get("vary") or {})
    cfg = config_mod.load({**base, "defense": dict(config["trial"]["defense"]), "run_dir": run_dir},
                          config_mod.nest(vary))
    victim = victims.get(victim_id(cfg)) or engine.train_victim(cfg, quiet=True)
    info = {"trial_id": trial_id, "curve": config["trial"]["curve"], "defense": cfg.defense.spec(), "vary": vary,
            "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    trial_json = storage.join(run_dir, "trial.json")
    storage.write_text(trial_json, json.dumps(info, indent=2))
    reported = {"epoch": 0}
    utility = engine.defended_test_set(cfg, victim)  # what honest users get: known before any query

    def on_replica_epoch(values: dict) -> None:
        for metrics in epoch_reports(values, epochs, reported["epoch"]):
            reported["epoch"] = metrics["replica_epoch"]
            metrics.update(utility)
            storage.write_text(trial_json, json.dumps({**info, "last": metrics}, indent=2))
            tune.report(metrics)

    summary = engine.run(cfg, quiet=True, victim=victim, plan=plan, app=f"{cfg.victim.name}-{trial_id}",
                         on_replica_epoch=on_replica_epoch)
    metrics = final(summary)
    storage.write_text(trial_json, json.dumps({**info, "last": metrics}, indent=2))
    tune.report(metrics)


def epoch_reports(values: dict[str, dict[int, float]], epochs: dict[str, int], after: int) -> list[dict]:
    """The per-epoch reports now due, in order: ``values`` maps each attacker whose replica trains to its test
    accuracy per epoch so far; ``epochs``, each attacker's replica epochs. An epoch is due once every replica
    has reached it (a finished replica stays at its last accuracy); the longest replica's last epoch is not,
    as it comes with the run's summary."""
    if not values or any(not v for v in values.values()):
        return []  # a replica has not finished its first epoch yet
    last = max(epochs[aid] for aid in values)
    reached = min(last if max(v) >= epochs[aid] else max(v) for aid, v in values.items())
    reports = []
    for epoch in range(after + 1, min(reached, last - 1) + 1):
        accs = {f"{aid}.replica_test_accuracy": v[max(e for e in v if e <= epoch)] for aid, v in values.items()}
        reports.append({"replica_epoch": epoch, "replica_accuracy_max": max(accs.values()), **accs})
    return reports


# ----------------------------------------------------------------------------------------------
# The driver

def _latest(name: str) -> str | None:
    """The latest sweep ``name`` under runs/sweeps whose trials started (one that stopped before has nothing to
    continue)."""
    root = os.path.abspath(os.path.join("runs", "sweeps"))
    found = [d for d in storage.listdir(root)
             if d.startswith(f"{name}-") and os.path.isdir(os.path.join(root, d, "tune"))]
    return os.path.join(root, found[-1]) if found else None


def _sweep_dir(cfg: SweepConfig, resume: bool) -> str:
    if cfg.dir:
        return cfg.dir if "://" in cfg.dir else os.path.abspath(os.path.expanduser(cfg.dir))
    if resume:
        latest = _latest(cfg.name)
        if latest is None:
            raise ConfigError(f"resume=true but runs/sweeps holds no sweep {cfg.name!r}; expected "
                              f"{SWEEP_PREFIX}dir=PATH of the sweep to continue")
        return latest
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join("runs", "sweeps", f"{cfg.name}-{stamp}"))


def _progress_callback(total: int):
    """A Tune callback that prints one line per finished (or failed) trial."""
    from ray.tune import Callback

    class Progress(Callback):
        @staticmethod
        def _label(trial) -> str:
            t = trial.config["trial"]
            shown = {**{k: v for k, v in t["defense"].items() if k != "name"}, **(trial.config.get("vary") or {})}
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in shown.items()) or t["defense"]["name"]
            return f"{t['curve']} ({params})"

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"started {self._label(trial)}", file=sys.stderr, flush=True)

        def _line(self, trials, trial, what: str) -> None:
            # counted from Tune's own trial states: right after a restore too
            done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
            r = trial.last_result or {}
            nums = "no result"
            if r.get("replica_accuracy_max") is not None:
                nums = (f"defended acc {r['defended_test_accuracy']:.3f}, L1 {r['test_l1_mean']:.3f}, best replica "
                        f"{r['replica_accuracy_max']:.3f}")
                if "run_dir" not in r:  # stopped before its replicas finished
                    nums += f" at epoch {r['replica_epoch']}"
            print(f"[{done}/{total}] {self._label(trial)}: {what}; {nums}", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, "done" if "run_dir" in (trial.last_result or {}) else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            try:  # Tune may not hold the error yet: the summary at the end gives it
                found = trial.get_error()
                error = f" ({str(found).strip().splitlines()[-1][:300]})" if found else ""
            except Exception:  # the message is a courtesy: never let it stop the sweep
                error = ""
            self._line(trials, trial, f"error{error}")

    return Progress()


def _trial_count(cfg: SweepConfig) -> int:
    """Trials the sweep will run: per curve the product of its grid sizes, times num_samples."""
    total = 0
    for label, spec in cfg.space.items():
        n = 1
        for key, value in spec.items():
            if key != "name":
                kind, args = _domain(key, value)
                n *= len(args) if kind == "grid" else 1
        total += n
    for key, value in cfg.vary.items():
        kind, args = _domain(key, value)
        total *= len(args) if kind == "grid" else 1
    return total * cfg.num_samples


def run(name_or_path: str, overrides: list[str] | None = None, *, scenario: str | None = None,
        resume: bool = False, quiet: bool = False) -> dict:
    """Run (or with ``resume`` continue) a sweep. ``overrides``: ``sweep.KEY=VALUE`` for the sweep, any
    other ``KEY=VALUE`` for the scenario of every trial. Returns :func:`analysis.sweep.write_report`'s
    output plus ``dir`` and ``interrupted``."""
    overrides = list(overrides or [])
    own = [o[len(SWEEP_PREFIX):] for o in overrides if o.startswith(SWEEP_PREFIX)]
    rest = [o for o in overrides if not o.startswith(SWEEP_PREFIX)]
    if resume:
        return _resume(name_or_path, own, rest, scenario, quiet)
    cfg = load(name_or_path, own, scenario)
    base = base_config(cfg, rest)
    _tune_config(cfg, base)  # the scheduler's settings, checked before any training
    from .engine import check_ray_address

    check_ray_address(base)  # and where the trials will run
    sweep_dir = _sweep_dir(cfg, resume=False)
    try:
        if storage.exists(storage.join(sweep_dir, "sweep.yaml")):
            raise ConfigError(f"{SWEEP_PREFIX}dir={sweep_dir!r} already holds a sweep; expected a new directory, "
                              f"or resume=true to continue it")
        storage.makedirs(sweep_dir)
        storage.write_text(storage.join(sweep_dir, "sweep.yaml"),
                           yaml.safe_dump({**cfg.model_dump(mode="json"), "overrides": [*cfg.overrides, *rest],
                                           "dir": sweep_dir}, sort_keys=False))  # the command line's too
        storage.write_text(storage.join(sweep_dir, "base.yaml"), config_mod.to_yaml(base))
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{SWEEP_PREFIX}dir={sweep_dir!r} cannot be written ({first_line(exc)}); expected "
                          f"a writable directory or a URI pyarrow knows (file://, s3://, gs://, hdfs://)") from None
    with _sigterm_stops_like_ctrl_c(name_or_path, sweep_dir):
        return _execute(cfg, base, sweep_dir, restore=False, quiet=quiet, given=name_or_path)


def _resume(name_or_path: str, own: list[str], rest: list[str], scenario: str | None, quiet: bool) -> dict:
    extra = [o for o in own if not o.startswith("dir=")] + rest + ([f"scenario={scenario}"] if scenario else [])
    if extra:
        raise ConfigError(f"resume=true continues the sweep as it was started, but {extra[0]!r} would change it; "
                          f"expected only sweep={name_or_path} and {SWEEP_PREFIX}dir=PATH")
    given = next((o[len("dir="):] for o in own if o.startswith("dir=")), None)
    probe = SweepConfig.model_construct(name=_read(name_or_path)["name"], dir=given)
    sweep_dir = _sweep_dir(probe, resume=True)
    try:
        found = storage.exists(storage.join(sweep_dir, "sweep.yaml"))
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{SWEEP_PREFIX}dir={sweep_dir!r} cannot be read ({first_line(exc)})") from None
    if not found:
        raise ConfigError(f"{SWEEP_PREFIX}dir={sweep_dir!r} holds no sweep to resume; expected the directory "
                          f"a sweep was started in")
    try:
        cfg = SweepConfig.model_validate(yaml.safe_load(storage.read_text(storage.join(sweep_dir, "sweep.yaml"))))
    except (ValidationError, yaml.YAMLError) as exc:
        raise ConfigError(f"{sweep_dir}/sweep.yaml is not a sweep this version can resume: "
                          f"{first_line(exc)}") from None
    base = config_mod.load(yaml.safe_load(storage.read_text(storage.join(sweep_dir, "base.yaml"))))
    with _sigterm_stops_like_ctrl_c(name_or_path, sweep_dir):
        return _execute(cfg, base, sweep_dir, restore=True, quiet=quiet, given=name_or_path)


def _execute(cfg: SweepConfig, base: config_mod.ScenarioConfig, sweep_dir: str, restore: bool,
             quiet: bool, given: str) -> dict:
    """Run the sweep's trials in Tune (``restore``: continue them); ``given``: the sweep as the user named it (a
    name or a file), for the command that continues it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our one line per trial
    from ray import tune

    from analysis.sweep import write_report

    from . import engine
    from .plan import make_plan
    from .serving import start_serve

    total = _trial_count(cfg)
    print(f"sweep {cfg.name}: {total} trials of {base.name} (up to {cfg.max_concurrent} at once) -> {sweep_dir}",
          file=sys.stderr, flush=True)
    victims = {}  # once each, for every trial
    for settings in victim_settings(cfg.vary):
        vcfg = config_mod.load(base.model_dump(), config_mod.nest(settings))
        if victim_id(vcfg) not in victims:
            victims[victim_id(vcfg)] = engine.train_victim(vcfg, quiet)
    first = next(iter(victims.values()))
    plan = make_plan(base, first.dataset) if shares_plan(cfg.vary) else None  # else each trial makes its own
    started = time.perf_counter()
    with engine.ray_session(base):
        # once, before trials race to start it
        start_serve(base.serve.port, base.serve.http, base.serve.request_timeout_s)
        trainable = tune.with_resources(
            tune.with_parameters(trial, base=base.model_dump(mode="json"), victims=victims, plan=plan,
                                 sweep_dir=sweep_dir),
            {"cpu": cfg.trial_cpus})
        tune_dir = storage.join(sweep_dir, "tune")
        if restore:
            if not tune.Tuner.can_restore(tune_dir):
                raise SimError(f"{SWEEP_PREFIX}dir={sweep_dir!r} has no Tune experiment state to restore (it "
                               f"stopped before its first trial started); expected a sweep to continue: start this "
                               f"one again with another {SWEEP_PREFIX}dir, or after deleting this directory")
            tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space(cfg.space, cfg.vary),
                               tune_config=_tune_config(cfg, base), run_config=tune.RunConfig(
                                   name="tune", storage_path=sweep_dir, verbose=0,
                                   callbacks=[_progress_callback(total)],
                                   failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        trials = tune.ExperimentAnalysis(tune_dir).trials
        # after Ctrl-C, Tune kills the trials still running after 10 s, before they delete their Serve apps
        from .serving import remove

        for app in {f"{base.victim.name}-{t.trial_id}" for t in trials}:
            remove(app)
    seconds = time.perf_counter() - started
    errors = {os.path.basename(str(r.path)): r.error for r in grid if r.error}
    statuses = {}
    for t in trials:
        finished = storage.exists(storage.join(sweep_dir, "runs", t.trial_id, "summary.json"))
        # a run that wrote its summary is done, though the sweep stopped before Tune noted it (as its table says)
        status = "done" if finished else {"TERMINATED": "stopped early", "ERROR": "error"}.get(t.status, "unfinished")
        error = errors.get(t.trial_id)
        statuses[t.trial_id] = {"status": status, "curve": t.config["trial"]["curve"],
                                "defense": t.config["trial"]["defense"], "vary": t.config.get("vary") or {},
                                "error": str(error).strip().splitlines()[-1][:300] if error else None}
    interrupted = len(statuses) < total or any(s["status"] == "unfinished" for s in statuses.values())
    state_path = storage.join(sweep_dir, "sweep.json")
    state = json.loads(storage.read_text(state_path)) if storage.exists(state_path) else {"sessions": []}
    state["sessions"].append({"ended": dt.datetime.now().isoformat(timespec="seconds"),
                              "seconds": round(seconds, 1), "restored": restore})
    state["trials"] = statuses
    storage.write_text(state_path, json.dumps(state, indent=2))
    out = write_report(sweep_dir)
    out.update(dir=sweep_dir, name=cfg.name, given=given, interrupted=interrupted, seconds=round(seconds, 1),
               total=total)
    return out


def _trial_dirname(t) -> str:
    """Tune's folder of a trial: its id, the same as the trial's run directory under ``runs/``."""
    return t.trial_id


def _tune_config(cfg: SweepConfig, base: config_mod.ScenarioConfig):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .plan import derive_seed

    allowed = ["replica_accuracy_max", *[f"{aid}.replica_test_accuracy" for aid in base.attackers]]
    if cfg.metric not in allowed:
        raise ConfigError(f"{SWEEP_PREFIX}metric={cfg.metric!r} is not reported while replicas train; "
                          f"expected one of: {', '.join(allowed)}")
    # ranges and choices sampled from the scenario's seed: the same sweep samples the same settings (the generator
    # holds the trials at once to max_concurrent: Tune ignores max_concurrent_trials beside a generator of one's own)
    kwargs = {"num_samples": cfg.num_samples, "reuse_actors": True, "trial_dirname_creator": _trial_dirname,
              "search_alg": BasicVariantGenerator(random_state=derive_seed(base.seed, "sweep"),
                                                  max_concurrent=cfg.max_concurrent)}
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        epochs = max(a.replica.epochs for a in base.attackers.values())
        kwargs.update(metric=cfg.metric, mode=cfg.mode, scheduler=ASHAScheduler(
            time_attr="replica_epoch", max_t=epochs, grace_period=min(cfg.asha.grace_period, epochs),
            reduction_factor=cfg.asha.reduction_factor))
    return tune.TuneConfig(**kwargs)


def format_result(out: dict) -> str:
    """What the CLI prints when a sweep ends."""
    rows = out["rows"]
    done = sum(r["status"] == "done" for r in rows)
    waiting = out.get("total", len(rows)) - len(rows)
    lines = [f"sweep -> {out['dir']}: {len(rows)} trials, {done} done"
             f"{f' ({waiting} more not started)' if waiting > 0 else ''}, in {out['seconds']:.0f} s",
             f"table:  {out['parquet']} (and .csv)", f"plot:   {out['plot']}", f"report: {out['markdown']}"]
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        lines.append(f"failed: {len(failed)} of {len(rows)} trials; the first, {failed[0]['trial_id']} "
                     f"({failed[0]['curve']}): {failed[0].get('error') or 'no message'}")
    if out["interrupted"]:
        lines.append(f"interrupted: continue with {resume_command(out['given'], out['dir'])}")
    return "\n".join(lines)


def resume_command(given: str, sweep_dir: str) -> str:
    """The command that continues the sweep in ``sweep_dir``, started as ``sweep=given`` (a name or a file)."""
    return f"python -m sim sweep={given} {SWEEP_PREFIX}dir={sweep_dir} resume=true"


class _NotTunesResumeHint(logging.Filter):
    """Tune's own hint after Ctrl-C (``Tuner.restore(…)``) is not how this tool continues a sweep: the CLI prints
    the command that does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c(given: str, sweep_dir: str):
    """SIGTERM (``timeout``, a batch scheduler, systemd) stops a sweep as Ctrl-C does: Tune stops the trials and
    saves its state, and the report is written. Sent to the whole process group, it stopped Ray's processes too:
    then nothing can be saved (Tune saved its state as trials finished), and the sweep says how to continue."""
    from .engine import ray_stopped

    def on_sigterm(signum, frame):
        if ray_stopped():
            print(f"\ninterrupted: SIGTERM stopped Ray's processes too; the trials that finished are kept. Continue "
                  f"with {resume_command(given, sweep_dir)}", file=sys.stderr, flush=True)
            os._exit(130)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: before Tune runs
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)  # to Tune's own handler while it runs (else Python's)

    tune_log = logging.getLogger("ray.tune.tune")
    hint = _NotTunesResumeHint()
    tune_log.addFilter(hint)
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        yield
    finally:
        tune_log.removeFilter(hint)
        if main:
            signal.signal(signal.SIGTERM, before)

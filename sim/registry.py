"""Every component declares itself once, and one registry finds it by category and name.

Categories (and where their built-ins live; every module there is imported on the first lookup):

- ``dataset`` (:mod:`sim.data`), ``model`` (:mod:`sim.models`): a loader or factory function;
- ``defense`` (:mod:`sim.defenses`), ``detector`` (:mod:`sim.detectors`), ``attack`` (:mod:`actors.attacks`):
  a :class:`Component` class that declares its parameters as :class:`Param` objects.

A component joins the registry with ``@register(CATEGORY)`` (its ``name`` attribute) or
``@register(CATEGORY, NAME)``. Configuration checks, ``python -m sim help``, the generated configuration
reference, the Serve replica, the summary and the offline analysis all ask the declaration, so a new
component is one new module in its category's package.

Plug-ins join the same registry without touching the package: a setting may name a component ``module:attr``
(imported and checked against its category's interface on first use), and installed distributions may declare
entry points in the groups ``mlsim.datasets``, ``mlsim.models``, ``mlsim.defenses``, ``mlsim.detectors`` and
``mlsim.attacks`` (loaded with the built-ins). :func:`runtime_env` is what Ray workers need to find the same
plug-ins: the modules' code and the names they were registered under.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import pkgutil
import sysconfig
from abc import ABC
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .errors import ConfigError, inert

log = logging.getLogger(__name__)

CATEGORIES = {  # category -> (the module or package of its built-ins, what a user-facing message calls one)
    "dataset": ("sim.data", "dataset"),
    "model": ("sim.models", "architecture"),
    "defense": ("sim.defenses", "defense"),
    "detector": ("sim.detectors", "detector"),
    "attack": ("actors.attacks", "attack"),
}
_entries: dict[str, dict[str, Any]] = {c: {} for c in CATEGORIES}
_modules: dict[str, list[str]] = {}  # category -> its built-in modules, in the order they are listed
_plugins: dict[str, dict[str, str]] = {c: {} for c in CATEGORIES}  # category -> name -> "module:attr" it came from
_broken: dict[str, dict[str, str]] = {c: {} for c in CATEGORIES}  # entry points that did not load -> why
GROUPS = {c: f"mlsim.{c}s" for c in CATEGORIES}  # entry-point group of each category
PLUGINS_ENV = "MLSIM_PLUGINS"  # JSON {category: {name: "module:attr"}}: the plug-ins a Ray worker registers too
_BASES = {  # category -> the class its components subclass (functions otherwise)
    "defense": "sim.defenses.base:Defense", "detector": "sim.detectors.base:Detector",
    "attack": "actors.attacks.base:Attack"}


def register(category: str, name: str | None = None) -> Callable:
    """Decorator: add a component class (named by its ``name`` attribute unless ``name`` is given) or a
    function (dataset loader, model factory) to ``category``."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of: {', '.join(CATEGORIES)}")

    def add(obj):
        key = name or getattr(obj, "name", None)
        if not key:
            raise ValueError(f"{obj!r} has no name to register under")
        if key in _entries[category] and _entries[category][key] is not obj:
            raise ValueError(f"{category} {key!r} is registered twice")
        if inspect.isclass(obj) and issubclass(obj, Component) and obj not in _entries[category].values():
            obj.name = key  # (a built-in named by module:attr keeps its own name)
        _entries[category][key] = obj
        return obj

    return add


def _discover(category: str) -> list[str]:
    """Import the built-in modules of ``category`` once (importing a module registers its components); returns
    their names in order (the package, then its modules by name)."""
    if category not in _modules:
        module = importlib.import_module(CATEGORIES[category][0])
        found = [module.__name__] + [f"{module.__name__}.{info.name}"
                                     for info in pkgutil.iter_modules(getattr(module, "__path__", []))
                                     if not info.name.startswith("_")]
        for name in found[1:]:
            importlib.import_module(name)
        _modules[category] = found
        load_installed(category)
    return _modules[category]


def load_installed(category: str) -> None:
    """Register the plug-ins of ``category`` that installed distributions declare as entry points, and those this
    process was handed in :data:`PLUGINS_ENV` (a Ray worker of a run that uses them). One that does not load is
    remembered with the reason, which naming it reports."""
    declared = [(ep.name, ep.value, f"entry point {ep.name!r} of group {GROUPS[category]}")
                for ep in importlib.metadata.entry_points().select(group=GROUPS[category])]
    handed = json.loads(os.environ.get(PLUGINS_ENV) or "{}").get(category, {})
    declared += [(name, target, f"plug-in {name!r}") for name, target in handed.items()]
    for name, target, what in declared:
        if name in _entries[category]:
            if _plugins[category].get(name) != target and name not in _broken[category]:
                kept = _plugins[category].get(name) or "the built-in"
                _broken[category][name] = (f"{what} ({target}) clashes with the {category} of that name "
                                           f"({kept}), which is kept; expected a name of its own")
                log.warning("%s", _broken[category][name])
            continue
        try:
            register(category, name)(load(category, target, what))
            _plugins[category][name] = target
        except (ConfigError, ValueError) as exc:
            why, named = str(exc), f"{what}={target!r}: "
            handed_as_named = what.startswith("plug-in") and name == target  # the name says it all: not twice
            _broken[category][name] = why[len(named):] if handed_as_named and why.startswith(named) else why


def load(category: str, target: str, field: str) -> Any:
    """The object ``module:attr`` names, checked against ``category``'s interface; a one-line ConfigError naming
    ``field`` otherwise (a module that does not import, a missing attribute, a wrong base class, a method not
    implemented, a parameter that is not declared with :class:`Param`)."""
    module_name, _, attr = target.partition(":")
    where = f"{field}={target!r}"
    if not module_name or not attr:
        raise ConfigError(f"{where} must be a registered name or module:attr")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"{where}: no module named {exc.name!r} on this Python's path; expected an "
                              f"importable module (run from its folder, add it to PYTHONPATH or install it)") from None
        raise ConfigError(f"{where}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module: whatever it raises is the user's to fix
        raise ConfigError(f"{where}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    check_interface(category, obj, where)
    return obj


def check_interface(category: str, obj: Any, where: str) -> None:
    """A one-line ConfigError if ``obj`` cannot serve as a component of ``category``."""
    if category not in _BASES:
        if not callable(obj):
            shape = {"model": "(input_shape, num_classes) -> nn.Module", "dataset": "() -> Dataset",
                     "client": "(uint8 images (N, C, H, W)) -> probabilities (N, K)"}.get(category, "")
            raise ConfigError(f"{where} is {type(obj).__name__} {obj!r}; expected a callable {shape}")
        return
    module_name, _, base_name = _BASES[category].partition(":")
    base = getattr(importlib.import_module(module_name), base_name)
    if not inspect.isclass(obj) or not issubclass(obj, base):
        raise ConfigError(f"{where} is {obj!r}; expected a subclass of {module_name.rsplit('.', 1)[0]}."
                          f"{base_name} ({_BASES[category].replace(':', '.')})")
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(f"{where} does not implement {', '.join(missing)}; expected every abstract method of "
                          f"{base_name} to be defined")
    if not isinstance(obj.params, dict):
        raise ConfigError(f"{where}.params is {type(obj.params).__name__}; expected a dict of name -> Param")
    for key, p in obj.params.items():
        if not isinstance(p, Param):
            raise ConfigError(f"{where} declares parameter {key!r} as {p!r}; expected a sim.registry.Param")
        try:
            p.check(where, key, p.default)
        except ConfigError:
            raise ConfigError(f"{where} declares parameter {key!r} with default {p.default!r}, which its own "
                              f"declaration refuses; expected a default that is {p.expected()}") from None
    obj._check_class(where)


def forget_plugins() -> None:
    """Drop every plug-in from the registry (and what failed to load), so that the next lookup loads the installed
    ones afresh: for a process whose path has changed (tests)."""
    for category in CATEGORIES:
        for name in _plugins[category]:
            _entries[category].pop(name, None)
        _plugins[category].clear()
        _broken[category].clear()
        if category in _modules:
            load_installed(category)


def plugins(category: str | None = None) -> dict[str, dict[str, str]] | dict[str, str]:
    """The plug-ins registered in this process: name -> "module:attr" (of one category, or category -> that)."""
    for c in [category] if category else CATEGORIES:
        _discover(c)
    return dict(_plugins[category]) if category else {c: dict(p) for c, p in _plugins.items() if p}


def not_loaded() -> dict[str, dict[str, str]]:
    """category -> {name: why} of the installed plug-ins that did not load or clash with another of their name."""
    for category in CATEGORIES:
        _discover(category)
    return {c: dict(b) for c, b in _broken.items() if b}


def broken(components) -> dict[tuple[str, str], str]:
    """(category, name) -> why, for the ``components`` that do not load in this process (a Ray worker's check); the
    why does not repeat the name."""
    out = {}
    for category, name in components:
        try:
            check_name(category, category, name)
        except ConfigError as exc:
            why, named = str(exc), f"{category}={name!r}"
            why = why[len(named):].removeprefix(" did not load").lstrip(": ") if why.startswith(named) else why
            out[(category, name)] = why
    return out


def is_builtin(category: str, name: str) -> bool:
    return name in entries(category) and name not in _plugins[category]


def code_id(category: str, name: str) -> str:
    """A digest of the source file that defines component ``name`` (its source where the file cannot be read): what
    a cache keys a plug-in by beside its name, so that an edited plug-in is not taken for the one cached."""
    import hashlib

    obj = get(category, name)
    try:
        text = open(inspect.getsourcefile(obj) or "", "rb").read()
    except (OSError, TypeError):
        try:
            text = inspect.getsource(obj).encode()
        except (OSError, TypeError):
            text = repr(obj).encode()
    return hashlib.sha1(text).hexdigest()[:16]


def runtime_env(components, extra: list[str] = ()) -> dict | None:
    """What a Ray worker needs to find the plug-ins among ``components`` ((category, name) pairs; None when there are
    none): their names in :data:`PLUGINS_ENV`, and on ``PYTHONPATH`` the folder each one's top-level module was
    found in, unless it is installed (site-packages). The folders must exist where the workers run: this machine,
    or every node of a cluster that shares them; elsewhere, install the plug-ins' package on every node. ``extra``:
    more ``module:attr`` targets whose modules workers import (a remote victim's adapter)."""
    used: dict[str, dict[str, str]] = {}
    for category, name in components:
        if name in _plugins[category]:
            used.setdefault(category, {})[name] = _plugins[category][name]
    if not used and not extra:
        return None
    installed = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    folders = []
    for targets in [*used.values(), {t: t for t in extra}]:
        for target in targets.values():
            top = importlib.import_module(target.partition(":")[0].split(".")[0])
            path = os.path.realpath(top.__path__[0] if hasattr(top, "__path__") else top.__file__)
            if not any(path.startswith(root + os.sep) for root in installed):
                folders.append(os.path.dirname(path))
    env = {PLUGINS_ENV: json.dumps(used, sort_keys=True)}
    if folders:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*folders, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return {"env_vars": env}


def entries(category: str) -> dict[str, Any]:
    """name -> component of ``category``: the built-ins in the order of their modules and, within a module, of
    registration; then the others in the order they registered."""
    modules = _discover(category)
    rank = {name: i for i, name in enumerate(modules)}
    listed = list(_entries[category].items())
    order = sorted(range(len(listed)), key=lambda i: (rank.get(listed[i][1].__module__, len(modules)), i))
    return dict(listed[i] for i in order)


def names(category: str) -> list[str]:
    return list(entries(category))


def builtins(category: str) -> dict[str, Any]:
    """name -> component of ``category``, the package's own only (no plug-ins)."""
    return {n: obj for n, obj in entries(category).items() if n not in _plugins[category]}


def check_name(category: str, field: str, name: Any, also: list[str] = ()) -> None:
    """Known names pass; ``module:attr`` is loaded and registered under that name; anything else is a one-line
    error naming the field, the name and the known ones (and ``also``: other forms the field takes)."""
    known = names(category)
    if name in known:
        return
    if name in _broken[category]:
        raise ConfigError(f"{field}={name!r} did not load: {_broken[category][name]}")
    if isinstance(name, str) and ":" in name:
        register(category, name)(load(category, name, field))
        _plugins[category][name] = name
        return
    raise ConfigError(f"{field}={name!r} is not a known {CATEGORIES[category][1]}; expected one of: "
                      f"{', '.join([*known, *also])}, or module:attr of your own")


def get(category: str, name: str, field: str | None = None) -> Any:
    """The component ``name`` of ``category``; ``field`` names the setting in the error if it is unknown."""
    check_name(category, field or category, name)
    return _entries[category][name]


def build(category: str, name: str, *args, **params) -> Any:
    """An instance of component ``name`` (its parameters checked by its declaration)."""
    return get(category, name)(*args, **params)


def summary_line(obj: Any) -> str:
    """The first paragraph of a component's docstring, on one line: its description in help and the reference."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# Declared parameters

@dataclass(frozen=True)
class Param:
    """One declared parameter: its default, type and allowed values, and a line of help.

    ``kind`` is float, int, str, bool or list (a non-empty list of ``choices``). A parameter whose default is
    None, or that is ``nullable``, may also be set to null. ``brief=False`` keeps it out of one-line summaries
    (training settings, say)."""

    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low is excluded (x > low rather than x >= low)
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""
    brief: bool = True
    nullable: bool = False

    def expected(self) -> str:
        if self.kind is list:
            what = f"a non-empty list of: {', '.join(self.choices or ())}"
        elif self.choices:
            what = f"one of: {', '.join(self.choices)}"
        elif self.kind is bool:
            what = "true or false"
        elif self.kind is str:
            what = "a string"
        else:
            what = "an integer" if self.kind is int else "a number"
            if self.low is not None and self.high is not None:
                what += (f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                         f"{')' if self.high_open else ']'}")
            elif self.low is not None:
                what += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                what += f" {'<' if self.high_open else '<='} {self.high:g}"
        return what + (" (or null)" if self.default is None or self.nullable else "")

    def check(self, owner: str, key: str, value: Any) -> Any:
        """The value, checked and coerced (an integer for an int, a float for a float); a one-line ConfigError
        naming ``owner.key``, the value and what was expected otherwise."""
        bad = ConfigError(f"{owner}.{key} must be {self.expected()}, got {value!r}")
        if value is None and (self.default is None or self.nullable):
            return None
        if self.kind is list:
            if not isinstance(value, (list, tuple)) or not value or any(v not in (self.choices or ()) for v in value):
                raise bad
            return list(value)
        if self.choices:
            if value not in self.choices:
                raise bad
            return value
        if self.kind is bool or self.kind is str:
            if not isinstance(value, self.kind):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad
        if not np.isfinite(float(value)):
            raise bad
        if self.kind is int:
            if float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad
        return value


class Component(ABC):
    """A component with declared parameters (``params``: name -> :class:`Param`), checked at construction
    and on every :meth:`set_params`; unknown names are errors. ``self.values`` holds the current values.
    Subclasses check relations between parameters in :meth:`_check_params`."""

    category: ClassVar[str] = "component"
    name: ClassVar[str] = "?"
    params: ClassVar[dict[str, Param]] = {}
    device: str = "cpu"  # where its models are (see to)

    def __init__(self, **params):
        self.values: dict[str, Any] = self.defaults()
        self.set_params(**params)

    def to(self, device: str) -> "Component":
        """Put the component's models (its public attributes that are torch modules) on ``device``; its computations
        follow them there and hand back CPU results. A component holding models elsewhere overrides this."""
        self.device = device
        for name, value in vars(self).items():
            if not name.startswith("_") and hasattr(value, "parameters") and hasattr(value, "to"):
                value.to(device)  # a private one may be the caller's (MAD's victim architecture): left alone
        return self

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {k: copy.copy(p.default) for k, p in cls.params.items()}

    @classmethod
    def check_params(cls, params: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """The given values, checked and coerced; ``owner`` prefixes the names in error messages."""
        owner = owner or cls.name
        for key in params:
            if key not in cls.params:
                known = ", ".join(cls.params) or "none"
                raise ConfigError(f"{owner}.{key} is not a parameter of {cls.category} {cls.name}; "
                                  f"expected one of: {known}")
        return {k: cls.params[k].check(owner, k, v) for k, v in params.items()}

    @classmethod
    def resolve(cls, params: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """Every parameter's value: the defaults with ``params`` checked over them, relations checked too."""
        values = {**cls.defaults(), **cls.check_params(params, owner)}
        owner = owner or cls.name
        for name, needs in cls._inert(values).items():
            default = cls.params[name].default
            if values[name] != default:
                raise ConfigError(inert(owner, name, values[name], f"{owner}.{needs}", default))
        cls._check_params(values, owner)
        return values

    @classmethod
    def _inert(cls, values: dict[str, Any]) -> dict[str, str]:
        """The parameters that the other values leave without effect: name -> the setting they need
        (``{"alpha": "variant=same_code"}``). :meth:`resolve` refuses one set to other than its default, which
        would otherwise be ignored without a word."""
        return {}

    @classmethod
    def _check_params(cls, values: dict[str, Any], owner: str) -> None:
        """Relations between parameters (each value is already checked); raise a one-line ConfigError."""

    @classmethod
    def _check_class(cls, where: str) -> None:
        """Relations between what the class declares (a plug-in's, when it is loaded); raise a one-line
        ConfigError naming ``where``."""

    def set_params(self, **params) -> None:
        """Check and apply new values; on any error nothing changes."""
        values = self.resolve({**self.values, **params})
        before = self.values
        self.values = values
        try:
            self._configure()
        except Exception:
            self.values = before
            self._configure()
            raise

    def _configure(self) -> None:
        """Hook run after the parameters change (e.g. to reseed a generator)."""

    def describe(self) -> dict[str, Any]:
        """The parameters worth a one-line summary (those declared ``brief``, less those the others leave without
        effect)."""
        inert = self._inert(self.values)
        return {k: v for k, v in self.values.items() if self.params[k].brief and k not in inert}

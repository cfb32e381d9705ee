"""The configuration reference, generated from the configuration models and the component declarations.

``python -m sim.reference [PATH]`` rewrites this checkout's ``docs/reference.md`` (or writes PATH); ``python -m sim
help`` prints the same keys as text. A test fails when the checked-in reference is stale, so nothing here is typed by
hand twice.
"""

from __future__ import annotations

import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import registry
from .config import AttackerConfig, DetectorConfig, ScenarioConfig

_SECTIONS = {"detectors": DetectorConfig, "attackers": AttackerConfig}  # dict fields: common keys + declarations


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (not cut at "et al." or "e.g.")."""
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(?<!\bal\.)(?<!e\.g\.)(?<!i\.e\.)(?:\s+(?=[A-Z`])|$)", text)
    return (match.group(1) if match else text).rstrip(".")


def _allowed(annotation: Any, field) -> str:
    """What a pydantic field accepts, in words."""
    category = (field.json_schema_extra or {}).get("registry")
    if category:
        what = f"one of the {registry.CATEGORIES[category][1]} names: " + ", ".join(registry.builtins(category))
        what += ", or npz:PATH, folder:PATH, module:attr" if category == "dataset" else ", or module:attr"
        return what + (" (or null)" if field.default is None else "")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _allowed(inner[0], field) + " (or null)" if len(inner) == 1 else " or ".join(map(_name, inner))
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr):g}")
    return _name(annotation) + (" " + ", ".join(bounds) if bounds else "")


def _name(annotation: Any) -> str:
    return {int: "integer", float: "number", str: "string", bool: "true or false"}.get(annotation,
                                                                                      getattr(annotation, "__name__",
                                                                                              str(annotation)))


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "{}" if field.default_factory is not None else "–"
    value = field.default
    if isinstance(value, BaseModel):
        return "–"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def scenario_keys() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) of every scalar key of a scenario, components' own parameters aside."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if name in ("name", "description") and not prefix:
                continue
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                if ann.model_config.get("extra") == "allow":  # a defense spec: name + the defense's parameters
                    rows.append((f"{prefix}{name}.name", _default(ann.model_fields["name"]), "a defense name or "
                                 "module:attr, or several joined by '+'", ann.model_fields["name"].description or ""))
                else:
                    walk(ann, f"{prefix}{name}.")
            elif typing.get_origin(ann) in (typing.Union, types.UnionType) and (
                    inner := [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]):
                rows.append((prefix + name, _default(field), "a mapping of the keys below (or null)",
                             field.description or ""))
                walk(inner[0], f"{prefix}{name}.")
            elif name in _SECTIONS and not prefix:
                walk(_SECTIONS[name], f"{name}.<{'name' if name == 'detectors' else 'id'}>.")
            else:
                rows.append((prefix + name, _default(field), _allowed(ann, field), field.description or ""))

    walk(ScenarioConfig, "")
    return rows


def _param_default(p: registry.Param) -> str:
    value = p.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(value)}]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings(values: dict) -> str:
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


def _params_table(params: dict[str, registry.Param], prefix: str) -> list[str]:
    if not params:
        return ["No parameters."]
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, p in params.items():
        lines.append(f"| `{prefix}{key}` | {_param_default(p)} | {p.expected()} | {p.help} |")
    return lines


def markdown() -> str:
    """The whole reference as Markdown (what ``docs/reference.md`` holds)."""
    from . import detectors

    out = ["# Configuration reference", "",
           "Generated by `python -m sim.reference` from the configuration models (`sim/config.py`), the shipped",
           "scenario and sweep files, and the components' own declarations (`sim/registry.py`);",
           "`tests/unit/test_docs.py` fails when this file is stale. How to set keys: [scenarios and",
           "configuration](configuration.md).", "",
           "## Scenario keys", "",
           "`attackers.<id>.…` and `detectors.<name>.…` hold the keys every attacker or detector has; each attack",
           "and detector kind adds its own (below).", "",
           "| key | default | allowed | meaning |", "|---|---|---|---|"]
    out += [f"| `{k}` | {d} | {a} | {m} |" for k, d, a, m in scenario_keys()]
    out += ["", *_scenarios()]
    out += ["", "## Defenses", "", "`defense=NAME defense.PARAM=VALUE`; a chain `defense=A+B defense.A.PARAM=VALUE`;",
            "the same specs serve `detectors.<name>.perturb`. More in [defenses](defenses.md).", ""]
    for name, cls in registry.builtins("defense").items():
        out += [f"### `{name}`", "", registry.summary_line(cls), "", *_params_table(cls.params, "defense."), ""]
    presets = detectors.presets()
    out += ["## Detectors", "",
            "`detectors.NAME.kind=KIND` adds a detector named NAME (its log columns are `NAME_score`,",
            "`NAME_flagged`, `NAME_seq`, `NAME_round`, `NAME_as_of`); these names are always there and need no kind.",
            "More in [detection](detection.md).", "",
            "| name | kind | settings |", "|---|---|---|"]
    for name, p in presets.items():
        out.append(f"| `{name}` | `{p['kind']}` | {_settings({k: v for k, v in p.items() if k != 'kind'})} |")
    out.append("")
    for name, cls in registry.builtins("detector").items():
        state = "keeps a history per key and flags keys for good" if cls.stateful else "scores each query alone"
        out += [f"### `{name}`", "", f"{registry.summary_line(cls)} It {state}.", "",
                *_params_table(cls.params, "detectors.<name>."), ""]
    out += ["## Attacks", "", "`attackers.ID.attack=KIND`, with the attack's own keys under `attackers.ID.`. More in",
            "[attacks](attacks.md).", ""]
    for name, cls in registry.builtins("attack").items():
        out += [f"### `{name}`", "", registry.summary_line(cls), "", *_params_table(cls.params, "attackers.<id>."), ""]
    for title, category, key in (("Architectures", "model", "`victim.arch`, `attackers.<id>.replica.arch`"),
                                 ("Datasets", "dataset", "`victim.dataset` and an attack's `pool`")):
        out += [f"## {title}", "", f"Names for {key}.", "", "| name | what |", "|---|---|"]
        out += [f"| `{n}` | {registry.summary_line(obj)} |" for n, obj in registry.builtins(category).items()]
        out.append("")
    return "\n".join(out)


def listing(rows: list[tuple[str, str]], width: int = 118) -> str:
    """Two columns of text, the second wrapped under itself."""
    left = max(len(a) for a, _ in rows) + 4
    return "\n".join(textwrap.fill(b, width, initial_indent=f"  {a:<{left - 2}}", subsequent_indent=" " * left)
                     if b else f"  {a}" for a, b in rows)


def _scenarios() -> list[str]:
    """The shipped scenarios and sweeps, as their files describe them."""
    from . import sweep
    from .config import load, scenario_names

    out = ["## Scenarios", "", "Shipped in `scenarios/` (`scenario=NAME`); `scenario=path/to/file.yaml` runs your "
           "own.", "", "| scenario | what it runs |", "|---|---|"]
    out += [f"| `{n}` | {' '.join(load(n).description.split())} |" for n in scenario_names()]
    out += ["", "## Sweeps", "", "Shipped in `scenarios/sweeps/` (`sweep=NAME`); see [sweeps](sweeps.md).", "",
            "| sweep | base scenario | curves | trials | what it maps |", "|---|---|---|---:|---|"]
    for n in sweep.sweep_names():
        s = sweep.load(n)
        curves, what = ", ".join(f"`{label}`" for label in s.space), " ".join(s.description.split())
        out.append(f"| `{n}` | `{s.scenario}` | {curves} | {sweep._trial_count(s)} | {what} |")
    return out


def text() -> str:
    """The keys and components as plain text, for ``python -m sim help``."""
    from . import detectors

    parts = [listing([(k, f"{d}. {m}" if m else d) for k, d, _, m in scenario_keys()])]

    plugins = registry.plugins()

    def params(category: str, name: str, cls) -> str:
        own = ", ".join(f"{k}={_param_default(p)}" for k, p in cls.params.items()) or "-"
        where = plugins.get(category, {}).get(name)
        return f"{own}  [plug-in: {where}]" if where else own

    for title, category in (("defenses (defense=NAME defense.PARAM=VALUE)", "defense"),
                            ("detector kinds (detectors.NAME.kind=KIND detectors.NAME.PARAM=VALUE)", "detector"),
                            ("attacks (attackers.ID.attack=KIND attackers.ID.PARAM=VALUE)", "attack")):
        parts.append(f"{title}:\n" + listing([(n, params(category, n, cls))
                                              for n, cls in registry.entries(category).items()]))
        if category == "detector":
            parts.append("detector shorthands (need no kind):\n" + listing(
                [(n, _settings(p)) for n, p in detectors.presets().items()]))
    for title, category in (("architectures", "model"), ("datasets", "dataset")):
        names = [f"{n} [plug-in: {plugins[category][n]}]" if n in plugins.get(category, {}) else n
                 for n in registry.names(category)]
        more = " (and npz:PATH, folder:PATH)" if category == "dataset" else ""
        parts.append(f"{title}: " + ", ".join(names) + more)
    parts.append("plug-ins: any of these may also be module:attr of your own, and installed packages add their own "
                 "through the entry-point groups " + ", ".join(registry.GROUPS.values())
                 + " (docs/own-components.md)")
    failed = registry.not_loaded()
    if failed:
        parts.append("installed plug-ins left out:\n" + listing([(f"{name} ({category})", why) for category, found
                                                                  in failed.items() for name, why in found.items()]))
    return "\n\n".join(parts)


HOW = {"defense": "defense=NAME defense.PARAM=VALUE", "detector": "detectors.NAME.kind=KIND detectors.NAME.PARAM=VALUE",
       "attack": "attackers.ID.attack=KIND attackers.ID.PARAM=VALUE", "model": "victim.arch=NAME",
       "dataset": "victim.dataset=NAME, or an attack's pool"}


def _scenario(name: str, cfg) -> str:
    """A scenario's description and what it sets up, by the keys an override names (attacker ids above all)."""
    v, b = cfg.victim, cfg.benign
    lines = [textwrap.fill(f"scenario {name}: {' '.join(cfg.description.split())}", 118, subsequent_indent="  "),
             f"  victim: {v.arch} on {v.dataset} ({v.training} training"
             f"{f', {v.quantization} quantized' if v.quantization != 'none' else ''}); "
             f"defense={cfg.defense.spec().get('name', 'identity')}",
             "  attackers (attackers.ID.…):"]
    for aid, a in cfg.attackers.items():
        lines.append(f"    {aid}: attack={a.attack}, budget={a.budget}, accounts={a.accounts}, actors={a.actors}")
    accounts = f", accounts={b.accounts}" if b.accounts else ""
    lines.append(f"  benign: users={b.users}{accounts}, queries={b.queries} each" if b.users else "  benign: none")
    on = [f"{n} (kind={d.kind}, action={d.action})" for n, d in cfg.enabled_detectors().items()]
    lines.append(f"  detectors on (detectors.NAME.…): {', '.join(on) or 'none'}")
    return "\n".join(lines)


def _has_space(path: str) -> bool:
    """Whether a YAML file is a mapping with a ``space`` key, as a sweep is."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "space" in raw


def about(name: str) -> str:
    """``python -m sim help NAME``: what the scenario, sweep or component NAME (a registered name or ``module:attr``
    of your own) is, with each parameter's default, allowed values and help."""
    from . import sweep
    from .config import load, scenario_names
    from .errors import ConfigError

    parts = []
    if name in scenario_names():
        parts.append(_scenario(name, load(name)))
    elif name.endswith((".yaml", ".yml")) and Path(name).is_file():  # a file of the user's: a scenario or a sweep
        try:
            parts.append(_scenario(name, load(name)))
        except ConfigError as exc:
            try:
                parts.append(f"sweep {name}: {' '.join(sweep.load(name).description.split())}")
            except ConfigError as sweep_exc:  # neither: the error of what it looks like (a sweep has a space)
                raise sweep_exc if _has_space(name) else exc from None
    if name in sweep.sweep_names():
        parts.append(f"sweep {name}: {' '.join(sweep.load(name).description.split())}")
    for category in HOW:  # components first: a class is a callable, which a model or a dataset may be
        if ":" not in name and name not in registry.entries(category):
            continue
        try:
            obj = registry.get(category, name, "help")
        except ConfigError:  # module:attr of another category (or of none)
            continue
        where = registry.plugins(category).get(name)  # an installed plug-in's module:attr
        head = f"{category} {name}{f' [plug-in: {where}]' if where and where != name else ''} ({HOW[category]})"
        own_doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__  # not a base class's
        lines = [head, textwrap.fill(registry.summary_line(obj) if own_doc else "(no description)", 118,
                                     initial_indent="  ", subsequent_indent="  ")]
        params = getattr(obj, "params", None) if isinstance(obj, type) else None
        if params:
            lines.append(listing([(k, f"{_param_default(p)}; {p.expected()}. {p.help}") for k, p in params.items()]))
        parts.append("\n".join(lines))
        if ":" in name:  # a class of one category is a callable too: the first interface it meets is what it is
            break
    if not parts:
        raise ConfigError(f"help {name!r}: not a scenario, sweep or component; expected a name python -m sim help "
                          f"lists, or module:attr of your own")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from sim.cli import OneLineParser

    ap = OneLineParser(prog="python -m sim.reference", description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default=str(Path(__file__).resolve().parents[1] / "docs" / "reference.md"),
                    help="the Markdown file to write (default: this checkout's docs/reference.md)")
    out = Path(ap.parse_args(argv).path)
    if out.is_dir() or not out.parent.is_dir():
        ap.error(f"PATH {str(out)!r}: expected a file in an existing directory")
    out.write_text(markdown() + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Output-perturbation defenses: a batch of clean probability vectors in, the returned vectors out.

Python API::

    from sim import defenses
    defenses.names()                                  # the registered defenses
    d = defenses.build("mad", eps=0.5, surrogate=net) # or victim=net: a seeded random copy of it
    returned = d(probs, inputs)                       # torch or numpy (N, K); inputs (N, C, H, W)
    d.set_params(eps=1.0)                             # checked like the constructor

A scenario gives a defense as a mapping ``{"name": "mad", "eps": 0.5}``; a chain is
``{"name": "reverse_sigmoid+rounding", "reverse_sigmoid": {"beta": 0.3}, "rounding": {"decimals": 2}}``
(:func:`from_spec`), applied left to right. A new defense is a module here with a :class:`Defense` subclass
decorated ``@register("defense")`` (see :mod:`sim.registry`).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from torch import nn

from .. import registry
from ..errors import ConfigError, failed
from .base import Defense, Param


def names() -> list[str]:
    return registry.names("defense")


def get(name: str) -> type[Defense]:
    return registry.get("defense", name)


def check_name(field: str, name: str) -> None:
    registry.check_name("defense", field, name)


def build(name: str, *, victim: nn.Module | None = None, surrogate: nn.Module | None = None,
          misinformation: nn.Module | None = None, models: dict[str, Any] | None = None, **params) -> Defense:
    """One defense with its parameters. The models go to the defenses that take them and are ignored by the
    rest: ``victim`` (MAD builds a random surrogate of its architecture), ``surrogate`` (MAD), ``misinformation``
    (adaptive misinformation), and ``models``, what :meth:`Defense.prepare` made (constructor keyword -> model).
    ``A+B`` builds a chain, each member's parameters under its name (``top_k={"k": 1}``), as in a scenario; its
    ``models``: member name -> that member's."""
    if isinstance(name, str) and "+" in name:
        return Chain([build(part, victim=victim, surrogate=surrogate, misinformation=misinformation,
                            models=(models or {}).get(part), **own)
                      for part, own in members({"name": name, **params})])
    cls = get(name)
    given = {"victim": victim, "surrogate": surrogate, "misinformation": misinformation, **(models or {})}
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in given.items() if k in accepted and v is not None}, **params)


class Chain(Defense):
    """Several defenses applied left to right."""

    name = "chain"

    def __init__(self, members: list[Defense]):
        self.members = members
        self.needs_inputs = any(m.needs_inputs for m in members)
        super().__init__()

    def to(self, device: str) -> "Chain":
        for m in self.members:
            m.to(device)
        self.device = device
        return self

    def _perturb(self, y, inputs):
        for m in self.members:
            y = m(y, inputs)
        return y

    def describe(self) -> dict[str, Any]:
        return {"name": "+".join(m.name for m in self.members),
                **{m.name: {k: v for k, v in m.describe().items() if k != "name"} for m in self.members}}


def members(spec: dict[str, Any], field: str = "defense") -> list[tuple[str, dict[str, Any]]]:
    """(name, params) of each defense in a spec mapping, checked for shape (not yet for values)."""
    spec = dict(spec)
    name = spec.pop("name", "identity")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{field}.name must be a defense name (or names joined by '+'), got {name!r}")
    parts = name.split("+")
    for part in parts:
        check_name(f"{field}.name", part)
    if len(parts) == 1:
        return [(name, spec)]
    if len(set(parts)) != len(parts):
        raise ConfigError(f"{field}.name={name!r} names a defense twice; expected each at most once")
    for key, value in spec.items():
        if key not in parts:
            dotted = [p for p in parts if "." in p]  # module:attr: an override's key would split at its dots
            yaml = (f"; a member named module:attr takes them in a scenario file, {field}: {{name: {name}, "
                    f"'{dotted[0]}': {{PARAM: …}}}}" if dotted else "")
            raise ConfigError(f"{field}.{key}: in a chain, parameters go under the member's name "
                              f"({field}.MEMBER.PARAM=…{yaml}); expected one of: {', '.join(parts)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{field}.{key} must be a mapping of {key}'s parameters, got {value!r}")
    return [(part, dict(spec.get(part) or {})) for part in parts]


def from_spec(spec: dict[str, Any], victim: nn.Module | None = None,
              models: dict[str, dict[str, Any]] | None = None) -> Defense:
    """The defense (or chain) a spec mapping describes; ``models``: member name -> what its
    :meth:`Defense.prepare` made (see :func:`prepare`)."""
    built = [build(name, victim=victim, models=(models or {}).get(name), **params) for name, params in members(spec)]
    return built[0] if len(built) == 1 else Chain(built)


def prepare(spec: dict[str, Any], ctx) -> dict[str, dict[str, bytes]]:
    """The trained models every member of ``spec`` needs (member name -> constructor keyword -> serialised
    model), from the victim zoo (``ctx``: a :class:`sim.zoo.ModelContext`)."""
    return {name: made for name, params in members(spec) if (made := get(name).prepare(params, ctx))}


def check_outputs(defense: Defense, clean: np.ndarray, x: np.ndarray, field: str = "defense") -> None:
    """A one-line ConfigError naming ``field`` unless ``defense`` maps the victim's answers ``clean`` (N, K) on the
    images ``x`` to an array of that shape of values in [0, 1], what a client may be sent. A chain's members are
    checked one by one on what the members before them return, so that the error names the member at fault."""
    if isinstance(defense, Chain):
        y = clean
        for m in defense.members:
            y = _checked(m, y, x, f"{field} member {m.name!r}")
    else:
        _checked(defense, clean, x, field)


def _checked(defense: Defense, clean: np.ndarray, x: np.ndarray, field: str) -> np.ndarray:
    try:
        out = np.asarray(defense(clean.copy(), x), np.float64)
    except Exception as exc:  # noqa: BLE001 - the user's defense: whatever it raises, one line
        raise failed(f"{field} fails on the victim's answers of shape {clean.shape}", exc,
                     "_perturb(y, inputs) -> probabilities of y's shape") from None
    if out.shape != clean.shape:
        raise ConfigError(f"{field} returns shape {out.shape} for the victim's answers of shape {clean.shape}; "
                          f"expected the same shape")
    finite = out[np.isfinite(out)]
    if finite.size < out.size or out.min() < -1e-6 or out.max() > 1 + 1e-6:
        seen = f"values in [{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "no finite value"
        raise ConfigError(f"{field} returns {seen}{' and NaN or inf' if finite.size < out.size else ''}; expected "
                          f"probabilities in [0, 1]")
    return out.astype(clean.dtype, copy=False)


def check_spec(spec: dict[str, Any], field: str = "defense") -> None:
    """Validate names and parameter values without building any model."""
    parts = members(spec, field)
    for name, params in parts:
        get(name).resolve(params, owner=field if len(parts) == 1 else f"{field}.{name}")


def resolved(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec's parameters with every default filled in (a chain: one mapping per member), without ``name``: what
    a run records of its defense."""
    parts = members(spec)
    values = {name: get(name).resolve(params) for name, params in parts}
    return values[parts[0][0]] if len(parts) == 1 else values


def names_in(spec: dict[str, Any]) -> list[str]:
    """The defenses a spec names, in chain order."""
    return [name for name, _ in members(spec)]


def is_identity(spec: dict[str, Any]) -> bool:
    """Whether the spec returns the clean answers unchanged, whatever they are."""
    return all(get(name).identity for name in names_in(spec))


__all__ = ["Defense", "Param", "Chain", "names", "get", "build", "members", "from_spec", "prepare", "check_spec",
           "resolved", "is_identity", "names_in", "check_name"]

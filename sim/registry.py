"""The one check behind every name → component registry (datasets, models, defenses, detectors)."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError


def check_name(kind: str, field: str, name: str, known: Iterable[str]) -> None:
    """A one-line error naming the field, the unknown name and the known ones."""
    known = list(known)
    if name not in known:
        raise ConfigError(f"{field}={name!r} is not a known {kind}; expected one of: {', '.join(known)}")

"""User-facing errors: one line naming the field, the bad value and what was expected.

Everything a user can get wrong raises a subclass of :class:`SimError` (itself a
``ValueError``); the CLI prints its message and exits with status 2. A run stopped by Ctrl-C raises
:class:`Interrupted` (status 130), one stopped by a fault it cannot go on past :class:`RunFailed` (status 1).
"""

import re


class SimError(ValueError):
    """A mistake in the user's input (configuration, data path, request)."""


class ConfigError(SimError):
    """A scenario, key or value that does not validate."""


class DataError(SimError):
    """A dataset that cannot be found or read."""


def failed(what: str, exc: BaseException, expected: str, kind: type[SimError] = ConfigError) -> SimError:
    """The one-line error for code of the user's own (a model factory, a dataset loader, a detector, a defense) that
    raised ``exc``: ``what`` failed, the exception's type and first line, and what was expected."""
    return kind(f"{what}: {type(exc).__name__}: {first_line(exc)}; expected {expected}")


def first_line(exc: BaseException) -> str:
    """An exception's first line, as a one-line message quotes it: without the terminal colours some libraries put in
    (torch's bold, Ray's task names)."""
    text = str(exc).strip()
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0] if text else "")


def shown(value) -> str:
    """A value as an error message shows it: its repr, cut to 40 characters (a request's body, a user's object)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def inert(owner: str, key: str, value, needs: str, default) -> str:
    """The one-line message for setting ``key`` of ``owner`` set to ``value`` where another setting leaves it without
    effect: it has one only with ``needs`` (its ``default``: None is unset)."""
    name = f"{owner}.{key}" if owner else key
    return (f"{name}={value} has no effect unless {needs}; expected {needs}, or {key} left at its default "
            f"({'unset' if default is None else default})")


class RequestError(SimError):
    """A query request the victim service refuses before answering (HTTP 4xx)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or SIGINT): where it was, and what it left (the CLI exits with status 130)."""

    def __init__(self, phase: str, run_dir: str, logged: int):
        super().__init__(
            f"interrupted during {phase}; the run directory {run_dir} keeps its query log ({logged:,} rows, "
            f"compacted) and a summary marked interrupted" if logged else
            f"interrupted during {phase}, before any query was logged; the run directory {run_dir} keeps a summary "
            f"marked interrupted")
        self.phase, self.run_dir, self.logged = phase, run_dir, logged


class RunFailed(RuntimeError):
    """A run stopped by a fault it cannot go on past (its victim's query log cannot be written): where it was, why,
    and what it left (the CLI prints it and exits with status 1)."""

    def __init__(self, phase: str, why: str, run_dir: str, logged: int):
        super().__init__(f"the run stopped during {phase}: {why}; the run directory {run_dir} keeps its query log "
                         f"({logged:,} rows) and a summary marked failed")
        self.phase, self.why, self.run_dir, self.logged = phase, why, run_dir, logged

"""``python -m sim [serve] scenario=NAME [key=value ...]`` and ``python -m sim help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import time

from .errors import Interrupted, RunFailed, SimError, first_line, shown


def _number(kind, low: float, strict: bool, expected: str):
    """An argparse type: ``kind`` of the text, above ``low`` (or at it when not ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not low <= value < float("inf") or (strict and value == low):  # nan compares false: refused too
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value
    return parse


count = _number(int, 1, False, "an integer >= 1")  # argparse types for the scripts' options
nonnegative = _number(int, 0, False, "an integer >= 0")
positive = _number(float, 0, True, "a number > 0")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line, ``error: …`` with status 2, as ``python -m sim``'s
    (argparse's own prints the whole usage first)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def machine() -> str:
    """The machine a script measured on, as its results record it: processor (or architecture) and cores."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def output_file(out: str) -> str:
    """A script's ``--out``, absolute, with its folder made now: before the measuring, not after it, where a missing
    folder (or a bare file name, whose folder is '') would lose the run. It must end in .json (the Markdown goes
    beside it, with .md) and its folder be writable."""
    path = os.path.abspath(out)
    if not path.endswith(".json") or os.path.isdir(path):
        raise SimError(f"--out {out!r}: expected the path of a .json file (the Markdown is written beside it)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.access(os.path.dirname(path), os.W_OK):
        raise SimError(f"--out {out!r}: its folder cannot be written; expected a writable one")
    return path


def read_results(path: str, needs: tuple[str, ...], script: str) -> dict:
    """The JSON results a script wrote, read back (``--report-only``): one line when the file is not there, not JSON,
    or not that script's (it lacks one of the keys in ``needs``)."""
    expected = f"expected the JSON a run of {script} wrote (--out)"
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise SimError(f"{path} does not exist; {expected}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SimError(f"{path} is not JSON ({first_line(exc)}); {expected}") from None
    if not isinstance(data, dict):
        raise SimError(f"{path} is not a result of {script}: a JSON {type(data).__name__}; {expected}")
    missing = [key for key in needs if key not in data]
    if missing:
        raise SimError(f"{path} is not a result of {script}: it has no {', '.join(missing)}; {expected}")
    return data


def description(doc: str) -> str:
    """A script's ``--help`` description: the whole first paragraph of its docstring, on one line."""
    return " ".join(doc.split("\n\n")[0].split())


def script(main) -> None:
    """Run a command-line script's ``main`` (the benchmarks' scripts) and exit: a user's mistake (a bad setting, a
    file that is not there) is one line on stderr and exit status 2, as for ``python -m sim``."""
    try:
        code = main()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


USAGE = """\
usage: python -m sim scenario=NAME [key=value ...]        run a scenario, print its summary
       python -m sim serve scenario=NAME [key=value ...]  serve its victim on 127.0.0.1 until Ctrl-C
       python -m sim sweep=NAME [scenario=NAME] [sweep.KEY=VALUE ...] [key=value ...] [resume=true]
                                                          a Ray Tune sweep of defense settings (sweep.KEY: the
                                                          sweep's own keys; key=value: every trial's scenario)
       python -m sim help                                 this text
       python -m sim help NAME                            a scenario, sweep or component (module:attr too), with
                                                          each parameter's default, allowed values and help

scenarios:
{scenarios}

sweeps (sweep.space.LABEL.PARAM=[a, b] | {{uniform: [lo, hi]}} | {{loguniform: …}} | {{choice: […]}}; sweep.dir=PATH):
{sweeps}

keys (dotted, any depth; `attackers.<id>.…` adds or changes an attacker, `detectors.<name>.…` a detector;
the full reference with every component's parameters: docs/reference.md):
{keys}
"""


def help_text() -> str:
    from . import sweep
    from .config import load, scenario_names
    from .reference import first_sentence, listing, text

    return USAGE.format(scenarios=listing([(n, first_sentence(load(n).description)) for n in scenario_names()]),
                        sweeps=listing([(n, first_sentence(sweep.load(n).description)) for n in sweep.sweep_names()]),
                        keys=text())


def _split_args(argv: list[str]) -> tuple[str | None, str, list[str]]:
    mode = "run"
    if argv and argv[0] in ("serve", "run"):
        mode, argv = argv[0], argv[1:]
    scenario, overrides = None, []
    for arg in argv:
        if arg.startswith("scenario="):
            if scenario is not None:
                raise SimError(f"{arg!r}: a second scenario (scenario={scenario} came first); expected one "
                               f"scenario=NAME")
            scenario = arg.split("=", 1)[1]
        elif arg.startswith("sweep="):
            if mode == "serve":
                raise SimError(f"{arg!r} cannot be served; expected python -m sim serve scenario=NAME")
            if mode == "sweep":
                raise SimError(f"{arg!r}: a second sweep; expected one sweep=NAME")
            mode, overrides = "sweep", [arg, *overrides]
        elif arg.startswith("-") and "=" in arg:
            raise SimError(f"argument {arg!r} is not understood; expected {arg.lstrip('-')} (key=value, no dashes)")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise SimError(f"argument {arg!r} is not understood; expected scenario=NAME or key=value "
                           f"(see python -m sim help)")
    return scenario, mode, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"] and len(argv) > 1:  # help NAME ...: a scenario, sweep or component, its parameters
        from .reference import about

        try:
            print("\n\n".join(about(name) for name in argv[1:]))
        except SimError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not argv or argv[0] == "help" or "-h" in argv or "--help" in argv:
        print(help_text())
        return 0 if argv else 2
    logging.basicConfig(level=os.environ.get("SIM_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        scenario, mode, overrides = _split_args(argv)
        if mode == "sweep":
            return run_sweep(scenario, overrides)
        if scenario is None:
            raise SimError("scenario=NAME is required (see python -m sim help)")
        from .config import load

        load(scenario, overrides)  # a mistaken name or key is one line in a second, before Ray and torch load
        if mode == "serve":
            return serve_forever(scenario, overrides)
        from .engine import run
        from .summary import format_summary

        summary = run(scenario, overrides)
        print(format_summary(summary))
        return 0
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 130
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_sweep(scenario: str | None, overrides: list[str]) -> int:
    """``sweep=NAME [resume=true] …``: run or continue a sweep, print where its results are."""
    from . import sweep

    name = overrides[0].split("=", 1)[1]
    resume = False
    rest = []
    for item in overrides[1:]:
        key, _, value = item.partition("=")
        if key == "resume":
            if value.lower() not in ("true", "false"):
                raise SimError(f"resume={value!r} must be true or false")
            resume = value.lower() == "true"
        else:
            rest.append(item)
    out = sweep.run(name, rest, scenario=scenario, resume=resume)
    print(sweep.format_result(out))
    if out["interrupted"]:
        return 130
    return 1 if any(r["status"] == "error" for r in out["rows"]) else 0  # a trial failed: not a sweep to trust


def _in_effect(cfg, dets) -> list[str]:
    """What serve mode's clients meet: the defense, each detector with what its flag does, the limits."""
    from .summary import params_text

    defense = cfg.defense.spec()
    params = params_text({k: v for k, v in defense.items() if k != "name"})
    detectors = [f"{name} ({params_text(info.params)}): {dets.rules[name]['action']}"
                 for name, info in dets.info.items()]
    s = cfg.serve
    limits = [f"quota {s.quota} queries" if s.quota else "", f"rate {s.rate:g}/s (burst {s.burst or s.max_images})"
              if s.rate else ""]
    limits = [text for text in limits if text]
    return [f"defense:   {defense['name']}{f' ({params})' if params else ''}",
            f"detectors: {'; '.join(detectors) or 'none'}",
            f"limits:    {', '.join(limits) + f' per {s.limit_by}' if limits else 'none'}"]


def serve_forever(scenario: str, overrides: list[str]) -> int:
    """Deploy the scenario's victim and serve external clients until interrupted."""
    from . import alerts, querylog, storage, summary
    from . import config as config_mod
    from .engine import (
        deploy_victim,
        new_run_id,
        prepare_models,
        prepare_run_dir,
        ray_session,
        ray_stopped,
        train_victim,
    )
    from .protocol import Account, hashed, make_keys

    cfg = config_mod.load(scenario, overrides)
    if cfg.victim.remote():
        raise SimError(f"victim.url={cfg.victim.url!r} / victim.client={cfg.victim.client!r}: serve mode serves a "
                       f"victim of this tool; expected neither (a remote victim is attacked with python -m sim "
                       f"scenario=…)")
    if cfg.serve.keys:
        keys_path, keys = cfg.serve.keys, load_keys(cfg.serve.keys)
    run_id = new_run_id(cfg)
    log_dir = prepare_run_dir(cfg, run_id)
    if not cfg.serve.keys:
        keys = make_keys([Account(f"external-{i:03d}", "external") for i in range(cfg.serve.accounts)])
        keys_path = storage.join(cfg.run_dir, "keys.json")
        storage.write_text(keys_path, json.dumps(
            [{"key": k, "account_id": a.account_id, "role": a.role} for k, a in keys.items()], indent=2))
    victim = train_victim(cfg)
    dets, defense_models = prepare_models(cfg, victim)

    def finish() -> int:  # as in a run: whatever happened, the log is left compacted and readable, with its alerts
        rows = querylog.compact(log_dir)
        alerts.write(cfg.run_dir, list(dets.detectors))
        return rows

    def on_signal(signum, _):
        if signum == signal.SIGTERM and ray_stopped():  # sent to the whole process group: Ray's processes are gone
            querylog.stop_writers(log_dir)  # but the Serve replicas outlive them briefly, and would go on writing
            print(f"stopped; {finish()} queries logged in {log_dir}", flush=True)
            os._exit(0)
        stop.update(now=True)

    stop = {"now": False}
    try:
        with ray_session(cfg):
            # while it deploys, SIGTERM stops it as Ctrl-C does (Ray's own handler, installed by ray.init, crashed)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            app, port, spec = deploy_victim(cfg, victim, run_id, keys, log_dir, dets, defense_models,
                                            http=True)
            print(f"serving {cfg.victim.arch} on {cfg.victim.dataset} (test accuracy {victim.test_accuracy:.4f})")
            print(f"url:  http://127.0.0.1:{port}/{app}")
            print(f"port: {port}")
            print(f"keys: {keys_path}")
            print(f"log:  {log_dir}")
            in_effect = _in_effect(cfg, dets)
            print("\n".join(in_effect))
            storage.write_text(storage.join(cfg.run_dir, summary.SERVED), json.dumps(  # analysis reads it
                {"run_id": run_id, "url": f"http://127.0.0.1:{port}/{app}", "keys": keys_path, "log": log_dir,
                 "in_effect": in_effect}, indent=2))
            print("Ctrl-C to stop", flush=True)
            # after ray.init, which installs its own SIGTERM handler; SIGINT too, in case it was ignored
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
            watched = {"text": storage.read_text(keys_path), "keys": hashed(keys)}
            proxies: dict = {}
            try:
                while not stop["now"]:
                    time.sleep(0.5)
                    spec = _follow_keys(keys_path, watched, spec, app)
                    _report_proxies(proxies, port)
            finally:
                from .serving import delete

                delete(spec, app)
    finally:
        rows = finish()
    print(f"stopped; {rows} queries logged in {log_dir}")
    return 0


def _follow_keys(path: str, seen: dict, spec, app: str):
    """Serve mode: apply what changed in the keys file since ``seen`` (its text and hashed keys) to the running app,
    live: keys added (or whose account changed) and keys removed, which are revoked. A file that does not parse keeps
    the app's keys, with a line saying why. Returns the app's spec."""
    from . import storage
    from .protocol import hashed
    from .serving import update_keys

    try:
        text = storage.read_text(path)
    except OSError:  # being replaced: look again next time
        return spec
    if text == seen["text"]:
        return spec
    seen["text"] = text
    try:
        keys = hashed(load_keys(path, text))
    except SimError as exc:
        print(f"keys file changed but not applied, the app keeps its keys: {exc}", flush=True)
        return spec
    add = {k: a for k, a in keys.items() if seen["keys"].get(k) != a}
    revoke = [k for k in seen["keys"] if k not in keys]
    if add or revoke:
        spec = update_keys(spec, app, add=add, revoke=revoke)
        print(f"keys: added {sorted(a.account_id for a in add.values()) or 'none'}, revoked "
              f"{sorted(seen['keys'][k].account_id for k in revoke) or 'none'}", flush=True)
    seen["keys"] = keys
    return spec


def _report_proxies(seen: dict, port: int) -> None:
    """Serve mode: one line whenever an HTTP proxy's health changes (``seen``: node -> its last status). Serve replaces
    a dead proxy within seconds; requests to the port fail meanwhile."""
    import ray
    from ray import serve

    try:
        now = {node: getattr(status, "value", str(status)) for node, status in serve.status().proxies.items()}
    except ray.exceptions.RayError:  # the controller itself may be restarting: look again next time
        return
    for node, status in now.items():
        if seen.get(node, "HEALTHY") != status:
            print(f"HTTP proxy on node {node[:8]}: {status}" + ("" if status == "HEALTHY" else
                  f" (requests to port {port} fail until Serve has replaced it)"), flush=True)
    seen.clear()
    seen.update(now)


def _stored_key(entry: dict) -> str:
    """An accounts file entry's key: the key itself, or only its SHA-256 (``key_sha256``, 64 hex digits)."""
    from .protocol import HASHED

    if "key" in entry:
        return entry["key"]
    digest = entry["key_sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise ValueError(f"key_sha256={digest!r} is not 64 lowercase hex digits")
    return HASHED + digest


def load_keys(path: str, text: str | None = None) -> dict:
    """The accounts file at ``path`` (or its ``text``, read already): API key, or ``sha256:`` digest, -> account."""
    from . import storage
    from .protocol import Account, hashed

    try:
        entries, keys, first = json.loads(storage.read_text(path) if text is None else text), {}, {}
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "account_id" not in e or not {"key", "key_sha256"} & set(e):
                raise ValueError(f"entry {i} is {e!r}")
            for field in ("key", "account_id", "role", "attack", "cohort"):
                value = e.get(field)
                required = field == "account_id" or (field == "key" and "key" in e)
                if not (isinstance(value, str) and value) and (required or value is not None):
                    raise ValueError(f"entry {i} has {field}={shown(value)}; expected a non-empty string"
                                     + ("" if required else " or none"))
            key = _stored_key(e)
            same = next(iter(hashed({key: None})))  # a key and its sha256 entry are the same key
            if same in first:
                raise ValueError(f"entry {i} ({e['account_id']!r}) has the key of entry {first[same]}; a key belongs "
                                 f"to one account")
            first[same] = i
            keys[key] = Account(e["account_id"], e.get("role", "external"), e.get("attack"), e.get("cohort"))
        return keys
    except OSError as exc:
        raise SimError(f"serve.keys={path!r} cannot be read ({exc.strerror or exc}); expected a JSON file of "
                       f"[{{\"key\": …, \"account_id\": …}}]") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SimError(f"serve.keys={path!r} is not a valid accounts file ({exc}); expected a JSON list of "
                       f"{{\"key\" (or \"key_sha256\"): …, \"account_id\": …, \"role\": …}}") from None

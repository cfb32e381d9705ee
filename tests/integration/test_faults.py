"""Faults in a real run and under a real app: a client actor SIGKILLed mid-run, the victim's disk full mid-run, the
HTTP proxy SIGKILLed. What each leaves is asserted: the run goes on or stops with a one-line reason, and no answer a
client got is missing from the log."""

import json
import os
import resource
import signal
import time
import urllib.error

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
from ray import serve

from sim import engine, querylog
from sim.errors import RunFailed
from sim.serving import delete, deploy
from sim.summary import format_summary

from .test_hardening import BODY, _post, _spec


def _pid(actor_name: str, namespace: str | None = None) -> int:
    """The process id of a running named actor."""
    handle = ray.get_actor(actor_name, namespace=namespace)
    return ray._private.state.actors(handle._actor_id.hex())["Pid"]


def _once_queried(at_least: int, act):
    """A stand-in for the engine's wait that, while clients query, calls ``act(board)`` once they have ``at_least``
    answers between them, then waits as the engine does."""
    wait = engine._wait_with_progress

    def waiting(refs, board, keys, bar, on_poll=None):
        if any(k.startswith("query:") for k in keys):
            deadline = time.monotonic() + 120
            while sum(ray.get(board.snapshot.remote()).get(k, 0) for k in keys) < at_least:
                assert time.monotonic() < deadline, "the clients never got that far"
                time.sleep(0.05)
            act(board, keys)
        return wait(refs, board, keys, bar, on_poll)
    return waiting


def test_a_client_actor_killed_mid_run_leaves_the_run_to_finish(ray_serve, small_overrides, monkeypatch):
    """SIGKILL of the attacker's actor once it has 128 answers: the run finishes; its report, rebuilt from the log,
    has every query it was answered and the budget it did not spend; its replica still trains on those answers."""
    killed = {}

    def kill_attacker(board, keys):
        name = next(n for n in ray.util.list_named_actors() if n.endswith(":single-actor0"))
        killed["posted"] = ray.get(board.snapshot.remote())["query:single-actor0"]
        os.kill(_pid(name), signal.SIGKILL)

    monkeypatch.setattr(engine, "_wait_with_progress", _once_queried(128, kill_attacker))
    summary = engine.run("single_knockoff", [*small_overrides, "attackers.single.budget=1200",
                                             "attackers.single.max_rate=400"], quiet=True)
    client = next(c for c in summary.clients if c.actor_id == "single-actor0")
    attacker = summary.attackers[0]
    assert client.failed and "died" in client.failed
    rows = querylog.read(summary.run_dir + "/queries")
    mine = rows.filter(pc.equal(rows.column("actor_id"), "single-actor0"))
    # the log has every answer the actor had posted before it was killed, and its report is the log's
    assert killed["posted"] <= mine.num_rows == client.queries < 1200
    assert attacker.actors_failed == 1 and attacker.unspent == 1200 - client.queries
    assert attacker.replica is not None  # its only actor died: the replica trained on the answers rebuilt from the log
    benign = [c for c in summary.clients if c.role == "benign"]
    assert [(c.queries, c.failed) for c in benign] == [(80, None)]  # its two accounts' 40 queries each
    assert "client actor single-actor0 died after" in format_summary(summary)


def test_a_full_disk_under_the_victim_stops_the_run_with_the_log_it_has(ray_serve, small_overrides, monkeypatch):
    """The disk is emulated full for the Serve replica alone: its file size limit (RLIMIT_FSIZE, set from outside with
    prlimit) is lowered to what its log stream holds, so its next write fails as on a full disk (EFBIG where a full
    disk gives ENOSPC). The service answers 503 from then on, the run stops with a one-line reason, and every answer
    a client got is in the log."""
    seen = {}

    def fill_disk(board, keys):
        info = serve.get_deployment_handle("victim", "fulldisk").info.remote().result()
        stream = os.path.join(seen["run_dir"], "queries", info["writer"] + querylog.STREAM_SUFFIX)
        resource.prlimit(info["pid"], resource.RLIMIT_FSIZE, (os.path.getsize(stream), resource.RLIM_INFINITY))
        seen["board"], seen["keys"] = board, keys

    monkeypatch.setattr(engine, "_wait_with_progress", _once_queried(64, fill_disk))
    overrides = [*small_overrides, "attackers.single.budget=1200", "attackers.single.max_rate=400"]
    seen["run_dir"] = next(o for o in overrides if o.startswith("run_dir=")).split("=", 1)[1]
    with pytest.raises(RunFailed, match=r"stopped during querying: the victim answered 503: the query log cannot "
                                        r"be written \(.*File too large.*\)") as info:
        engine.run("single_knockoff", overrides, quiet=True, app="fulldisk")
    assert "\n" not in str(info.value)
    rows = querylog.read(seen["run_dir"] + "/queries")
    posted = ray.get(seen["board"].snapshot.remote())
    assert 0 < sum(posted.get(k, 0) for k in seen["keys"]) <= rows.num_rows == info.value.logged < 1200 + 80
    stub = json.loads(open(seen["run_dir"] + "/summary.json").read())
    assert stub["interrupted"] == "querying" and "File too large" in stub["error"] and stub["logged"] == rows.num_rows
    assert "fulldisk" not in serve.status().applications


def test_a_killed_http_proxy_refuses_connections_until_serve_restarts_it(ray_serve, tmp_path):
    """SIGKILL of Serve's HTTP proxy: requests fail with a refused connection (never a wrong answer) until Serve's
    controller starts a new proxy on the same port; the app answers again, and the log has exactly the requests that
    were answered."""
    spec = _spec(tmp_path, "proxied")
    deploy(spec, "proxied", replicas=1, replica_cpus=0.5)
    url = f"http://127.0.0.1:{ray_serve}/proxied"
    try:
        assert _post(url, BODY)[0] == 200
        proxy = next(n for n in ray.util.list_named_actors(all_namespaces=True) if "PROXY" in n["name"])
        os.kill(_pid(proxy["name"], proxy["namespace"]), signal.SIGKILL)
        refused, answered, deadline = 0, 1, time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status = _post(url, BODY)[0]
            except (ConnectionError, urllib.error.URLError) as exc:  # refused or reset: the client knows
                assert isinstance(getattr(exc, "reason", exc), ConnectionError), exc
                refused += 1
                time.sleep(0.2)
                continue
            assert status == 200
            answered += 1
            if answered == 3:
                break
        assert answered == 3, f"the proxy did not come back within 120 s ({refused} refused)"
        assert refused > 0  # the outage was seen
        rows = querylog.read(str(tmp_path / "queries"))
        assert rows.num_rows == 3 * 4 and np.all(np.asarray(rows.column("action").to_pylist()) == "answered")
    finally:
        delete(spec, "proxied")

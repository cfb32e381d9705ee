"""`python -m sim serve`: deploys the victim, serves external clients (among them a run of this tool attacking it as
a remote victim, victim.url), follows its keys file, reports its HTTP proxy's health, shuts down cleanly on Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import analysis
import sim
from sim import data, querylog
from sim.serving import free_port

from .conftest import env_without_ray_address
from .test_http import post


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its Ray's processes, for a driver that started its own)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def _attack_remotely(url: str, keys: list[dict], served_accuracy: float, cache_dir: str, run_dir) -> set[str]:
    """A run of this tool attacking the served victim through three of its keys (attacker, benign user, evaluation);
    returns the input digests it logged."""
    key_file = run_dir.parent / "remote-keys.json"
    key_file.write_text(json.dumps(keys))
    s = sim.run("single_knockoff", [f"victim.url={url}", f"victim.key_file={key_file}", "attackers.single.budget=200",
                                    "attackers.single.replica.epochs=10", "benign.users=1", "benign.queries=40",
                                    f"cache_dir={cache_dir}", f"run_dir={run_dir}"], quiet=True)
    assert (s.victim.source, s.victim.checkpoint) == ("remote", url)
    assert s.victim.test_accuracy == served_accuracy  # measured through the evaluation account
    assert s.defense.test_l1_mean is None and s.detection == {}
    assert s.queries.total == 240 and s.queries.answered == 240
    single = s.attackers[0]
    assert single.replica.test_accuracy > 0.5 and single.replica.fidelity > 0.5 and single.undefended is None
    table = analysis.read_run(str(run_dir))
    roles = Counter(table.column("role").to_pylist())
    assert roles == {"attacker": 200, "benign": 40, "evaluation": len(data.load("mnist5k").x_test)}
    assert table.column("clean_probs").null_count == table.num_rows  # no clean answers of a remote victim
    assert table.column("returned_probs").null_count == 0 and table.column("input").null_count == 0
    assert set(table.column("account_id").to_pylist()) == {"single-0000", "benign-0", "evaluation"}
    return set(table.column("input_sha1").to_pylist())


def test_serve_mode_answers_external_clients_and_leaves_a_readable_log(cache_dir, tmp_path, ray_serve):
    port = free_port()
    run_dir = tmp_path / "served"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", "serve", "scenario=single_knockoff", f"cache_dir={cache_dir}",
         f"run_dir={run_dir}", f"serve.port={port}", "serve.accounts=6", "victim.epochs=2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_without_ray_address(),
        start_new_session=True)
    later: list[str] = []  # what serve mode prints once it serves
    reader = None
    try:
        lines, deadline = [], time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            assert line, f"serve exited early: {lines}"
            lines.append(line.strip())
            if line.startswith("Ctrl-C"):
                break
        info = dict(m.groups() for m in map(re.compile(r"^(url|port|keys|log):\s+(.*)$").match, lines) if m)
        url = info["url"]
        assert url == f"http://127.0.0.1:{port}/victim" and info["port"] == str(port)
        assert info["keys"] == str(run_dir / "keys.json") and info["log"] == str(run_dir / "queries")
        assert any(line.startswith("detectors: prada (") for line in lines)  # what its clients meet
        assert json.load(open(run_dir / "served.json"))["url"] == url
        all_keys = json.load(open(run_dir / "keys.json"))
        assert len(all_keys) == 6 and {k["role"] for k in all_keys} == {"external"}
        served_accuracy = float(re.search(r"test accuracy ([0-9.]+)", lines[0]).group(1))
        reader = threading.Thread(target=lambda: later.extend(proc.stdout), daemon=True)
        reader.start()
        remote = _attack_remotely(url, all_keys[3:], served_accuracy, cache_dir, tmp_path / "remote")
        keys = all_keys[:3]  # the rest of the test uses these

        imgs = (data.load("mnist5k").x_test[:5, 0] / 255.0).tolist()
        status, body = post(url, {"images": imgs}, key=keys[1]["key"])
        assert status == 200 and body["account"] == keys[1]["account_id"] and len(body["results"]) == 5
        assert post(url, {"images": imgs}, key="not-a-key")[0] == 401

        # the keys file edited while it serves: one key removed (revoked), one added, applied live
        edited = [*all_keys[1:], {"key": "a-fresh-key-of-128-bits-or-more-0001", "account_id": "external-new"}]
        (run_dir / "keys.json").write_text(json.dumps(edited))
        one = imgs[:1]
        deadline = time.time() + 60
        while not (post(url, {"images": one}, key=keys[0]["key"])[0] == 401
                   and post(url, {"images": one}, key=edited[-1]["key"])[0] == 200):
            assert time.time() < deadline, "the edited keys file was not applied within 60 s"
            time.sleep(0.5)
        assert post(url, {"images": one}, key=keys[2]["key"])[0] == 200  # untouched keys keep working

        # its HTTP proxy killed: connections fail until Serve has replaced it, and serve mode says so
        proxy = next(p for p in _descendants(proc.pid) if _cmdline(p).startswith(b"ray::ProxyActor"))
        os.kill(proxy, signal.SIGKILL)
        refused, deadline = 0, time.time() + 90
        while True:
            assert time.time() < deadline, "the proxy was not replaced within 90 s"
            try:
                if post(url, {"images": one}, key=keys[2]["key"])[0] == 200:
                    break
            except (ConnectionError, urllib.error.URLError):
                refused += 1
                time.sleep(0.3)
        assert refused
        while not any(re.match(r"HTTP proxy on node \w+: HEALTHY", line) for line in later):  # it says it is back
            assert time.time() < deadline, "serve mode did not say the proxy was back within 90 s"
            time.sleep(0.3)
    finally:  # as systemd stops a service: SIGTERM to every process, Ray's included (they stop at once)
        os.killpg(proc.pid, signal.SIGTERM)
        stopping = time.monotonic()
        proc.wait(timeout=120)
        # its Serve replica (a process group of its own) outlived Ray's processes: stopped before the log was compacted
        writers_left = querylog.stop_writers(str(run_dir / "queries"), wait_s=5)
        if reader is not None:
            reader.join(timeout=30)
    out = "".join(later)
    assert proc.returncode == 0 and time.monotonic() - stopping < 30 and writers_left == 0, out[-2000:]
    health = re.findall(r"^HTTP proxy on node \w+: (\w+)", out, re.M)
    assert len(health) >= 2 and health[0] != "HEALTHY" and health[-1] == "HEALTHY", out
    assert f"keys: added ['external-new'], revoked ['{keys[0]['account_id']}']" in out
    table = querylog.read(str(run_dir / "queries"))
    assert f"stopped; {table.num_rows} queries logged" in out
    answered = table.filter(table.column("returned_label").is_valid())
    per_account = Counter(answered.column("account_id").to_pylist())
    assert per_account[keys[1]["account_id"]] == 5  # the first request
    assert per_account["external-new"] == 1  # once the change was applied
    assert per_account[keys[2]["account_id"]] == 2  # then, and once the proxy was back
    assert np.isfinite(np.array(answered.column("clean_probs").to_pylist())).all()
    # every query the remote run logged reached the server (through its three accounts), and nothing else did
    theirs = table.filter(pc.is_in(table.column("account_id"), pa.array([k["account_id"] for k in all_keys[3:]])))
    assert set(theirs.column("input_sha1").to_pylist()) == remote and theirs.num_rows == 1240

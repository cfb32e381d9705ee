"""The victim API's hardening on a real Serve app: per-account limits exact under concurrent clients and two replicas
(the same answers over HTTP and handles), oversize bodies refused unread, full queues shed, keys kept as hashes and
added or revoked live."""

import base64
import http.client
import json
import pickle
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.compute as pc
import pytest
from ray import serve

from sim import models, querylog
from sim.errors import ConfigError
from sim.limits import Limits
from sim.protocol import Account
from sim.serving import VictimSpec, delete, deploy, update_keys

from .conftest import REQUEST_TIMEOUT_S


def _spec(tmp_path, name, limits=None, **extra):
    model = models.build("lenet", (1, 28, 28), 10)
    keys = {"k-one": Account("acct-one", "attacker", "knockoff"), "k-two": Account("acct-two", "attacker", "knockoff")}
    return VictimSpec(victim=name, run_id="t", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts=keys, detectors={}, rules={}, defense={"name": "identity"},
                      log_dir=str(tmp_path / "queries"), log_inputs=True, max_images=4, limits=limits,
                      state_dir=str(tmp_path / "tier"), **extra)


def _lower(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def _post(url, body: bytes, key="k-one", headers=None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", "X-API-Key": key,
                                                          **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, _lower(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, _lower(err.headers), json.loads(text)
        except ValueError:  # Serve's own answers (a full queue) are plain text
            return err.code, _lower(err.headers), {"text": text.decode()}


BODY = json.dumps({"images": np.zeros((4, 28, 28)).tolist()}).encode()


def test_quota_and_rate_hold_exactly_for_concurrent_clients_on_two_replicas(ray_serve, tmp_path):
    spec = _spec(tmp_path, "limited", Limits(quota=50, rate=10.0, burst=8))  # slow refill: every path overruns it
    deploy(spec, "limited", replicas=2, replica_cpus=0.5)
    url = f"http://127.0.0.1:{ray_serve}/limited"
    handle = serve.get_deployment_handle("victim", "limited")
    x = np.zeros((4, 1, 28, 28), np.uint8)
    waits = {"http": [], "handle": []}
    try:
        def over_http(_):  # a client that retries over the rate (sooner than Retry-After's whole second)
            while True:
                status, headers, body = _post(url, BODY)
                if status != 429 or body["error"] != "rate":
                    return status, headers, body
                waits["http"].append(int(headers["retry-after"]))
                assert body["retry_after"] <= int(headers["retry-after"])
                time.sleep(body["retry_after"])

        def over_handle(_):
            while True:
                reply = handle.query.remote("k-one", x, "t").result()
                if reply.status != 429 or reply.reason != "rate":
                    return reply
                waits["handle"].append(reply.retry_after)
                time.sleep(reply.retry_after)

        with ThreadPoolExecutor(8) as pool:  # one account, 8 clients at once, over HTTP and over handles in turn
            results = list(pool.map(lambda i: over_http(i) if i % 2 else over_handle(i), range(40)))
        web, handled = results[1::2], results[::2]
        answered = sum(sum(r["action"] == "answered" for r in body.get("results", [])) for _, _, body in web)
        answered += sum(int(r.answered.sum()) for r in handled)
        assert answered == 50  # the quota, exactly, across both replicas and both paths
        for status, headers, body in web:
            assert status in (200, 429)
            if status == 429:
                assert body["error"] == "quota" and "retry-after" not in headers and "retry_after" not in body
        assert waits["http"] and waits["handle"]  # 8 clients at once overran the bucket of 8 on both paths
        assert all(0 < w <= 4 / 10 for w in waits["handle"])  # the exact wait for 4 tokens at most
        assert all(w == 1 for w in waits["http"])  # HTTP's Retry-After is whole seconds, rounded up
        assert _post(url, BODY, key="k-two")[0] == 200  # another account has its own quota
    finally:
        delete(spec, "limited")
    table = querylog.read(str(tmp_path / "queries"))
    retried = len(waits["http"]) + len(waits["handle"])
    assert table.num_rows == (40 + retried) * 4 + 4  # every query of every request, once
    counts = {v["values"]: v["counts"] for v in pc.value_counts(table.column("refusal_reason")).to_pylist()}
    assert counts.get("quota") == 40 * 4 - 50 and counts.get("rate", 0) == 4 * retried
    assert pc.sum(pc.equal(table.column("action"), "answered")).as_py() == 54


def test_oversize_bodies_get_413_unread_and_full_queues_503(ray_serve, tmp_path):
    spec = _spec(tmp_path, "bounded", max_body_bytes=4096)
    deploy(spec, "bounded", replicas=1, max_ongoing_requests=1, max_queued_requests=1)
    port = ray_serve
    try:
        status, _, body = _post(f"http://127.0.0.1:{port}/bounded", b"[" + b"0," * 5000 + b"0]")
        assert status == 413 and body["error"] == "request body larger than serve.max_body_bytes=4096"
        # no declared length: the body streams in chunks and is cut off once past the limit
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.putrequest("POST", "/bounded")
        conn.putheader("X-API-Key", "k-one")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for _ in range(10):
            conn.send(b"400\r\n" + b"x" * 1024 + b"\r\n")
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        assert resp.status == 413 and "max_body_bytes" in json.loads(resp.read())["error"]
        conn.close()
        small = json.dumps({"images": np.zeros((1, 28, 28)).tolist()}).encode()  # within 4,096 bytes
        assert len(small) < 4096 and _post(f"http://127.0.0.1:{port}/bounded", small)[0] == 200

        statuses, shed = [], []
        lock = threading.Lock()

        def hammer(_):
            status, headers, body = _post(f"http://127.0.0.1:{port}/bounded", small)
            with lock:
                statuses.append(status)
                if status == 503:
                    shed.append((headers, body))

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(hammer, range(64)))
        assert set(statuses) <= {200, 503} and 503 in statuses  # shed by Serve, never an error
        assert all(headers["retry-after"] == "1" and "backpressure" in body["text"] for headers, body in shed)
        assert _post(f"http://127.0.0.1:{port}/bounded", small)[0] == 200  # and still up
    finally:
        delete(spec, "bounded")
    rows = querylog.read(str(tmp_path / "queries"))
    reasons = rows.column("refusal_reason").to_pylist()
    assert reasons.count("request body larger than serve.max_body_bytes=4096") == 2  # each refused row logged
    assert pc.sum(pc.equal(rows.column("action"), "answered")).as_py() == statuses.count(200) + 2


@pytest.mark.parametrize("value", ["serve.rate=0", "serve.quota=-1"])
def test_bad_limits_are_config_errors(value):
    from sim import config
    from sim.errors import ConfigError

    with pytest.raises(ConfigError, match=value.split("=")[0]):
        config.load("distributed_knockoff", [value])


def test_keys_are_kept_hashed_and_added_or_revoked_live_on_every_replica(ray_serve, tmp_path):
    spec = _spec(tmp_path, "keyed")
    assert all(k.startswith("sha256:") for k in spec.accounts) and b"k-one" not in pickle.dumps(spec)
    deploy(spec, "keyed", replicas=2, replica_cpus=0.5)
    url = f"http://127.0.0.1:{ray_serve}/keyed"
    handle = serve.get_deployment_handle("victim", "keyed")
    pids = set()
    try:
        assert _post(url, BODY, key="k-one")[0] == 200
        # the deploy options default to the app's own: it keeps its two replicas
        spec = update_keys(spec, "keyed", add={"k-new": Account("acct-new", "external")}, revoke=["k-one"])
        for _ in range(12):  # requests spread over both replicas: each has the change
            pids.add(handle.info.remote().result()["pid"])
            status, _, body = _post(url, BODY, key="k-one")
            assert status == 401 and body["error"] == "unknown API key"
            status, _, body = _post(url, BODY, key="k-new")
            assert status == 200 and body["account"] == "acct-new"
            assert _post(url, BODY, key="k-two")[0] == 200  # the others are untouched
        assert len(pids) == 2  # and the replicas were not restarted for it
        with pytest.raises(ConfigError, match="cannot revoke 1 key"):
            update_keys(spec, "keyed", revoke=["never-issued"])
        spec = update_keys(spec, "keyed", add={"k-one": Account("acct-one", "attacker", "knockoff")})  # given back
        assert _post(url, BODY, key="k-one")[0] == 200
    finally:
        delete(spec, "keyed")
    rows = querylog.read(str(tmp_path / "queries"))
    refused = rows.filter(pc.equal(rows.column("refusal_reason"), "unknown API key"))
    assert refused.num_rows == 12  # each revoked request left its refused row


def _slow_body(port: int, app: str) -> socket.socket:
    """A request whose body never arrives: headers that promise 100 kB, then 10 bytes."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(f"POST /{app} HTTP/1.1\r\nHost: x\r\nX-API-Key: k-0\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 100000\r\n\r\n{{\"images\": ".encode())
    return conn


def test_sixteen_concurrent_http_clients_get_every_answer_logged_once(ray_serve, tmp_path):
    """16 clients for 10 s, while 4 other connections hold requests whose bodies never come: no error for the 16
    (the slow ones wedge nothing), and the proxy answers the slow ones 408 at its request timeout."""
    model = models.build("lenet", (1, 28, 28), 10)
    keys = {f"k-{i}": Account(f"acct-{i}", "benign") for i in range(16)}
    spec = VictimSpec(victim="loaded", run_id="t", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts=keys, detectors={"prada": {"kind": "prada", "params": {}}},
                      rules={}, defense={"name": "identity"}, log_dir=str(tmp_path / "queries"), log_inputs=True,
                      max_images=16)
    deploy(spec, "loaded", replicas=2, replica_cpus=0.5)
    url = f"http://127.0.0.1:{ray_serve}/loaded"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)
    body = json.dumps({"uint8": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}).encode()
    deadline = time.monotonic() + 10  # bounded in time, not in requests

    def client(i):
        out = []
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            status, _, reply = _post(url, body, key=f"k-{i}")
            out.append((status, time.perf_counter() - t0, reply.get("request_id"), len(reply.get("actions", []))))
        return out

    slow = [_slow_body(ray_serve, "loaded") for _ in range(4)]
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(16) as pool:
            done = [r for part in pool.map(client, range(16)) for r in part]
        for conn in slow:  # the session's proxy times requests out after REQUEST_TIMEOUT_S
            conn.settimeout(max(1.0, started + 4 * REQUEST_TIMEOUT_S - time.monotonic()))
            assert conn.recv(64).startswith(b"HTTP/1.1 408"), "a slow body was not cut off"
            conn.close()
        assert REQUEST_TIMEOUT_S - 3 < time.monotonic() - started < 4 * REQUEST_TIMEOUT_S
    finally:
        delete(spec, "loaded")
    assert {s for s, *_ in done} == {200} and all(n == 16 for *_, n in done)  # no error of any kind
    latency = np.array([t for _, t, *_ in done]) * 1e3
    print(f"{len(done)} requests, {16 * len(done)} queries in 10 s: p50 {np.percentile(latency, 50):.0f} ms, "
          f"p99 {np.percentile(latency, 99):.0f} ms")
    log = querylog.read(str(tmp_path / "queries"))
    assert log.num_rows == 16 * len(done)  # every answered query, once
    assert sorted(set(log.column("request_id").to_pylist())) == sorted(r for _, _, r, _ in done)
    assert pc.all(pc.equal(log.column("action"), "answered")).as_py()

"""A seeded fuzzer against a real Serve app over HTTP: 500 generated requests (random bytes, truncated and deeply
nested JSON, wrong types at every level, huge numbers, wrong content types and methods, oversize bodies, odd and
missing headers). Each gets an answer, never a 5xx or a dropped connection; each that reaches the service leaves
exactly the rows its answer says; the server stays up."""

import base64
import http.client
import json

import numpy as np
import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim import models, querylog
from sim.protocol import Account
from sim.serving import VictimSpec, delete, deploy

MAX_BODY = 16384
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=30)
images = st.one_of(  # what "images" may hold: numbers, wrong types, wrong shapes, huge values, at any level
    json_values,
    st.lists(st.lists(st.lists(st.floats(-2, 2) | st.integers(-300, 300), min_size=28, max_size=28),
                      min_size=28, max_size=28), min_size=0, max_size=2),
    st.lists(st.lists(st.lists(json_values, min_size=1, max_size=3), max_size=3), max_size=2),
)


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["json", "bytes", "truncated", "nested", "huge_number", "base64", "npy", "png",
                                 "oversize", "challenge"]))
    if kind == "json":
        body = json.dumps({"images": draw(images)}).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=2048))
    elif kind == "truncated":
        whole = json.dumps({"images": np.zeros((1, 28, 28)).tolist()}).encode()
        body = whole[:draw(st.integers(0, len(whole) - 1))]
    elif kind == "nested":
        depth = draw(st.integers(10, 200_000 if draw(st.booleans()) else 2_000))
        body = b'{"images": ' + b"[" * depth + b"]" * draw(st.integers(0, depth)) + b"}"
    elif kind == "huge_number":
        body = b'{"images": [[' + draw(st.sampled_from([b"1e999", b"-1e999", b"9" * 5000, b"NaN", b"Infinity",
                                                          b"1" + b"0" * 400])) + b"]]}"
    elif kind == "base64":
        shape = draw(st.lists(st.integers(-2, 40), min_size=0, max_size=5) | json_values)
        text = base64.b64encode(draw(st.binary(max_size=1000))).decode()
        body = json.dumps({"uint8": draw(st.sampled_from([text, text[:-1], "!!!", 7])), "shape": shape}).encode()
    elif kind == "npy":
        body = b"\x93NUMPY" + draw(st.binary(max_size=400))
    elif kind == "png":
        body = b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=400))
    elif kind == "oversize":
        body = b"[" + b"0," * draw(st.integers(MAX_BODY // 2, MAX_BODY * 2)) + b"0]"
    else:
        body = json.dumps({"challenge": draw(json_values), "solution": draw(json_values)}).encode()
    ctype = draw(st.sampled_from(["application/json", "application/x-npy", "image/png", "text/plain",
                                  "application/json; charset=utf-8", None, "x/" + "y" * 300]))
    if kind in ("npy", "png") and draw(st.booleans()):
        ctype = {"npy": "application/x-npy", "png": "image/png"}[kind]
    key = draw(st.sampled_from(["k-fuzz", "k-fuzz", "nope", "", None, "k" * 4000, "sha256:" + "0" * 64]))
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH"]))
    actor = draw(st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40))
    return method, body, ctype, key, actor


def _send(port, method, body, ctype, key, actor):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {k: v for k, v in (("Content-Type", ctype), ("X-API-Key", key), ("X-Actor-Id", actor)) if v is not None}
    conn.request(method, "/fuzzed", body=body, headers=headers)
    resp = conn.getresponse()  # a dropped connection raises here, and fails the test
    status, data = resp.status, resp.read()
    conn.close()
    return status, data


def test_fuzzed_requests_get_4xx_and_leave_exactly_their_rows(ray_serve, tmp_path):
    model = models.build("lenet", (1, 28, 28), 10)
    spec = VictimSpec(victim="fuzzed", run_id="t", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts={"k-fuzz": Account("acct-fuzz", "attacker", "knockoff")},
                      detectors={"prada": {"kind": "prada", "params": {"min_pool": 10}}}, rules={},
                      defense={"name": "identity"}, log_dir=str(tmp_path / "queries"), log_inputs=True, max_images=4,
                      max_body_bytes=MAX_BODY)
    deploy(spec, "fuzzed")
    seen: list[tuple[int, dict | None]] = []
    try:
        @settings(max_examples=500, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def fuzz(request):
            status, data = _send(ray_serve, *request)
            assert status < 500, (request[0], request[1][:200], status, data[:300])
            try:
                reply = json.loads(data)
            except ValueError:
                reply = None  # Serve's own answer (plain text)
            seen.append((status, reply))

        fuzz()
        assert _send(ray_serve, "POST", json.dumps({"images": np.zeros((1, 28, 28)).tolist()}).encode(),
                     "application/json", "k-fuzz", None)[0] == 200  # still up and answering
    finally:
        delete(spec, "fuzzed")
    assert len(seen) >= 500 and sum(s >= 400 for s, _ in seen) > 450
    own = [s for s, r in seen if r is None or "request_id" not in r]  # answered by Serve's proxy, not the service
    assert all(400 <= s < 500 for s in own)
    print(f"{len(seen)} requests: {len(own)} answered by Serve itself ({sorted(set(own))}), the rest by the service")
    log = querylog.read(str(tmp_path / "queries"))
    rows = {v["values"]: v["counts"] for v in pc.value_counts(log.column("request_id")).to_pylist()}
    for status, reply in seen:
        if reply is None:
            continue
        got = rows.get(reply["request_id"], 0)
        if status >= 400 and "results" not in reply and "actions" not in reply:
            assert got == 1, (status, reply)  # one refused row per refused request
        else:
            assert got == len(reply.get("results") or reply.get("actions")), (status, reply)

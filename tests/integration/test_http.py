"""The HTTP API of a deployed victim: good and bad requests, each bad one a 4xx and a refused log row."""

import glob
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pyarrow.compute as pc
import pytest
import ray

from sim import data, models, querylog
from sim.protocol import Account
from sim.serving import VictimSpec, delete, deploy


@pytest.fixture()
def victim_app(ray_serve, tmp_path):

    model = models.build("lenet", (1, 28, 28), 10)
    keys = {"good-key": Account("acct-1", "external")}
    spec = VictimSpec(victim="httpvictim", run_id="t", model=models.to_bytes(model, "lenet", (1, 28, 28), 10),
                      input_shape=(1, 28, 28), accounts=keys,
                      detectors={"prada": {"kind": "prada", "params": {"delta": 0.95, "min_pool": 50}}},
                      rules={}, defense={"name": "identity"},
                      log_dir=str(tmp_path / "queries"), log_inputs=True, max_images=4)
    deploy(spec, "httpvictim")
    yield f"http://127.0.0.1:{ray_serve}/httpvictim", str(tmp_path / "queries")
    delete(spec, "httpvictim")


def post(url, body, key="good-key", method="POST"):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    data_ = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data_ if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_good_and_bad_requests(victim_app):
    url, log_dir = victim_app
    imgs = (data.load("mnist5k").x_test[:3, 0] / 255.0).round(4).tolist()
    status, body = post(url, {"images": imgs})
    assert status == 200 and body["account"] == "acct-1" and len(body["results"]) == 3
    for r in body["results"]:
        assert r["action"] == "answered" and abs(sum(r["probs"]) - 1) < 1e-4
        assert r["label"] == int(np.argmax(r["probs"]))

    bad = [
        ({"images": imgs}, "wrong-key", 401, "unknown API key"),
        ({"images": imgs}, None, 401, "missing API key"),
        (b"{oops", "good-key", 400, "malformed body"),
        ({"pictures": imgs}, "good-key", 400, "malformed body"),
        ({"images": [[[0.5] * 27] * 28]}, "good-key", 400, "images shape (1, 28, 27) is wrong"),
        ({"images": [[["x"] * 28] * 28]}, "good-key", 400, "dtype"),
        ({"images": [[[2.0] * 28] * 28]}, "good-key", 400, "must be in [0, 1]"),
        ({"images": [[[float("nan")] * 28] * 28]}, "good-key", 400, None),
        ({"images": imgs * 2}, "good-key", 413, "too many images: 6 > serve.max_images=4"),
    ]
    for body_, key, code, reason in bad:
        status, reply = post(url, body_, key)
        assert status == code, (body_ if isinstance(body_, bytes) else key, reply)
        if reason:
            assert reason in reply["error"]
        assert "\n" not in reply["error"]
    status, reply = post(url, None, method="GET")
    assert status == 405 and reply["error"] == "method GET not allowed; use POST"
    for headers, code, answer in (({}, 405, ("Allow", "POST")),  # a GET: the method it should have used
                                  ({"X-Actor-Id": "a" * 129}, 400, ("error", "header x-actor-id is 129 characters "
                                                                              "long; expected at most 128"))):
        req = urllib.request.Request(url, data=json.dumps({"images": imgs}).encode() if headers else None,
                                     headers={"X-API-Key": "good-key", **headers}, method="POST" if headers else "GET")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        got = err.value.headers if answer[0] == "Allow" else json.loads(err.value.read())
        assert err.value.code == code and got[answer[0]] == answer[1]
    # still healthy after all that
    assert post(url, {"images": imgs[:1]})[0] == 200

    table = querylog.read(log_dir)
    actions = pc.value_counts(table.column("action")).to_pylist()
    assert {a["values"]: a["counts"] for a in actions} == {"answered": 4, "refused": len(bad) + 3}
    assert max(map(len, filter(None, table.column("actor_id").to_pylist())), default=0) <= 128
    refused = table.filter(pc.equal(table.column("action"), "refused"))
    assert refused.column("refusal_reason").null_count == 0
    # each request is a row there, and not also a line in Serve's own replica log (its access log is off)
    logs = glob.glob(os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve",
                                  "replica_httpvictim_*.log"))
    assert logs and not any(" /httpvictim 200 " in open(path).read() for path in logs)


def test_a_replica_killed_with_sigkill_loses_no_answered_query(victim_app):
    import signal

    from ray import serve

    url, log_dir = victim_app
    handle = serve.get_deployment_handle("victim", "httpvictim")
    imgs = data.load("mnist5k").x_test[:4]
    answered = 0
    for _ in range(5):
        reply = handle.query.remote("good-key", imgs, "killer").result()
        answered += int(reply.answered.sum())
    info = handle.info.remote().result()
    assert info["rows"] == answered == 20
    os.kill(info["pid"], signal.SIGKILL)  # no close, no flush beyond what each answer already did
    table = querylog.read(log_dir)
    assert table.num_rows == answered
    assert table.column("action").to_pylist() == ["answered"] * answered
    # Serve brings a new replica up, with a writer of its own; the handle waits for it
    reply = handle.query.remote("good-key", imgs[:1], "after").result(timeout_s=120)
    assert reply.status == 200
    assert querylog.read(log_dir).num_rows == answered + 1


def test_compact_encodings_base64_npy_and_png_are_answered_in_kind(victim_app):
    import base64
    import io

    from PIL import Image

    url, log_dir = victim_app
    x = data.load("mnist5k").x_test[:3]
    _, floats = post(url, {"images": (x[:, 0] / 255.0).tolist()})

    def send(body, kind):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": kind,
                                                                               "X-API-Key": "good-key"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def npy_body(arr, cut=0):
        out = io.BytesIO()
        np.save(out, arr)
        return out.getvalue()[:len(out.getvalue()) - cut]

    def png_body(img, mode="L"):
        out = io.BytesIO()
        Image.fromarray(img, mode).save(out, format="PNG")
        return out.getvalue()

    text = base64.b64encode(x.tobytes()).decode()
    _, b64 = post(url, {"uint8": text, "shape": list(x.shape)})
    _, npy = send(npy_body(x), "application/x-npy")
    _, png = send(png_body(x[0, 0]), "image/png")
    want = np.array([r["probs"] for r in floats["results"]], np.float32)
    for body, n in ((b64, 3), (npy, 3), (png, 1)):  # the same pixels, the same answers, as exact float32
        probs = np.frombuffer(base64.b64decode(body["probs"]["float32"]), np.float32).reshape(body["probs"]["shape"])
        assert body["actions"] == ["answered"] * n and body["labels"] == [r["label"] for r in floats["results"][:n]]
        np.testing.assert_allclose(probs, want[:n], atol=1e-6)
    assert "results" not in b64

    bad = [
        (None, {"uint8": text[:-4], "shape": list(x.shape)}, 400, "must be the base64 text of 2352 bytes"),
        (None, {"uint8": text, "shape": [3, 28, 28, 1]}, 400, "images shape [3, 28, 28, 1] is wrong"),
        (None, {"uint8": text, "shape": [9, 1, 28, 28]}, 413, "too many images: 9 > serve.max_images=4"),
        (None, {"uint8": "!" * len(text), "shape": list(x.shape)}, 400, "not valid base64"),
        (None, {"uint8": "!" * 8, "shape": list(x.shape)}, 400, "not valid base64 text: it holds characters"),
        ("application/x-npy", b"not numpy at all", 400, "malformed application/x-npy body"),
        ("application/x-npy", npy_body(x, cut=10), 400, "needs 2352"),
        ("application/x-npy", npy_body(x.astype(np.int64)), 400, "dtype int64"),
        ("application/x-npy", npy_body(np.zeros((5, 1, 28, 28), np.uint8)), 413, "too many images: 5"),
        ("application/x-npy", npy_body(np.full((1, 28, 28), 2.0)), 400, "must be in [0, 1]"),
        ("image/png", b"\x89PNG but not really", 400, "malformed image/png body"),
        ("image/png", png_body(np.zeros((32, 32), np.uint8)), 400, "PNG image is 32x32 L; expected 28x28 L"),
        ("image/png", png_body(np.zeros((28, 28, 3), np.uint8), "RGB"), 400, "28x28 RGB; expected 28x28 L"),
        ("image/png", png_body(x[0, 0])[:-30], 400, "does not decode"),
    ]
    for kind, body, code, reason in bad:
        status, reply = post(url, body) if kind is None else send(body, kind)
        assert status == code and reason in reply["error"], (reason, reply)
    table = querylog.read(log_dir)
    assert table.num_rows == 10 + len(bad)  # every bad body is a refused row

import json
import re

import numpy as np
import pyarrow.compute as pc
import pytest

from sim import data, detectors, models, querylog
from sim.errors import RequestError
from sim.policy import Rule
from sim.protocol import Account, make_keys
from sim.service import VictimService, parse_images


@pytest.fixture()
def service(tmp_path):
    model = models.build("lenet", (1, 28, 28), 10)
    keys = {"k-att": Account("att-0", "attacker", "knockoff"), "k-ben": Account("ben-0", "benign")}
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w", detectors=["prada"])
    svc = VictimService(model=model, victim="v", run_id="r", accounts=keys, input_shape=(1, 28, 28),
                        detectors={"prada": detectors.build("prada", min_pool=10)},
                        rules={"prada": Rule(action="refuse")}, writer=writer, max_images=8)
    yield svc, tmp_path
    writer.close()


def test_good_request_is_answered_with_probabilities_and_logged(service):
    svc, path = service
    x = data.load("mnist5k").x_test[:4]
    reply = svc.query("k-ben", x, "actor-1")
    assert reply.status == 200 and reply.actions == ["answered"] * 4
    np.testing.assert_allclose(reply.probs.sum(1), 1, atol=1e-5)
    assert (reply.labels == reply.probs.argmax(1)).all()
    table = querylog.read(str(path))
    assert table.num_rows == 4 and set(table.column("role").to_pylist()) == {"benign"}
    assert table.column("actor_id").to_pylist() == ["actor-1"] * 4
    assert np.array_equal(querylog.decode_inputs(table, (1, 28, 28)), x)


def test_float_and_hw_inputs_are_quantised_to_8_bits(service):
    svc, _ = service
    x = data.load("mnist5k").x_test[:2]
    a = svc.query("k-ben", x, None)
    b = svc.query("k-ben", (x[:, 0] / 255.0).tolist(), None)  # (N, H, W) floats, as JSON sends them
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5)


@pytest.mark.parametrize("key,images,status,reason", [
    ("nope", np.zeros((1, 1, 28, 28), np.uint8), 401, "unknown API key"),
    (None, np.zeros((1, 1, 28, 28), np.uint8), 401, "missing API key"),
    ("k-att", np.zeros((1, 3, 28, 28), np.uint8), 400, r"images shape \(1, 3, 28, 28\) is wrong"),
    ("k-att", np.zeros((0, 1, 28, 28), np.uint8), 400, "with N >= 1"),
    ("k-att", np.zeros((1, 1, 28, 28), np.int64), 400, "images dtype int64 not supported"),
    ("k-att", np.full((1, 1, 28, 28), np.nan), 400, "NaN or infinite"),
    ("k-att", np.full((1, 1, 28, 28), 1.5), 400, r"must be in \[0, 1\], got min 1.5 max 1.5"),
    ("k-att", np.zeros((9, 1, 28, 28), np.uint8), 413, "too many images: 9 > serve.max_images=8"),
    ("k-att", [[0.1, 0.2], [0.3]], 400, "rectangular array"),
    ("k-att", [["a"] * 28] * 28, 400, "dtype <U1 not supported"),
    ("k-att", None, 400, "missing 'images'"),
])
def test_bad_requests_get_4xx_and_one_refused_log_row(service, key, images, status, reason):
    svc, path = service
    reply = svc.query(key, images, "actor-x")
    assert reply.status == status
    assert re.search(reason, reply.reason)
    assert "\n" not in reply.reason
    rows = querylog.read(str(path)).to_pylist()
    assert len(rows) == 1 and rows[0]["action"] == "refused" and rows[0]["refusal_reason"] == reply.reason
    # the replica still answers afterwards
    assert svc.query("k-ben", np.zeros((1, 1, 28, 28), np.uint8)).status == 200


def test_malformed_json_body_is_400_and_logged(service):
    svc, path = service
    for body, why in ((b"{not json", "not JSON (Expecting property name"), (b"[1, 2]", "a JSON array"),
                      (json.dumps({"imgs": []}).encode(), "the object has no 'images', 'uint8' or 'challenge' key "
                                                          "(its keys: ['imgs'])"),
                      (json.dumps({"images": [], "uint8": ""}).encode(), "the object has 'images' and 'uint8'"),
                      (b'{"images": 1' + b"0" * 5000 + b"}", "not JSON (Exceeds the limit")):
        reply = svc.query_json("k-att", body)
        assert reply.status == 400 and reply.reason.startswith(f"malformed body: {why}"), reply.reason
    reply = svc.query_json("k-att", b"\xff\xd8\xff\xe0", content_type="image/jpeg")
    assert reply.status == 415 and reply.reason.startswith("Content-Type 'image/jpeg' is not one this API reads")
    reply = svc.query_json("k-att", json.dumps({"uint8": "AAAA"}).encode())
    assert reply.status == 400 and reply.reason.startswith("shape is missing")
    # an unknown or missing key is 401 before anything of the body is read: no format hint to an unknown caller
    for key, why in (("nope", "unknown API key"), (None, "missing API key")):
        for body, kind in ((b"{not json", None), (b"\x89PNG", "image/png"), (b"x", "image/jpeg")):
            reply = svc.query_json(key, body, content_type=kind)
            assert reply.status == 401 and reply.reason.startswith(why), reply.reason
    assert querylog.read(str(path)).num_rows == 13


def _png(ihdr: bytes, idat: bytes = b"") -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b"")


def test_hostile_bodies_get_a_400_naming_the_fault_never_a_500(service):
    """Bodies a fuzzing client sent that once raised past the checks (a 500 with no log row): base64 text of the right
    length whose padding says another size, a PNG declaring 10 billion pixels, one of 4-bit samples, an animated one,
    a .npy header with an unclosed bracket; and reasons that quote what they were sent cut short, in JSON's words."""
    import base64
    import io
    import struct

    from PIL import Image

    svc, path = service
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (0, 255)]
    animated = io.BytesIO()
    frames[0].save(animated, "PNG", save_all=True, append_images=frames[1:])
    four_bit = io.BytesIO()
    frames[0].save(four_bit, "PNG", bits=4)
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1, 28, 28}"
    header += b" " * (117 - len(header)) + b"\n"
    for body, kind, why in (
            (json.dumps({"uint8": base64.b64encode(bytes(786)).decode(), "shape": [1, 1, 28, 28]}), None,
             "'uint8' decodes to 786 bytes; shape [1, 1, 28, 28] needs 784"),
            (_png(struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0), b"\0" * 29), "image/png",
             "PNG image is 100000x100000 L; expected 28x28 L"),
            (four_bit.getvalue(), "image/png", "PNG image is 28x28 L of 4-bit samples; expected 28x28 L"),
            (animated.getvalue(), "image/png", "the PNG body holds 2 frames (an animated PNG); expected one image"),
            (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(784), "application/x-npy",
             "malformed application/x-npy body"),
            (json.dumps({"uint8": "", "shape": [1] * 100_000}), None, "images shape [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"),
            (json.dumps({"uint8": None, "shape": [1, 1, 28, 28]}), None, "got a JSON null"),
            (b"null", None, "malformed body: a JSON null"),
            (b'"x"', None, "malformed body: a JSON string"),
            (b'{"images": {"a": 1}}', None, "images must be an array of images, got a JSON object"),
            (b'{"images": 0.5}', None, "images must be an array of images, got a JSON number"),
            (json.dumps({"images": [[[0.0] * 27 + [True]] * 28]}), None, "got true or false among them"),
            (json.dumps({"images": [[[1.0000000000000002] * 28] * 28]}), None, "got min 1.0000000000000002 max "
                                                                              "1.0000000000000002")):
        reply = svc.query_json("k-att", body if isinstance(body, bytes) else body.encode(), content_type=kind)
        assert reply.status == 400 and why in reply.reason and len(reply.reason) < 300, reply.reason
    reply = svc.query_json("k-att", json.dumps({"challenge": "c" * 100_000, "solution": 1}).encode())
    assert reply.status == 404 and len(reply.reason) < 100  # the id it was given, cut short
    assert querylog.read(str(path)).num_rows == 14


def test_prada_refuse_action_refuses_a_flagged_accounts_later_queries(service):
    svc, path = service
    ds = data.load("mnist5k")
    seed = ds.x_test[:1].astype(np.float32) / 255
    rng = np.random.default_rng(0)
    xs = np.clip(seed + 0.02 * rng.choice([-1, 1], size=(120, 1, 28, 28)), 0, 1)
    replies = [svc.query("k-att", xs[i:i + 8]) for i in range(0, 120, 8)]
    actions = [a for r in replies for a in r.actions]
    assert "refused" in actions
    first = actions.index("refused")
    assert set(actions[first:]) == {"refused"}
    assert replies[-1].status == 403 and replies[-1].reason == "account flagged by prada"
    assert svc.query("k-ben", ds.x_test[:8]).status == 200  # other accounts are unaffected
    table = querylog.read(str(path))
    att = table.filter(pc.equal(table.column("account_id"), "att-0"))
    assert att.column("action").to_pylist() == actions
    assert att.column("prada_flagged").to_pylist()[first - 1] is True


def test_parse_images_keeps_uint8_and_quantises_floats():
    x = (np.arange(784) % 256).astype(np.uint8).reshape(1, 1, 28, 28)
    assert np.array_equal(parse_images(x, (1, 28, 28), 4), x)
    assert np.array_equal(parse_images(x / 255.0, (1, 28, 28), 4), x)
    assert np.array_equal(parse_images((x[:, 0] / 255.0).tolist(), (1, 28, 28), 4), x)
    with pytest.raises(RequestError, match="dtype bool not supported"):
        parse_images(x.astype(bool), (1, 28, 28), 4)


def test_absurdly_deep_json_is_a_400_and_logged(service):
    svc, path = service
    body = ("{\"images\": " + "[" * 100000 + "]" * 100000 + "}").encode()
    reply = svc.query_json("k-att", body)
    assert reply.status == 400 and reply.reason.startswith("malformed body")
    rows = querylog.read(str(path)).to_pylist()
    assert len(rows) == 1 and rows[0]["account_id"] == "att-0" and rows[0]["action"] == "refused"


def test_reject_logs_one_refused_row_for_known_and_unknown_keys(service):
    svc, path = service
    assert svc.reject("k-ben", 405, "method GET not allowed; use POST").status == 405
    assert svc.reject("nope", 405, "method PUT not allowed; use POST").account_id is None
    rows = querylog.read(str(path)).to_pylist()
    assert [(r["account_id"], r["refusal_reason"]) for r in rows] == [
        ("ben-0", "method GET not allowed; use POST"), (None, "method PUT not allowed; use POST")]


def test_seeded_keys_are_reproducible_and_distinct():
    accts = [Account(f"a{i}", "attacker") for i in range(50)]
    k1, k2 = make_keys(accts, seed=3), make_keys(accts, seed=3)
    assert list(k1) == list(k2) and len(set(k1)) == 50
    assert list(make_keys(accts)) != list(k1)


def test_log_inputs_off_leaves_the_input_column_empty(tmp_path):
    model = models.build("lenet", (1, 28, 28), 10)
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    svc = VictimService(model=model, victim="v", run_id="r", accounts={"k": Account("a", "benign")},
                        input_shape=(1, 28, 28), writer=writer, log_inputs=False)
    assert svc.query("k", data.load("mnist5k").x_test[:3]).status == 200
    writer.close()
    table = querylog.read(str(tmp_path))
    assert table.num_rows == 3 and table.column("input").null_count == 3
    assert table.column("input_sha1").null_count == 0


def test_the_defense_shapes_the_answers_and_the_log_records_its_distortion(tmp_path):
    from sim import defenses

    model = models.build("lenet", (1, 28, 28), 10)
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    svc = VictimService(model=model, victim="v", run_id="r", accounts={"k": Account("a", "benign")},
                        input_shape=(1, 28, 28), defense=defenses.build("labels_only"), writer=writer)
    x = data.load("mnist5k").x_test[:5]
    one_hot = svc.query("k", x).probs
    assert ((one_hot == 0) | (one_hot == 1)).all() and (one_hot.sum(1) == 1).all()
    svc.set_defense(defenses.build("mad", eps=0.25, victim=model))
    mad = svc.query("k", x).probs
    writer.close()
    table = querylog.read(str(tmp_path))
    clean = np.array(table.column("clean_probs").to_pylist())
    l1 = table.column("defense_l1").to_numpy()
    np.testing.assert_allclose(l1[:5], np.abs(one_hot - clean[:5]).sum(1), atol=1e-5)
    np.testing.assert_allclose(l1[5:], 0.25, atol=1e-5)
    assert not table.column("top1_changed").to_numpy(zero_copy_only=False)[:5].any()  # labels_only keeps top-1
    np.testing.assert_allclose(mad, np.array(table.column("returned_probs").to_pylist())[5:], atol=1e-7)


def test_a_compact_query_and_its_proof_of_work_are_answered_in_kind():
    import base64

    from sim import pow

    model = models.build("lenet", (1, 28, 28), 10)
    keys = {"k": Account("a-0", "attacker", "jbda")}
    svc = VictimService(model=model, victim="v", run_id="r", accounts=keys, input_shape=(1, 28, 28),
                        detectors={"msp": detectors.build("msp", threshold=-1.0)},  # flags every query
                        rules={"msp": Rule(action="proof_of_work", threshold=0, saturate=1, bits_min=4, bits_max=4)})
    x = data.load("mnist5k").x_test[:3]
    body = json.dumps({"uint8": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}).encode()
    asked = svc.query_json("k", body)
    out = asked.to_json()
    assert asked.status == 202 and out["actions"] == ["challenged"] * 3 and out["labels"] == [-1] * 3
    assert np.isnan(np.frombuffer(base64.b64decode(out["probs"]["float32"]), np.float32)).all()
    counter, _ = pow.solve(out["challenge"]["nonce"], out["challenge"]["bits"])
    solved = svc.query_json("k", json.dumps({"challenge": out["challenge"]["id"], "solution": counter}).encode())
    got = solved.to_json()
    probs = np.frombuffer(base64.b64decode(got["probs"]["float32"]), np.float32).reshape(got["probs"]["shape"])
    assert got["actions"] == ["answered"] * 3 and got["probs"]["shape"] == [3, 10]
    np.testing.assert_array_equal(probs, solved.probs)  # the exact float32 values
    assert got["labels"] == probs.argmax(1).tolist()
    # the same request as JSON numbers gets the per-query results
    plain = svc.query_json("k", json.dumps({"images": (x[:, 0] / 255.0).tolist()}).encode()).to_json()
    assert [r["action"] for r in plain["results"]] == ["challenged"] * 3 and "actions" not in plain


def test_the_service_keeps_only_hashes_of_keys_and_finds_accounts_by_them(service):
    svc, _ = service
    from sim.protocol import hash_key

    assert set(svc.accounts) == {hash_key("k-att"), hash_key("k-ben")}
    assert svc.query("k-att", np.zeros((1, 1, 28, 28), np.uint8)).status == 200
    assert svc.query(hash_key("k-att"), np.zeros((1, 1, 28, 28), np.uint8)).status == 401  # a hash is not a key
    svc.set_keys(dict(svc.accounts), {hash_key("k-new"): Account("new", "external")}, {hash_key("k-att")})
    assert svc.query("k-att", np.zeros((1, 1, 28, 28), np.uint8)).reason == "unknown API key"
    assert svc.query("k-new", np.zeros((1, 1, 28, 28), np.uint8)).account_id == "new"


def test_an_accounts_file_may_hold_keys_or_only_their_hashes(tmp_path):
    import hashlib

    from sim.cli import load_keys
    from sim.errors import SimError
    from sim.protocol import hashed

    digest = hashlib.sha256(b"secret-key").hexdigest()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"key": "plain-key", "account_id": "a"},
                                {"key_sha256": digest, "account_id": "b", "role": "benign", "cohort": "c"}]))
    keys = hashed(load_keys(str(path)))
    assert keys[f"sha256:{digest}"] == Account("b", "benign", None, "c")
    assert keys[f"sha256:{hashlib.sha256(b'plain-key').hexdigest()}"].account_id == "a"
    path.write_text(json.dumps([{"key_sha256": "XYZ", "account_id": "b"}]))
    with pytest.raises(SimError, match=r"is not a valid accounts file \(key_sha256='XYZ' is not 64 lowercase hex"):
        load_keys(str(path))
    path.write_text(json.dumps([{"key": "plain-key", "account_id": "a"}, {"key": "k2", "account_id": "b"},
                                {"key_sha256": hashlib.sha256(b"plain-key").hexdigest(), "account_id": "c"}]))
    with pytest.raises(SimError, match=r"\(entry 2 \('c'\) has the key of entry 0; a key belongs to one account\)"):
        load_keys(str(path))
    path.write_text(json.dumps([{"key": "k"}, {"account_id": "b"}]))
    with pytest.raises(SimError, match=r"is not a valid accounts file \(entry 0 is \{'key': 'k'\}\); expected a JSON"):
        load_keys(str(path))
    for entry, why in (({"key": 123, "account_id": "a"}, "key=123; expected a non-empty string"),
                       ({"key": "k", "account_id": 5}, "account_id=5; expected a non-empty string"),
                       ({"key": "k", "account_id": "a", "cohort": ["c"]}, "cohort=['c']; expected a non-empty string "
                                                                          "or none")):
        path.write_text(json.dumps([{"key": "k0", "account_id": "z"}, entry]))  # typed by hand into a live file
        with pytest.raises(SimError, match=re.escape(f"(entry 1 has {why})")):
            load_keys(str(path))


def test_once_the_log_cannot_be_written_nothing_more_is_answered(service, monkeypatch):
    """A full disk (a write that fails): that request and every later one get 503 and no answer, since an answer the
    log does not have would be lost; what was logged before stays readable."""
    import errno

    svc, path = service
    x = data.load("mnist5k").x_test[:2]
    assert svc.query("k-ben", x).status == 200
    writes = []

    def full(**rows):
        writes.append(rows["request_id"])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(svc.writer, "write", full)
    for call in (lambda: svc.query("k-ben", x), lambda: svc.query_json("k-att", b"{}"), lambda: svc.query("bad", x)):
        reply = call()
        assert reply.status == 503 and not len(reply.answered) and "No space left on device" in reply.reason
        assert reply.to_json()["error"] == reply.reason
    assert len(writes) == 1  # after the first failure the service writes nothing more
    assert querylog.read(str(path)).num_rows == 2


def test_a_request_waiting_for_the_log_when_a_write_fails_writes_nothing(service, monkeypatch):
    """Two requests at once: B passes the check of the log's health while A is writing, and waits for the writer;
    A's write fails (it may leave a torn record, behind which no reader would find B's rows). B must not write after
    it: it gets 503 too, and nothing more reaches the writer."""
    import errno
    import threading

    svc, _ = service
    x = data.load("mnist5k").x_test[:2]

    class Watched:  # the service's lock, telling when a second request waits for it
        def __init__(self):
            self.lock, self.waiting = threading.Lock(), threading.Event()

        def __enter__(self):
            if self.lock.locked():
                self.waiting.set()
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()

    svc._lock = Watched()
    writes, replies = [], {}

    def full(**rows):
        writes.append(rows["request_id"])
        if len(writes) == 1:  # A, holding the lock: B starts now, passes the check, and waits for the lock
            other = threading.Thread(target=lambda: replies.setdefault("B", svc.query("k-att", x)))
            other.start()
            assert svc._lock.waiting.wait(60)
            replies["thread"] = other
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(svc.writer, "write", full)
    replies["A"] = svc.query("k-ben", x)
    replies["thread"].join(60)
    assert replies["A"].status == replies["B"].status == 503 and len(writes) == 1


def test_once_the_detection_tier_cannot_journal_its_state_nothing_more_is_answered(service, monkeypatch):
    """The tier's journal lives under the run directory too: a shard that cannot record what it scored fails the
    request, which gets 503, as does every later one; nothing is answered that the detectors did not record."""
    import errno

    svc, path = service
    x = data.load("mnist5k").x_test[:2]
    assert svc.query("k-ben", x).status == 200

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(svc.tier, "score", full)
    for call in (lambda: svc.query("k-att", x), lambda: svc.query("k-ben", x)):
        reply = call()
        assert reply.status == 503 and not len(reply.answered)
        assert reply.reason == ("the detection tier cannot record its state ([Errno 28] No space left on device); the "
                                "service answers nothing it cannot judge")
    assert querylog.read(str(path)).num_rows == 2


def _image_png(pixels: np.ndarray, mode: str) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, "PNG")
    return out.getvalue()


def test_the_compact_encodings_decode_exactly_what_was_sent_and_refuse_what_does_not_fit():
    """Each encoding's pixels arrive where they were (an RGB PNG's rows stay rows), exactly ``max_images`` images is
    allowed, and what is wrong gets a 400 naming it: negative floats, Fortran-order or truncated .npy, over-long
    base64, a grayscale PNG for an RGB victim, a non-JSON text/plain body."""
    import base64
    import io

    from sim.service import parse_base64, parse_npy, parse_png

    shape = (1, 28, 28)
    with pytest.raises(RequestError, match=r"must be in \[0, 1\], got min -0.2"):
        parse_images(np.full((1, 1, 28, 28), -0.2), shape, 4)
    assert parse_images(np.full((1, 1, 28, 28), 0.5), shape, 4).max() == 128  # 127.5 rounds to 128, not down
    four = np.arange(4 * 784, dtype=np.uint32).astype(np.uint8).reshape(4, 1, 28, 28)
    got = parse_base64({"uint8": base64.b64encode(four.tobytes()).decode(), "shape": list(four.shape)}, shape, 4)
    out = io.BytesIO()
    np.save(out, four)
    assert np.array_equal(got, four) and np.array_equal(parse_npy(out.getvalue(), shape, 4), four)
    with pytest.raises(RequestError, match="holds characters other than"):
        parse_base64({"uint8": "!" * 8, "shape": [1, 1, 28, 28]}, shape, 4)
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(four[:2]))
    with pytest.raises(RequestError, match="Fortran order"):
        parse_npy(fortran.getvalue(), shape, 4)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, :, 0] = 255  # the first row red
    x = parse_png(_image_png(rgb, "RGB"), (3, 8, 8), 4)
    assert x.shape == (1, 3, 8, 8) and x[0, 0, 0].tolist() == [255] * 8 and x[0, 0, :, 0].sum() == 255

    keys = {"k": Account("a", "benign")}
    gray = VictimService(model=models.build("lenet", shape, 10), victim="v", run_id="r", accounts=keys,
                         input_shape=shape, max_images=4)
    color = VictimService(model=models.build("lenet", (3, 16, 16), 10), victim="v", run_id="r", accounts=keys,
                          input_shape=(3, 16, 16), max_images=4)
    for svc, body, kind, why in (
            (gray, json.dumps({"uint8": base64.b64encode(bytes(787)).decode(), "shape": [1, 1, 28, 28]}).encode(),
             None, "must be the base64 text of 784 bytes"),
            (gray, out.getvalue()[:-10], "application/x-npy", "needs 3136"),
            (color, _image_png(np.zeros((16, 16), np.uint8), "L"), "image/png", "16x16 L; expected 16x16 RGB"),
            (gray, b"hello", "text/plain", "malformed body: not JSON")):
        reply = svc.query_json("k", body, content_type=kind)
        assert reply.status == 400 and why in reply.reason, reply.reason


def test_a_reply_as_json_carries_the_error_alone_or_each_querys_action_and_reason():
    from sim.protocol import Reply

    assert Reply(400, "bad", "rid").to_json() == {"error": "bad", "request_id": "rid"}
    reply = Reply(403, "quota", "rid", "a", np.array([True, False]), [None, "quota"], np.array([1, -1]),
                  np.array([[0.2, 0.8], [np.nan, np.nan]]))
    assert reply.to_json()["results"][1] == {"action": "refused", "reason": "quota"}

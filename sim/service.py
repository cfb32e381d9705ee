"""The victim service, Ray-free: validation -> model -> detectors -> response policy -> defense -> log.

:class:`VictimService` is what a Serve replica runs for both its HTTP route and its DeploymentHandle
method, so both paths share every check. It is also usable directly (tests, benchmarks). A replica builds it from a
:class:`VictimSpec`, everything it needs in one picklable object (:func:`build_service`), which works in-process too.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import logging
import math
import re
import secrets
import threading
import time
from typing import Any

import numpy as np
from torch import nn

from . import defenses, detectors, models, pow
from .detectors import Detector
from .errors import RequestError, first_line, shown
from .limits import Limits
from .policy import ACTIONS, Rule, acted_on, combine
from .protocol import API_KEY_HEADER, Account, Reply, hash_key, hashed, new_request_id
from .querylog import QueryLogWriter, input_digest, who
from .tier import LocalTier, needed
from .training import predict_probs

log = logging.getLogger(__name__)


def parse_images(images: Any, input_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """Validate a batch of images and return it as uint8 (N, C, H, W).

    Accepted: a numpy array of uint8 pixels (0..255), or float values in [0, 1] (numpy array or nested
    lists, as JSON sends them), shaped (N, C, H, W) or, for one channel, (N, H, W). Float images are
    quantised to 8 bits, as an image API would.
    """
    if images is None:
        raise RequestError(400, "missing 'images': expected a batch of images")
    if isinstance(images, (dict, str, bytes, int, float)):  # (a bool is an int)
        raise RequestError(400, f"images must be an array of images, got a JSON {json_type(images)}")
    if isinstance(images, np.ndarray):
        arr = images
    else:
        try:
            arr = np.asarray(images)
        except (ValueError, TypeError):
            raise RequestError(400, "images must be a rectangular array of numbers (got ragged or mixed "
                                    "data)") from None
    if arr.dtype == object:
        raise RequestError(400, "images must be a rectangular array of numbers (got ragged or mixed data, or whole "
                                "numbers beyond 64 bits)")
    from_json = not isinstance(images, np.ndarray)
    ok = arr.dtype == np.uint8 or arr.dtype.kind == "f" or (from_json and arr.dtype.kind in "iu")
    if not ok:
        raise RequestError(400, f"images dtype {arr.dtype} not supported; expected uint8 pixels or floats in [0, 1]")
    _batch_shape(tuple(arr.shape), input_shape, max_images)
    arr = arr.reshape(len(arr), *input_shape)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise RequestError(400, "images contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        raise RequestError(400, f"image values must be in [0, 1], got min {lo!r} max {hi!r}")
    return np.rint(arr * 255).astype(np.uint8)


NPY_TYPE = "application/x-npy"


def _batch_shape(shape: Any, input_shape: tuple[int, int, int], max_images: int) -> tuple[int, ...]:
    """A declared batch shape, checked before any image is decoded: (N, C, H, W), or (N, H, W) for one channel."""
    c, h, w = input_shape
    want = f"(N, {c}, {h}, {w})" + (f" or (N, {h}, {w})" if c == 1 else "")
    if (not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or tuple(shape[1:]) not in {(c, h, w), *([(h, w)] if c == 1 else [])} or len(shape) < 3 or shape[0] < 1):
        raise RequestError(400, f"images shape {shown(shape)} is wrong; expected {want} with N >= 1")
    if shape[0] > max_images:
        raise RequestError(413, f"too many images: {shown(shape[0])} > serve.max_images={max_images}")
    return tuple(shape)


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def parse_base64(payload: dict, input_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """``{"uint8": BASE64, "shape": [N, C, H, W]}``: 8-bit pixels, C order, as base64 text. The shape is checked and
    the text's length bounded before it is decoded."""
    if "shape" not in payload:
        raise RequestError(400, "shape is missing: a base64 body declares its images' shape, [N, C, H, W]")
    shape = _batch_shape(payload.get("shape"), input_shape, max_images)
    text = payload.get("uint8")
    size = int(np.prod(shape))
    if isinstance(text, str) and len(text) <= 8 * -(-size // 3) and not _BASE64.fullmatch(text):  # bounded first
        raise RequestError(400, "'uint8' is not valid base64 text: it holds characters other than A-Z, a-z, 0-9, "
                                "+, / and = padding")
    if not isinstance(text, str) or len(text) != 4 * -(-size // 3):
        got = f"{len(text)} characters" if isinstance(text, str) else f"a JSON {json_type(text)}"
        raise RequestError(400, f"'uint8' must be the base64 text of {size} bytes ({4 * -(-size // 3)} characters) "
                                f"for shape {list(shape)}, got {got}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'uint8' is not valid base64 text") from None
    if len(raw) != size:  # the right length, but its padding says otherwise
        raise RequestError(400, f"'uint8' decodes to {len(raw)} bytes; shape {list(shape)} needs {size}")
    return np.frombuffer(bytearray(raw), np.uint8).reshape(shape)  # writable, as torch wants it


def parse_npy(body: bytes, input_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """A ``.npy`` body (``Content-Type: application/x-npy``) of uint8 pixels or floats in [0, 1]; its header is read and
    checked before the array."""
    buf = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(buf, max_header_size=1024)
    except Exception:  # numpy's reader of the (at most 1 KiB) header raises what its parsers raise on bad text
        raise RequestError(400, f"malformed {NPY_TYPE} body: expected a .npy file (numpy.save) of one array") from None
    if dtype.hasobject or dtype.kind not in "uf" or fortran:
        raise RequestError(400, f"a .npy body must hold uint8 pixels or floats in [0, 1] in C order, got dtype "
                                f"{dtype}{' (Fortran order)' if fortran else ''}")
    shape = _batch_shape(list(shape), input_shape, max_images)
    count = int(np.prod(shape))
    if len(body) - buf.tell() != count * dtype.itemsize:
        raise RequestError(400, f"the .npy body holds {len(body) - buf.tell()} bytes of data; its header "
                                f"({dtype}, {list(shape)}) needs {count * dtype.itemsize}")
    return np.frombuffer(body, dtype, count=count, offset=buf.tell()).reshape(shape).copy()  # writable


PNG_TYPE = "image/png"
PNG_MODES = {1: "L", 3: "RGB"}


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # IHDR's colour type -> PIL's name of the mode


def parse_png(body: bytes, input_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """One image as a PNG body (``Content-Type: image/png``): 8-bit grayscale for one channel, 8-bit RGB for three,
    of the victim's size; its header (size, bit depth, colour type) is read from its first bytes and checked before
    anything decodes it (a PNG may declare billions of pixels)."""
    import struct

    from PIL import Image, UnidentifiedImageError

    c, h, w = input_shape
    want = PNG_MODES.get(c)
    if len(body) < 26 or body[:8] != PNG_SIGNATURE or body[12:16] != b"IHDR":
        raise RequestError(400, f"malformed {PNG_TYPE} body: expected one PNG image")
    width, height, depth, color = struct.unpack(">IIBB", body[16:26])
    mode = PNG_COLOR_TYPES.get(color, f"colour type {color}") + ("" if depth == 8 else f" of {depth}-bit samples")
    if (width, height, mode) != (w, h, want):
        raise RequestError(400, f"PNG image is {width}x{height} {mode}; expected {w}x{h} "
                                f"{want or f'(no PNG mode holds {c} channels)'}")
    try:
        img = Image.open(io.BytesIO(body), formats=["PNG"])  # reads the header only
        frames = getattr(img, "n_frames", 1)
        pixels = np.asarray(img, np.uint8) if frames == 1 else None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise RequestError(400, f"malformed {PNG_TYPE} body: its image data does not decode as a PNG of that "
                                f"header") from None
    if pixels is None:
        raise RequestError(400, f"the PNG body holds {frames} frames (an animated PNG); expected one image")
    return (pixels[None, None] if c == 1 else pixels.transpose(2, 0, 1)[None]).copy()


BINARY_TYPES = {NPY_TYPE: parse_npy, PNG_TYPE: parse_png}  # Content-Type -> parser of a binary query body
BODIES = (f'a JSON object {{"images": [[...]]}}, {{"uint8": BASE64, "shape": [N, C, H, W]}} or {{"challenge": ID, '
          f'"solution": N}}, or an {NPY_TYPE} or {PNG_TYPE} body')


def _holds_bool(value: Any) -> bool:
    """Whether parsed JSON holds true or false anywhere in its (nested) lists."""
    if isinstance(value, list):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, bool)


def json_type(value: Any) -> str:
    """What JSON calls a parsed value's type (a reason names the client's JSON, not Python's types)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else "boolean"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


def _json_request(body: bytes, kind: str) -> dict:
    """A JSON body's object, holding exactly one of ``images``, ``uint8`` and ``challenge``; a body that is not one
    gets a reason naming what is wrong with it (whatever its declared type, a body that parses as JSON is JSON)."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestError(400, f"malformed body: its JSON is nested too deeply; expected {BODIES}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if kind and kind != "application/json" and not kind.endswith("+json") and not kind.startswith("text/"):
            raise RequestError(415, f"Content-Type {shown(kind)} is not one this API reads; expected "
                                    f"application/json, {NPY_TYPE} or {PNG_TYPE}") from None
        why = str(exc) if len(str(exc)) <= 80 else str(exc)[:77] + "..."
        raise RequestError(400, f"malformed body: not JSON ({why}); expected {BODIES}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"malformed body: a JSON {json_type(payload)}; expected {BODIES}")
    found = [k for k in ("images", "uint8", "challenge") if k in payload]
    if len(found) != 1:
        has = f"has {' and '.join(repr(k) for k in found)}" if found else \
            f"has no 'images', 'uint8' or 'challenge' key (its keys: {shown(sorted(map(str, payload)))})"
        raise RequestError(400, f"malformed body: the object {has}; expected {BODIES}")
    return payload


class _LogFailed(Exception):
    """The query log could not take a request's rows."""


def _while_logging(method):
    """An entry point that, once the query log cannot be written (a full disk, a directory gone), answers 503 and
    nothing else: no answer goes out that the log does not have. So too once the detection tier cannot journal its
    state (the same disk, under the run directory): no answer goes out that the detectors cannot record."""
    @functools.wraps(method)
    def entry(self, api_key, *args, **kwargs):
        if self.log_error is None:
            try:
                return method(self, api_key, *args, **kwargs)
            except _LogFailed:
                pass
            except OSError as exc:  # from the tier (a Ray tier's error is an OSError too): its journal failed
                why = first_line(getattr(exc, "cause", None) or exc)  # a Ray task error: what the shard raised
                self.log_error = (f"the detection tier cannot record its state ({why}); the service "
                                  f"answers nothing it cannot judge")
                log.error("%s", self.log_error)
        account = self._lookup(api_key)
        return Reply(503, self.log_error, new_request_id(), account and account.account_id)
    return entry


def _check_solution(challenge_id: Any, counter: Any, seconds: Any) -> None:
    """A proof-of-work answer's fields, checked before its challenge is taken (so a malformed answer spends none)."""
    if not isinstance(challenge_id, str):
        raise RequestError(400, f"challenge {shown(challenge_id)}: expected the id of a challenge this service "
                                f"issued (a string)")
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter < 2 ** 64:
        what = "is missing" if counter is None else f"{shown(counter)} is not one"
        raise RequestError(400, f"solution {what}: expected the counter that solves the puzzle, a whole number in "
                                f"[0, 2**64); the challenge stays open")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds < 0):
        raise RequestError(400, f"seconds {shown(seconds)}: expected the solving time, a number of seconds >= 0, "
                                f"or no seconds; the challenge stays open")


class VictimService:
    """One victim behind its detectors, response policy, output defense and query log.

    ``detectors`` maps a name (the log's column prefix) to a detector, ``rules`` the same names to their
    :class:`sim.policy.Rule` (default: answer, keyed by account). ``perturbers`` maps a rule's name to the
    defense its ``perturb`` action uses. The stateful detectors' state and the open proof-of-work challenges live
    in ``tier`` (:mod:`sim.tier`; a Serve replica gets the shared, sharded one of its app); without one, the
    service keeps them in its own :class:`sim.tier.LocalTier`. The model, the tier and the stateless detectors run
    outside any lock, so requests of different accounts overlap; only the output defense and the log writer take
    one request at a time.
    """

    def __init__(self, *, model: nn.Module, victim: str, run_id: str, accounts: dict[str, Account],
                 input_shape: tuple[int, int, int], detectors: dict[str, Detector] | None = None,
                 rules: dict[str, Rule] | None = None, perturbers: dict | None = None, defense=None,
                 writer: QueryLogWriter | None = None, max_images: int = 256, log_inputs: bool = True,
                 tier=None, limits: Limits | None = None):
        self.model = model.eval()
        self.victim = victim
        self.run_id = run_id
        self.accounts = hashed(accounts)  # only the keys' hashes are kept
        self.input_shape = tuple(input_shape)
        self.detectors = detectors or {}
        self.stateful = {name for name, det in self.detectors.items() if det.stateful}
        self.rules = {name: (rules or {}).get(name) or Rule() for name in self.detectors}
        self.perturbers = perturbers or {}
        self.defense = defense
        self.writer = writer
        self.max_images = max_images
        self.log_inputs = log_inputs
        self.limits = limits if limits is not None and limits.enabled else None
        if tier is None and needed(bool(self.stateful), (r.action for r in self.rules.values()), self.limits):
            tier = LocalTier({n: self.detectors[n] for n in self.stateful}, limits=self.limits)
        self.tier = tier
        self.log_error: str | None = None  # why the log cannot be written: from then on every request gets 503
        self._lock = threading.Lock()  # the defense (a random generator) and the writer: one request at a time
        self.classes = predict_probs(self.model, np.zeros((1, *self.input_shape), np.uint8)).shape[1]

    # -- entry points --------------------------------------------------------------------------
    @_while_logging
    def query(self, api_key: str | None, images: Any, actor_id: str | None = None, compact: bool = False) -> Reply:
        """Answer one request: one account, a batch of images. Never raises for a bad request. ``compact``: the
        request came over HTTP in a compact encoding, and so does its answer (and the answer to its challenge)."""
        start = time.perf_counter()
        try:
            account = self._account(api_key)
            x = parse_images(images, self.input_shape, self.max_images)
        except RequestError as exc:
            return self.reject(api_key, exc.status, exc.reason, actor_id, start)
        request_id = new_request_id()
        admitted = len(x)
        if self.limits is not None:  # before the model: a refused query costs no model time
            admission = self.tier.admit(request_id, self.limits.key(account, actor_id), len(x))
            if not admission.admitted:
                with self._lock:
                    self._log_refused(request_id, account, actor_id, x, admission.reason, start)
                n = len(x)
                return Reply(429, admission.reason, request_id, account.account_id, np.zeros(n, bool),
                             [admission.reason] * n, np.full(n, -1), np.full((n, self.classes), np.nan, np.float32),
                             compact=compact, retry_after=admission.retry_after)
            admitted = admission.admitted
        clean = predict_probs(self.model, x[:admitted])
        return self._answer(request_id, account, actor_id, x, clean, start, compact)

    @_while_logging
    def solve(self, api_key: str | None, challenge_id: Any, counter: Any, actor_id: str | None = None,
              seconds: float | None = None) -> Reply:
        """The second half of a proof-of-work request: the counter solving challenge ``challenge_id``.
        Right: the challenged queries are answered. Wrong: they are refused (and the challenge is spent).
        Malformed (not a counter, not a challenge id): 400, and the challenge stays open.
        ``seconds``: the client's solving time, as it reports it (logged)."""
        start = time.perf_counter()
        request_id = new_request_id()
        try:
            account = self._account(api_key)
            _check_solution(challenge_id, counter, seconds)
            item = self.tier.take(account.account_id, challenge_id, request_id) if self.tier is not None else None
            if item is None:
                raise RequestError(404, f"unknown or expired challenge {shown(challenge_id)} for this account")
        except RequestError as exc:
            return self.reject(api_key, exc.status, exc.reason, actor_id, start)
        ok = pow.verify(item["nonce"], item["bits"], counter)
        x, clean, bits = item["x"], item["clean"], item["pow_bits"]
        n = len(x)
        share = None if seconds is None else np.full(n, float(seconds) * (bits / max(bits.sum(), 1)))  # no overflow
        with self._lock:  # defenses may hold state (a random generator): one request at a time, as in query
            if ok:
                returned = self._defend(clean, x, item["perturb"])
                actions = ["perturbed" if r is not None else "answered" for r in item["perturb"]]
                reasons: list[str | None] = [None] * n
            else:
                returned = np.full_like(clean, np.nan)
                actions = ["refused"] * n
                reasons = ["wrong proof-of-work solution"] * n
            labels = np.where(ok, np.nan_to_num(returned, nan=-1.0).argmax(1), -1)
            self._log(request_id, account, actor_id, x, clean, returned, labels, actions, reasons, start,
                      pow_bits=bits, pow_seconds=share, resubmission=True)
        answered = np.full(n, ok)
        status, reason = (200, None) if ok else (403, reasons[0])
        return Reply(status, reason, request_id, account.account_id, answered, reasons, labels, returned,
                     compact=item.get("compact", False))

    @_while_logging
    def query_json(self, api_key: str | None, body: bytes, actor_id: str | None = None,
                   content_type: str | None = None) -> Reply:
        """The HTTP path. A JSON body ``{"images": [...]}`` (floats in [0, 1]) or ``{"uint8":
        BASE64, "shape": [N, C, H, W]}`` is a query, ``{"challenge": ID, "solution": N}`` (optionally
        ``"seconds"``) answers a proof-of-work challenge; a body of type ``application/x-npy`` (a batch) or
        ``image/png`` (one image) is a query too. A query in a compact encoding (base64, .npy, PNG) is answered in
        kind (:meth:`sim.protocol.Reply.to_json`)."""
        start = time.perf_counter()
        refused = self.key_error(api_key)  # the key first: nothing of an unknown caller's body is read
        if refused is not None:
            return self.reject(api_key, refused.status, refused.reason, actor_id, start)
        kind = (content_type or "").split(";")[0].strip().lower()
        if kind in BINARY_TYPES:
            try:
                images = BINARY_TYPES[kind](body, self.input_shape, self.max_images)
            except RequestError as exc:
                return self.reject(api_key, exc.status, exc.reason, actor_id, start)
            return self.query(api_key, images, actor_id, compact=True)
        try:
            payload = _json_request(body, kind)
        except RequestError as exc:
            return self.reject(api_key, exc.status, exc.reason, actor_id, start)
        if "challenge" in payload:
            return self.solve(api_key, payload["challenge"], payload.get("solution"), actor_id, payload.get("seconds"))
        if "uint8" in payload:
            try:
                images = parse_base64(payload, self.input_shape, self.max_images)
            except RequestError as exc:
                return self.reject(api_key, exc.status, exc.reason, actor_id, start)
            return self.query(api_key, images, actor_id, compact=True)
        if (b"true" in body or b"false" in body) and _holds_bool(payload["images"]):  # numpy would take them as 1, 0
            return self.reject(api_key, 400, "images must be numbers in [0, 1]; got true or false among them",
                               actor_id, start)
        return self.query(api_key, payload["images"], actor_id)

    @_while_logging
    def reject(self, api_key: str | None, status: int, reason: str, actor_id: str | None = None,
               start: float | None = None) -> Reply:
        """Refuse a request before reading any image, and log it as one refused row."""
        account = self._lookup(api_key)
        request_id = new_request_id()
        if self.writer is not None:
            latency = (time.perf_counter() - start) * 1e3 if start is not None else 0.0
            with self._lock:
                self._write(
                    run_id=self.run_id, victim=self.victim, request_id=request_id, **who(account, actor_id),
                    actions=["refused"], refusal_reason=[reason], latency_ms=latency,
                )
        return Reply(status, reason, request_id, account and account.account_id)

    def set_defense(self, defense) -> None:
        """Swap the output defense (live reconfiguration); requests in flight finish with the old one."""
        with self._lock:
            self.defense = defense

    # -- internals -----------------------------------------------------------------------------
    def _write(self, **rows) -> None:
        """One request's rows into the log (under the lock); a failure stops the service answering (503). A request
        that waited for the lock while another's write failed writes nothing: a failed write may leave a torn record,
        behind which no reader would find its rows."""
        if self.log_error is not None:
            raise _LogFailed
        try:
            self.writer.write(**rows)
        except OSError as exc:  # pyarrow's I/O errors are OSErrors too
            self.log_error = (f"the query log cannot be written ({first_line(exc)}); the service answers "
                              f"nothing it cannot log")
            log.error("%s: %s", self.writer.writer_id, self.log_error)
            raise _LogFailed from exc

    def key_error(self, api_key) -> RequestError | None:
        """The 401 a request with this key gets before anything else of it is read; None for a known key."""
        try:
            self._account(api_key)
        except RequestError as exc:
            return exc
        return None

    def _account(self, api_key) -> Account:
        if not api_key:
            raise RequestError(401, f"missing API key (header {API_KEY_HEADER})")
        account = self._lookup(api_key)
        if account is None:
            raise RequestError(401, "unknown API key")
        return account

    def _lookup(self, api_key) -> Account | None:
        """The account of a key: found by the key's SHA-256, so what a lookup's time depends on is a digest the
        client cannot steer toward a stored one, and no key is held in the clear."""
        return self.accounts.get(hash_key(api_key)) if isinstance(api_key, str) else None

    def set_keys(self, base: dict[str, Account], added: dict[str, Account], revoked: set[str]) -> None:
        """The accounts, changed live: ``base`` (hashed keys) with ``added`` and without ``revoked``."""
        self.accounts = {k: a for k, a in {**base, **added}.items() if k not in revoked}

    def _defend(self, clean: np.ndarray, x: np.ndarray, perturb: list) -> np.ndarray:
        """Returned probabilities: each query through its rule's perturbation, or the victim's defense."""
        out = np.empty_like(clean)
        for rule in set(perturb):
            idx = np.array([i for i, r in enumerate(perturb) if r is rule])
            defense = self.defense if rule is None else self.perturbers[rule]
            out[idx] = defense(clean[idx], x[idx]) if defense is not None else clean[idx]
        return out

    def _detect(self, request_id: str, account: Account, actor_id: str | None, x: np.ndarray,
                clean: np.ndarray) -> dict:
        """Every detector's verdict on the request: the stateful ones from the tier (one call per shard
        involved), the stateless ones here."""
        labels = clean.argmax(1)
        out = {}
        items = [(name, self.rules[name].key(account, actor_id)) for name in self.detectors if name in self.stateful]
        if items:
            out.update(self.tier.score(request_id, items, x, labels, clean))
        for name, det in self.detectors.items():
            if name not in self.stateful:
                out[name] = det.score(account.account_id, x, labels, clean)
        return out

    def _answer(self, request_id: str, account: Account, actor_id: str | None, batch: np.ndarray, clean: np.ndarray,
                start: float, compact: bool = False) -> Reply:
        """Answer the queries of ``batch`` the model saw (``clean``: its probabilities, the first ones); the rest
        are refused for the quota."""
        n = len(clean)
        x = batch[:n]
        detections = self._detect(request_id, account, actor_id, x, clean)
        decisions = []
        for name in self.detectors:
            res, stateful = detections[name], name in self.stateful
            decisions.append((name, self.rules[name], acted_on(res.flags, res.was_flagged, stateful), res.scores))
        level, bits, perturb = combine(decisions, n)
        act = np.array(ACTIONS)[level]
        reasons: list[str | None] = [None] * n
        for name, rule, mask, _ in decisions:  # a refusing detector gives the reason
            what = "account" if name in self.stateful else "query"
            for i in np.flatnonzero(mask & (act == "refuse") & (rule.action == "refuse")):
                reasons[i] = reasons[i] or f"{what} flagged by {name}"
        answer = (act == "answer") | (act == "perturb")
        actions = np.where(act == "perturb", "perturbed", np.where(answer, "answered",
                           np.where(act == "proof_of_work", "challenged", "refused"))).tolist()
        challenge = None
        asked = np.flatnonzero(act == "proof_of_work")
        if len(asked):
            challenge = {"id": secrets.token_hex(16), "nonce": pow.new_nonce(), "bits": pow.combined_bits(bits[asked]),
                         "indices": asked.tolist()}
            self.tier.issue(account.account_id, challenge["id"], {
                "account": account.account_id, "nonce": challenge["nonce"], "bits": challenge["bits"],
                "x": x[asked], "clean": clean[asked], "pow_bits": bits[asked], "perturb": [perturb[i] for i in asked],
                "compact": compact})
        returned = np.full_like(clean, np.nan)
        with self._lock:
            if answer.any():
                idx = np.flatnonzero(answer)
                returned[idx] = self._defend(clean[idx], x[idx], [perturb[i] for i in idx])
            labels = np.where(answer, np.nan_to_num(returned, nan=-1.0).argmax(1), -1)
            self._log(request_id, account, actor_id, x, clean, returned, labels, actions, reasons, start,
                      detections=detections, pow_bits=np.where(act == "proof_of_work", bits, 0))
            if n < len(batch):
                self._log_refused(request_id, account, actor_id, batch[n:], "quota", start)
        if n < len(batch):  # the quota ran out within the request
            cut = len(batch) - n
            answer = np.r_[answer, np.zeros(cut, bool)]
            reasons += ["quota"] * cut
            labels = np.r_[labels, np.full(cut, -1)]
            returned = np.concatenate([returned, np.full((cut, returned.shape[1]), np.nan, returned.dtype)])
        if answer.any():
            status, reason = 200, None
        elif challenge is not None:
            status, reason = 202, "proof of work required"
        else:
            status, reason = 403, reasons[0]
        return Reply(status, reason, request_id, account.account_id, answer, reasons, labels, returned,
                     challenge, compact)

    def _log_refused(self, request_id: str, account: Account, actor_id, x, reason: str, start: float) -> None:
        """Rows for queries refused before the model saw them (a limit)."""
        if self.writer is not None:
            self._write(
                run_id=self.run_id, victim=self.victim, request_id=request_id, **who(account, actor_id),
                actions=["refused"] * len(x), refusal_reason=[reason] * len(x),
                latency_ms=(time.perf_counter() - start) * 1e3, input_sha1=[input_digest(img) for img in x],
                inputs=x if self.log_inputs else None,
            )

    def _log(self, request_id: str, account: Account, actor_id, x, clean, returned, labels, actions, reasons, start,
             *, detections=None, pow_bits=None, pow_seconds=None, resubmission=False) -> None:
        if self.writer is not None:
            self._write(
                run_id=self.run_id, victim=self.victim, request_id=request_id, **who(account, actor_id),
                actions=actions, refusal_reason=reasons,
                latency_ms=(time.perf_counter() - start) * 1e3,
                input_sha1=[input_digest(img) for img in x],
                clean_probs=clean, returned_probs=returned, returned_label=labels, detections=detections,
                pow_bits=pow_bits, pow_seconds=pow_seconds, resubmission=resubmission,
                inputs=x if self.log_inputs and not resubmission else None,
            )


@dataclasses.dataclass
class VictimSpec:
    """Everything a replica needs to rebuild the victim service (picklable)."""

    victim: str
    run_id: str
    model: bytes  # sim.models.to_bytes of the victim
    input_shape: tuple[int, int, int]
    accounts: dict[str, Account]  # API key -> account; only their hashes travel and are kept (__post_init__)
    detectors: dict[str, dict]  # name -> {"kind": registry name, "params": {...}}
    rules: dict[str, dict]  # name -> sim.policy.Rule fields
    defense: dict  # defense spec mapping ({"name": ..., params}); changed live through ``reconfigure``
    log_dir: str | None
    log_inputs: bool
    max_images: int
    threads: int = 1  # torch threads per replica
    defense_models: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)  # see defenses.prepare
    detector_models: dict[str, bytes] = dataclasses.field(default_factory=dict)  # name -> Detector.prepare's
    shards: int = 1  # shards of the detection tier (sim.tier_actors), when the victim keeps per-key state
    state_dir: str | None = None  # where the tier journals its state (default: a temporary directory)
    device: str = "cpu"  # where the replicas run the model (sim.devices)
    limits: Limits | None = None  # per-account quota and rate (sim.limits), held in the detection tier
    max_body_bytes: int | None = None  # largest HTTP body (None: room for max_images images as JSON floats)
    # keys added and revoked on the running app (update_keys): {"added": {hash: account fields}, "revoked": [hash]}
    key_changes: dict = dataclasses.field(default_factory=lambda: {"added": {}, "revoked": []})
    runtime_env: dict | None = None  # what replicas and shards need to import the scenario's plug-ins (registry)

    def __post_init__(self):
        self.accounts = hashed(self.accounts)

    @property
    def body_limit(self) -> int:
        """The largest HTTP body a replica reads: ``max_body_bytes``, or room for ``max_images`` images of JSON
        floats (24 characters a value, more than ``repr`` of a float needs) and a little more."""
        c, h, w = self.input_shape
        return self.max_body_bytes or self.max_images * c * h * w * 24 + 65536


def build_detectors(spec: VictimSpec) -> tuple[dict, dict]:
    """The spec's detectors and their rules, with the trained models they need."""
    built = detectors.build_named(spec.detectors, spec.detector_models)
    for det in built.values():
        if not det.stateful:  # the stateful ones live in the detection tier's shards, on the CPU
            det.to(spec.device)
    return built, {name: Rule(**spec.rules.get(name, {})) for name in spec.detectors}


def build_defense(spec: VictimSpec, defense: dict):
    """The defense a spec mapping describes, given the models it may need and the victim's architecture (a fresh
    float copy: MAD's default surrogate is a seeded random copy of it, also for an int8 victim)."""
    architecture = models.from_bytes(spec.model, architecture_only=True)
    return defenses.from_spec(defense, victim=architecture, models=spec.defense_models).to(spec.device)


def build_service(spec: VictimSpec, writer_id: str, tier=None) -> VictimService:
    """The service a replica runs (``tier``: its app's detection tier; None: one of its own, in-process)."""
    model = models.from_bytes(spec.model).to(spec.device)
    writer = (QueryLogWriter(spec.log_dir, spec.input_shape, writer_id, detectors=list(spec.detectors))
              if spec.log_dir else None)
    dets, rules = build_detectors(spec)
    perturbers = {name: build_defense(spec, r.perturb) for name, r in rules.items() if r.action == "perturb"}
    return VictimService(
        model=model, victim=spec.victim, run_id=spec.run_id, accounts=spec.accounts,
        input_shape=spec.input_shape, detectors=dets, rules=rules, perturbers=perturbers,
        defense=build_defense(spec, spec.defense),
        writer=writer, max_images=spec.max_images, log_inputs=spec.log_inputs, tier=tier, limits=spec.limits,
    )

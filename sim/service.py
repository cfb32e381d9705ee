"""The victim service, Ray-free: validation -> model -> detectors -> response policy -> defense -> log.

:class:`VictimService` is what a Serve replica runs for both its HTTP route and its DeploymentHandle
method, so both paths share every check. It is also usable directly (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from typing import Any

import numpy as np
from torch import nn

from .detectors import Detector
from .errors import RequestError
from .protocol import API_KEY_HEADER, Account, Reply
from .querylog import QueryLogWriter
from .training import predict_probs

def parse_images(images: Any, input_shape: tuple[int, int, int], max_images: int) -> np.ndarray:
    """Validate a batch of images and return it as uint8 (N, C, H, W).

    Accepted: a numpy array of uint8 pixels (0..255), or float values in [0, 1] (numpy array or nested
    lists, as JSON sends them), shaped (N, C, H, W) or, for one channel, (N, H, W). Float images are
    quantised to 8 bits, as an image API would.
    """
    if images is None:
        raise RequestError(400, "missing 'images': expected a batch of images")
    if isinstance(images, np.ndarray):
        arr = images
    else:
        try:
            arr = np.asarray(images)
        except (ValueError, TypeError):
            raise RequestError(400, "images must be a rectangular array of numbers (got ragged or mixed data)") from None
    if arr.dtype == object:
        raise RequestError(400, "images must be a rectangular array of numbers (got ragged or mixed data)")
    from_json = not isinstance(images, np.ndarray)
    ok = arr.dtype == np.uint8 or arr.dtype.kind == "f" or (from_json and arr.dtype.kind in "iu")
    if not ok:
        raise RequestError(400, f"images dtype {arr.dtype} not supported; expected uint8 pixels or floats in [0, 1]")
    c, h, w = input_shape
    given = tuple(arr.shape)
    if arr.ndim == 3 and c == 1:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1:] != (c, h, w) or arr.shape[0] == 0:
        want = f"(N, {c}, {h}, {w})" + (f" or (N, {h}, {w})" if c == 1 else "")
        raise RequestError(400, f"images shape {given} is wrong; expected {want} with N >= 1")
    if arr.shape[0] > max_images:
        raise RequestError(413, f"too many images: {arr.shape[0]} > serve.max_images={max_images}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise RequestError(400, "images contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        raise RequestError(400, f"image values must be in [0, 1], got min {lo:g} max {hi:g}")
    return np.rint(arr * 255).astype(np.uint8)


class VictimService:
    """One victim behind its detectors, response policy, output defense and query log."""

    def __init__(self, *, model: nn.Module, victim: str, run_id: str, accounts: dict[str, Account],
                 input_shape: tuple[int, int, int], detectors: dict[str, Detector] | None = None,
                 detector_actions: dict[str, str] | None = None, defense=None,
                 writer: QueryLogWriter | None = None, max_images: int = 256, log_inputs: bool = True):
        self.model = model.eval()
        self.victim = victim
        self.run_id = run_id
        self.accounts = accounts
        self.input_shape = tuple(input_shape)
        self.detectors = detectors or {}
        self.detector_actions = detector_actions or {}
        self.defense = defense
        self.writer = writer
        self.max_images = max_images
        self.log_inputs = log_inputs
        self._lock = threading.Lock()  # detectors and the writer are stateful; Serve may call from threads

    # -- entry points --------------------------------------------------------------------------
    def query(self, api_key: str | None, images: Any, actor_id: str | None = None) -> Reply:
        """Answer one request: one account, a batch of images. Never raises for a bad request."""
        start = time.perf_counter()
        account = self.accounts.get(api_key) if isinstance(api_key, str) else None
        try:
            if not api_key:
                raise RequestError(401, f"missing API key (header {API_KEY_HEADER})")
            if account is None:
                raise RequestError(401, "unknown API key")
            x = parse_images(images, self.input_shape, self.max_images)
        except RequestError as exc:
            return self.reject(api_key, exc.status, exc.reason, actor_id, start)
        clean = predict_probs(self.model, x)  # stateless: outside the lock
        with self._lock:  # detectors' histories and the log see each account's requests in one order
            return self._answer(account, actor_id, x, clean, start)

    def query_json(self, api_key: str | None, body: bytes, actor_id: str | None = None) -> Reply:
        """The HTTP path: parse a JSON body ``{"images": [...]}`` then :meth:`query`."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            payload = None
        if not isinstance(payload, dict) or "images" not in payload:
            return self.reject(api_key, 400, "malformed body: expected a JSON object {\"images\": [[...]]}",
                               actor_id)
        return self.query(api_key, payload["images"], actor_id)

    def reject(self, api_key: str | None, status: int, reason: str, actor_id: str | None = None,
               start: float | None = None) -> Reply:
        """Refuse a request before reading any image, and log it as one refused row."""
        account = self.accounts.get(api_key) if isinstance(api_key, str) else None
        request_id = uuid.uuid4().hex
        if self.writer is not None:
            latency = (time.perf_counter() - start) * 1e3 if start is not None else 0.0
            with self._lock:
                self.writer.write(
                    run_id=self.run_id, victim=self.victim, request_id=request_id,
                    account_id=account and account.account_id, actor_id=actor_id,
                    role=account and account.role, attack=account and account.attack,
                    answered=np.zeros(1, bool), refusal_reason=[reason], latency_ms=latency,
                )
        return Reply(status, reason, request_id, account and account.account_id)

    def set_defense(self, defense) -> None:
        """Swap the output defense (live reconfiguration); requests in flight finish with the old one."""
        with self._lock:
            self.defense = defense

    # -- internals -----------------------------------------------------------------------------
    def _answer(self, account: Account, actor_id: str | None, x: np.ndarray, clean: np.ndarray,
                start: float) -> Reply:
        n = len(x)
        request_id = uuid.uuid4().hex
        clean_labels = clean.argmax(1)

        refused = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n
        det_out = {}
        for name, det in self.detectors.items():
            was_flagged = det.is_flagged(account.account_id)
            res = det.score(account.account_id, x, clean_labels)
            det_out[name] = res
            if self.detector_actions.get(name) == "refuse":
                before = np.r_[was_flagged, res.flags[:-1]]  # the query that trips the flag is answered
                for i in np.flatnonzero(before & ~refused):
                    reasons[i] = f"account flagged by {name}"
                refused |= before
        answered = ~refused
        returned = np.full_like(clean, np.nan)
        if answered.any():
            returned[answered] = (self.defense(clean[answered], x[answered]) if self.defense is not None
                                  else clean[answered])
        labels = np.where(answered, np.nan_to_num(returned, nan=-1.0).argmax(1), -1)
        latency = (time.perf_counter() - start) * 1e3
        if self.writer is not None:
            prada = det_out.get("prada")
            self.writer.write(
                run_id=self.run_id, victim=self.victim, request_id=request_id,
                account_id=account.account_id, actor_id=actor_id, role=account.role,
                attack=account.attack, answered=answered, refusal_reason=reasons, latency_ms=latency,
                input_sha1=[hashlib.sha1(img.tobytes()).hexdigest() for img in x],
                clean_probs=clean, returned_probs=returned, returned_label=labels,
                prada_score=prada.scores if prada else None, prada_flagged=prada.flags if prada else None,
                inputs=x if self.log_inputs else None,
            )
        status, reason = (200, None) if answered.any() else (403, reasons[0])
        return Reply(status, reason, request_id, account.account_id, answered, reasons, labels, returned)

"""A victim this tool does not serve (``victim.url`` or ``victim.client``): the transport of the clients that query it,
and the query log they write of what they sent and got back. Ray-free: a client actor runs one, the driver another
(the evaluation account).

Over HTTP it speaks the project's JSON protocol (docs/serving.md): POST ``{"uint8": BASE64, "shape": [N, C, H, W]}``
with the account's key in ``X-API-Key``, answered ``{"actions", "labels", "reasons", "probs": {"float32", "shape"}}``
(or ``{"results": [...]}``, the plain JSON form), a challenge solved with ``{"challenge", "solution", "seconds"}``.
Through an adapter (``victim.client=module:callable``) any other API: the callable maps uint8 images (N, C, H, W) to
probability vectors (N, K) and does its own talking.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from typing import Callable

import numpy as np

from .errors import SimError, failed
from .protocol import ACTOR_HEADER, API_KEY_HEADER, Account, Reply, new_request_id
from .querylog import QueryLogWriter, input_digest, who

TIMEOUT_S = 120.0  # one request's limit


class RemoteError(RuntimeError):
    """The remote victim could not be reached, or answered something that is not the protocol."""


def _parse(status: int, body: bytes, n: int) -> Reply:
    """A reply of the JSON protocol (either form) to a request of ``n`` queries."""
    try:
        d = json.loads(body or b"{}")
    except ValueError:
        raise RemoteError(f"the victim answered {status} with a body that is not JSON: {body[:80]!r}") from None
    rid = str(d.get("request_id") or new_request_id())
    retry = d.get("retry_after")
    if "actions" in d:
        probs = np.frombuffer(base64.b64decode(d["probs"]["float32"]), np.float32).reshape(d["probs"]["shape"])
        answered = np.asarray([a == "answered" for a in d["actions"]], bool)
        return Reply(status, d.get("error"), rid, d.get("account"), answered, list(d.get("reasons") or [None] * n),
                     np.asarray(d["labels"], np.int64), probs.copy(), d.get("challenge"), True, retry)
    if "results" in d:
        results = d["results"]
        answered = np.asarray([r.get("action") == "answered" for r in results], bool)
        k = max((len(r["probs"]) for r in results if "probs" in r), default=0)
        probs = np.full((len(results), k), np.nan, np.float32)
        labels = np.full(len(results), -1, np.int64)
        for i, r in enumerate(results):
            if "probs" in r:
                probs[i], labels[i] = r["probs"], r.get("label", int(np.argmax(r["probs"])))
        challenge = d.get("challenge")
        if challenge is not None:  # the plain form lists the challenged queries by their action
            challenge = {**challenge, "indices": [i for i, r in enumerate(results) if r.get("action") == "challenged"]}
        return Reply(status, d.get("error"), rid, d.get("account"), answered,
                     [r.get("reason") for r in results], labels, probs, challenge, False, retry)
    if status < 400:
        raise RemoteError(f"the victim answered {status} without actions or results: {str(d)[:120]}")
    return Reply(status, d.get("error") or f"HTTP {status}", rid, retry_after=retry)


def load_adapter(target: str) -> Callable:
    """The callable ``victim.client`` names (``module:attr``), checked to be one."""
    from . import registry

    return registry.load("client", target, "victim.client")


class AdapterError(RemoteError, SimError):
    """``victim.client``'s adapter (the user's code) failed, or answered something that is not probabilities: a
    one-line error with exit status 2, like any mistake of the user's."""


def adapter_answers(adapter: Callable, x: np.ndarray) -> np.ndarray:
    """What ``victim.client``'s adapter answers to the images ``x``, checked to be one probability vector per image
    (an :class:`AdapterError` otherwise)."""
    try:
        probs = np.asarray(adapter(x), np.float32)
    except Exception as exc:  # noqa: BLE001 - the user's adapter: whatever it raises, one line
        raise AdapterError(str(failed(f"victim.client fails on {len(x)} images", exc, "a callable mapping uint8 "
                                      "images (N, C, H, W) to probabilities (N, K)"))) from None
    if probs.ndim != 2 or len(probs) != len(x):
        raise AdapterError(f"victim.client returned shape {probs.shape} for {len(x)} images; expected "
                           f"(N, classes) probabilities")
    sums = probs.sum(1) if probs.size else np.ones(1)
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(sums - 1).max() > 1e-3:
        raise AdapterError(f"victim.client returned rows that are not probabilities (values in "
                           f"[{np.nanmin(probs):.3g}, {np.nanmax(probs):.3g}], row sums in "
                           f"[{np.nanmin(sums):.3g}, {np.nanmax(sums):.3g}]); expected each row a probability "
                           f"vector (a softmax of logits)")
    return probs


class RemoteVictim:
    """One client's way to a remote victim, logging every query to ``log_dir`` (writer ``writer_id``).

    ``accounts``: the API key -> the account it stands for here (the log's account, role, attack and cohort; the
    remote has its own names for them). ``client``: ``module:attr`` of an adapter, a callable (images) ->
    probabilities used instead of HTTP."""

    def __init__(self, *, run_id: str, victim: str, url: str | None, accounts: dict[str, Account], log_dir: str,
                 input_shape: tuple, writer_id: str, log_inputs: bool = True, client: str | None = None,
                 timeout: float = TIMEOUT_S):
        self.run_id, self.victim, self.url, self.accounts = run_id, victim, url, accounts
        self.adapter = load_adapter(client) if client else None
        self.timeout, self.log_inputs = timeout, log_inputs
        self.writer = QueryLogWriter(log_dir, input_shape, writer_id)
        self._pending: dict[str, np.ndarray] = {}  # challenge id -> the images it covers (logged when solved)

    def _post(self, key: str | None, payload: dict, actor_id: str | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers[API_KEY_HEADER] = key
        if actor_id:
            headers[ACTOR_HEADER] = actor_id
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteError(f"victim.url={self.url!r} cannot be reached ({getattr(exc, 'reason', exc)})") from None

    def query(self, key: str | None, x: np.ndarray, actor_id: str | None = None) -> Reply:
        """Send the uint8 images ``x`` (N, C, H, W) through the account of ``key``; log and return the reply."""
        start = time.perf_counter()
        if self.adapter is not None:
            probs = adapter_answers(self.adapter, x)
            reply = Reply(200, None, new_request_id(), None, np.ones(len(x), bool), [None] * len(x),
                          probs.argmax(1), probs)
        else:
            status, body = self._post(key, {"uint8": base64.b64encode(np.ascontiguousarray(x, np.uint8).tobytes())
                                            .decode(), "shape": list(x.shape)}, actor_id)
            reply = _parse(status, body, len(x))
        if reply.challenge:
            self._pending[reply.challenge["id"]] = x[np.asarray(reply.challenge["indices"], int)]
        self._log(key, x, reply, actor_id, start)
        return self._ours(key, reply)

    def _account(self, key: str | None) -> Account | None:
        return self.accounts.get(key) if key is not None else next(iter(self.accounts.values()), None)

    def _ours(self, key: str | None, reply: Reply) -> Reply:
        """The reply under our name for the account (the remote's own is in its log, not ours)."""
        account = self._account(key)
        reply.account_id = account.account_id if account is not None else reply.account_id
        return reply

    def solve(self, key: str | None, challenge_id: str, counter: int, actor_id: str | None = None,
              seconds: float = 0.0) -> Reply:
        """Send a proof of work's solution; the challenged queries come back (logged as resubmissions)."""
        start = time.perf_counter()
        status, body = self._post(key, {"challenge": challenge_id, "solution": counter, "seconds": seconds}, actor_id)
        x = self._pending.pop(challenge_id, None)
        reply = _parse(status, body, 0 if x is None else len(x))
        if x is not None and len(reply.answered) == len(x):
            self._log(key, x, reply, actor_id, start, resubmission=True)
        return self._ours(key, reply)

    def _log(self, key, x, reply: Reply, actor_id, start: float, resubmission: bool = False) -> None:
        account = self._account(key)
        n = len(x)
        actions = reply.actions if len(reply.answered) == n else ["refused"] * n
        reasons = list(reply.reasons) if len(reply.reasons) == n else [reply.reason] * n
        probs = reply.probs if len(reply.answered) == n and reply.probs.size else None
        self.writer.write(
            run_id=self.run_id, victim=self.victim, request_id=reply.request_id, **who(account, actor_id),
            actions=actions,
            refusal_reason=[r if a == "refused" else None for r, a in zip(reasons, actions)],
            latency_ms=(time.perf_counter() - start) * 1e3, input_sha1=[input_digest(img) for img in x],
            returned_probs=probs, returned_label=None if probs is None else reply.labels,
            resubmission=resubmission, inputs=x if self.log_inputs else None)

    def close(self) -> None:
        self.writer.close()

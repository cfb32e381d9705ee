"""PRADA (Juuti et al. 2019): per-account detection of synthetic query streams.

For each account and each predicted class c, PRADA keeps a growing set G_c of past queries and a
threshold T_c. A new query x with predicted class c:
  1. d = min L2 distance from x to G_c (the first query of a class has no distance: it starts G_c, with an own
     distance of 0, and T_c = 0);
  2. d joins the account's pool D of distances;
  3. if d > T_c, x joins G_c and T_c = max(T_c, mean(D_c) - std(D_c)) over G_c's own distances, the first
     member's 0 included;
  4. once |D| > min_pool (100, as published), D is trimmed of values beyond 3 standard deviations and the
     Shapiro-Wilk statistic W of what remains is computed; W < delta flags the account (for good).
Steps 1-4 are the paper's Algorithm 1 as the authors' code runs it (SSGAalto/prada-protecting-against-dnn-model-
stealing-attacks, ``growing_set.py``). Where this class differs from that code: it tests after every query, not every
10th; a flag is for good, where the code's flag is the latest test's verdict; the pool holds every class's distances,
where the code leaves out the classes with fewer than 10; and ``min_pool`` counts the pool before the trim, the code's
100 after it.
Natural queries give roughly normal distances; synthetic ones (small steps around seeds) do not.

The score is 1 - W (higher = more suspicious), NaN until the pool is large enough; the flag is
score > 1 - delta. The key need not be an account: the victim service can pool a group of accounts
(a client address, an account-creation batch, all traffic) under one key to catch split attacks.
State is a dict keyed by account, so a query costs the same however many accounts exist.
Distances are those of images scaled to [0, 1], computed exactly from the 8-bit pixels (squared distances are
integers, exact in float64; then one square root and one division by 255). The class sets keep each query as its
8-bit pixels, 1 byte per pixel (784 bytes for a 28x28 query, a quarter of float32), and its squared norm. The
distances a request needs come from a few matrix products (its queries against their class sets and against each
other), not one query at a time.
``skip_repeats``: an exact repeat of an earlier query of its class adds no distance. Off by default (as
published); pooled streams want it on, since honest users of a group often send the same popular image,
and a pile of zero distances alone would make the pool look non-normal.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict

import numpy as np

from ..policy import GROUPS
from ..registry import register
from .base import Detection, Detector, Param


@functools.cache
def _swilk():
    """The Shapiro-Wilk algorithm (AS R94) scipy.stats.shapiro runs, on a sample sorted already; None in another scipy
    (its public test, which sorts again, is used). Imported on first use: scipy.stats takes a second to import, which
    processes that never test (Serve replicas, clients) do not pay."""
    try:
        from scipy.stats._ansari_swilk_statistics import swilk
    except ImportError:
        return None
    return swilk


class _Coefficients:
    """Shapiro-Wilk's coefficients per sample size, computed once and shared by every key in the process (they depend
    on the size alone, and computing them is half the test's time): least recently used first out beyond
    ``max_bytes``."""

    def __init__(self, max_bytes: int = 32 << 20):
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes, self.max_bytes = 0, max_bytes

    def w(self, y: np.ndarray) -> float:
        n = len(y)
        a = self.cache.get(n)
        if a is not None:
            self.cache.move_to_end(n)
            return float(_swilk()(y, a, 1)[0])  # init=1: the given coefficients
        a = np.zeros(n // 2)
        w = float(_swilk()(y, a, 0)[0])  # computes them into a
        self.cache[n] = a
        self.bytes += a.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self.cache.popitem(last=False)[1].nbytes
        return w


_COEFFICIENTS = _Coefficients()


def _w_sorted(d: np.ndarray) -> float:
    """Shapiro-Wilk W of a sorted sample of at least 3 values that are not all equal (exactly scipy's)."""
    if _swilk() is None:
        from scipy.stats import shapiro

        with warnings.catch_warnings():  # scipy warns that its p-value is approximate past 5,000; W is exact
            warnings.simplefilter("ignore", UserWarning)
            return float(shapiro(d)[0])
    return _COEFFICIENTS.w(d - d[len(d) // 2])  # shifted by a middle value, as scipy does, for accuracy


class _Growing:
    """An append-only buffer that doubles its capacity."""

    __slots__ = ("data", "n")

    def __init__(self, shape=(), dtype=np.float64):
        self.data = np.empty((2, *shape), dtype)  # small: most accounts of a large population send few queries
        self.n = 0

    def append(self, value) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.n] = value
        self.n += 1

    @property
    def values(self) -> np.ndarray:
        return self.data[: self.n]


class _SortedPool(_Growing):
    """The pool of distances, kept sorted as it grows: W needs it sorted, and an insertion costs a memmove where a
    sort of the whole pool per query cost most of PRADA's time."""

    __slots__ = ("total", "total_sq")

    def __init__(self):
        super().__init__()
        self.total = self.total_sq = 0.0  # running sums, for the mean and standard deviation

    def stats(self) -> tuple[float, float]:
        mean = self.total / self.n
        return mean, float(np.sqrt(max(self.total_sq / self.n - mean * mean, 0.0)))

    def append(self, value) -> None:
        self.total += value
        self.total_sq += value * value
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        i = int(self.data[: self.n].searchsorted(value, "right"))
        self.data[i + 1: self.n + 1] = self.data[i: self.n]
        self.data[i] = value
        self.n += 1


class _ClassSet:
    """A growing set of flattened queries of one class (8-bit pixels, with their squared norms), with its threshold
    over its own distances."""

    __slots__ = ("points", "norms", "count", "total", "total_sq", "threshold")

    def __init__(self, dim: int):
        self.points = _Growing((dim,), np.uint8)
        self.norms = _Growing()  # each member's squared norm (an exact integer)
        self.count = 0  # the set's own distances: the first member's 0, then each later member's
        self.total = 0.0
        self.total_sq = 0.0
        self.threshold = 0.0

    def add(self, x: np.ndarray, norm: float, d: float) -> None:
        """A member and its own distance (0 for the first, as the paper's D_Gc starts); the threshold follows."""
        self.points.append(x)
        self.norms.append(norm)
        self.count += 1
        self.total += d
        self.total_sq += d * d
        mean = self.total / self.count
        std = np.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))
        self.threshold = max(self.threshold, mean - std)

    BLOCK = 4096  # members per matrix product (bounds the float64 copy of a large set)

    def nearest(self, xf: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Squared L2 distance, in 8-bit pixel units, from each row of ``xf`` (8-bit pixels as float64, with their
        squared ``norms``) to its nearest member: matrix products over ``BLOCK`` members at a time, exact (every term
        is an integer far below 2**53, so the order of the sums does not matter)."""
        points, member_norms, block = self.points.values, self.norms.values, self.BLOCK
        best = None
        for s in range(0, len(points), block):
            products = xf @ points[s:s + block].T.astype(np.float64)
            part = (member_norms[s:s + block] - 2.0 * products).min(1)
            best = part if best is None else np.minimum(best, part)
        return best + norms


class _Account:
    __slots__ = ("classes", "pool", "flagged", "last_w")

    def __init__(self):
        self.classes: dict[int, _ClassSet] = {}
        self.pool = _SortedPool()
        self.flagged = False
        self.last_w = float("nan")


@register("detector")
class Prada(Detector):
    """PRADA (Juuti et al. 2019): per key, the Shapiro-Wilk W of the distances between each query and the key's
    earlier queries of its class; W below delta flags the key for good. Score 1 - W."""

    name = "prada"
    params = {
        "delta": Param(0.95, low=0, high=1, low_open=True, help="Shapiro-Wilk W threshold"),
        "min_pool": Param(100, int, low=3, help="distances pooled before PRADA may flag"),
        "skip_repeats": Param(False, bool, help="an exact repeat of an earlier query adds no distance"),
        "group": Param("account", str, choices=GROUPS, brief=False,
                       help="whose queries form one history: each account, each client actor (a client address), "
                            "each account cohort (a sign-up batch), or all traffic"),
    }
    presets = {
        "prada": {"enabled": True},
        # a second PRADA over pooled accounts, against attackers who split their queries; honest users of a
        # group share popular images, so exact repeats are skipped
        "pooled_prada": {"enabled": False, "group": "all", "skip_repeats": True},
    }

    CHUNK = 128  # queries whose distances to each other are computed at once (a CHUNK x CHUNK product)
    SMALL = 256  # (queries x members) per class present, below which one masked product beats one per class

    def __init__(self, models=None, **params):
        super().__init__(models, **params)
        self._accounts: dict[str, _Account] = {}

    def threshold(self) -> float:
        return 1.0 - self.values["delta"]

    def saturation(self) -> float:
        return min(1.0, 2 * self.threshold())

    @staticmethod
    def _w_statistic(pool: _SortedPool) -> float:
        """W of the pool once the values beyond 3 standard deviations of its mean are trimmed."""
        d = pool.values
        mean, std = pool.stats()
        if std > 0:  # the values within mean +- 3 std: a slice of the sorted pool
            d = d[d.searchsorted(mean - 3 * std, "left"): d.searchsorted(mean + 3 * std, "right")]
        if len(d) < 3 or d[-1] == d[0]:
            return 1.0 if len(d) >= 3 else float("nan")  # identical distances: no evidence either way
        return _w_sorted(d)

    @staticmethod
    def _flat(inputs: np.ndarray) -> np.ndarray:
        """The queries as flat 8-bit pixels (floats in [0, 1] are quantised as the victim service does)."""
        raw = np.asarray(inputs)
        if raw.dtype != np.uint8:
            raw = np.rint(np.clip(raw, 0, 1) * 255).astype(np.uint8)
        return raw.reshape(len(raw), int(np.prod(raw.shape[1:])))

    def _feed(self, acc: _Account, x: np.ndarray, labels: np.ndarray, judge: bool) -> tuple[np.ndarray, np.ndarray]:
        """Put queries (flat 8-bit pixels, the victim's labels) through the account's history, in order, ``CHUNK`` at
        a time. ``judge``: test the pool after each distance and return each query's score and flag (:meth:`score`);
        otherwise only grow the history (:meth:`final_w`)."""
        scores, flags = np.full(len(x), np.nan), np.zeros(len(x), bool)
        for s in range(0, len(x), self.CHUNK):
            part = slice(s, s + self.CHUNK)
            self._chunk(acc, x[part], labels[part], scores[part], flags[part], judge)
        return scores, flags

    def _chunk(self, acc: _Account, x: np.ndarray, labels: np.ndarray, scores: np.ndarray, flags: np.ndarray,
               judge: bool) -> None:
        # every distance the chunk needs, in exact matrix products: from each query to its class set as the chunk
        # found it, and between the chunk's queries of one class (one may join the set before another is scored)
        xf = x.astype(np.float64)
        norms = np.einsum("ij,ij->i", xf, xf)
        near = self._nearest(acc, xf, norms, labels)
        pairs = norms[:, None] + norms[None, :] - 2.0 * (xf @ xf.T)
        pairs[labels[:, None] != labels[None, :]] = np.inf
        skip, min_pool, delta = self.values["skip_repeats"], self.values["min_pool"], self.values["delta"]
        for i, c in enumerate(labels.tolist()):
            cls, joins = acc.classes.get(c), False
            if cls is None:  # the first query of a class has no distance and starts the set, its own distance 0
                acc.classes[c] = cls = _ClassSet(x.shape[1])
                cls.add(x[i], norms[i], 0.0)
                joins = True
            else:
                d = math.sqrt(near[i]) / 255.0  # in [0, 1] pixel units
                if d > 0 or not skip:  # a repeated image, when skipped, is no new evidence either way
                    acc.pool.append(d)
                    if d > cls.threshold:
                        cls.add(x[i], norms[i], d)
                        joins = True
                    if judge and acc.pool.n > min_pool:
                        acc.last_w = self._w_statistic(acc.pool)
                        acc.flagged = acc.flagged or acc.last_w < delta
            if joins:  # the chunk's later queries of its class now have it in their set
                np.minimum(near, pairs[:, i], out=near)
            scores[i] = 1.0 - acc.last_w
            flags[i] = acc.flagged

    def _nearest(self, acc: _Account, xf: np.ndarray, norms: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Squared distance from each query to its class set (inf where the account has none yet). A small request
        against small sets takes one product against all their members with the other classes masked out (a few
        numpy calls in all); otherwise one product per class (a few calls per class, the least arithmetic)."""
        present = [c for c in np.unique(labels).tolist() if c in acc.classes]
        sets = [acc.classes[c] for c in present]
        members = sum(cls.points.n for cls in sets)
        near = np.full(len(xf), np.inf)
        if not sets:
            return near
        if len(xf) * members <= self.SMALL * len(sets):
            points = np.concatenate([cls.points.values for cls in sets]).astype(np.float64)
            sq = np.concatenate([cls.norms.values for cls in sets]) - 2.0 * (xf @ points.T)
            sq[labels[:, None] != np.repeat(present, [cls.points.n for cls in sets])[None, :]] = np.inf
            return sq.min(1) + norms
        for c, cls in zip(present, sets):
            idx = np.flatnonzero(labels == c)
            near[idx] = cls.nearest(xf[idx], norms[idx])
        return near

    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray,
              probs: np.ndarray | None = None) -> Detection:
        acc = self._accounts.setdefault(account_id, _Account())
        return Detection(*self._feed(acc, self._flat(inputs), np.asarray(labels), judge=True))

    def final_w(self, inputs: np.ndarray, labels: np.ndarray) -> float | None:
        """W of a whole stream judged at its end (None if fewer than ``min_pool`` distances): what
        :meth:`score` gives at the stream's last query, without a Shapiro-Wilk test after every query."""
        acc = _Account()
        self._feed(acc, self._flat(inputs), np.asarray(labels), judge=False)
        return self._w_statistic(acc.pool) if acc.pool.n > self.values["min_pool"] else None

    def flagged_accounts(self) -> set[str]:
        return {a for a, s in self._accounts.items() if s.flagged}

    def memory(self) -> dict[str, int]:
        """What the histories hold: keys, kept queries (class-set members), distances pooled, and the bytes of
        their buffers as allocated (capacity doubles, so up to twice what is used)."""
        kept = pooled = nbytes = 0
        for acc in self._accounts.values():
            pooled += acc.pool.n
            nbytes += acc.pool.data.nbytes
            for cls in acc.classes.values():
                kept += cls.points.n
                nbytes += cls.points.data.nbytes + cls.norms.data.nbytes
        return {"keys": len(self._accounts), "kept": kept, "pooled": pooled, "bytes": nbytes}

    def is_flagged(self, account_id: str) -> bool:  # O(1), on every request
        acc = self._accounts.get(account_id)
        return acc is not None and acc.flagged

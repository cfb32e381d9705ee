"""Account linking: catch an attacker who splits its queries over many accounts (our own method).

Per-account PRADA needs about ``min_pool`` queries of one account before it can judge it; an attacker
with 50 accounts and 1,500 queries sends 30 per account and is never judged. Linking puts back together
what the split took apart, in two steps, every ``every`` queries:

1. **Link.** Each account with at least ``min_queries`` queries is described by what it asks, not when:
   the histogram of its query pixels' intensities (16 bins), normalised, square-rooted and divided by √2, so
   that the Euclidean distance between two accounts is the Hellinger distance of their pixel distributions.
   (Label histograms were tried too: over 15 queries an account's labels are too noisy to link on.)
   Accounts are clustered by average linkage (scipy) and the tree is cut at ``distance``. Sybil accounts
   of one attacker draw from one generator (seed perturbations, a synthetic generator, one natural pool)
   and land together; honest users' natural queries land in their own cluster.
2. **Test.** Each cluster of at least ``min_accounts`` accounts is judged as one stream: PRADA (with
   this detector's ``delta`` and ``min_pool``) runs over the cluster's queries in arrival order. If PRADA
   flags it (W below delta at the end of the pooled stream, not a dip along the way), the blame is
   searched down the cluster's own linkage tree (:meth:`AccountLinker._descend`): sub-clusters with
   enough queries are judged on their own, so honest accounts pooled with an attacker's are cleared by
   their own streams; sub-clusters too small to judge (sybil accounts of 15 queries) keep the flag; and
   when two sub-clusters are each cleared but flagged together, the attack only shows pooled: every account
   of the two is flagged except (with ``spare``, the default) those with enough queries for PRADA that clear
   themselves on their own stream. Without that exception one dip of a large pooled cluster of honest
   accounts and a few sybils flags every honest account in it (``docs/detection.md``). Flags are for good,
   and each records why it was raised (:meth:`AccountLinker.flag_reasons`). Exact repeats are skipped in
   pooled streams (honest users share popular images; see ``Prada.skip_repeats``).

Linking alone flags nothing (honest users are similar to one another too); the PRADA test decides. The
score of a query is 1 - W of its account's cluster at the last re-clustering (NaN before its account
was linked into a cluster of ``min_accounts``), and the flag is the account's.
"""

from __future__ import annotations

import numpy as np

from ..registry import register
from .base import Detection, Detector, Param
from .prada import Prada

PIXEL_BINS = 16
# Why an account was flagged: its own stream (a lone account, or a leaf of the cluster tree) failed PRADA; it sat
# in a flagged part of the tree too small for PRADA to judge; or its part and a sibling part each cleared
# themselves but failed together.
REASONS = ("own stream", "too small to judge", "pooled")


class _Acct:
    __slots__ = ("pixels", "n", "w", "flagged", "why")

    def __init__(self):
        self.pixels = np.zeros(PIXEL_BINS)
        self.n = 0
        self.w = float("nan")
        self.flagged = False
        self.why = ""  # why it was flagged: one of REASONS


@register("detector")
class AccountLinker(Detector):
    """Account linking (our own): cluster the accounts by the pixel statistics of what they ask, then judge each
    cluster's pooled queries with PRADA; the flag is the account's. Score 1 - W of the account's cluster."""

    name = "link"
    stateful = True
    population = True
    params = {
        "every": Param(500, int, low=1, help="re-cluster the accounts every this many queries"),
        "min_queries": Param(10, int, low=1, help="queries an account needs before it is linked"),
        "distance": Param(0.3, low=0, low_open=True, help="Hellinger distance at which the cluster tree is cut"),
        "min_accounts": Param(2, int, low=1, help="smallest cluster judged by PRADA"),
        "delta": Prada.params["delta"],
        "min_pool": Param(50, int, low=3, help="distances a cluster's pooled stream needs before PRADA judges it"),
        "spare": Param(True, bool, help="when two parts fail only pooled, spare the accounts that clear themselves "
                                        "on their own stream"),
    }
    presets = {"link": {"enabled": False}}
    threshold = Prada.threshold  # both flag where W falls below delta
    saturation = Prada.saturation

    def __init__(self, models=None, **params):
        super().__init__(models, **params)
        self._accounts: dict[str, _Acct] = {}
        self._stream_acct: list[str] = []  # every query in arrival order: account, image, label
        self._stream_x: list[np.ndarray] = []
        self._stream_y: list[np.ndarray] = []
        self._since = 0
        self.clusters: list[list[str]] = []  # the last clustering (accounts with enough queries)

    def score(self, account_id: str, inputs: np.ndarray, labels: np.ndarray,
              probs: np.ndarray | None = None) -> Detection:
        x = np.asarray(inputs)
        x = x if x.dtype == np.uint8 else np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
        labels = np.asarray(labels, np.int64)
        acc = self._accounts.setdefault(account_id, _Acct())
        was_flagged = acc.flagged
        acc.pixels += np.bincount(x.reshape(-1) >> 4, minlength=PIXEL_BINS)
        acc.n += len(x)
        self._stream_acct.append(account_id)
        self._stream_x.append(x.reshape(len(x), -1))
        self._stream_y.append(labels)
        self._since += len(x)
        flags = np.full(len(x), was_flagged)
        if self._since >= self.values["every"]:  # after this batch: only its last query sees the new verdict
            self._since = 0
            self.relink()
            flags[-1] = acc.flagged
        return Detection(np.full(len(x), 1.0 - acc.w), flags)

    def features(self, accounts: list[str]) -> np.ndarray:
        """Hellinger embedding of each account's pixel-intensity histogram."""
        rows = []
        for a in accounts:
            s = self._accounts[a]
            rows.append(np.sqrt(s.pixels / s.pixels.sum()))
        return np.array(rows) / np.sqrt(2)

    def relink(self) -> None:
        """Re-cluster the accounts and judge the clusters with PRADA, descending into flagged ones."""
        from scipy.cluster.hierarchy import fcluster, linkage, to_tree  # here: importing scipy takes a while

        p = self.values
        ready = sorted(a for a, s in self._accounts.items() if s.n >= p["min_queries"])
        if len(ready) < p["min_accounts"] or not ready:
            return
        feats = self.features(ready)
        ids = (fcluster(linkage(feats, "average"), p["distance"], "distance") if len(ready) > 1
               else np.ones(1, int))  # one account: a cluster of its own (min_accounts=1)
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(ids):
            groups.setdefault(int(c), []).append(i)
        self.clusters = sorted(([ready[i] for i in g] for g in groups.values()), key=lambda g: (-len(g), g))
        self._verdicts: dict = {}  # PRADA's verdict on each group tested in this round
        owner = np.array(self._stream_acct)
        for members in groups.values():
            if len(members) < p["min_accounts"]:
                continue
            names = [ready[i] for i in members]
            if len(members) == 1:  # min_accounts=1: a lone account is judged on its own
                result = self._test(names, owner)
                if result is not None:
                    self._accounts[names[0]].w = result[0]
                    if result[1]:
                        self._flag(names, "own stream")
                continue
            self._descend(to_tree(linkage(feats[members], "average")), names, owner)

    def _test(self, accounts: list[str], owner: np.ndarray) -> tuple[float, bool] | None:
        """PRADA over the pooled queries of ``accounts`` in arrival order: (W, W < delta) with W at the end
        of the stream, or None if they are too few for PRADA to judge (``min_pool``)."""
        key = frozenset(accounts)
        if key in self._verdicts:
            return self._verdicts[key]
        pick = np.flatnonzero(np.isin(owner, accounts))
        prada = Prada(delta=self.values["delta"], min_pool=self.values["min_pool"], skip_repeats=True)
        w = prada.final_w(np.concatenate([self._stream_x[i] for i in pick]),
                          np.concatenate([self._stream_y[i] for i in pick]))
        # the pooled stream as it stands now, not a dip along the way
        self._verdicts[key] = None if w is None else (w, w < self.values["delta"])
        return self._verdicts[key]

    def _descend(self, node, names: list[str], owner: np.ndarray) -> None:
        """Test a node of the cluster tree with PRADA; if it is flagged, find whom to blame among its two
        children, each judged on its own where it has enough queries for PRADA:
        - a child too small to judge keeps the flag (sybil accounts of 15 queries each);
        - children flagged on their own are searched in turn, and a cleared sibling is spared (an honest
          account pooled with an attacker's clears itself);
        - if both children are cleared, the attack only shows when they are pooled (sybils each holding a
          different round of a Jacobian attack): the whole node is flagged, except, with ``spare``, the
          accounts that clear themselves on their own stream."""
        accounts = [names[i] for i in node.pre_order()]
        result = self._test(accounts, owner)
        if result is None:
            return
        for a in accounts:
            self._accounts[a].w = result[0]
        if not result[1]:
            return
        if node.is_leaf():
            self._flag(accounts, "own stream")
            return
        children = [(c, [names[i] for i in c.pre_order()]) for c in (node.get_left(), node.get_right())]
        verdicts = [self._test(sub, owner) for _, sub in children]
        if all(v is not None and not v[1] for v in verdicts):
            self._flag([a for a in accounts if not (self.values["spare"] and self._clears_alone(a, owner))],
                       "pooled")
            return
        for (child, sub), v in zip(children, verdicts):
            if v is None:
                self._flag(sub, "too small to judge")
            elif v[1]:
                self._descend(child, names, owner)

    def _clears_alone(self, account: str, owner: np.ndarray) -> bool:
        verdict = self._test([account], owner)
        return verdict is not None and not verdict[1]

    def _flag(self, accounts: list[str], why: str) -> None:
        for a in accounts:
            acc = self._accounts[a]
            if not acc.flagged:
                acc.flagged, acc.why = True, why

    def flagged_accounts(self) -> set[str]:
        return {a for a, s in self._accounts.items() if s.flagged}

    def flag_reasons(self) -> dict[str, str]:
        """Each flagged account and why it was flagged (one of :data:`REASONS`)."""
        return {a: s.why for a, s in self._accounts.items() if s.flagged}

    def verdicts(self) -> dict[str, tuple[float, bool]]:
        """Each account linked into a judged cluster, or flagged: (1 - W of its cluster, flagged)."""
        return {a: (1.0 - s.w, s.flagged) for a, s in self._accounts.items() if not np.isnan(s.w) or s.flagged}

    def is_flagged(self, account_id: str) -> bool:
        acc = self._accounts.get(account_id)
        return acc is not None and acc.flagged

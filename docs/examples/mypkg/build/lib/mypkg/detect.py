"""A detector plug-in: a sim.detectors.Detector subclass. This one is stateful (a history per account), so the
detection tier shards it by account, snapshots it and replays it like PRADA."""

import numpy as np

from sim.detectors import Detection, Detector, Param


class Burst(Detector):
    """Flag an account for good once it has sent more than `limit` queries."""

    stateful = True
    params = {"limit": Param(400, int, low=1, help="queries an account may send before it is flagged")}

    def __init__(self, models=None, **params):
        super().__init__(models, **params)
        self.sent = {}  # account -> queries so far: the state the tier keeps, snapshots and restores

    @property
    def needs_images(self):
        return False  # it only counts

    def score(self, account_id, inputs, labels, probs=None):
        before = self.sent.get(account_id, 0)
        counts = before + np.arange(1, len(labels) + 1)
        self.sent[account_id] = int(counts[-1]) if len(counts) else before
        return Detection(scores=counts.astype(float), flags=counts > self.values["limit"])

    def threshold(self):
        return float(self.values["limit"])

    def flagged_accounts(self):
        return {a for a, n in self.sent.items() if n > self.values["limit"]}

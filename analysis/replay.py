"""Replay: run any detector over a logged query stream, with other parameters or another grouping,
without re-running the simulation.

The stream is every scored query (see :func:`analysis.detection.scored_rows`), fed request by request
as the victim service fed it. Its order: with ``order=NAME`` (a stateful detector of the run), each key's
queries in the order that detector's owner in the detection tier saw them (the log's ``NAME_seq``), which
is exact for a detector keyed like NAME however many Serve replicas and shards the run had: with the
parameters and grouping the run used, PRADA's replayed scores and flags are the online ones, bit for bit.
Without it, arrival order (by writer sequence within a Serve replica, by time across replicas), which is
exact per account for a run with one replica (a client waits for each answer), not for a pooled key, whose requests
one replica serves concurrently. Account linking is fed in rounds (:mod:`sim.tier`): with ``order=NAME`` (the run's
linking detector), the replay takes the queries in round by round as the run's linker did (the log's ``NAME_round``,
each round's queries in request-id order) and gives each query the verdict of the round it got online
(``NAME_as_of``), so with the run's parameters it reproduces linking's scores and flags exactly, however many
replicas and shards the run had; with other parameters it shows what they would have flagged at the same
publication points. Detectors that look at images (PRADA, SAME, linking) need the run to
have logged its inputs (``log.inputs=true``, the default); the maximum-softmax score needs only the
logged probabilities.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import yaml

from sim import detectors as detector_registry
from sim import querylog
from sim.errors import SimError
from sim.policy import GROUPS, Rule
from sim.protocol import Account

from .detection import scored_rows


def arrival_order(rows: pa.Table) -> np.ndarray:
    """Indices of ``rows`` in the order the victim saw them: each writer's (Serve replica's) rows in their
    sequence, writers interleaved by time (a clock step back inside one writer cannot reorder its rows)."""
    ts = rows.column("timestamp").cast(pa.int64()).to_numpy()
    writer = np.asarray(rows.column("writer").to_pylist())
    seq = rows.column("seq").to_numpy()
    by_writer = np.lexsort((seq, writer))
    ts_sorted, w_sorted = ts[by_writer], writer[by_writer]
    monotone = np.empty_like(ts)
    for w in np.unique(w_sorted):
        part = w_sorted == w
        monotone[by_writer[part]] = np.maximum.accumulate(ts_sorted[part])
    return np.lexsort((seq, writer, monotone))


class _RunModels:
    """A run's :class:`sim.zoo.ModelContext`, made on first use: most detectors need no models, and a log may
    come without its run's config. A run that logged no images gets none made (minutes of training): the models
    would have nothing to score."""

    def __init__(self, run_dir: str, cfg, why: str, kind: str):
        self._run_dir, self._cfg, self._why, self._kind, self._ctx = run_dir, cfg, why, kind, None

    def __getattr__(self, name: str):
        if self._ctx is None:
            from sim import zoo

            if self._cfg is not None and not self._cfg.log.inputs:
                raise SimError(f"replay of {self._kind} needs the query images, but this run's log has none; expected "
                               f"a run logged with log.inputs=true")
            if self._cfg is None:
                raise SimError(f"{self._run_dir}: {self._why}, so the models this replay needs cannot be made as the "
                               f"run made them; expected a run directory written by this version of python -m sim")
            victim = zoo.get_victim(self._cfg.victim, self._cfg.data, self._cfg.seed, self._cfg.cache_dir)
            self._ctx = zoo.ModelContext.of(self._cfg, victim)
        return getattr(self._ctx, name)


def _run_config(run_dir: str):
    """(the run's scenario config, None) or (None, why it has none usable)."""
    from sim import config, storage

    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        return None, "the run has no config.yaml"
    try:
        return config.load(yaml.safe_load(storage.read_text(path))), None
    except SimError as exc:  # a run of another version: fine for what needs no models
        return None, f"its config.yaml does not load ({exc})"


def run_settings(run_dir: str, kind: str, name: str | None = None) -> tuple[str | None, dict]:
    """The name and settings of the run's detector ``name`` if it is of ``kind``, else of its first detector of
    ``kind``, as it ran: its scenario settings, with the threshold it calibrated (from the summary). (None, {})
    where the run has no such detector (or no readable config)."""
    from sim import summary as summary_mod

    cfg, _ = _run_config(run_dir)
    found = {n: d for n, d in (cfg.enabled_detectors() if cfg else {}).items() if d.kind == kind}
    if not found:
        return None, {}
    name = name if name in found else next(iter(found))
    settings = found[name].params()
    ran = summary_mod.read(run_dir)
    calibration = ran.detection[name].calibration if ran and name in ran.detection else None
    if calibration:
        settings["threshold"] = calibration["threshold"]
    return name, settings


def prepare(run_dir: str, kind: str, params: dict | None = None):
    """The trained models a replay of detector ``kind`` needs over a run (SAME's, an outlier-exposure victim),
    made like the run made them: through the victim zoo, from the run's own settings (those of its first
    detector of this kind) with ``params`` over them. None when the kind needs none."""
    cfg, why = _run_config(run_dir)
    base = next((d.params() for d in cfg.detectors.values() if d.kind == kind), {}) if cfg else {}
    return detector_registry.get(kind).prepare({**base, **(params or {})}, _RunModels(run_dir, cfg, why, kind))


def calibration_images(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The benign images a run calibrated its stateless detectors' thresholds on (the calibration split of the
    victim's training data, :func:`sim.detectors.calibration_split`) and the victim's probabilities on them, made as
    the run made them (through the victim zoo)."""
    from sim import zoo
    from sim.training import predict_probs

    cfg, why = _run_config(run_dir)
    if cfg is None:
        raise SimError(f"{run_dir}: {why}, so the images its thresholds were calibrated on cannot be made; "
                       f"expected a run directory written by this version of python -m sim, or a threshold "
                       f"(--param threshold=…)")
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    x = victim.dataset.x_train[detector_registry.calibration_split(len(victim.dataset.x_train), cfg.seed)[1]]
    return x, predict_probs(victim.model, x)


def check_order(table: pa.Table, order: str | None) -> None:
    """A one-line error unless ``order`` (if given) is a stateful detector of the run that logged its order."""
    logged = [c[:-4] for c in table.column_names if c.endswith("_seq") and table.column(c).null_count < len(table)]
    if order is not None and order not in logged:
        why = (f"detector {order} logged no order (it keeps no history per key)" if f"{order}_seq" in table.column_names
               else f"the log has no {order}_seq column")
        raise SimError(f"order={order!r}: {why}; expected one of the run's stateful detectors "
                       f"({', '.join(logged) or 'none logged an order'})")


def replay(table: pa.Table, kind: str, params: dict | None = None, group: str | None = None,
           order: str | None = None, calibration: tuple[np.ndarray, np.ndarray] | None = None, **models) -> dict:
    """Run detector ``kind`` (a registry name) with ``params`` over the log ``table``, keying its history by
    ``group`` (account, actor, cohort or all; default: the ``group`` in ``params``, else account). ``order``: a
    logged stateful detector whose per-key order to follow (see the module's note; it should key its history like
    ``group``). ``calibration``: benign images and the victim's probabilities on them, on which a stateless detector
    given no threshold calibrates one for its ``target_fpr``, as the run did (see :func:`calibration_images`).
    ``models``: what the detector needs beyond its parameters (``models=``: what its :meth:`Detector.prepare` made,
    see :func:`prepare`). Returns ``scores`` and ``flags`` aligned with ``scored_rows(table)``, the ``rows``
    themselves, the ``threshold`` a stateless detector flagged above, and, in a stateful detector's order, the
    ``gaps``: keys whose history in the tier holds a query the log lacks (key -> its position; see :func:`_gaps`).
    """
    if group is not None and (params or {}).get("group", group) != group:
        raise SimError(f"group={group!r} and the parameter group={params['group']!r} disagree; expected one grouping "
                       f"(the replay keys its history by it)")
    group = group or (params or {}).get("group") or "account"
    if group not in GROUPS:
        raise SimError(f"group={group!r} is not a grouping; expected one of: {', '.join(GROUPS)}")
    check_order(table, order)
    det = detector_registry.build(kind, **(params or {}), **models)
    extra = {}
    if isinstance(det, detector_registry.StatelessDetector):
        if det.threshold() is None and det.values["target_fpr"] is not None:  # as the run calibrated it
            if calibration is None:
                raise SimError(f"replay of {kind}: no threshold, and target_fpr={det.values['target_fpr']} needs "
                               f"benign images to calibrate one on; expected threshold=… among the parameters, or "
                               f"calibration=(images, victim probabilities) (analysis.calibration_images(RUN) "
                               f"makes the run's)")
            det.calibrate(*calibration)
        extra["threshold"] = det.threshold()
    rows = scored_rows(table)
    n = rows.num_rows
    scores, flags = np.full(n, np.nan), np.zeros(n, bool)
    if n == 0:
        return {"scores": scores, "flags": flags, "rows": rows, "gaps": {}, **extra}
    needs_images = det.needs_images
    shape = querylog.input_shape(table.schema)
    if needs_images and (shape is None or rows.column("input").null_count == n):
        raise SimError(f"replay of {kind} needs the query images, but this run's log has none; expected a run "
                       f"logged with log.inputs=true")
    if order is not None and det.population:
        return _replay_rounds(det, rows, order, shape)
    cols = {c: rows.column(c).to_pylist() for c in ("account_id", "actor_id", "cohort", "role", "attack")
            if c in rows.column_names}
    rule = Rule(group=group)
    keys = np.asarray([rule.key(Account(cols["account_id"][i], cols["role"][i], cols["attack"][i],
                                        cols.get("cohort", [None] * n)[i]), cols["actor_id"][i]) for i in range(n)])
    gaps: dict[str, int] = {}
    if order is None:
        idx = arrival_order(rows)
    else:
        seq = rows.column(f"{order}_seq").to_numpy(zero_copy_only=False)
        missing = int(np.isnan(seq.astype(np.float64)).sum())
        if missing:
            raise SimError(f"order={order!r}: {missing:,} of the {n:,} scored queries have no {order}_seq; expected "
                           f"a stateful detector that scored every query of the run")
        seq = seq.astype(np.int64)
        idx = np.lexsort((seq, keys))
        if ((keys[idx][1:] == keys[idx][:-1]) & (seq[idx][1:] == seq[idx][:-1])).any():
            raise SimError(f"order={order!r} is not an order of each {group}'s queries: two queries of one "
                           f"{group} key share a position in it (its detector keys its history otherwise); expected "
                           f"a stateful detector of the run keyed by {group}")
        gaps = _gaps(keys[idx], seq[idx])
    rows_sorted = rows.take(idx)
    keys = keys[idx]
    probs = querylog.prob_matrix(rows_sorted.column("clean_probs"))
    images = querylog.decode_inputs(rows_sorted, shape) if needs_images else np.zeros((n, 1), np.uint8)
    req = np.asarray(rows_sorted.column("request_id").to_pylist())
    starts = np.r_[0, np.flatnonzero(req[1:] != req[:-1]) + 1, n]
    flagged: set[str] = set()  # a stateful detector's keys flagged so far: for good, as the tier keeps them
    for a, b in zip(starts[:-1], starts[1:]):
        batch = (keys[a], images[a:b], probs[a:b].argmax(1), probs[a:b])
        res = detector_registry.score_for_good(det, *batch, flagged) if det.stateful else det.score(*batch)
        scores[idx[a:b]] = res.scores
        flags[idx[a:b]] = res.flags
    return {"scores": scores, "flags": flags, "rows": rows, "gaps": gaps, **extra}


def _gaps(keys: np.ndarray, seq: np.ndarray) -> dict[str, int]:
    """Keys whose logged positions (``keys`` grouped, ``seq`` ascending within each) are not 0, 1, 2, …: key -> the
    first position the log lacks. The tier scored a query there that no row records (a Serve replica killed between
    its shard's verdict and its log write); a replay in that order is exact for the key only up to it. Only where the
    order keys its history like the replay: under an order keyed more coarsely (a cohort's, for a replay per
    account), a key's positions are its share of a larger history's, and most keys' do not start at 0 (then: {})."""
    n = len(keys)
    starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    if np.mean(seq[starts] == 0) < 0.9:
        return {}
    position = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    wrong = np.flatnonzero(seq != position)
    out: dict[str, int] = {}
    for i in wrong:
        out.setdefault(str(keys[i]), int(position[i]))
    return out


def _replay_rounds(det, rows: pa.Table, order: str, shape) -> dict:
    """Account linking over ``rows`` round by round: the rounds' queries ingested as the run's linker ingested them,
    each query given the verdict of the round it saw (see the module's note)."""
    from sim.tier import Linker

    n = rows.num_rows
    cols = {c: rows.column(f"{order}_{c}").to_numpy(zero_copy_only=False).astype(np.float64)
            if f"{order}_{c}" in rows.column_names else np.full(n, np.nan) for c in ("round", "as_of")}
    if any(np.isnan(v).any() for v in cols.values()):
        raise SimError(f"order={order!r}: some scored queries have no {order}_round; expected the run's "
                       f"account-linking detector, logged by this version (query log schema "
                       f"{querylog.SCHEMA_VERSION})")
    rounds, as_of = cols["round"].astype(np.int64), cols["as_of"].astype(np.int64)
    req = np.asarray(rows.column("request_id").to_pylist())
    accounts = np.asarray(rows.column("account_id").to_pylist())
    order_idx = np.lexsort((rows.column("seq").to_numpy(), req, rounds))
    in_order = rows.take(order_idx)
    images = querylog.decode_inputs(in_order, shape).reshape(n, -1)
    labels = querylog.prob_matrix(in_order.column("clean_probs")).argmax(1)
    linker = Linker(det)
    seen: dict[int, dict] = {0: {}}
    r_sorted, req_sorted = rounds[order_idx], req[order_idx]
    bounds = np.r_[0, np.flatnonzero((r_sorted[1:] != r_sorted[:-1]) | (req_sorted[1:] != req_sorted[:-1])) + 1, n]
    batch: list = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        batch.append((req_sorted[a], accounts[order_idx[a]], images[a:b], labels[a:b]))
        if b == n or r_sorted[b] != r_sorted[a]:  # the round is complete: ingest it, keep its verdicts
            linker.ingest([(batch, {})])
            seen[int(r_sorted[a])] = linker.verdicts()
            batch = []
    for r in range(1, int(as_of.max(initial=0)) + 1):  # a round with no logged query changed no verdict
        seen.setdefault(r, seen[r - 1])
    scores, flags = np.full(n, np.nan), np.zeros(n, bool)
    for i in range(n):
        scores[i], flags[i], _ = seen[int(as_of[i])].get(accounts[i], (np.nan, False, 0))
    return {"scores": scores, "flags": flags, "rows": rows, "gaps": {}}

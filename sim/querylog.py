"""The query log: one row per query (answered or refused), defined once here for writer and reader.

Writing: each writer (one per Serve replica) owns an append-only Arrow IPC stream file
``queries/<writer>.arrows`` and writes one record batch per request, flushed to the operating system
before the answer is returned, so a replica killed with SIGKILL loses no answered query.
At the end of a run :func:`compact` turns the streams into one Parquet file and assigns ``query_index``
(the position of a query in its account's history, over all writers, by time).
Reading (:func:`read`) takes the Parquet files and any streams left by a crash, tolerating a torn
last record.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import storage

log = logging.getLogger(__name__)

SCHEMA_VERSION = "5"
STREAM_SUFFIX = ".arrows"

SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("victim", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("account_id", pa.string()),  # null: the API key matched no account
        pa.field("actor_id", pa.string()),
        pa.field("role", pa.string()),  # attacker / benign / external (ground truth, never used to decide)
        pa.field("attack", pa.string()),  # e.g. knockoff; null for benign users
        pa.field("cohort", pa.string()),  # the account's sign-up batch (a grouping key for detectors)
        pa.field("query_index", pa.int64()),  # per account, from 0, assigned at compaction
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("input_sha1", pa.string()),
        pa.field("clean_probs", pa.list_(pa.float32())),
        pa.field("returned_probs", pa.list_(pa.float32())),  # null if refused
        pa.field("returned_label", pa.int32()),  # null if refused
        # answered / perturbed (answered through a policy's defense) / challenged (proof of work asked,
        # not answered) / refused
        pa.field("action", pa.string(), nullable=False),
        pa.field("refusal_reason", pa.string()),
        pa.field("defense_l1", pa.float32()),  # L1 distance clean -> returned; null if not answered
        pa.field("top1_changed", pa.bool_()),  # the defense changed the top-1 label; null if not answered
        pa.field("pow_bits", pa.int16()),  # this query's proof-of-work difficulty; null if none was asked
        pa.field("pow_seconds", pa.float32()),  # client's solving time, its share of the puzzle (resubmissions)
        # the answer to a solved (or wrongly solved) challenge: the same query a second time, not scored
        pa.field("resubmission", pa.bool_(), nullable=False),
        pa.field("latency_ms", pa.float32(), nullable=False),  # whole request, same for its queries
        pa.field("input", pa.binary()),  # uint8 image bytes in C, H, W order; shape in the metadata
        pa.field("writer", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),  # row number within its writer
    ],
    metadata={"schema_version": SCHEMA_VERSION},
)
COLUMNS = SCHEMA.names
ANSWERED = ("answered", "perturbed")  # actions that returned probabilities
# refusal reasons of a limit (serve.rate, serve.quota): the query was refused before the model and the detectors saw
# it. A run's clients wait out a refusal over the rate and send the query again, so its row is an attempt, not a query
RATE, QUOTA = "rate", "quota"
LIMITS = (RATE, QUOTA)


def refused_for(table: pa.Table, reasons) -> np.ndarray:
    """Which rows were refused for one of ``reasons`` (a boolean array)."""
    if "refusal_reason" not in table.column_names:
        return np.zeros(table.num_rows, bool)
    hit = pc.is_in(table.column("refusal_reason"), value_set=pa.array(list(reasons), pa.string()))
    return pc.fill_null(hit, False).to_numpy(zero_copy_only=False).astype(bool)


DETECTOR_SUFFIXES = ("_score", "_flagged", "_seq", "_round", "_as_of")


def detector_fields(name: str) -> list[pa.Field]:
    """The columns of each detector a run has: its score (higher = more suspicious; null before it has one), its
    flag (for stateful detectors, the key's flag as of this query) and, for stateful detectors, the query's position
    in its key's history, in the order the key's owner in the detection tier saw it (null for stateless ones). A
    detector fed in rounds (account linking) also records the round that took the query in and the round whose
    verdict the query got (0: none yet); null for the others."""
    return [pa.field(f"{name}_score", pa.float32()), pa.field(f"{name}_flagged", pa.bool_()),
            pa.field(f"{name}_seq", pa.int64()), pa.field(f"{name}_round", pa.int32()),
            pa.field(f"{name}_as_of", pa.int32())]


def schema_for(input_shape: tuple[int, ...], detectors: tuple[str, ...] | list[str] = ()) -> pa.Schema:
    """The schema of a run: the base columns plus each detector's, with the input shape and the
    detector names recorded in its metadata."""
    fields = list(SCHEMA) + [f for d in detectors for f in detector_fields(d)]
    return pa.schema(fields, metadata={"schema_version": SCHEMA_VERSION, "detectors": ",".join(detectors),
                                       "input_shape": ",".join(str(d) for d in input_shape)})


def input_shape(schema: pa.Schema) -> tuple[int, ...] | None:
    raw = (schema.metadata or {}).get(b"input_shape")
    return tuple(int(v) for v in raw.decode().split(",")) if raw else None


def detector_names(schema: pa.Schema) -> list[str]:
    """The detectors whose columns a log has (from its metadata, else from its column names)."""
    raw = (schema.metadata or {}).get(b"detectors")
    if raw is not None:
        return [d for d in raw.decode().split(",") if d]
    return [n[: -len("_score")] for n in schema.names if n.endswith("_score")]


def _prob_lists(mat: np.ndarray | None, valid: np.ndarray | None, n: int) -> pa.Array:
    """(N, K) probabilities as list<float32>; rows where ``valid`` is False are null (None: all valid)."""
    if mat is None or (valid is not None and not valid.any()):
        return pa.nulls(n, pa.list_(pa.float32()))
    k = mat.shape[1]
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    values = pa.array(np.ascontiguousarray(mat, dtype=np.float32).reshape(-1))
    return pa.ListArray.from_arrays(offsets, values, mask=None if valid is None else pa.array(~valid))


def _binary(images: np.ndarray | None, n: int) -> pa.Array:
    if images is None:
        return pa.nulls(n, pa.binary())
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(n, -1)
    offsets = np.arange(n + 1, dtype=np.int32) * flat.shape[1]
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


def who(account, actor_id: str | None) -> dict:
    """The columns that say whose request a row is: the account's (None where the key matched none) and the actor's."""
    return {"account_id": account and account.account_id, "actor_id": actor_id, "role": account and account.role,
            "attack": account and account.attack, "cohort": account and account.cohort}


class QueryLogWriter:
    """Append-only writer of one process. ``write`` returns once the rows are in the OS's hands."""

    def __init__(self, directory: str, input_shape: tuple[int, ...], writer_id: str | None = None,
                 detectors: tuple[str, ...] | list[str] = ()):
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self.detectors = tuple(detectors)
        self.schema = schema_for(input_shape, self.detectors)
        storage.makedirs(directory)
        fs, path = storage.resolve(storage.join(directory, f"{self.writer_id}{STREAM_SUFFIX}"))
        self._sink = fs.open_output_stream(path, compression=None, buffer_size=None)
        self._stream = ipc.new_stream(self._sink, self.schema)
        self.rows = 0  # rows written so far; also the next row's ``seq``

    def write(self, *, run_id: str, victim: str, request_id: str, account_id: str | None,
              actor_id: str | None, role: str | None, attack: str | None, actions: list[str],
              refusal_reason: list[str | None], latency_ms: float, cohort: str | None = None,
              input_sha1: list[str] | None = None, clean_probs: np.ndarray | None = None,
              returned_probs: np.ndarray | None = None, returned_label: np.ndarray | None = None,
              detections: dict | None = None, pow_bits: np.ndarray | None = None,
              pow_seconds: np.ndarray | None = None, resubmission: bool = False,
              inputs: np.ndarray | None = None) -> None:
        """One request's rows; ``actions`` (one per query: answered / perturbed / challenged / refused)
        gives the row count. ``detections``: detector name -> :class:`sim.detectors.Detection`."""
        answered = np.isin(np.asarray(actions, object), ANSWERED)
        n = len(answered)
        ts = pa.array(np.full(n, int(time.time() * 1e6), dtype=np.int64)).cast(pa.timestamp("us", tz="UTC"))
        label = (pa.nulls(n, pa.int32()) if returned_label is None
                 else pa.array(np.asarray(returned_label, np.int32), mask=~answered))
        cols = {
            "run_id": pa.array([run_id] * n, pa.string()),
            "victim": pa.array([victim] * n, pa.string()),
            "request_id": pa.array([request_id] * n, pa.string()),
            "account_id": pa.array([account_id] * n, pa.string()),
            "actor_id": pa.array([actor_id] * n, pa.string()),
            "role": pa.array([role] * n, pa.string()),
            "attack": pa.array([attack] * n, pa.string()),
            "cohort": pa.array([cohort] * n, pa.string()),
            "query_index": pa.nulls(n, pa.int64()),
            "timestamp": ts,
            "input_sha1": pa.array(input_sha1 if input_sha1 is not None else [None] * n, pa.string()),
            "clean_probs": _prob_lists(clean_probs, None, n),
            "returned_probs": _prob_lists(returned_probs, answered, n),
            "returned_label": label,
            "action": pa.array(list(actions), pa.string()),
            "refusal_reason": pa.array(refusal_reason, pa.string()),
            "defense_l1": (pa.nulls(n, pa.float32()) if returned_probs is None or clean_probs is None else
                           pa.array(np.abs(np.nan_to_num(returned_probs) - clean_probs).sum(1).astype(np.float32),
                                    mask=~answered)),
            "top1_changed": (pa.nulls(n, pa.bool_()) if returned_label is None or clean_probs is None else
                             pa.array(np.asarray(returned_label) != clean_probs.argmax(1), mask=~answered)),
            "pow_bits": (pa.nulls(n, pa.int16()) if pow_bits is None
                         else pa.array(np.asarray(pow_bits, np.int16), mask=np.asarray(pow_bits) <= 0)),
            "pow_seconds": (pa.nulls(n, pa.float32()) if pow_seconds is None
                            else pa.array(np.asarray(pow_seconds, np.float32))),
            "resubmission": pa.array(np.full(n, resubmission)),
            "latency_ms": pa.array(np.full(n, latency_ms, np.float32)),
            "input": _binary(inputs, n),
            "writer": pa.array([self.writer_id] * n, pa.string()),
            "seq": pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
        }
        for name in self.detectors:
            det = (detections or {}).get(name)
            cols[f"{name}_score"] = (pa.nulls(n, pa.float32()) if det is None
                                     else pa.array(np.asarray(det.scores, np.float32), from_pandas=True))
            cols[f"{name}_flagged"] = (pa.nulls(n, pa.bool_()) if det is None
                                       else pa.array(np.asarray(det.flags, bool)))
            for col, kind, dtype in (("seq", pa.int64(), np.int64), ("round", pa.int32(), np.int32),
                                     ("as_of", pa.int32(), np.int32)):
                value = None if det is None else getattr(det, col)
                cols[f"{name}_{col}"] = (pa.nulls(n, kind) if value is None
                                         else pa.array(np.asarray(value, dtype)))
        self._stream.write_batch(pa.RecordBatch.from_pydict(cols, schema=self.schema))
        self._sink.flush()
        self.rows += n

    def close(self) -> None:
        if self._sink is not None:
            self._stream.close()
            self._sink.close()
            self._sink = None


# ----------------------------------------------------------------------------------------------
# Reading and compaction

def _list(directory: str, suffix: str) -> list[str]:
    if not storage.exists(directory):
        return []
    fs, path = storage.resolve(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def exists(queries_dir: str) -> bool:
    """Whether a log (compacted or not) is there."""
    return bool(_list(queries_dir, ".parquet") or _list(queries_dir, STREAM_SUFFIX))


def _read_stream(fs: pafs.FileSystem, path: str) -> list[pa.RecordBatch]:
    """All complete record batches of one stream; a torn last record is dropped."""
    batches: list[pa.RecordBatch] = []
    with fs.open_input_file(path) as src:
        try:
            reader = ipc.open_stream(src)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError) as exc:
            log.warning("query log %s: dropped a torn record at its end (%s)", path, exc)
    return batches


def _with_query_index(table: pa.Table) -> pa.Table:
    """Sort by account and time, and number each account's queries from 0."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("account_id", "ascending"), ("timestamp", "ascending"),
                           ("writer", "ascending"), ("seq", "ascending")])
    acc = pc.fill_null(table.column("account_id"), "\x00").to_numpy(zero_copy_only=False)
    starts = np.r_[True, acc[1:] != acc[:-1]]
    pos = np.arange(len(acc))
    first = np.maximum.accumulate(np.where(starts, pos, 0))
    idx = table.schema.get_field_index("query_index")
    return table.set_column(idx, SCHEMA.field("query_index"), pa.array(pos - first, pa.int64()))


def read(queries_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The whole log of a run (``RUN/queries``): Parquet parts plus any uncompacted streams, with
    ``query_index`` assigned over all of them."""
    fs, _ = storage.resolve(queries_dir)
    parts = [pq.read_table(p, filesystem=fs, columns=columns) for p in _list(queries_dir, ".parquet")]
    streams = _list(queries_dir, STREAM_SUFFIX)
    batches = [b for p in streams for b in _read_stream(fs, p)]
    if batches:
        table = pa.Table.from_batches(batches)
        parts.append(table.select(columns) if columns else table)
    if not parts:  # no log yet: an empty table with the columns asked for (detector columns included)
        extra = [f for c in columns or [] if c not in SCHEMA.names
                 for suffix in DETECTOR_SUFFIXES if c.endswith(suffix)
                 for f in detector_fields(c[: -len(suffix)]) if f.name == c]
        empty = pa.schema(list(SCHEMA) + extra).empty_table()
        return empty.select(columns) if columns else empty
    table = pa.concat_tables(parts, promote_options="default")
    needs_index = batches or len(parts) > 1  # a single Parquet part was indexed when it was compacted
    if needs_index and (columns is None or {"account_id", "timestamp", "writer", "seq", "query_index"} <= set(columns)):
        table = _with_query_index(table)
    return table


def stop_writers(queries_dir: str, wait_s: float = 10.0) -> int:
    """Kill (SIGKILL) the processes of this machine that still hold the log's streams open, and wait until they are
    gone; returns how many there were. A SIGTERM to a run's whole process group stops a local Ray's own processes,
    but its workers each have a process group of their own: its Serve replicas go on answering and logging for a
    second or two, and a row written after the log is compacted would be lost with the stream it went to. Each row
    a replica wrote is in its stream already (flushed before the answer goes out). Only where the log is on this
    machine and the system lists open files under /proc (Linux); elsewhere, 0 and nothing done."""
    import signal

    directory = storage.local_path(queries_dir)
    if directory is None or not os.path.isdir("/proc/self/fd"):
        return 0
    inside = os.path.realpath(directory) + os.sep
    holders = {pid for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())
               if _writes_under(pid, inside)}
    for pid in holders:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in holders) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(holders)


def _writes_under(pid: int, inside: str) -> bool:
    """Whether process ``pid`` holds a file under the directory ``inside`` open for writing (a reader, such as an
    analysis of the live log, is left alone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone meanwhile, or not ours to look into
        return False
    for fd in fds:
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                flags = next(int(line.split()[1], 8) for line in fh if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):  # closed meanwhile
            continue
        if flags & (os.O_WRONLY | os.O_RDWR):
            return True
    return False


def _zombie(pid: int) -> bool:
    """Whether a process has exited but not been reaped (its files are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def compact(queries_dir: str) -> int:
    """Merge the run's streams (and any earlier Parquet parts) into one Parquet file; returns its rows."""
    fs, path = storage.resolve(queries_dir)
    old = _list(queries_dir, ".parquet") + _list(queries_dir, STREAM_SUFFIX)
    if not old:
        return 0
    table = read(queries_dir)
    if table.num_rows == 0:  # streams opened but never written to (a run stopped early): nothing to keep
        for p in old:
            fs.delete_file(p)
        return 0
    shape = input_shape(table.schema)
    table = table.cast(schema_for(shape or (), detector_names(table.schema)))
    part = f"{path}/part-{uuid.uuid4().hex[:8]}.parquet"
    try:  # under another name until whole, so that a failure (a full disk) leaves the streams as the only copy
        pq.write_table(table, part + ".partial", filesystem=fs, compression="zstd")
        fs.move(part + ".partial", part)
    except OSError:
        with contextlib.suppress(OSError):
            fs.delete_file(part + ".partial")
        raise
    for p in old:
        fs.delete_file(p)
    return table.num_rows


def decode_inputs(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    """The ``input`` column back to uint8 images (N, *shape); rows without input are zeros."""
    col = table.column("input").combine_chunks()
    size, n = int(np.prod(shape)), len(col)
    valid = col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else None
    kept = col if valid is None else col.filter(pa.array(valid))  # the images' bytes, one after another
    flat = np.zeros((0, size), np.uint8)
    if len(kept):
        lengths = pc.binary_length(kept).to_numpy()
        if (lengths != size).any():
            raise ValueError(f"input: an image of {int(lengths[lengths != size][0])} bytes; expected {size} "
                             f"(shape {tuple(shape)})")
        offsets = np.frombuffer(kept.buffers()[1], np.int32)[kept.offset:kept.offset + len(kept) + 1]
        flat = np.frombuffer(kept.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, size)
    if valid is None:
        return flat.reshape(n, *shape).copy()
    out = np.zeros((n, size), np.uint8)
    out[valid] = flat
    return out.reshape(n, *shape)


def prob_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A probabilities column (``clean_probs``, ``returned_probs``) as an (N, K) float32 array; null rows (a
    refused query's answer) are NaN."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.drop_null(pc.list_value_length(col)).to_numpy()
    if len(lengths) and lengths.min() != lengths.max():
        raise ValueError(f"probabilities of {lengths.min()} and {lengths.max()} classes in one column; expected "
                         f"one class count")
    out = np.full((len(col), int(lengths[0]) if len(lengths) else 0), np.nan, np.float32)
    if len(lengths):
        out[valid] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(lengths), -1)
    return out


def check_table(table, columns, what: str) -> None:
    """A one-line SimError unless ``table`` is a query-log table with ``columns`` (``what``: who needs them)."""
    from .errors import SimError

    if not isinstance(table, pa.Table):
        raise SimError(f"{what} takes a query-log table (analysis.read_run(RUN_DIR)), got {type(table).__name__} "
                       f"{str(table)[:60]!r}")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SimError(f"{what} needs the log's column{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which "
                       f"this table lacks; expected the table read_run gives without columns= (or with these)")


def queries(table: pa.Table) -> np.ndarray:
    """Which rows are an account's queries (a boolean array): all but a solved challenge's answer (the challenged
    query again, ``resubmission``) and an attempt refused over the rate (the client sends it again after the wait)."""
    keep = ~refused_for(table, [RATE])
    if "resubmission" in table.column_names:
        keep &= ~pc.fill_null(table.column("resubmission"), False).to_numpy(zero_copy_only=False).astype(bool)
    return keep


def per_account_counts(table: pa.Table) -> dict[str, int]:
    """How many queries each account made in a query-log table (its rows that are queries, :func:`queries`)."""
    check_table(table, ("account_id",), "per_account_counts")
    counts = pc.value_counts(table.filter(queries(table)).column("account_id").combine_chunks()).to_pylist()
    return {c["values"]: c["counts"] for c in counts if c["values"] is not None}


def input_digest(image: np.ndarray) -> str:
    """The ``input_sha1`` of one 8-bit image, as the log stores it."""
    return hashlib.sha1(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def clean_answers(table: pa.Table, accounts: set[str] | None = None) -> dict[str, np.ndarray]:
    """input_sha1 -> the victim's clean probabilities, over the rows of ``accounts`` (all if None) that have them:
    what the victim would have answered undefended, as the log recorded it."""
    rows = table.filter(table.column("clean_probs").is_valid())
    if accounts is not None:
        rows = rows.filter(pc.is_in(rows.column("account_id"), pa.array(sorted(accounts), pa.string())))
    probs = prob_matrix(rows.column("clean_probs"))
    return dict(zip(rows.column("input_sha1").to_pylist(), probs))

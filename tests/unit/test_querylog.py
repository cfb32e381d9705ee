import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sim import querylog


def _write(writer, account, n, rng, action="answered"):
    x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(10), n).astype(np.float32)
    writer.write(run_id="r", victim="v", request_id=f"req-{writer.rows}", account_id=account, actor_id="a0",
                 role="attacker", attack="knockoff", actions=[action] * n,
                 refusal_reason=[None] * n,
                 latency_ms=1.5, input_sha1=["h"] * n, clean_probs=probs, returned_probs=probs,
                 returned_label=probs.argmax(1),
                 inputs=x)
    return x, probs


def test_round_trip_keeps_every_value(tmp_path):
    rng = np.random.default_rng(0)
    w = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w1")
    x, probs = _write(w, "acct-1", 5, rng)
    w.write(run_id="r", victim="v", request_id="bad", account_id=None, actor_id=None, role=None, attack=None,
            actions=["refused"], refusal_reason=["unknown API key"], latency_ms=0.1)
    w.close()
    table = querylog.read(str(tmp_path))
    assert table.num_rows == 6 and table.schema.names == querylog.COLUMNS
    rows = table.filter(table.column("account_id").is_valid())
    assert rows.column("query_index").to_pylist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.array(rows.column("clean_probs").to_pylist(), np.float32), probs)
    np.testing.assert_array_equal(querylog.decode_inputs(rows, (1, 28, 28)), x)
    refused = table.filter(table.column("account_id").is_null()).to_pylist()[0]
    assert refused["action"] == "refused" and refused["refusal_reason"] == "unknown API key"
    assert refused["returned_probs"] is None and refused["input"] is None


def test_vectorised_readers_keep_row_order_across_chunks_slices_and_null_rows():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 1, 2, 2), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), 6).astype(np.float32)
    valid = np.array([True, False, True, True, False, True])
    table = pa.concat_tables(
        pa.table({"input": pa.array([images[i].tobytes() if valid[i] else None for i in range(a, b)], pa.binary()),
                  "returned_probs": querylog._prob_lists(probs[a:b], valid[a:b], b - a)})
        for a, b in ((0, 2), (2, 6)))
    assert table.column("input").num_chunks == 2
    for rows, idx in ((table, np.arange(6)), (table.slice(1, 4), np.arange(1, 5))):
        got = querylog.decode_inputs(rows, (1, 2, 2))
        np.testing.assert_array_equal(got[valid[idx]], images[idx][valid[idx]])
        assert not got[~valid[idx]].any()  # a row without input reads as zeros
        mat = querylog.prob_matrix(rows.column("returned_probs"))
        assert mat.shape == (len(idx), 3)
        np.testing.assert_array_equal(mat[valid[idx]], probs[idx][valid[idx]])
        assert np.isnan(mat[~valid[idx]]).all()  # a refused query's answer is NaN
    bad = pa.table({"input": pa.array([b"\x00" * 3], pa.binary())})
    with pytest.raises(ValueError, match="3 bytes; expected 4"):
        querylog.decode_inputs(bad, (1, 2, 2))


def test_compaction_writes_one_parquet_file_with_schema_metadata_and_per_account_index(tmp_path):
    rng = np.random.default_rng(1)
    writers = [querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), f"w{i}") for i in range(2)]
    for i in range(6):
        _write(writers[i % 2], f"acct-{i % 3}", 4, rng)
    for w in writers:
        w.close()
    assert querylog.compact(str(tmp_path)) == 24
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".parquet")
    schema = pq.read_schema(tmp_path / files[0])
    assert schema.metadata[b"schema_version"] == querylog.SCHEMA_VERSION.encode()
    assert querylog.input_shape(schema) == (1, 28, 28)
    table = querylog.read(str(tmp_path))
    assert querylog.per_account_counts(table) == {"acct-0": 8, "acct-1": 8, "acct-2": 8}
    for acct, first in (("acct-0", "w0"), ("acct-1", "w1"), ("acct-2", "w0")):
        mine = table.filter(pc.equal(table.column("account_id"), acct)).sort_by("query_index")
        assert mine.column("query_index").to_pylist() == list(range(8))
        # numbered in the order the account's requests were written, whichever writer wrote each (acct-1's first
        # request went through w1), and within a request in its rows' order
        assert mine.column("writer").to_pylist() == [first] * 4 + [{"w0": "w1", "w1": "w0"}[first]] * 4
        stamps = mine.column("timestamp").to_pylist()
        assert stamps == sorted(stamps) and mine.column("seq").to_pylist()[:4] == sorted(mine.column("seq")[:4]
                                                                                          .to_pylist())


def test_reader_tolerates_a_torn_last_record(tmp_path):
    rng = np.random.default_rng(2)
    w = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    _write(w, "a", 3, rng)
    _write(w, "a", 3, rng)
    path = tmp_path / "w.arrows"
    size = path.stat().st_size
    w.close()
    with open(path, "r+b") as fh:  # a writer killed in the middle of its third record
        fh.truncate(size - 100)
    table = querylog.read(str(tmp_path))
    assert table.num_rows == 3
    assert querylog.compact(str(tmp_path)) == 3


def test_unclosed_stream_of_a_killed_writer_is_readable(tmp_path):
    rng = np.random.default_rng(3)
    w = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    _write(w, "a", 4, rng)
    # no close(): as if the process had been killed after answering
    assert querylog.read(str(tmp_path)).num_rows == 4


def test_empty_log_reads_as_an_empty_table(tmp_path):
    assert querylog.read(str(tmp_path / "none")).num_rows == 0


def test_compacting_streams_that_were_never_written_to_removes_them(tmp_path):
    """Writers opened by a run stopped before any query: nothing to keep, and no empty stream is left behind."""
    for name in ("w1", "w2"):
        querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), name).close()
    assert sorted(os.listdir(tmp_path)) == ["w1.arrows", "w2.arrows"]
    assert querylog.compact(str(tmp_path)) == 0
    assert os.listdir(tmp_path) == [] and not querylog.exists(str(tmp_path))


def test_a_compaction_that_fails_half_way_leaves_the_streams_as_they_were(tmp_path, monkeypatch):
    """A full disk while the Parquet file is written: no partial file is left to read, the streams keep every row."""
    import errno

    rng = np.random.default_rng(5)
    w = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    _write(w, "a", 6, rng)
    w.close()
    real = pq.write_table

    def full_disk(table, where, **kwargs):
        real(table.slice(0, 2), where, **kwargs)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(querylog.pq, "write_table", full_disk)
    try:
        querylog.compact(str(tmp_path))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("the compaction did not fail")
    assert sorted(os.listdir(tmp_path)) == ["w.arrows"]
    assert querylog.read(str(tmp_path)).num_rows == 6
    monkeypatch.setattr(querylog.pq, "write_table", real)
    assert querylog.compact(str(tmp_path)) == 6 and querylog.read(str(tmp_path)).num_rows == 6


@pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="open files are listed under /proc on Linux only")
def test_the_processes_still_writing_a_log_are_stopped_and_its_readers_left_alone(tmp_path):
    """What a group SIGTERM leaves running: a Serve replica of the stopped Ray that still has its stream open for
    writing. It is killed before the log is compacted; a process reading the log is not."""
    import subprocess
    import sys

    stream = tmp_path / "w.arrows"
    stream.write_bytes(b"")
    hold = "import sys, time; f = open(sys.argv[1], sys.argv[2]); print('open', flush=True); time.sleep(60)"
    writer, reader = (subprocess.Popen([sys.executable, "-c", hold, str(stream), mode], stdout=subprocess.PIPE)
                      for mode in ("ab", "rb"))
    try:
        assert writer.stdout.readline() == reader.stdout.readline() == b"open\n"
        assert querylog.stop_writers(str(tmp_path)) == 1
        assert writer.wait(timeout=5) == -9 and reader.poll() is None
        assert querylog.stop_writers(str(tmp_path)) == 0  # none left
        assert querylog.stop_writers("s3://bucket/queries") == 0  # not on this machine: nothing to look for
    finally:
        for proc in (writer, reader):
            proc.kill()
            proc.wait()

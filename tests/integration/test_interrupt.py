"""Ctrl-C during each phase of a run (as KeyboardInterrupt in the driver): the run stops, leaves its log compacted
with every row the service wrote and a summary marked interrupted; a real SIGINT, twice, to ``python -m sim`` in
its own process group (as a terminal sends it) stops it at once with status 130; and SIGTERM (as ``kill`` sends it
to the process, or ``timeout`` and a batch scheduler to the whole process group) stops it as Ctrl-C does."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sim import querylog
from sim.summary import read as read_summary

from .conftest import env_without_ray_address

RUN = ["scenario=single_knockoff", "victim.epochs=2", "attackers.single.budget=400",
       "attackers.single.replica.epochs=200", "benign.queries=40"]


def _interrupt(args: list[str], marker: str, twice: bool = False, term: str | None = None,
               writers: dict | None = None) -> tuple[int, float, str]:
    """Start ``python -m sim ARGS``, wait until its output matches ``marker`` (a regex), send SIGINT to its process
    group (twice: again a second later; ``term="process"``: SIGTERM to the process alone instead, ``term="group"``:
    to its whole group, Ray's processes included); returns (exit status, seconds from the first signal to the exit,
    its output). ``writers``: ``{"log": QUERIES_DIR}``, to which ``"left"`` is added: how many processes still held
    the log open for writing when the run had exited (stopped then)."""
    # SIGINT's default disposition in the child, as a terminal's foreground job has it: a test run started in the
    # background of a non-interactive shell ignores SIGINT, which its children inherit (and Python then keeps)
    proc = subprocess.Popen([sys.executable, "-m", "sim", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env_without_ray_address(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(256).decode(errors="replace"),
                                                             "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while not re.search(marker, "".join(out)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before {marker!r}: {''.join(out)[-2000:]}"
    sent = time.monotonic()
    if term == "process":
        proc.terminate()
    elif term == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    if twice:
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
        if writers is not None:
            writers["left"] = querylog.stop_writers(writers["log"], wait_s=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(5)
    return proc.returncode, time.monotonic() - sent, "".join(out)


def _check_interrupted(run_dir, phase: str) -> "querylog.pa.Table":
    """What an interrupted run leaves: a summary marked interrupted, its log compacted (when it has one)."""
    stub = json.loads((run_dir / "summary.json").read_text())
    assert stub["interrupted"] == phase and read_summary(str(run_dir)) is None
    log_dir = run_dir / "queries"
    rows = querylog.read(str(log_dir))
    assert stub["logged"] == rows.num_rows
    if rows.num_rows:
        assert not list(log_dir.glob(f"*{querylog.STREAM_SUFFIX}")) and list(log_dir.glob("*.parquet"))
        assert (run_dir / "alerts.parquet").exists()
        ids = list(zip(rows.column("request_id").to_pylist(), rows.column("seq").to_pylist(),
                       rows.column("writer").to_pylist()))
        assert len(set(ids)) == len(ids)  # each row once
    return rows


@pytest.fixture(scope="module")
def signalled(tmp_path_factory, cache_dir) -> dict:
    """The three runs below, each in a process (and a Ray) of its own, started at once and signalled as each test
    says: each spends most of its time starting Ray and Serve, much of it waiting, so together they take not much
    longer than one. Name -> (run directory, exit status, seconds from the signal to the exit, output, writers)."""
    root = tmp_path_factory.mktemp("signalled")
    runs = {  # name: (extra arguments, marker, how the signal goes)
        "twice": ([], "Started Serve", {"twice": True}),
        "term": ([], "training replicas", {"term": "process"}),
        # a rate limit keeps the queries going for seconds (unpaced, 480 can be done between two progress updates),
        # and the signal goes once the bar shows 1 to 99%
        "group": (["serve.rate=40"], r"querying: +[1-9]\d?%",
                  {"term": "group", "writers": {"log": str(root / "group" / "queries")}}),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: (pool.submit(_interrupt, [*RUN, f"run_dir={root / name}", f"cache_dir={cache_dir}", *extra],
                                      marker, **how), how.get("writers"))
                   for name, (extra, marker, how) in runs.items()}
        return {name: (root / name, *future.result(), writers) for name, (future, writers) in futures.items()}


def test_a_second_ctrl_c_stops_the_run_at_once(signalled):
    """The signal itself, in a process of its own: twice right after Serve started (the second lands in the cleanup,
    which it cuts short)."""
    twice_dir, status, seconds, out, _ = signalled["twice"]
    assert status == 130 and seconds < 15 and "stopped at once" in out, out[-2000:]  # not waiting for the cleanup
    querylog.read(str(twice_dir / "queries"))  # the log as it was left: readable


def test_sigterm_stops_a_run_as_ctrl_c_does(signalled):
    """Ray's driver would exit at once on SIGTERM; the run cleans up instead and says where it stopped."""
    run_dir, status, seconds, out, _ = signalled["term"]
    assert status == 130 and "interrupted during replica training" in out and "SIGTERM received" not in out, out[-2000:]
    assert _check_interrupted(run_dir, "replica training").num_rows == 400 + 2 * 40


def test_sigterm_to_the_whole_process_group_stops_ray_too_and_the_run_still_keeps_its_log(signalled):
    """timeout, systemd and batch schedulers signal every process of the job: Ray's own (which Ray shields from
    SIGINT only) stop at once, so the run cleans up what needs no Ray: it compacts the streams the replicas wrote
    and marks its summary, in seconds (not after Ray's minute of trying to reach its GCS)."""
    run_dir, status, seconds, out, writers = signalled["group"]
    assert status == 130 and "interrupted during querying" in out and seconds < 30, out[-2000:]
    # the Serve replica, in a process group of its own, outlived Ray's processes: it was stopped before the log was
    # compacted, not left answering and writing rows into a stream the compaction had deleted
    assert writers["left"] == 0
    assert _check_interrupted(run_dir, "querying").num_rows > 0


def test_a_run_interrupted_in_each_phase_stops_and_keeps_its_log(ray_serve, small_overrides, tmp_path,
                                                                              monkeypatch):
    """Ctrl-C as the run sees it (KeyboardInterrupt in the driver), in this process's Ray: while the victim trains,
    while clients query (once some queries are answered), while replicas train (after their first epoch) and while
    the run evaluates them."""
    import ray

    from sim import engine
    from sim.errors import Interrupted

    wait = engine._wait_with_progress

    def interrupted_once_answered(refs, board, keys, bar, on_poll=None):
        if any(k.startswith("query:") for k in keys):
            while not sum(ray.get(board.snapshot.remote()).get(k, 0) for k in keys):
                time.sleep(0.1)
            raise KeyboardInterrupt
        wait(refs, board, keys, bar, on_poll)

    def interrupted_training(self, stage, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine._Bars, "__call__", interrupted_training)  # after the victim's first epoch
    training_victim = tmp_path / "victim"
    with pytest.raises(Interrupted, match="interrupted during victim training"):
        engine.run("single_knockoff", [*small_overrides, f"run_dir={training_victim}",
                                       f"cache_dir={tmp_path / 'cache'}"], quiet=True)
    assert _check_interrupted(training_victim, "victim training").num_rows == 0
    monkeypatch.undo()

    monkeypatch.setattr(engine, "_wait_with_progress", interrupted_once_answered)
    querying = tmp_path / "querying"
    with pytest.raises(Interrupted, match="interrupted during querying"):
        engine.run("single_knockoff", [*small_overrides, f"run_dir={querying}"], quiet=True)
    assert _check_interrupted(querying, "querying").num_rows > 0
    monkeypatch.setattr(engine, "_wait_with_progress", wait)

    def stop(accuracies):
        if any(accuracies.values()):
            raise KeyboardInterrupt

    training = tmp_path / "training"
    with pytest.raises(Interrupted, match="interrupted during replica training"):
        engine.run("single_knockoff", [*small_overrides, f"run_dir={training}", "attackers.single.replica.epochs=3"],
            quiet=True, on_replica_epoch=stop)
    assert _check_interrupted(training, "replica training").num_rows == 160 + 2 * 40  # every query the clients sent

    def interrupted_evaluation(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "measure_victim", interrupted_evaluation)  # after the replicas have trained
    evaluating = tmp_path / "evaluation"
    with pytest.raises(Interrupted, match="interrupted during evaluation"):
        engine.run("single_knockoff", [*small_overrides, f"run_dir={evaluating}"], quiet=True)
    assert _check_interrupted(evaluating, "evaluation").num_rows == 160 + 2 * 40

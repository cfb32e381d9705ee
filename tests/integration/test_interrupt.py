"""Ctrl-C during each phase of a real run (``python -m sim`` in its own process group, as a terminal sends it): the
run stops within seconds with one line and status 130, leaves its log compacted with every row the service wrote,
and a summary marked interrupted; a second Ctrl-C stops it at once."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sim import querylog
from sim.summary import read as read_summary

from .conftest import env_without_ray_address

QUERYING = r"querying:\s+\d+%\|[^|]*\|\s*[1-9]\d*/480"  # some queries answered already
RUN = ["scenario=single_knockoff", "victim.epochs=2", "attackers.single.budget=400",
       "attackers.single.replica.epochs=200", "benign.queries=40"]


def _interrupt(args: list[str], marker: str, twice: bool = False) -> tuple[int, float, str]:
    """Start ``python -m sim ARGS``, wait until its output matches ``marker`` (a regex), send SIGINT to its process
    group (twice: again a second later); returns (exit status, seconds from the first signal to the exit, its
    output)."""
    proc = subprocess.Popen([sys.executable, "-m", "sim", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env_without_ray_address())
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(256).decode(errors="replace"),
                                                             "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while not re.search(marker, "".join(out)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before {marker!r}: {''.join(out)[-2000:]}"
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    if twice:
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(5)
    return proc.returncode, time.monotonic() - sent, "".join(out)


CASES = [  # phase, what the output shows when it is under way, the run's own settings
    ("victim training", "training victim:", ["victim.epochs=400"]),  # a victim of its own to train
    ("querying", QUERYING, ["attackers.single.max_rate=50"]),  # paced: 8 s of querying
    ("replica training", "training replicas:", []),
]


def test_ctrl_c_in_each_phase_stops_the_run_and_keeps_what_it_logged(tmp_path, cache_dir):
    """The phases' runs go at once (each process waits more than it computes), and a fourth gets Ctrl-C twice."""
    def one(case):
        phase, marker, extra = case
        run_dir = tmp_path / phase.replace(" ", "_")
        cache = tmp_path / "cache" if phase == "victim training" else cache_dir
        return _interrupt([*RUN, *extra, f"run_dir={run_dir}", f"cache_dir={cache}"], marker)

    twice_dir = tmp_path / "twice"
    with ThreadPoolExecutor(len(CASES) + 1) as pool:
        twice = pool.submit(_interrupt, [*RUN, f"run_dir={twice_dir}", f"cache_dir={cache_dir}"], "Started Serve",
                            twice=True)
        runs = list(pool.map(one, CASES))
    status, seconds, out = twice.result()
    assert status == 130 and seconds < 15 and "stopped at once" in out, out[-2000:]  # not waiting for the cleanup
    querylog.read(str(twice_dir / "queries"))  # the log as it was left: readable

    for (phase, _, _), (status, seconds, out) in zip(CASES, runs):
        run_dir = tmp_path / phase.replace(" ", "_")
        assert status == 130 and seconds < 45, out[-2000:]
        stub = json.loads((run_dir / "summary.json").read_text())
        said = [line for line in out.replace("\r", "\n").splitlines() if "interrupted during" in line]
        assert len(said) == 1 and said[0].endswith(f"interrupted during {phase}; the run directory {run_dir} keeps "
                                                   f"its query log ({stub['logged']:,} rows, compacted) and a summary "
                                                   f"marked interrupted"), out[-2000:]
        assert stub["interrupted"] == phase and read_summary(str(run_dir)) is None
        log_dir = run_dir / "queries"
        rows = querylog.read(str(log_dir))
        assert stub["logged"] == rows.num_rows
        if phase == "victim training":
            assert rows.num_rows == 0
            continue
        assert rows.num_rows > 0 and (run_dir / "alerts.parquet").exists()
        assert not list(log_dir.glob(f"*{querylog.STREAM_SUFFIX}")) and list(log_dir.glob("*.parquet"))  # compacted
        ids = list(zip(rows.column("request_id").to_pylist(), rows.column("seq").to_pylist(),
                       rows.column("writer").to_pylist()))
        assert len(set(ids)) == len(ids)  # each row once
        if phase == "replica training":  # the querying had finished: every query the clients sent is there
            assert rows.num_rows == 480

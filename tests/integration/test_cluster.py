"""Cluster mode on one two-node cluster started by the tests (2 logical CPUs per node, no authentication): a scenario
run by the CLI, and a sweep whose trials spread over the nodes."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import sim

from .conftest import SMALL, env_without_ray_address


def _without_auth() -> dict:
    """The environment without a Ray address or auth mode (the session's own ray.init sets RAY_AUTH_MODE=token in
    this process): the cluster and its clients all without authentication."""
    env = env_without_ray_address()
    env.pop("RAY_AUTH_MODE", None)
    return env


@pytest.fixture(scope="module")
def cluster() -> str:
    """The cluster's address; it lives apart from the session's own Ray, for this module's tests (starting one costs
    seconds of both cores)."""
    launcher = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "cluster_launcher.py"), "2"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_without_auth())
    try:
        yield json.loads(launcher.stdout.readline())["address"]
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=120)


def test_cli_runs_a_scenario_on_a_two_node_cluster(cluster, cache_dir, tmp_path):
    address = cluster
    run_uri = f"file://{tmp_path}/run"  # run directories may be URIs
    env = {**_without_auth(), "RAY_ADDRESS": address}  # found through ray.address=auto
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "scenario=single_knockoff", "ray.address=auto",
         f"cache_dir={cache_dir}", f"run_dir={run_uri}", *SMALL],
        capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("single ") and "knockoff" in line for line in proc.stdout.splitlines())
    summary = sim.read_summary(str(tmp_path / "run"))
    assert summary.attackers[0].replica is not None
    assert summary.ray.nodes == 2 and summary.ray.client_nodes == 2
    assert summary.queries.logged == summary.queries.total == 160 + 2 * 40
    assert os.listdir(tmp_path / "run" / "queries")[0].endswith(".parquet")
    assert f"joined the Ray cluster at {address}: 2 nodes" in proc.stderr  # whichever cluster auto found
    assert os.path.isdir(tmp_path / "run" / "tier" / "shard-0")  # a file:// run_dir holds the tier's journal
    # a client whose RAY_AUTH_MODE is not the cluster's gets in, but the cluster cannot call back: one line
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "scenario=single_knockoff", f"ray.address={address}",
         f"cache_dir={cache_dir}", f"run_dir={tmp_path}/refused", *SMALL],
        capture_output=True, text=True, timeout=400, env={**_without_auth(), "RAY_AUTH_MODE": "token"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: ray.address='{address}': the cluster cannot call back into this process (an actor started "
        f"there died before it ran): this process has RAY_AUTH_MODE='token', the cluster another; expected the "
        f"RAY_AUTH_MODE the cluster was started with (docs/cluster.md)")


def test_sweep_spreads_trials_over_a_two_node_cluster(cluster, cache_dir, tmp_path):
    """Each node has 2 logical CPUs and each trial reserves 1.5, so the two trials must run on different
    nodes; the sweep directory is a URI."""
    proc = subprocess.run([sys.executable, "-m", "sim", "sweep=random_noise_eps", "scenario=single_knockoff",
                           "sweep.space={random_noise: {eps: [0.5, 1.0]}}", "sweep.trial_cpus=1.5",
                           "sweep.max_concurrent=2", f"sweep.dir=file://{tmp_path}/sweep", "ray.address=auto",
                           f"cache_dir={cache_dir}", *SMALL, "benign.users=0", "detectors.prada.enabled=false"],
                          capture_output=True, text=True, timeout=500, env={**_without_auth(), "RAY_ADDRESS": cluster})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(tmp_path / "sweep" / "results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["done", "done"]
    assert len({r["node_id"] for r in table}) == 2

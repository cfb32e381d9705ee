"""Sweeps end to end: a tiny sweep through the CLI, interrupted and resumed; ASHA in process (a sweep over a two-node
cluster: test_cluster.py)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq

import sim

from .conftest import SMALL, env_without_ray_address

# 3 trials of 2 defenses against the single Knockoff attacker, tiny budgets, no benign users and no detector (each
# trial starts fewer actors: what a sweep does is the same). Two run at once: the first session stops after one has
# finished, with the other unfinished, and the resumed session runs that one and the third at once
TINY = ["sweep=mad_eps", "scenario=single_knockoff", "sweep.space={mad: {eps: [0.5, 1.0]}, random_noise: {eps: [1.0]}}",
        *SMALL, "benign.users=0", "detectors.prada.enabled=false"]


def _sweep(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "sim", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_tiny_sweep_interrupted_then_resumed_redoes_no_finished_trial(ray_serve, cache_dir, tmp_path, capsys):
    """Started with the CLI in a process (and a Ray) of its own and stopped there with SIGTERM once a trial has
    finished; resumed with the CLI's own entry point in this process, on the session's Ray (a Ray, a Serve and a set of
    imports fewer)."""
    from analysis.__main__ import main as analysis_main
    from sim.cli import main

    sweep_dir = tmp_path / "sweep"
    args = [*TINY, f"cache_dir={cache_dir}", f"sweep.dir={sweep_dir}", "ray.num_cpus=2"]
    proc = _sweep(*args, env=env_without_ray_address())
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 400
    while not any(line.startswith("[1/3]") for line in lines) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # until Tune has seen the first trial finish
    runs = sweep_dir / "runs"
    done = [d for d in (os.listdir(runs) if runs.exists() else []) if (runs / d / "summary.json").exists()]
    assert done, "".join(lines)[-3000:]

    def named(trial: str, line: str) -> bool:  # the progress line names a trial by its curve and parameters
        info = json.loads((runs / trial / "trial.json").read_text())
        return line.startswith(f"[1/3] {info['curve']} (eps={info['defense']['eps']:.4g}): done")

    # the trial Tune saw finish (another may have written its summary since, before Tune noted it)
    line = next(x for x in lines if x.startswith("[1/3]"))
    first = next(d for d in done if named(d, line))
    last = json.loads((runs / first / "trial.json").read_text())["last"]  # its final report, not an epoch's
    assert last["run_dir"].endswith(first) and last["replica_accuracy_max"] is not None
    before = json.loads((sweep_dir / "runs" / first / "summary.json").read_text())
    proc.send_signal(signal.SIGTERM)  # as kill or a batch scheduler sends it: the sweep stops as on Ctrl-C (Tune
    out = proc.stdout.read()          # saves its state and stops)
    proc.wait(timeout=300)
    reader.join(timeout=60)
    assert proc.returncode == 130, "".join(lines)[-3000:]
    assert f"continue with python -m sim sweep=mad_eps sweep.dir={sweep_dir} resume=true" in out
    assert not any("SIGTERM received" in x or "Tuner.restore" in x for x in lines), "".join(lines)[-3000:]
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert any(s["status"] == "unfinished" for s in state["trials"].values()) or len(state["trials"]) < 3

    capsys.readouterr()
    assert main(["sweep=mad_eps", f"sweep.dir={sweep_dir}", "resume=true"]) == 0, capsys.readouterr().err[-3000:]
    assert "3 trials, 3 done" in capsys.readouterr().out
    # the finished trial was not run again: same run, same summary
    assert json.loads((sweep_dir / "runs" / first / "summary.json").read_text()) == before
    table = pq.read_table(sweep_dir / "results.parquet").to_pylist()
    assert len(table) == 3 and all(r["status"] == "done" for r in table)
    assert sorted((r["curve"], r["param.eps"]) for r in table) == [("mad", 0.5), ("mad", 1.0), ("random_noise", 1.0)]
    for r in table:  # every trial is a run directory like any run's, and its numbers are its summary's
        run = sweep_dir / "runs" / r["trial_id"]
        summary = sim.read_summary(str(run))
        assert summary.queries.logged == summary.queries.total == 160
        assert any(f.endswith(".parquet") for f in os.listdir(run / "queries"))
        assert r["single.replica_test_accuracy"] == summary.attackers[0].replica.test_accuracy
        assert r["test_l1_mean"] == summary.defense.test_l1_mean > 0
        assert r["attacker_l1_mean"] == summary.defense.by_role["attacker"].l1_mean > 0  # the attacker's answers
        assert summary.defense.name == r["curve"] and summary.defense.params["eps"] == r["param.eps"]
    # a bigger noise budget distorts more
    l1 = {(r["curve"], r["param.eps"]): r["test_l1_mean"] for r in table}
    assert l1[("mad", 1.0)] > l1[("mad", 0.5)]
    assert (sweep_dir / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    md = (sweep_dir / "sweep.md").read_text()
    assert "3 (3 done)" in md and "over 2 session(s)" in md and "| random_noise | 1 | done |" in md
    # Tune saw each trial's replica accuracy after its first epoch (what early stopping judges), then the run
    progress = [json.loads(line) for line in open(sweep_dir / "tune" / first / "result.json")]
    assert [p["replica_epoch"] for p in progress] == [1, 2]
    assert progress[-1]["run_dir"].endswith(first)

    assert analysis_main([str(sweep_dir)]) == 0
    assert "3 trials" in capsys.readouterr().out and all((sweep_dir / "runs" / r["trial_id"] / "report.md").exists()
                                                         for r in table)


def test_asha_stops_the_weakest_defense_early(ray_serve, cache_dir, tmp_path):
    """In-process, on the session's Ray: two MAD trials one after another, the strongest first. The second (eps=0,
    no perturbation at all) trains the better replica by far, so ASHA stops it at its first rung, where the first
    trial's result is all it has to compare with."""
    from sim import sweep

    out = sweep.run("mad_eps", ["sweep.space={mad: {eps: [2.0, 0.0]}}", "sweep.max_concurrent=1",
                                "sweep.scheduler=asha", "sweep.asha.grace_period=1", f"sweep.dir={tmp_path / 'asha'}",
                                # enough queries and steps that an undefended replica learns in its first epoch
                                "victim.epochs=2", "benign.users=0", "detectors.prada.enabled=false",
                                "attackers.single.budget=400",
                                "attackers.single.replica.epochs=3", "attackers.single.replica.batch_size=16",
                                f"cache_dir={cache_dir}"], scenario="single_knockoff", quiet=True)
    rows = {r["param.eps"]: r for r in out["rows"]}
    assert rows[2.0]["status"] == "done"
    weakest = rows[0.0]
    assert weakest["status"] == "stopped early" and weakest["replica_epoch"] < 3
    assert weakest["single.replica_test_accuracy"] > rows[2.0]["single.replica_test_accuracy"]
    assert weakest["test_l1_mean"] < 1e-6  # what honest users get is known before the replica trains
    assert not out["interrupted"]

"""The benchmarks' reports: the serving benchmark's CPU accounting and pipeline paragraph (benchmarks/serving.py),
the scenario runs' spread table (benchmarks/runs.py), the SAME reference-mode table (benchmarks/detection.py)."""

import json
import os
import time

import numpy as np
import pytest

from .conftest import benchmark_module


@pytest.fixture(scope="module")
def serving():
    yield from benchmark_module("serving")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_cpu_time_is_split_by_process_group_per_image(serving):
    before = serving._process_ticks()
    assert before[os.getpid()][0] == "Ray and the rest"  # this process is none of the service's
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 s of CPU in this process
        pass
    after = serving._process_ticks()
    mine = {os.getpid(): after[os.getpid()]}
    assert 250 <= serving._cpu_by_group(before, mine, images=1000)["Ray and the rest"] <= 500  # µs per image
    used = serving._cpu_by_group(before, after, images=1000)
    assert used["Ray and the rest"] >= 250 and set(used) <= {*serving.PROCESS_GROUPS, "Ray and the rest"}


def test_the_cpu_table_totals_each_configuration(serving):
    rows = [{"log": True, "prada": False, "accounts": 1, "cpu_us_per_image": {"replicas": 250.0, "clients": 50.0}},
            {"log": True, "prada": True, "accounts": 64,
             "cpu_us_per_image": {"replicas": 290.0, "shards": 40.0, "clients": 50.0, "Ray and the rest": 20.0}}]
    lines = serving.cpu_table(rows)
    assert "| configuration | replicas | shards | clients | Ray and the rest | total |" in lines
    assert "| log on, PRADA off | 250 | 0 | 50 | 0 | 300 |" in lines
    assert "| log on, PRADA on, 64 accounts per client | 290 | 40 | 50 | 20 | 400 |" in lines
    assert serving.cpu_table([{"log": True, "prada": False}]) == []  # results from before the table existed


def test_the_cpu_table_says_what_ratio_the_services_own_cpu_predicts(serving):
    """With the clients and Ray keeping the same cores busy per second, throughput is (cores - that) / the service's
    CPU per image, so PRADA's ratio is the replicas' and shards' CPU per image off over on."""
    def row(prada, rate, cpu):
        return {"log": True, "prada": prada, "accounts": 1, "images_per_s": rate, "cpu_us_per_image": cpu}
    off = row(False, 8000.0, {"replicas": 200.0, "clients": 40.0, "Ray and the rest": 10.0})  # 0.4 cores beside
    on = row(True, 5000.0, {"replicas": 250.0, "shards": 70.0, "clients": 64.0, "Ray and the rest": 16.0})  # 0.4
    text = " ".join(serving.cpu_table([off, on]))
    assert "0.40 cores with PRADA off, 0.40 with it on; the clients alone 0.32 and 0.32" in text
    assert "200 ÷ 320 = **0.62**" in text
    on["images_per_s"] = 2500.0  # the clients' and Ray's CPU halved: not fixed, no prediction
    text = " ".join(serving.cpu_table([off, on]))
    assert "kept different shares of the cores busy" in text and "÷" not in text


def test_the_pipeline_report_says_how_long_the_histories_were(serving):
    """PRADA's test runs once an account holds min_pool distances, so the report gives each PRADA row's queries per
    account in a window: images/s x seconds / (clients x accounts per client)."""
    def row(prada, log, accounts, rate):
        return {"prada": prada, "log": log, "accounts": accounts, "images_per_s": rate, "p50_ms": 1.0, "p99_ms": 2.0,
                "served_over_raw": 0.5}
    cost = {"median": 0.75, "min": 0.7, "max": 0.8}
    result = {"machine": {"cpus": 2, "torch": "t", "ray": "r"}, "victim": {"arch": "lenet", "dataset": "mnist5k"},
              "seconds_per_config": 10, "raw_images_per_s": 10_000.0, "date": "2026-12-05",
              "pipeline": {"clients": 16, "batch": 64, "replicas": 2, "rounds": 3,
                           "prada_cost": cost, "prada_cost_by_accounts": {"8": cost, "64": cost}, "log_cost": cost,
                           "rows": [row(False, True, 1, 6000.0), row(True, True, 1, 4800.0),
                                    row(True, True, 8, 4960.0), row(True, True, 64, 5120.0)]}}
    text = serving.table(result)
    assert "whose history grows to about 3,000 queries in a window" in text  # 4,800 x 10 / 16
    assert "with 8 accounts per client in turn, whose histories reach about 388 queries each" in text  # /(16 x 8)
    assert "with 64 accounts per client in turn, whose histories reach about 50 queries each" in text
    # kept by a later run of other sections (--only) at another length: its own seconds, said in its heading
    result.update(seconds_per_config=1, date="2026-12-07")
    result["pipeline"].update(seconds=10, date="2026-12-05")
    text = serving.table(result)
    assert "## The pipeline (measured 2026-12-05, 10 s per configuration)" in text
    assert "whose history grows to about 3,000 queries in a window" in text


def test_a_scripts_results_are_read_back_with_one_line_errors_and_written_where_asked(tmp_path, monkeypatch):
    from sim.cli import output_file, read_results
    from sim.errors import SimError

    monkeypatch.chdir(tmp_path)
    path = output_file("deeper/r.json")  # relative, in a folder that does not exist yet: made before any measuring
    assert path == str(tmp_path / "deeper" / "r.json") and (tmp_path / "deeper").is_dir()
    assert output_file("bare.json") == str(tmp_path / "bare.json")
    for wrong in ("r.md", "deeper"):  # the Markdown would overwrite it; a folder
        with pytest.raises(SimError, match=rf"^--out '{wrong}': expected the path of a .json file"):
            output_file(wrong)
    with pytest.raises(SimError, match=r"r.json does not exist; expected the JSON a run of x.py wrote \(--out\)$"):
        read_results(path, ("rows",), "x.py")
    (tmp_path / "deeper" / "r.json").write_text("{")
    with pytest.raises(SimError, match=r"r.json is not JSON \(Expecting property name"):
        read_results(path, ("rows",), "x.py")
    (tmp_path / "deeper" / "r.json").write_text(json.dumps({"rows": [], "other": 1}))
    with pytest.raises(SimError, match=r"r.json is not a result of x.py: it has no machine, date; expected"):
        read_results(path, ("rows", "machine", "date"), "x.py")
    assert read_results(path, ("rows",), "x.py") == {"rows": [], "other": 1}
    (tmp_path / "deeper" / "r.json").write_text("[1, 2]")
    with pytest.raises(SimError, match=r"r.json is not a result of x.py: a JSON list; expected"):
        read_results(path, (), "x.py")


def test_the_tier_report_gives_each_sides_cpu_beside_pradas_own(serving):
    """The tier section: per request, the wall times and the CPU of the calling process, of the shard's and of PRADA
    in process, whose difference is what the call costs in Ray."""
    row = {"histories": "one account", "requests": 300, "queries_per_key": 19_200, "hop_p50_ms": 6.15,
           "in_process_p50_ms": 5.06, "caller_cpu_ms": 0.73, "shard_cpu_ms": 5.6, "in_process_cpu_ms": 4.85}
    result = {"machine": {"cpus": 2, "torch": "t", "ray": "r"}, "victim": {"arch": "lenet", "dataset": "mnist5k"},
              "seconds_per_config": 10, "raw_images_per_s": 10_000.0, "date": "2026-12-05",
              "tier": {"batch": 64, "rows": [row]}}
    text = serving.table(result)
    assert "| caller CPU ms | shard CPU ms | in-process CPU ms |" in text
    assert "| one account | 19,200 | 6.15 | 5.06 | 0.73 | 5.60 | 4.85 |" in text
    row["shard_cpu_ms"] = None  # no /proc where it ran: not measured, rather than zero
    assert "| one account | 19,200 | 6.15 | 5.06 | 0.73 | – | 4.85 |" in serving.table(result)


@pytest.fixture(scope="module")
def runs():
    yield from benchmark_module("runs")


def test_the_defenses_spread_gives_each_seeds_cut(runs):
    """The cut column: the undefended twin's replica accuracy minus the defended replica's, at each seed, from the
    shipped runs (the defenses study was run at seeds 0, 1 and 2)."""
    result = json.load(open(os.path.join(runs.RESULTS, "runs.json")))["runs"]
    lines = runs.spread("defenses", result)
    assert "| command | seeds | attacker | replica accuracy | accounts flagged | benign flagged | cut |" in lines
    mad = [result["defenses"][runs.seeded("mad eps=0.8", seed)]["summary"] for seed in (0, 1, 2)]
    cuts = []
    for s in mad:
        knockoff = next(a for a in s["attackers"] if a["id"] == "knockoff")
        cuts.append(100 * (knockoff["undefended"]["test_accuracy"] - knockoff["replica"]["test_accuracy"]))
    row = next(line for line in lines if line.startswith("| `python -m sim scenario=mad_vs_knockoff` |"))
    assert row.endswith(" | " + " / ".join(f"{c:+.1f}" for c in cuts) + " |")
    assert all(c > 10 for c in cuts)  # MAD cuts the soft-label replica at every seed
    dp = next(i for i, line in enumerate(lines) if "victim.training=dp_sgd" in line)
    assert lines[dp].endswith(" | – / – / – |")  # no undefended twin: no cut
    splits = runs.spread("splits_knockoff", result)
    assert not splits or all("| cut |" not in line for line in splits)  # no twins there: no column


def test_fresh_runs_replace_only_what_they_measure_again(runs):
    """--fresh forgets the chosen studies' runs at the chosen seeds, and nothing else (the other studies' results
    and the other seeds' stay in runs.json)."""
    label = runs.STUDIES["splits_knockoff"][0][0]
    old = {"splits_knockoff": {label: {"seed": 0}, runs.seeded(label, 1): {"seed": 1}},
           "defenses": {"mad eps=0.8": {"seed": 0}}}
    assert runs.forget(old, ["splits_knockoff"], [0]) == {"splits_knockoff": {runs.seeded(label, 1): {"seed": 1}},
                                                          "defenses": {"mad eps=0.8": {"seed": 0}}}
    assert runs.forget(old, ["scenarios"], [0, 1, 2]) == old


def test_a_study_says_when_its_runs_were_measured(runs):
    today = {"summary": {"run_id": "same-detection-20261205101010-abcdef"}}  # a name may hold dashes
    earlier = {"summary": {"run_id": "distributed_knockoff-20261201112458-d8ce4a"}}
    assert runs.measured([today]) == "2026-12-05"
    assert runs.measured([today, earlier, today]) == "2026-12-01 to 2026-12-05"


@pytest.fixture(scope="module")
def detection():
    yield from benchmark_module("detection")


def test_the_code_pixel_range_moves_same_s_balance(detection):
    """On the code's [-1, 1] pixels the same reconstruction's MSE is 4 times as large: a query with the larger KL
    but the smaller MSE outranks the other on [0, 1] pixels and not on the code's."""
    s = detection.code_scores(np.array([0.01, 0.02]), np.array([1.0, 0.0]), alpha=0.99)
    assert s["SAME"] == pytest.approx([0.0199, 0.0198])
    assert s["SAME ±1"] == pytest.approx([0.0496, 0.0792])
    assert list(s["SAME-X"]) == [0.01, 0.02] and list(s["SAME-Y"]) == [1.0, 0.0]


def test_the_reference_table_says_how_well_its_mae_reconstructs(detection):
    cell = {"budget": 1000, "attack": "knockoff", "auroc": 0.9, "aupr": 0.8, "fpr95": 0.2}
    result = {"same_code": [{**cell, "detector": "SAME"}, {**cell, "detector": "SAME ±1", "auroc": 0.95}],
              "same_code_settings": {"mae": "cpu", "overrides": [], "device": "cpu",
                                     "mse": {"honest": 0.01234, "1000": {"knockoff": 0.03, "jbda": 0.02}},
                                     "mae_loss": [[10, 0.0654], [100, 0.041]]}}
    lines = detection.same_table(result, "same_code")
    assert "| 1,000 | SAME ±1 | 95.00 / 80.00 / 20.00 |" in lines
    assert ("The MAE's mean reconstruction MSE (pixels in [0, 1]): honest test images 0.0123; 1,000 queries of "
            "knockoff 0.0300, jbda 0.0200; its training loss by epoch: 10: 0.0654, 100: 0.0410.") in lines
    del result["same_code_settings"]["mae_loss"]  # trained before such losses were recorded: none to report
    assert ("The MAE's mean reconstruction MSE (pixels in [0, 1]): honest test images 0.0123; 1,000 queries of "
            "knockoff 0.0300, jbda 0.0200.") in detection.same_table(result, "same_code")


@pytest.fixture(scope="module")
def attacks():
    yield from benchmark_module("attacks")


def test_the_attacks_table_gives_dfmes_own_student_beside_its_replica(attacks):
    """DFME's row is a replica trained afresh on its queries; the model DFME trained itself is scored beside it."""

    def cell(attack, budget, acc, own=None):
        return {"dataset": "mnist5k", "attack": attack, "budget": budget, "seed": 0, "variant": "default",
                "replica_epochs": 20, "victim_accuracy": 0.978, "replica_accuracy": acc, "fidelity": acc,
                **({"extracted": {"test_accuracy": own, "fidelity": own + 0.01}} if own is not None else {})}

    text = attacks.table([cell("knockoff", 1000, 0.7), cell("dfme", 1000, 0.57, 0.1), cell("dfme", 5000, 0.84, 0.3)])
    assert "| dfme | 57.0 / 57.0 | 84.0 / 84.0 |" in text
    assert ("dfme's row is a replica trained afresh on its queries; the model dfme trained itself while it queried "
            "(its student, the one its paper scores), accuracy / fidelity %: 1,000 queries 10.0 / 11.0; "
            "5,000 queries 30.0 / 31.0") in text
    assert "knockoff's row" not in text

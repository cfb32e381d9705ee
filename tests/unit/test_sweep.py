"""Sweep configuration, search spaces and the offline sweep report (no Ray started)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis import sweep as asweep
from sim import config, summary, sweep
from sim.errors import ConfigError


def test_shipped_sweeps_load_and_count_their_trials():
    assert {"mad_eps", "reverse_sigmoid_beta", "random_noise_eps", "defense_frontier"} <= set(sweep.sweep_names())
    mad = sweep.load("mad_eps")
    assert mad.scenario == "mad_vs_knockoff"
    assert {s.get("name", label) for label, s in mad.space.items()} == {"identity", "mad", "mad_argmax"}
    assert sweep._trial_count(mad) == 1 + 6 + 6
    frontier = sweep.load("defense_frontier")
    assert len(frontier.space) >= 4
    for name in sweep.sweep_names():
        base = sweep.base_config(sweep.load(name), [])
        assert base.attackers, name
    rate = sweep.load("rate_limit")  # a limit is a scenario key like any other: each trial runs with its own
    assert sweep._trial_count(rate) == 4 and not sweep.shares_plan(rate.vary)
    base = sweep.base_config(rate, [])
    assert [config.load(base.model_dump(), config.nest({"serve.rate": r})).serve.rate
            for r in rate.vary["serve.rate"]] == [5, 20, 80, 320]


def test_overrides_replace_spaces_drop_curves_and_change_settings():
    cfg = sweep.load("mad_eps", ["space.mad.eps={uniform: [0.1, 2.0]}", "space.mad_argmax=null",
                                 "num_samples=3", "scheduler=asha"], scenario="single_knockoff")
    assert cfg.space["mad"]["eps"] == {"uniform": [0.1, 2.0]}
    assert "mad_argmax" not in cfg.space and cfg.scenario == "single_knockoff"
    assert sweep._trial_count(cfg) == (1 + 1) * 3 and cfg.scheduler == "asha"


def test_param_space_gives_one_trial_per_grid_point_with_its_own_defense():
    from ray.tune.search.variant_generator import generate_variants

    cfg = sweep.load("mad_eps", ["space={mad: {eps: [0.5, 1.0]}, rs: {name: reverse_sigmoid, gamma: 0.5, "
                                 "beta: {loguniform: [0.01, 1.0]}}}"])
    trials = [v for _, v in generate_variants(sweep.param_space(cfg.space))]
    assert [t["trial"]["curve"] for t in trials] == ["mad", "mad", "rs"]
    assert [t["trial"]["defense"]["eps"] for t in trials[:2]] == [0.5, 1.0]
    rs = trials[2]["trial"]["defense"]
    assert rs["name"] == "reverse_sigmoid" and rs["gamma"] == 0.5 and 0.01 <= rs["beta"] <= 1.0


@pytest.mark.parametrize("override,message", [
    ("space.mad.eps={unifrom: [0, 1]}", r"sweep.space.mad.eps=\{'unifrom': \[0, 1\]\} is not a search space; "
                                        r"expected a value, a list, or one of \{grid: …\}"),
    ("space.mad.eps={uniform: [1, 0.5]}",
     r"sweep.space.mad.eps.uniform=\[1, 0.5\]; expected \[low, high\] with low < high"),
    ("space.mad.eps={loguniform: [0, 1]}", r"sweep.space.mad.eps.loguniform=\[0, 1\]; expected a low bound > 0"),
    ("space.mad.eps=[]", r"sweep.space.mad.eps.grid=\[\] must be a non-empty list"),
    ("space.mad.eps=[0.5, -1]", r"sweep.space.mad.eps must be a number >= 0, got -1"),
    ("space.mad.epsilon=[0.5]",
     r"sweep.space.mad.epsilon is not a parameter of defense mad; expected one of: eps, norm"),
    ("space.madd={eps: [1]}", r"sweep.space.madd \(a defense name\)='madd' is not a known defense"),
    ("space.x={name: rounding+top_k}", r"sweep.space.x.name='rounding\+top_k': expected one defense's name"),
    ("max_concurent=3", r"unknown key 'sweep.max_concurent'; known keys here: name, description, scenario"),
    ("max_concurrent=0", r"sweep.max_concurrent must be >= 1, got 0"),
    ("scheduler=hyperband", r"sweep.scheduler must be 'fifo' or 'asha', got 'hyperband'"),
    ("space={}", r"sweep.space: must name at least one defense to sweep"),
    ("space={top_k: {k: {uniform: [1, 5]}}}", r"sweep.space.top_k.k.uniform=\[1, 5\]: k takes an integer >= 1, not a "
                                              r"continuous range; expected a list or \{choice: \[…\]\}"),
])
def test_bad_sweep_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        sweep.load("mad_eps", [override])
    assert re.search(message, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_the_swept_defense_and_per_trial_run_dir_cannot_be_overridden():
    cfg = sweep.load("mad_eps")
    with pytest.raises(ConfigError, match="the defense is what the sweep varies"):
        sweep.base_config(cfg, ["defense.eps=0.3"])
    with pytest.raises(ConfigError, match="each trial has its own run directory"):
        sweep.base_config(cfg, ["run_dir=/tmp/x"])
    # what a swept defense needs of the scenario is checked before any trial
    am = sweep.load("mad_eps", ["space={am: {name: adaptive_misinformation, tau: [0.5, 0.9]}}"])
    with pytest.raises(ConfigError, match="sweep.space.am on scenario 'mad_vs_knockoff': defense "
                                          "adaptive_misinformation needs victim.training=outlier_exposure"):
        sweep.base_config(am, [])
    assert sweep.base_config(am, ["victim.training=outlier_exposure"]).victim.training == "outlier_exposure"


def test_a_setting_that_has_effect_only_in_some_trials_may_be_given_to_all():
    # DP-SGD's noise for every trial, where vary trains some victims with DP-SGD: it takes effect in those
    cfg = sweep.load("mad_eps", ["vary={victim.training: [standard, dp_sgd]}"])
    assert sweep.base_config(cfg, ["victim.dp.noise_multiplier=1.5"]).victim.dp.noise_multiplier == 1.5
    # in none of them: refused, as for one run
    cfg = sweep.load("mad_eps", ["vary={victim.training: [standard], victim.quantization: [ptq]}"])
    with pytest.raises(ConfigError, match=r"^victim.dp.noise_multiplier=1.5 has no effect unless "
                                          r"victim.training=dp_sgd; expected"):
        sweep.base_config(cfg, ["victim.dp.noise_multiplier=1.5"])


def test_vary_crosses_scenario_settings_with_every_curve_and_trains_each_victim_once():
    from ray.tune.search.variant_generator import generate_variants

    cfg = sweep.load("mad_eps", ["space={none: {name: identity}, mad: {eps: [0.5, 1.0]}}",
                                 "vary={victim.quantization: [none, ptq], victim.divqat.alpha: 0.5}"])
    trials = [v for _, v in generate_variants(sweep.param_space(cfg.space, cfg.vary))]
    assert sweep._trial_count(cfg) == len(trials) == 6
    assert {(t["trial"]["curve"], t["trial"]["defense"].get("eps"), t["vary"]["victim.quantization"])
            for t in trials} == {(c, e, q) for c, e in (("none", None), ("mad", 0.5), ("mad", 1.0))
                                 for q in ("none", "ptq")}
    assert sweep.victim_settings(cfg.vary) == [{"victim.quantization": "none", "victim.divqat.alpha": 0.5},
                                               {"victim.quantization": "ptq", "victim.divqat.alpha": 0.5}]
    assert sweep.shares_plan(cfg.vary)
    assert not sweep.shares_plan({"victim.quantization": ["ptq"], "attackers.knockoff.budget": [500, 1000]})
    base = sweep.base_config(cfg, [])
    a, b = (sweep.victim_id(config.load(base.model_dump(), config.nest(s))) for s in sweep.victim_settings(cfg.vary))
    assert a != b


@pytest.mark.parametrize("vary,message", [
    ("{victim.quantization: [ptq, int4]}", r"sweep.vary.victim.quantization='int4': victim.quantization must be"),
    ("{victim.divqat.alpha: {uniform: [0, 1]}}", r"sweep.vary.victim.divqat.alpha.uniform=\[0, 1\]: every victim is "
                                                 r"trained before the trials start"),
    ("{defense.eps: [1]}", r"sweep.vary.defense.eps: the defense and the run directory are the sweep's own"),
    ("{victim.epoch: [1]}", r"sweep.vary.victim.epoch=1: unknown key 'victim.epoch'"),
    ("{serve.rate: [0, 5]}", r"sweep.vary.serve.rate=0: serve.rate must be > 0, got 0"),
])
def test_bad_vary_settings_are_one_line_errors_before_any_trial(vary, message):
    with pytest.raises(ConfigError) as info:
        sweep.base_config(sweep.load("mad_eps", [f"vary={vary}"]), [])
    assert re.search(message, str(info.value)), str(info.value)


def test_a_vary_key_given_on_its_own_is_one_dotted_key():
    cfg = sweep.load("mad_eps", ["vary={victim.quantization: [none, ptq], serve.rate: [5]}",
                                 "vary.victim.quantization=[none, qat]", "vary.attackers.knockoff.budget=[100, 200]",
                                 "vary.serve.rate=null"])
    assert cfg.vary == {"victim.quantization": ["none", "qat"], "attackers.knockoff.budget": [100, 200]}
    with pytest.raises(ConfigError, match=r"sweep.vary.victim.quantization='int4': victim.quantization must be"):
        sweep.base_config(sweep.load("mad_eps", ["vary.victim.quantization=int4"]), [])


def test_a_sweep_needs_an_attacker(tmp_path):
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("benign: {users: 1}\n")
    with pytest.raises(ConfigError, match="scenario 'quiet' has no attackers, so a sweep has no replica to measure"):
        sweep.base_config(sweep.load("mad_eps", scenario=str(quiet)), [])


def test_epoch_reports_wait_for_every_replica_and_never_skip_an_epoch():
    epochs = {"a": 4, "b": 2}
    assert sweep.epoch_reports({"a": {1: 0.5}, "b": {}}, epochs, 0) == []  # b has not finished an epoch
    # polled late: epochs 1 and 2 both due at once, in order; b is finished at 2 and stays at its last accuracy
    due = sweep.epoch_reports({"a": {1: 0.5, 2: 0.6, 3: 0.7}, "b": {1: 0.9, 2: 0.8}}, epochs, 0)
    assert [d["replica_epoch"] for d in due] == [1, 2, 3]
    assert due[0] == {"replica_epoch": 1, "replica_accuracy_max": 0.9, "a.replica_test_accuracy": 0.5,
                      "b.replica_test_accuracy": 0.9}
    assert due[2]["b.replica_test_accuracy"] == 0.8 and due[2]["replica_accuracy_max"] == 0.8
    # nothing twice, and the last epoch is left to the run's summary
    assert sweep.epoch_reports({"a": {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.75}, "b": {1: 0.9, 2: 0.8}}, epochs, 3) == []


def test_asha_judges_only_metrics_reported_while_replicas_train():
    cfg = sweep.load("mad_eps", ["scheduler=asha", "asha.grace_period=3"])
    base = sweep.base_config(cfg, [])
    tc = sweep._tune_config(cfg, base)
    assert tc.metric == "replica_accuracy_max" and tc.mode == "min"
    assert tc.scheduler._time_attr == "replica_epoch" and tc.scheduler._max_t == 20  # mad_vs_knockoff's epochs
    assert tc.scheduler._reduction_factor == 2
    with pytest.raises(ConfigError, match=r"sweep.metric='test_l1_mean' is not reported while replicas train; "
                                          r"expected one of: replica_accuracy_max, knockoff.replica_test_accuracy"):
        sweep._tune_config(sweep.load("mad_eps", ["scheduler=asha", "metric=test_l1_mean"]), base)


def test_cli_sweep_errors_are_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "sim", "sweep=mad_eps", "sweep.space.mad.eps={uniform: [2, 1]}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: sweep.space.mad.eps.uniform=[2, 1]; expected [low, high] with low < high"]
    proc = subprocess.run([sys.executable, "-m", "sim", "sweep=nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "sweep='nope' is not a known sweep; expected one of: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_refuses_a_directory_without_a_sweep_and_changed_settings(tmp_path):
    with pytest.raises(ConfigError, match="holds no sweep to resume"):
        sweep.run("mad_eps", [f"sweep.dir={tmp_path}"], resume=True)
    with pytest.raises(ConfigError, match="resume=true continues the sweep as it was started, but "
                                          "'victim.epochs=2' would change it"):
        sweep.run("mad_eps", [f"sweep.dir={tmp_path}", "victim.epochs=2"], resume=True)


def test_pareto_front_keeps_points_no_other_beats():
    pts = [(0.1, 0.9), (0.5, 0.5), (0.6, 0.6), (1.0, 0.2), (0.5, 0.7)]
    assert asweep.pareto(pts) == [0, 1, 3]
    # defended accuracy: higher x is better
    assert asweep.pareto([(0.99, 0.9), (0.95, 0.5), (0.90, 0.6)], x_better="max") == [0, 1]


def test_distortion_to_reach_interpolates_between_the_trials_around_the_target():
    rows = [{"test_l1_mean": 0.2, "a": 0.95}, {"test_l1_mean": 0.6, "a": 0.70}, {"test_l1_mean": 1.0, "a": 0.3}]
    l1, exact = asweep.distortion_to_reach(rows, "a", 0.8)
    assert exact and l1 == pytest.approx(0.2 + 0.4 * (0.95 - 0.8) / (0.95 - 0.70))
    assert asweep.distortion_to_reach(rows, "a", 0.99) == (0.2, False)  # already below at the least L1
    assert asweep.distortion_to_reach(rows, "a", 0.1) is None
    # a trial stopped early counts only when its replica was already above the target
    early = [{"test_l1_mean": 0.4, "a": 0.85, "status": "stopped early"},
             {"test_l1_mean": 0.5, "a": 0.60, "status": "stopped early"}]
    l1, _ = asweep.distortion_to_reach(rows + early, "a", 0.8)
    assert l1 == pytest.approx(0.4 + 0.2 * (0.85 - 0.8) / (0.85 - 0.70))


def _summary(acc, l1, defended) -> str:
    """A run summary (the version-1 fixture, read as today's) with one attacker and these numbers."""
    s = summary.parse(json.loads((Path(__file__).parent.parent / "data" / "summary_v1.json").read_text()))
    s.victim.defended_test_accuracy = defended
    attacker = s.defense.by_role["attacker"].model_copy(update={"l1_mean": l1 * 1.5})  # what the attacker got
    s.defense = s.defense.model_copy(update={"test_l1_mean": l1, "test_top1_preserved_rate": 1.0, "l1_mean": l1,
                                             "by_role": {**s.defense.by_role, "attacker": attacker}})
    s.attackers = [s.attackers[0].model_copy(update={"id": "knockoff", "undefended": None,
                                                     "replica": summary.Replica(test_accuracy=acc, fidelity=acc)})]
    s.detection = {}
    return s.model_dump_json()


def test_sweep_report_from_trial_directories(tmp_path):
    """The report reads the sweep directory alone: finished trials from their summaries, a trial stopped
    early from what it last reported."""
    (tmp_path / "sweep.yaml").write_text("name: t\nscenario: single_knockoff\ntarget: 0.8\nmax_concurrent: 2\n"
                                         "space: {mad: {eps: [0.5, 1.0]}, random_noise: {eps: [1.0]}}\n")
    (tmp_path / "sweep.json").write_text(json.dumps({"sessions": [{"seconds": 360}],
                                                     "trials": {"t3": {"status": "stopped early"}}}))
    trials = {"t0": ("mad", 0.5, 0.9), "t1": ("mad", 1.0, 0.5), "t2": ("random_noise", 1.0, 0.85)}
    for tid, (curve, eps, acc) in trials.items():
        run = tmp_path / "runs" / tid
        run.mkdir(parents=True)
        (run / "trial.json").write_text(json.dumps({"trial_id": tid, "curve": curve,
                                                    "defense": {"name": curve, "eps": eps}}))
        (run / "summary.json").write_text(_summary(acc, eps, 0.99 - eps / 10))
    stopped = tmp_path / "runs" / "t3"
    stopped.mkdir()
    (stopped / "trial.json").write_text(json.dumps({"trial_id": "t3", "curve": "random_noise",
                                                    "defense": {"name": "random_noise", "eps": 0.2},
                                                    "last": {"knockoff.replica_test_accuracy": 0.95,
                                                             "replica_epoch": 4}}))
    out = asweep.write_report(str(tmp_path))
    rows = {r["trial_id"]: r for r in out["rows"]}
    assert rows["t0"]["status"] == "done" and rows["t0"]["knockoff.replica_test_accuracy"] == 0.9
    assert rows["t3"]["status"] == "stopped early" and rows["t3"]["replica_epoch"] == 4
    import pyarrow.parquet as pq

    table = pq.read_table(out["parquet"])
    assert table.num_rows == 4 and {"curve", "param.eps", "test_l1_mean", "status"} <= set(table.column_names)
    assert open(out["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(out["markdown"]).read()
    assert "| mad | 0.5 | done | 0.921 | 0.940 | 0.500 | 0.750 | 0.900 |" in md  # test L1, attacker-query L1
    assert "3 done, 1 stopped early" in md and "30.0 finished trials per hour" in md
    assert "| mad | 0.625 |" in md  # L1 at which the replica crosses 80%: between 0.5 (0.9) and 1.0 (0.5)
    assert "| random_noise | not reached |" in md


def test_results_table_keeps_a_parameter_that_is_a_word_in_one_curve_and_a_number_in_another(tmp_path):
    import pyarrow.parquet as pq

    parquet, csv = asweep.write_table([{"curve": "a", "param.x": "l1"}, {"curve": "b", "param.x": 0.5},
                                       {"curve": "c", "param.y": 2}], str(tmp_path))
    assert pq.read_table(parquet).to_pylist() == [{"curve": "a", "param.x": "l1", "param.y": None},
                                                   {"curve": "b", "param.x": "0.5", "param.y": None},
                                                   {"curve": "c", "param.x": None, "param.y": 2}]
    assert open(csv).read().splitlines()[0] == '"curve","param.x","param.y"'


def test_resume_finds_the_latest_sweep_whose_trials_started_and_names_it_as_it_was_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, started in (("mad_eps-20261201-000000", True), ("mad_eps-20261202-000000", False)):
        (tmp_path / "runs" / "sweeps" / name).mkdir(parents=True)
        if started:
            (tmp_path / "runs" / "sweeps" / name / "tune").mkdir()
    assert sweep._latest("mad_eps") == str(tmp_path / "runs" / "sweeps" / "mad_eps-20261201-000000")
    out = {"rows": [{"status": "done"}], "dir": "/s/d", "seconds": 3, "parquet": "p", "plot": "f", "markdown": "m",
           "interrupted": True, "name": "small", "given": "my/small.yaml", "total": 6}
    assert sweep.format_result(out).startswith("sweep -> /s/d: 1 trials, 1 done (5 more not started), in 3 s")
    assert sweep.format_result(out).endswith(
        "interrupted: continue with python -m sim sweep=my/small.yaml sweep.dir=/s/d resume=true")
    out.update(interrupted=False, rows=[{"status": "done"}, {"status": "error", "trial_id": "t2", "curve": "mad",
                                                            "error": "ConfigError: no such file"}])
    assert sweep.format_result(out).endswith("failed: 1 of 2 trials; the first, t2 (mad): ConfigError: no such file")


def test_a_sweep_samples_its_ranges_from_the_scenarios_seed():
    from ray.tune.experiment import Experiment

    def samples(seed: int) -> list[float]:
        cfg = sweep.load("mad_eps", ["space={mad: {eps: {uniform: [0.2, 1.0]}}}", "num_samples=3", "max_concurrent=3"])
        alg = sweep._tune_config(cfg, sweep.base_config(cfg, [f"seed={seed}"])).search_alg
        alg.add_configurations([Experiment(name="x", run=lambda c: None, num_samples=3,
                                           config=sweep.param_space(cfg.space, cfg.vary))])
        return [t.config["trial"]["defense"]["eps"] for t in iter(alg.next_trial, None)]

    first = samples(0)
    assert len(set(first)) == 3 and all(0.2 <= e <= 1.0 for e in first)
    assert samples(0) == first and samples(1) != first


def test_a_metric_nothing_reports_is_refused_whatever_the_scheduler():
    cfg = sweep.load("mad_eps", ["metric=accuracy"])
    with pytest.raises(ConfigError, match=r"sweep.metric='accuracy' is not reported while replicas train"):
        sweep._tune_config(cfg, sweep.base_config(cfg, []))


def test_the_sweep_records_the_command_lines_scenario_overrides_with_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_execute", lambda *args, **kwargs: {})  # no trial: what is written before them
    sweep.run("mad_eps", [f"sweep.dir={tmp_path / 's'}", "attackers.knockoff.budget=200"])
    written = yaml.safe_load((tmp_path / "s" / "sweep.yaml").read_text())
    assert written["overrides"] == ["undefended_baseline=false", "attackers.knockoff.budget=200"]
    assert "with `undefended_baseline=false`, `attackers.knockoff.budget=200`" in asweep._markdown(
        written, [], [], 0.8, False, {})


def test_the_sweep_table_shows_what_each_detector_flagged_and_the_sweeps_text_says_when_its_base_changed():
    rows = [{"trial_id": "a", "curve": "mad", "status": "done", "param.eps": 0.5, "test_l1_mean": 0.5,
             "prada.flagged_attacker_accounts": 3.0, "prada.flagged_benign_accounts": 0, "prada.query_auroc": 0.61}]
    md = asweep._markdown({"name": "t"}, rows, [], 0.8, False, {})
    assert ("| curve | eps | status | test L1 | prada flagged attacker accounts | prada flagged benign accounts | "
            "prada query AUROC |") in md
    assert "| mad | 0.5 | done | 0.500 | 3 | 0 | 0.610 |" in md
    # mad_eps's text describes mad_vs_knockoff's attackers: run on another base, it says so
    assert sweep.load("mad_eps", scenario="crowd").description.endswith(
        "(Run here on scenario `crowd` in place of `mad_vs_knockoff`, which the text above describes.)")
    assert "in place of" not in sweep.load("mad_eps", scenario="mad_vs_knockoff").description


def test_a_sweep_files_scenario_file_is_looked_for_beside_it(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: single_knockoff\nattackers: {single: {budget: 200}}\n")
    (tmp_path / "mine.yaml").write_text("scenario: base.yaml\nspace: {mad: {eps: [0.5]}}\n")
    cfg = sweep.load(str(tmp_path / "mine.yaml"))
    assert cfg.scenario == str(tmp_path / "base.yaml")
    assert sweep.base_config(cfg, []).attackers["single"].budget == 200


def test_the_sweep_says_when_each_trial_starts_and_ends(capsys):
    from types import SimpleNamespace

    progress = sweep._progress_callback(2)
    trial = SimpleNamespace(config={"trial": {"curve": "mad", "defense": {"name": "mad", "eps": 0.5}},
                                    "vary": {"serve.rate": 5}}, status="RUNNING", last_result={})
    progress.on_trial_start(0, [trial], trial)
    trial.last_result = {"replica_accuracy_max": 0.5, "defended_test_accuracy": 0.9, "test_l1_mean": 0.4,
                         "run_dir": "r"}
    progress.on_trial_complete(1, [trial], trial)
    assert capsys.readouterr().err.splitlines() == [
        "started mad (eps=0.5, serve.rate=5)",
        "[1/2] mad (eps=0.5, serve.rate=5): done; defended acc 0.900, L1 0.400, best replica 0.500"]


def test_the_search_holds_the_trials_at_once_to_max_concurrent():
    from ray.tune.experiment import Experiment

    cfg = sweep.load("mad_eps", ["space={mad: {eps: [0.2, 0.4, 0.6, 0.8]}}", "max_concurrent=2"])
    alg = sweep._tune_config(cfg, sweep.base_config(cfg, [])).search_alg
    alg.add_configurations([Experiment(name="x", run=lambda c: None, config=sweep.param_space(cfg.space, cfg.vary))])
    first = [alg.next_trial() for _ in range(3)]
    assert first[0] is not None and first[1] is not None and first[2] is None  # two running: the third waits
    alg.on_trial_complete(first[0].trial_id)
    assert alg.next_trial() is not None


def test_the_cli_exits_1_when_a_trial_failed(monkeypatch, capsys):
    from sim import cli

    rows = [{"status": "done"}, {"status": "error", "trial_id": "t2", "curve": "mad", "error": "boom"}]
    out = {"rows": rows, "dir": "/s/d", "seconds": 3, "parquet": "p", "plot": "f", "markdown": "m",
           "interrupted": False, "name": "small", "given": "small", "total": 2}
    monkeypatch.setattr(sweep, "run", lambda *a, **k: out)
    assert cli.run_sweep(None, ["sweep=small"]) == 1
    assert "failed: 1 of 2 trials" in capsys.readouterr().out
    out["rows"] = rows[:1]
    assert cli.run_sweep(None, ["sweep=small"]) == 0
    out["interrupted"] = True
    assert cli.run_sweep(None, ["sweep=small"]) == 130


def test_reading_a_directory_that_is_no_sweep_is_one_line_naming_it(tmp_path):
    from analysis.sweep import read_sweep

    with pytest.raises(ConfigError, match=rf"^sweep_dir='{tmp_path}' holds no sweep.yaml; expected a directory "
                                          r"written by python -m sim sweep=NAME$"):
        read_sweep(str(tmp_path))

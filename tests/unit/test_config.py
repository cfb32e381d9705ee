import re
import subprocess
import sys
from pathlib import Path

import pytest

from sim import config, defenses
from sim.errors import ConfigError, SimError


def test_distributed_knockoff_extends_single_knockoff_and_meets_the_spec():
    cfg = config.load("distributed_knockoff")
    assert cfg.name == "distributed_knockoff"
    assert set(cfg.attackers) == {"single", "distributed"}
    single, dist = cfg.attackers["single"], cfg.attackers["distributed"]
    assert single.accounts == 1 and dist.accounts >= 20 and dist.actors >= 4
    assert single.budget == dist.budget
    assert cfg.benign.users >= 2 and cfg.detectors["prada"].enabled
    assert cfg.victim.arch == "lenet" and cfg.victim.dataset == "mnist5k"


def test_overrides_change_values_and_can_add_an_attacker():
    cfg = config.load("single_knockoff", ["victim.epochs=3", "attackers.extra.budget=10", "seed=7"])
    assert cfg.victim.epochs == 3 and cfg.seed == 7
    assert cfg.attackers["extra"].budget == 10 and cfg.attackers["extra"].attack == "knockoff"


def test_an_added_attacker_whose_id_is_a_near_miss_is_pointed_out(caplog):
    with caplog.at_level("WARNING", logger="sim.config"):
        cfg = config.load("distributed_knockoff", ["attackers.distribted.budget=5"])
    assert set(cfg.attackers) == {"single", "distributed", "distribted"}  # added, as documented
    assert [r.getMessage() for r in caplog.records] == [
        "attackers.distribted is not an attacker of this scenario, so the override adds one (attack knockoff); "
        "did you mean attackers.distributed?"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sim.config"):
        config.load("distributed_knockoff", ["attackers.extra.attack=jbda", "attackers.distributed.budget=100"])
    assert caplog.records == []  # a new id unlike the scenario's, and a known one: nothing to say
    with caplog.at_level("WARNING", logger="sim.config"):
        config.load("single_jbda", ["attackers.single.budget=100"])  # another scenario's id, no attack named
    assert [r.getMessage() for r in caplog.records] == [
        "attackers.single is not an attacker of this scenario (its attackers: jbda), so the override adds one with "
        "the default attack knockoff; name its attack (attackers.single.attack=…) to add one on purpose"]


def test_setting_a_detector_that_stays_off_is_pointed_out(caplog):
    with caplog.at_level("WARNING", logger="sim.config"):
        config.load("single_knockoff", ["detectors.same.action=refuse", "detectors.msp.enabled=true",
                                        "detectors.msp.action=refuse", "detectors.prada.enabled=false"])
    assert [r.getMessage() for r in caplog.records] == [
        "detectors.same.action=refuse has no effect: detectors.same is off (detectors.same.enabled=true turns it on)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sim.config"):  # a sweep's trial that turns it on: it has effect there
        config.load("single_knockoff", ["detectors.same.action=refuse", "detectors.msp.threshold=0.5"],
                    variants=[{"detectors": {"same": {"enabled": v}}} for v in (False, True)])
    assert [r.getMessage() for r in caplog.records] == [
        "detectors.msp.threshold=0.5 has no effect: detectors.msp is off (detectors.msp.enabled=true turns it on)"]


@pytest.mark.parametrize("override,message", [
    ("victim.epoch=3", "unknown key 'victim.epoch'; known keys here: name, dataset, arch, checkpoint, preprocess, url, "
                       "key_file, client, epochs"),
    ("bogus=1", "unknown key 'bogus'; known keys here: name, description, seed"),
    ("victim.epochs=0", "victim.epochs must be >= 1, got 0"),
    ("victim.epochs=abc", "victim.epochs must be a valid integer, got 'abc'$"),
    ("attackers.single.budget=1.5", "attackers.single.budget must be a valid integer, got 1.5$"),
    ("victim=3", r"victim must be a mapping of keys \(victim.KEY=VALUE\), got 3$"),
    ("seed.foo=1", "seed must be a valid integer, got {'foo': 1}$"),
    ("victim.preprocess.mean=[0.5]", "victim.preprocess.std is missing; expected victim.preprocess.std=VALUE beside "
                                     "the keys given$"),
    ("attackers.single.attack=", r"attackers.single.attack must be a valid string, got null \(an empty value\)$"),
    ("detectors.prada.delta=1.5", r"detectors.prada.delta must be a number in \(0, 1\], got 1.5"),
    ("detectors.prada.action=block",
     "detectors.prada.action must be 'answer', 'refuse', 'perturb' or 'proof_of_work', got 'block'"),
    ("victim.arch=alexnet", "victim.arch='alexnet' is not a known architecture; expected one of: lenet"),
    ("attackers.single.pool=imagenet", "attackers.single.pool='imagenet' is not a known dataset; expected one of: "
                                       "mnist5k, digits, glyphs"),
    ("victim.dataset=mnsit", "cifar100, npz:PATH, folder:PATH, or module:attr of your own"),
    ("attackers.single.actors=2", r"attackers.single: actors \(2\) must be <= accounts \(1\)"),
    ("serve.shards=0", "serve.shards must be >= 1, got 0"),
    ("seed=${nope}", "cannot resolve an interpolation: Interpolation key 'nope' not found"),
    ("detector.prada.acton=refuse", "unknown key 'detectors.prada.acton'"),
    ("detector=5", "detector=5 must be a mapping"),
    ("attackers.single.split=zigzag", "attackers.single.split must be 'round_robin', 'random' or 'blocks'"),
    ("attackers.single.pool=digits+imagenet", "attackers.single.pool='imagenet' is not a known dataset"),
    ("attackers.single.attack=gan", "attackers.single.attack='gan' is not a known attack; expected one of: dfme, jbda"),
    ("attackers.single.dfme.step=0", "unknown key 'attackers.single.dfme.step'; known keys here: attack, budget"),
    ("attackers.single.adaptive.arms=pixels",
     "attackers.single.adaptive.arms must be one of: labels, clusters, got 'pixels'"),
    ("attackers.single.accounts=1501", r"attackers.single: accounts \(1501\) must be <= budget \(1500\)"),
    ("attackers.single.adaptive.rewards=[certainty,", r"attackers.single.adaptive.rewards='\[certainty,' is not a "
                                                      r"value; expected a number, a word, \[a, list\] or"),
    ("seed==", "seed='=' is not a value"),
    ("defense={name: mad, eps: 0.5}", "defense='{name: mad, eps: 0.5}' is not a defense name; expected defense=NAME "
                                      r"\(or A\+B\) and its parameters as defense.PARAM=VALUE"),
    ("attackers.single.strategy=adaptive", None),
    ("attackers.single.sample_with_replacement=true", None),
])
def test_bad_overrides_are_one_line_errors_naming_key_value_and_expectation(override, message):
    if message is None:  # fine alone
        config.load("single_knockoff", [override])
        return
    with pytest.raises(ConfigError, match=message) as info:
        config.load("single_knockoff", [override])
    assert "\n" not in str(info.value)


def test_detector_is_an_alias_of_detectors():
    cfg = config.load("single_knockoff", ["detector.prada.action=refuse", "detectors.prada.delta=0.9"])
    assert cfg.detectors["prada"].action == "refuse" and cfg.detectors["prada"].delta == 0.9


@pytest.mark.parametrize("run_dir,message", [
    ("{file}", "cannot be written"),
    ("foo://x", "Unrecognized filesystem type"),
])
def test_unusable_run_dirs_are_one_line_errors(tmp_path, run_dir, message):
    from sim.engine import prepare_run_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=message) as info:
        prepare_run_dir(config.load("single_knockoff", [f"run_dir={run_dir.format(file=afile)}"]), "r-1-a")
    assert "\n" not in str(info.value)


def test_relative_run_dir_becomes_absolute(tmp_path, monkeypatch):
    from sim.engine import prepare_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = config.load("single_knockoff", ["run_dir=rel/run"])
    assert prepare_run_dir(cfg, "r-1-a") == str(tmp_path / "rel" / "run" / "queries")
    assert cfg.run_dir == str(tmp_path / "rel" / "run")


def test_a_fresh_run_directory_ends_with_its_run_ids_time_and_suffix(tmp_path, monkeypatch):
    from sim.engine import new_run_id, prepare_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = config.load("single_knockoff")
    run_id = new_run_id(cfg)
    prepare_run_dir(cfg, run_id)
    name, stamp, suffix = re.fullmatch(r"(.+)-(\d{14})-([0-9a-f]{6})", run_id).groups()
    assert name == "single_knockoff"
    assert cfg.run_dir == str(tmp_path / "runs" / name / f"{stamp[:8]}-{stamp[8:]}-{suffix}")


def test_unknown_scenario_lists_the_known_ones():
    with pytest.raises(ConfigError, match="scenario='nope' is not a known scenario; expected one of: "
                                          + ", ".join(config.scenario_names())):
        config.load("nope")
    assert {"distributed_knockoff", "single_knockoff", "mad_vs_knockoff"} <= set(config.scenario_names())


def test_scenario_file_path_and_extends(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: single_knockoff\nvictim:\n  epochs: 2\n")
    cfg = config.load(str(path))
    assert cfg.name == "mine" and cfg.victim.epochs == 2 and "single" in cfg.attackers
    path.write_text(f"extends: {tmp_path / 'gone.yaml'}\n")  # the error names the file whose extends led there
    with pytest.raises(ConfigError, match=rf"^extends='{tmp_path / 'gone.yaml'}' in '{path}': scenario="):
        config.load(str(path))


def test_an_empty_scenario_or_sweep_file_is_an_error_not_a_run_of_every_default(tmp_path):
    from sim import sweep

    path = tmp_path / "mine.yaml"
    path.write_text("# to do\n")
    with pytest.raises(ConfigError, match=rf"^scenario '{path}' is empty; expected a mapping of keys \(extends: NAME "
                                          r"starts from another scenario\)$"):
        config.load(str(path))
    with pytest.raises(ConfigError, match=rf"^sweep '{path}' is empty; expected a mapping of keys$"):
        sweep.load(str(path))


def test_linking_that_the_scenarios_traffic_never_lets_re_cluster_is_pointed_out(caplog):
    from sim.engine import warn_idle_linking

    small = ["detectors.link.enabled=true", "attackers.single.budget=300", "benign.users=2", "benign.queries=100"]
    with caplog.at_level("WARNING", logger="sim.engine"):
        warn_idle_linking(config.load("single_knockoff", small))  # 500 queries at most: linking's every 500 runs once
        assert caplog.records == []
        more = ["benign.queries_max=150", "detectors.link.every=601"]  # 300 + 2 x 150 = 600 at most
        warn_idle_linking(config.load("single_knockoff", [*small, *more]))
    assert [r.getMessage() for r in caplog.records] == [
        "detectors.link.every=601 is more than the 600 queries this scenario sends at most: link never re-clusters "
        "and flags nothing (a smaller every, or a larger budget, runs it)"]


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with pytest.raises(ConfigError, match=f"extends='{a}' makes a cycle: {a} -> {b} -> {a}$"):
        config.load(str(a))


def test_a_relative_extends_cycle_is_found_and_extends_must_name_a_scenario(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("extends: sub/b.yaml\n")
    (tmp_path / "sub" / "b.yaml").write_text("extends: ../a.yaml\n")  # the paths differ, the file is the same
    a, b = tmp_path / "a.yaml", tmp_path / "sub" / "b.yaml"
    with pytest.raises(ConfigError, match=f"extends='{a}' makes a cycle: {a} -> {b} -> {a}$"):
        config.load(str(a))
    (tmp_path / "c.yaml").write_text("extends: [single_knockoff]\n")
    with pytest.raises(ConfigError, match=r"extends=\['single_knockoff'\] in '.*c.yaml' is not a scenario; expected "):
        config.load(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("override,message", [
    ("attackers=[1, 2]", "attackers=[1, 2] is a list; attackers must be a mapping of keys (attackers.KEY=VALUE)"),
    ("victim=[1]", "victim=[1] is a list; victim must be a mapping of keys (victim.KEY=VALUE)"),
    ("attackers.distributed=[1]", "attackers.distributed=[1] is a list; attackers.distributed must be a mapping of "
                                  "keys (attackers.distributed.KEY=VALUE)"),
    ("victim=", "victim must be a mapping of keys (victim.KEY=VALUE), got null (an empty value)"),
    ("serve.http=maybe", "serve.http must be a valid boolean, got 'maybe'"),
    ("victim.lr=inf", "victim.lr must be a finite number, got 'inf'"),
    ("seed=true", "seed must be a number, got True"),  # not 1
    ("attackers.single.budget=false", "attackers.single.budget must be a number, got False"),
    ("attackers.single.replica.lr=.nan", "attackers.single.replica.lr must be a finite number, got nan"),
])
def test_a_list_or_nothing_where_a_mapping_belongs_is_a_one_line_error(override, message):
    with pytest.raises(ConfigError) as info:
        config.load("distributed_knockoff", [override])
    assert str(info.value) == message


def test_a_scenario_file_that_is_not_yaml_says_where(tmp_path):
    (tmp_path / "bad.yaml").write_text("seed: 1\nvictim:\n  epochs: 3\n   lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^scenario '.*bad.yaml' is not valid YAML at line 4, column 6: mapping "
                                          r"values are not allowed here$"):
        config.load(str(tmp_path / "bad.yaml"))


def test_a_key_given_twice_in_a_scenario_file_is_refused_not_silently_replaced(tmp_path):
    (tmp_path / "twice.yaml").write_text("extends: distributed_knockoff\ndetectors:\n  prada: {enabled: true}\n"
                                         "seed: 3\ndetectors:\n  link: {enabled: true}\n")
    with pytest.raises(ConfigError, match=r"^scenario '.*twice.yaml' is not valid YAML at line 5, column 1: key "
                                          r"'detectors' is given twice in one mapping \(first at line 2\); expected "
                                          r"each key once$"):
        config.load(str(tmp_path / "twice.yaml"))
    (tmp_path / "flow.yaml").write_text("extends: distributed_knockoff\ndetectors: {prada: {enabled: true}, prada: "
                                        "{enabled: false}}\n")  # the same line
    with pytest.raises(ConfigError, match=r"key 'prada' is given twice in one mapping \(first at line 2\)"):
        config.load(str(tmp_path / "flow.yaml"))
    # a key that a merge (<<: *anchor) brought in may still be overridden
    (tmp_path / "merge.yaml").write_text("extends: distributed_knockoff\nx: &base {epochs: 2, lr: 0.05}\n"
                                         "victim:\n  <<: *base\n  epochs: 1\n")
    raw = config.read_mapping(str(tmp_path / "merge.yaml"), "scenario", tmp_path)
    assert raw["victim"] == {"epochs": 1, "lr": 0.05}


def test_a_scenario_file_that_gives_a_list_where_its_base_has_a_mapping_is_one_line(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: single_knockoff\nattackers:\n  - single\n")
    with pytest.raises(ConfigError, match=r"^'.*mine.yaml' \(extends 'single_knockoff'\): attackers=\['single'\] is "
                                          r"a list; attackers must be a mapping of keys \(attackers.KEY=VALUE\)$"):
        config.load(str(tmp_path / "mine.yaml"))


@pytest.mark.parametrize("overrides,message", [
    ("seed=3", "overrides='seed=3' is not a list (a str); expected a list of 'key=value' strings (or a mapping)"),
    ([3], "override 3 is not a string (a int); expected a 'key=value' string"),
    ({"victim.epochs": 1}, "overrides key 'victim.epochs': a mapping of overrides is nested as a scenario file is; "
                           "expected {'victim': {'epochs': …}}, or the list form ['victim.epochs=…']"),
])
def test_overrides_of_the_wrong_shape_from_python_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        config.load("single_knockoff", overrides)
    assert str(info.value) == message


def test_a_mapping_of_overrides_takes_numpy_numbers_and_a_defense_by_name():
    import numpy as np

    cfg = config.load("single_knockoff", {"seed": np.int64(3), "defense": "mad", "victim": {"epochs": np.int32(2)}})
    assert cfg.seed == 3 and type(cfg.seed) is int and cfg.defense.spec() == {"name": "mad"} and cfg.victim.epochs == 2
    # as in a scenario file: another attack drops the old one's parameters, another defense its parameters
    jbda = config.load("single_knockoff", {"attackers": {"single": {"attack": "jbda"}}}).attackers["single"]
    assert jbda.attack == "jbda" and "pool" not in jbda.params()
    assert config.load("mad_vs_knockoff", {"defense": "top_k"}).defense.spec() == {"name": "top_k"}
    # and a scenario given as a mapping may extend another, as a file does
    mine = config.load({"extends": "single_knockoff", "seed": 3})
    assert mine.seed == 3 and list(mine.attackers) == ["single"]


def test_extends_finds_a_relative_base_beside_the_file(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text("extends: single_knockoff\nseed: 3\n")
    (tmp_path / "mine.yaml").write_text("extends: base.yaml\nvictim:\n  epochs: 2\n")
    monkeypatch.chdir(tmp_path.parent)  # not where the files are
    cfg = config.load(str(tmp_path / "mine.yaml"))
    assert cfg.seed == 3 and cfg.victim.epochs == 2 and "single" in cfg.attackers
    (tmp_path / "bare.yaml").write_text("extends: base\n")  # a name is a shipped scenario: the file needs .yaml
    with pytest.raises(ConfigError, match=r"extends='base' in '.*bare.yaml' is not a shipped scenario; expected "
                                          r"extends: base.yaml for the file beside it$"):
        config.load(str(tmp_path / "bare.yaml"))
    with pytest.raises(ConfigError, match=r"scenario='.*gone.yaml': no such file; expected the path of an existing"):
        config.load(str(tmp_path / "gone.yaml"))


def test_resolved_config_round_trips_through_yaml():
    import yaml

    cfg = config.load("distributed_knockoff", ["victim.epochs=4"])
    again = config.validate(yaml.safe_load(config.to_yaml(cfg)))
    assert again == cfg
    # a defense's parameters (and a perturbing detector's) are written in full, defaults included, and load back
    cfg = config.load("single_knockoff", ["defense=top_k+rounding", "defense.top_k.k=2",
                                          "detectors.prada.action=perturb", "detectors.prada.perturb.name=mad"])
    written = yaml.safe_load(config.to_yaml(cfg))
    assert written["defense"] == {"name": "top_k+rounding", "top_k": {"k": 2}, "rounding": defenses.resolved(
        {"name": "rounding"})} and written["detectors"]["prada"]["perturb"] == {"name": "mad", **defenses.resolved(
            {"name": "mad"})}
    again = config.validate(written)
    assert defenses.resolved(again.defense.spec()) == defenses.resolved(cfg.defense.spec())
    assert config.to_yaml(again) == config.to_yaml(cfg)


@pytest.mark.parametrize("args,message", [
    (["scenario=nope"], "error: scenario='nope' is not a known scenario"),
    (["scenario=single_knockoff", "victim.epoch=1"], "error: unknown key 'victim.epoch'"),
    (["scenario=single_knockoff", "stray"], "error: argument 'stray' is not understood"),
    (["--scenario=single_knockoff"], "error: argument '--scenario=single_knockoff' is not understood; expected "
                                     "scenario=single_knockoff (key=value, no dashes)"),
    (["victim.epochs=1"], "error: scenario=NAME is required"),
    (["scenario=single_knockoff", "scenario=dfme"], "error: 'scenario=dfme': a second scenario (scenario="
                                                    "single_knockoff came first); expected one scenario=NAME"),
])
def test_cli_user_errors_exit_2_with_one_line_and_no_traceback(args, message):
    proc = subprocess.run([sys.executable, "-m", "sim", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_scripts_report_a_users_mistake_in_one_line_with_status_2(tmp_path, capsys):
    """The benchmarks' scripts run their main through sim.cli.script; their options are checked as they parse."""
    import argparse

    from sim import cli

    def bad_setting():
        config.load("single_knockoff", ["seed=-1"])

    def missing_file():
        open(tmp_path / "results.json")

    for main, message in ((bad_setting, "error: seed must be >= 0, got -1"),
                          (missing_file, f"error: {tmp_path / 'results.json'}: No such file or directory")):
        with pytest.raises(SystemExit) as info:
            cli.script(main)
        assert info.value.code == 2 and capsys.readouterr().err.strip() == message
    with pytest.raises(SystemExit) as info:
        cli.script(lambda: None)
    assert info.value.code == 0
    assert cli.count("3") == 3 and cli.nonnegative("0") == 0 and cli.positive("0.5") == 0.5
    for parse, text in ((cli.count, "0"), (cli.count, "2.5"), (cli.nonnegative, "-1"), (cli.positive, "0"),
                        (cli.positive, "nan"), (cli.positive, "inf")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}' is not "):
            parse(text)


def test_the_reference_writer_takes_one_file_path(tmp_path, capsys):
    from sim import reference

    assert reference.main([str(tmp_path / "ref.md")]) == 0
    assert (tmp_path / "ref.md").read_text().startswith("# Configuration reference")
    assert capsys.readouterr().err.strip() == f"wrote {tmp_path / 'ref.md'}"
    for args in ([str(tmp_path)], [str(tmp_path / "no" / "ref.md")], ["a.md", "b.md"], ["--nope"]):
        with pytest.raises(SystemExit) as info:
            reference.main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["runs", "replicate"])  # the others build their parser in the same way
def test_a_benchmark_scripts_bad_option_is_one_line_with_status_2(name):
    proc = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--no-such-option"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: unrecognized arguments: --no-such-option "
                                   f"(see python benchmarks/{name}.py --help)")


def test_cli_help_lists_scenarios_and_keys():
    proc = subprocess.run([sys.executable, "-m", "sim", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "distributed_knockoff" in proc.stdout and "single_knockoff" in proc.stdout
    assert "attackers.<id>.accounts" in proc.stdout and "detectors.<name>.action" in proc.stdout
    assert "  mad                      eps=1, norm=l1, jacobian=last_layer, seed=0, objective=angle\n" in proc.stdout
    assert re.search(r"^  prada +delta=0.95, min_pool=100, skip_repeats=false, group=account$", proc.stdout, re.M)
    assert "  pooled_prada  kind=prada, enabled=false, group=all, skip_repeats=true\n" in proc.stdout
    assert "DFME (Truong et al. 2021), data-free: a generator's images" in proc.stdout  # not cut at "al."


def test_a_port_in_use_is_a_user_error():
    import socket

    from sim.serving import check_port, free_port

    port = free_port()
    assert check_port(port) == port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(SimError, match=f"serve.port={port} cannot be used on 127.0.0.1"):
            check_port(port)


def test_an_unreachable_cluster_address_is_a_user_error(monkeypatch):
    from sim import engine
    from sim.engine import check_ray_address
    from sim.serving import free_port

    monkeypatch.setattr(engine.ray, "is_initialized", lambda: False)  # (a Ray of the integration tests: not used)

    with pytest.raises(SimError, match=r"ray.address='127.0.0.1:\d+': cannot connect"):
        check_ray_address(config.load("single_knockoff", [f"ray.address=127.0.0.1:{free_port()}"]))
    for bad in ("nonsense", "localhost:abc", ":6379", "host:70000"):
        with pytest.raises(ConfigError, match=rf"ray.address must be a cluster address: HOST:PORT .*, got '{bad}'"):
            config.load("single_knockoff", [f"ray.address={bad}"])
    monkeypatch.setenv("RAY_ADDRESS", "bad")
    with pytest.raises(SimError, match=r"RAY_ADDRESS='bad' is not a cluster address; expected HOST:PORT"):
        check_ray_address(config.load("single_knockoff"))
    for good in ("auto", "ray://head:10001", "10.0.0.1:6379"):
        assert config.load("single_knockoff", [f"ray.address={good}"]).ray.address == good
    # auto: the cluster ray.init would find on this machine, checked as one given by its address
    monkeypatch.delenv("RAY_ADDRESS")
    from ray._private import services

    def nothing(address):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die", nothing)
    with pytest.raises(SimError, match=r"^ray.address='auto': no Ray cluster runs on this machine; expected one"):
        check_ray_address(config.load("single_knockoff", ["ray.address=auto"]))
    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die", lambda a: f"127.0.0.1:{free_port()}")
    with pytest.raises(SimError, match=r"^ray.address='auto': cannot connect"):  # a cluster that has stopped
        check_ray_address(config.load("single_knockoff", ["ray.address=auto"]))


def test_a_run_dir_that_already_holds_a_log_is_refused(tmp_path):

    from sim import querylog
    from sim.engine import prepare_run_dir

    cfg = config.load("single_knockoff", [f"run_dir={tmp_path}"])
    log_dir = prepare_run_dir(cfg, "r-1-a")
    assert (tmp_path / "config.yaml").exists()
    w = querylog.QueryLogWriter(log_dir, (1, 28, 28), "w")
    w.write(run_id="r", victim="v", request_id="q", account_id="a", actor_id=None, role="benign", attack=None,
            actions=["refused"], refusal_reason=["x"], latency_ms=0.0)
    w.close()
    with pytest.raises(ConfigError, match=f"run_dir='{tmp_path}' already holds a run's query log"):
        prepare_run_dir(config.load("single_knockoff", [f"run_dir={tmp_path}"]), "r-1-a")


# -- defenses in scenarios -------------------------------------------------------------------------

def test_defense_name_then_params_in_any_order_and_the_old_params_are_dropped():
    for overrides in (["defense=reverse_sigmoid", "defense.beta=0.2"], ["defense.beta=0.2", "defense=reverse_sigmoid"]):
        cfg = config.load("mad_vs_knockoff", overrides)
        assert cfg.defense.spec() == {"name": "reverse_sigmoid", "beta": 0.2}  # MAD's eps/norm are gone
    cfg = config.load("mad_vs_knockoff", ["defense.eps=0.25"])
    assert cfg.defense.spec()["eps"] == 0.25 and cfg.defense.spec()["name"] == "mad"


def test_defense_chain_with_per_member_params():
    cfg = config.load("single_knockoff", ["defense=reverse_sigmoid+rounding", "defense.rounding.decimals=1"])
    assert cfg.defense.spec() == {"name": "reverse_sigmoid+rounding", "rounding": {"decimals": 1}}


def test_defense_as_a_plain_name_in_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("extends: single_knockoff\ndefense: labels_only\n")
    assert config.load(str(path)).defense.spec() == {"name": "labels_only"}


@pytest.mark.parametrize("overrides,message", [
    (["defense=mad", "defense.eps=-1"], "defense.eps must be a number >= 0, got -1"),
    (["defense=mad", "defense.epsilon=1"], "defense.epsilon is not a parameter of defense mad"),
    (["defense=madd"], "defense.name='madd' is not a known defense; expected one of: identity, top_k"),
    (["defense=adaptive_misinformation"], "defense adaptive_misinformation needs victim.training=outlier_exposure, "
                                           "but victim.training='standard'"),
    (["victim.training=fancy"], "victim.training must be 'standard', 'outlier_exposure', 'dp_sgd' or 'adversarial', "
                                "got 'fancy'"),
    (["victim.adversarial.step=0.5"], "victim.adversarial: step=0.5 is larger than eps=0.1; expected step <= eps"),
    (["victim.quantization=int4"], "victim.quantization must be 'none', 'ptq', 'qat' or 'divqat', got 'int4'"),
    (["victim.divqat.alpha=-1"], "victim.divqat.alpha must be >= 0, got -1"),
    (["victim.training=dp_sgd", "victim.quantization=qat"], "victim.quantization=qat fine-tunes without DP-SGD"),
    (["victim.dp.noise_multiplier=0"], "victim.dp.noise_multiplier must be > 0, got 0"),
    (["victim.training=dp_sgd", "victim.dataset=cifar10", "victim.arch=resnet18"],
     "victim.training=dp_sgd needs per-sample gradients, which batch norm does not allow, but victim.arch='resnet18'"),
])
def test_bad_defense_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as exc:
        config.load("single_knockoff", overrides)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_adaptive_misinformation_with_an_outlier_exposure_victim_is_accepted():
    cfg = config.load("single_knockoff", ["defense=adaptive_misinformation", "defense.tau=0.6",
                                          "victim.training=outlier_exposure"])
    assert cfg.defense.spec() == {"name": "adaptive_misinformation", "tau": 0.6}


def test_more_coarse_groups_than_pool_images_is_a_one_line_error():
    from sim import data
    from sim.plan import make_plan

    cfg = config.load("single_knockoff", ["attackers.single.strategy=adaptive",
                                          "attackers.single.adaptive.arms=clusters",
                                          "attackers.single.adaptive.clusters=5000"])
    with pytest.raises(ConfigError, match="attackers.single.adaptive.clusters=5000 exceeds the 1797 images of pool "
                                          "'digits'; expected at most 1797"):
        make_plan(cfg, data.load("mnist5k"))


def test_knockoff_pool_size_holds_a_nested_random_subset_of_the_pool():
    from sim import data
    from sim.plan import make_plan

    def held(n: int, seed: int = 0) -> set[bytes]:  # the images of one actor that queries its whole pool once
        cfg = config.load("single_knockoff", [f"seed={seed}", f"attackers.single.pool_size={n}",
                                              f"attackers.single.budget={n}", "benign.users=0"])
        (client,) = make_plan(cfg, data.load("mnist5k")).of(attacker="single")
        return {img.tobytes() for img in client.source.images}

    pool = {img.tobytes() for img in data.load_pool("digits")[0]}
    small, large = held(100), held(400)
    assert len(small) == 100 and len(large) == 400 and small < large < pool  # a smaller size keeps a prefix
    assert held(100, seed=1) != small  # the subset follows the seed
    cfg = config.load("single_knockoff", ["attackers.single.pool_size=5000"])
    with pytest.raises(ConfigError, match="attackers.single.pool_size=5000 exceeds the 1797 images of pool 'digits'; "
                                          "expected at most 1797"):
        make_plan(cfg, data.load("mnist5k"))
    cfg = config.load("single_knockoff", ["attackers.single.pool_size=1000", "attackers.single.budget=1500"])
    with pytest.raises(ConfigError, match=r"budget=1500 exceeds the 1000 images of pool 'digits' \(pool_size=1000\)"):
        make_plan(cfg, data.load("mnist5k"))
    with pytest.raises(ConfigError, match="attackers.single.pool_size must be an integer >= 1"):
        config.load("single_knockoff", ["attackers.single.pool_size=0"])


@pytest.mark.parametrize("override, message", [
    ("detectors.same.mask_ratio=1", r"detectors.same.mask_ratio must be a number in \(0, 1\), got 1"),
    ("detectors.msp.target_fpr=0", r"detectors.msp.target_fpr must be a number in \(0, 1\) \(or null\), got 0"),
    ("detectors.prada.pow.bits_max=4", "bits_min \\(8\\) must be <= bits_max \\(4\\)"),
    ("detectors.msp.threshold=0.5,detectors.msp.target_fpr=0.01",
     r"detectors.msp.target_fpr=0.01 has no effect unless detectors.msp.threshold=null; expected "
     r"detectors.msp.threshold=null, or detectors.msp.target_fpr left at its default \(0.05\)"),
    ("benign.accounts=1", r"benign: accounts \(1\) must be >= users \(2\): every user holds one"),
    ("benign.queries_max=10", r"benign: queries_max \(10\) must be >= queries \(300\)"),
    ("detectors.pooled_prada.group=ip",
     "detectors.pooled_prada.group must be one of: account, actor, cohort, all, got 'ip'"),
    ("detectors.link.group=all", "unknown key 'detectors.link.group'"),
    ("detectors.same.action=block", "detectors.same.action must be 'answer', 'refuse', 'perturb' or 'proof_of_work'"),
    ("detectors.eDM.enabled=true", "detectors.eDM.kind is missing: 'eDM' is not a shorthand .*; expected "
                                   "detectors.eDM.kind= one of: link, .*prada, .*same"),
    ("detectors.p2.kind=prad", "detectors.p2.kind='prad' is not a known detector; expected one of: link, .*prada"),
    ("detectors.p-2.kind=prada", "detector name 'p-2' must be letters, digits and '_'"),
    ("detectors.prada.window=3", "unknown key 'detectors.prada.window'; known keys here: kind, enabled, action, pow, "
                                 "perturb, delta, min_pool, skip_repeats, group"),
])
def test_bad_detector_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load("single_knockoff", override.split(","))


def test_a_given_threshold_beside_the_default_target_fpr_is_accepted():
    """A threshold given turns calibration off; target_fpr at its default (stated or not) is then simply unused."""
    for extra in ([], ["detectors.msp.target_fpr=0.05"]):
        cfg = config.load("single_knockoff", ["detectors.msp.threshold=0.5", *extra])
        assert cfg.detectors["msp"].params()["threshold"] == 0.5


@pytest.mark.parametrize("mode, setting, its_mode, message", [
    ([], "detectors.same.alpha=0.5", ["detectors.same.variant=same_code"],
     "detectors.same.alpha=0.5 has no effect unless detectors.same.variant=same_code; expected "
     "detectors.same.variant=same_code, or alpha left at its default (0.99)"),
    (["detectors.same.variant=same_code"], "detectors.same.weight=2", ["detectors.same.variant=default"],
     "detectors.same.weight=2.0 has no effect unless detectors.same.variant=default"),
    (["defense=random_noise", "defense.variant=mad_code"], "defense.scale=3", ["defense=random_noise"],
     "defense.scale=3.0 has no effect unless defense.variant=simplex"),
    (["defense=mad", "defense.objective=random"], "defense.jacobian=all", ["defense=mad"],
     "defense.jacobian=all has no effect unless defense.objective=angle"),
    ([], "attackers.single.adaptive.lr=0.1", ["attackers.single.strategy=adaptive"],
     "attackers.single.adaptive.lr=0.1 has no effect unless attackers.single.strategy=adaptive"),
    (["attackers.single.strategy=adaptive"], "attackers.single.adaptive.clusters=4",
     ["attackers.single.strategy=adaptive", "attackers.single.adaptive.arms=clusters"],
     "attackers.single.adaptive.clusters=4 has no effect unless attackers.single.adaptive.arms=clusters"),
    (["attackers.single.attack=jbda", "attackers.single.jacobian.variant=mad_code"],
     "attackers.single.jacobian.rounds=3", ["attackers.single.attack=jbda"],
     "attackers.single.jacobian.rounds=3 has no effect unless attackers.single.jacobian.variant=default"),
    (["attackers.single.replica.variant=mad_code"], "attackers.single.replica.lr=0.01", [],
     "attackers.single.replica: lr=0.01 has no effect unless variant=default"),
    (["attackers.single.replica.variant=mad_code"], "attackers.single.replica.optimizer=sgd", [],
     "attackers.single.replica: optimizer=sgd has no effect unless variant=default"),
    ([], "detectors.prada.pow.bits_max=12", ["detectors.prada.action=proof_of_work"],
     "detectors.prada: pow.bits_max=12 has no effect unless action=proof_of_work; expected action=proof_of_work, or "
     "pow.bits_max left at its default (16)"),
    (["detectors.prada.action=refuse"], "detectors.prada.perturb.name=rounding", ["detectors.prada.action=perturb"],
     "detectors.prada: perturb.name=rounding has no effect unless action=perturb"),
])
def test_a_setting_that_its_mode_ignores_is_refused_naming_the_setting_it_needs(mode, setting, its_mode, message):
    """Set where the other settings leave it without effect, a value is refused rather than ignored; in its own
    mode it is accepted, and so is its default stated anywhere."""
    with pytest.raises(ConfigError) as exc:
        config.load("single_knockoff", [*mode, setting])
    assert message in str(exc.value) and "\n" not in str(exc.value)
    config.load("single_knockoff", [*its_mode, setting])
    key = setting.split("=")[0]
    default = {"detectors.same.alpha": 0.99, "detectors.same.weight": 1.0, "defense.scale": 10.0,
               "defense.jacobian": "last_layer", "attackers.single.adaptive.lr": 0.01,
               "attackers.single.adaptive.clusters": 10, "attackers.single.jacobian.rounds": 6,
               "attackers.single.replica.lr": 0.001, "attackers.single.replica.optimizer": "adam",
               "detectors.prada.pow.bits_max": 16, "detectors.prada.perturb.name": "mad"}[key]
    config.load("single_knockoff", [*mode, f"{key}={default}"])


def test_a_proof_of_work_saturation_at_or_below_the_threshold_is_refused():
    from sim import detection

    pow_ = ["detectors.prada.action=proof_of_work"]  # PRADA's threshold: 1 - delta, 0.05
    with pytest.raises(ConfigError, match=r"detectors.prada.pow.saturate=0.04 is not above the detector's threshold "
                                          r"0.05, so every flagged query would get bits_max; expected a score above"):
        detection.setup(config.load("single_knockoff", [*pow_, "detectors.prada.pow.saturate=0.04"]), None)
    rule = detection.setup(config.load("single_knockoff", [*pow_, "detectors.prada.pow.saturate=0.3"]), None).rules
    assert rule["prada"]["saturate"] == 0.3 and rule["prada"]["threshold"] == pytest.approx(0.05)


def test_detector_defaults_survive_partial_overrides():
    cfg = config.load("single_knockoff", ["detectors.pooled_prada.enabled=true", "detectors.msp.action=perturb",
                                          "detectors.msp.perturb.eps=0.5", "detectors.msp.enabled=true"])
    assert cfg.detectors["pooled_prada"].group == "all"  # not the per-account default of plain PRADA
    assert cfg.detectors["pooled_prada"].kind == "prada" and cfg.detectors["pooled_prada"].skip_repeats
    assert cfg.detectors["msp"].perturb.spec() == {"name": "mad", "eps": 0.5}
    assert list(cfg.enabled_detectors()) == ["prada", "pooled_prada", "msp"]
    with pytest.raises(ConfigError, match="detectors.msp.perturb.name='nope' is not a known defense"):
        config.load("single_knockoff", ["detectors.msp.enabled=true", "detectors.msp.action=perturb",
                                        "detectors.msp.perturb.name=nope"])
    # stateful detectors live in the detection tier, so any number of replicas serves them
    cfg = config.load("single_knockoff", ["detectors.link.enabled=true", "serve.replicas=4"])
    assert cfg.serve.shards_for(cpus=2) == 2 and cfg.serve.shards_for(cpus=16) == 4
    assert config.load("single_knockoff", ["serve.shards=3"]).serve.shards_for(cpus=2) == 3


def test_proof_of_work_needs_sane_difficulty():
    with pytest.raises(ConfigError, match="detectors.msp.pow.bits_min must be >= 1, got 0"):
        config.load("single_knockoff", ["detectors.msp.pow.bits_min=0"])
    with pytest.raises(ConfigError, match="detectors.msp.pow.bits_max must be <= 24, got 30"):
        config.load("single_knockoff", ["detectors.msp.pow.bits_max=30"])


def test_switching_a_kind_drops_what_the_new_kind_does_not_declare():
    cfg = config.load("single_knockoff", ["attackers.single.jacobian.rounds=3", "attackers.single.attack=jb_self"])
    single = cfg.attackers["single"]
    assert single.attack == "jb_self" and single.params()["jacobian.rounds"] == 3 and "pool" not in single.params()
    assert single.budget == 1500  # the keys every attacker has are kept
    with pytest.raises(ConfigError, match="unknown key 'attackers.single.pool'"):  # in the same breath: an error
        config.load("single_knockoff", ["attackers.single.attack=jbda", "attackers.single.pool=digits"])
    # what both kinds declare stays (same_detection's jbda attacker has jacobian.rounds=20 in its file)
    jb = config.load("same_detection", ["attackers.jbda.attack=jb_top3"]).attackers["jbda"]
    assert jb.attack == "jb_top3" and jb.params()["jacobian.rounds"] == 20
    # a detector's kind likewise: single_jbda gives prada delta and min_pool, which msp does not have
    prada = config.load("single_jbda", ["detectors.prada.kind=msp"]).detectors["prada"]
    assert prada.kind == "msp" and "delta" not in prada.params() and prada.enabled
    # naming a shorthand's own kind keeps its settings
    pooled = config.load("single_knockoff", ["detectors.pooled_prada.kind=prada"]).detectors["pooled_prada"]
    assert pooled.group == "all" and pooled.skip_repeats



def test_switching_to_a_plug_in_kind_by_module_attr_drops_the_old_kinds_parameters(tmp_path, monkeypatch):
    import importlib

    from sim import registry

    (tmp_path / "kinds.py").write_text("from actors.attacks.jacobian import JBDA\nfrom sim.detectors.msp import "
                                       "MaxSoftmax\n\n\nclass MyJBDA(JBDA):\n    pass\n\n\n"
                                       "class MyMsp(MaxSoftmax):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:  # loaded to know what it declares
        plug = config.load("single_knockoff", ["attackers.single.attack=kinds:MyJBDA"]).attackers["single"]
        assert "pool" not in plug.params() and plug.params()["jacobian.rounds"] == 6
        msp = config.load("single_jbda", ["detectors.prada.kind=kinds:MyMsp"]).detectors["prada"]
        assert "delta" not in msp.params()
        with pytest.raises(ConfigError, match="attackers.single.attack='nowhere:X': no module named 'nowhere'"):
            config.load("single_knockoff", ["attackers.single.attack=nowhere:X"])
    finally:
        registry.forget_plugins()


def test_a_scenario_file_may_give_its_bases_entries_another_kind(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: mad_vs_knockoff\nattackers: {knockoff: {attack: jbda}}\n"
                                         "defense: {name: reverse_sigmoid, beta: 0.5}\n"
                                         "detectors: {prada: {kind: msp}}\n")
    cfg = config.load(str(tmp_path / "child.yaml"))
    assert cfg.attackers["knockoff"].attack == "jbda" and "pool" not in cfg.attackers["knockoff"].params()
    assert cfg.attackers["knockoff"].budget == config.load("mad_vs_knockoff").attackers["knockoff"].budget
    assert cfg.defense.spec() == {"name": "reverse_sigmoid", "beta": 0.5}  # not mad's eps
    assert cfg.detectors["prada"].kind == "msp" and "delta" not in cfg.detectors["prada"].params()
    (tmp_path / "same.yaml").write_text("extends: mad_vs_knockoff\ndefense: {eps: 0.5}\n")  # the same kind: merged
    assert config.load(str(tmp_path / "same.yaml")).defense.spec() == {"name": "mad", **{
        k: v for k, v in config.load("mad_vs_knockoff").defense.spec().items() if k != "name"}, "eps": 0.5}


def test_every_defense_the_victim_may_answer_through_is_checked():
    with pytest.raises(ConfigError, match="detectors.prada.perturb adaptive_misinformation needs "
                                          "victim.training=outlier_exposure"):
        config.load("single_knockoff", ["detectors.prada.action=perturb",
                                        "detectors.prada.perturb.name=adaptive_misinformation"])
    with pytest.raises(ConfigError, match=r"detectors.prada.perturb.eps must be a number >= 0, got -1"):
        config.load("single_knockoff", ["detectors.prada.action=perturb", "detectors.prada.perturb.eps=-1"])
    cfg = config.load("single_knockoff", ["detectors.prada.action=perturb", "defense=rounding"])
    assert cfg.defense_specs() == {"defense": {"name": "rounding"}, "detectors.prada.perturb": {"name": "mad"}}


def test_an_empty_detectors_mapping_is_the_shorthands(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("extends: single_knockoff\ndetectors:\n")
    assert list(config.load(str(path)).enabled_detectors()) == ["prada"]


def test_the_device_resolves_to_the_cpu_here_and_cuda_without_a_gpu_is_a_user_error():
    import torch

    from sim import devices

    assert config.load("single_knockoff").device == "auto"
    assert devices.resolve("cpu") == "cpu" and devices.resolve("cpu", cluster_gpus=4) == "cpu"
    assert devices.resolve("auto", cluster_gpus=2) == "cuda"  # a GPU somewhere in the cluster
    if not torch.cuda.is_available():
        assert devices.resolve("auto") == "cpu" and devices.local("auto") == "cpu"
        with pytest.raises(ConfigError, match="device=cuda but no CUDA device is visible"):
            devices.local("cuda")
        proc = subprocess.run([sys.executable, "-m", "sim", "scenario=single_knockoff", "device=cuda"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: device=cuda but no CUDA device is visible")


def test_autoscaling_is_checked_and_exclusive_with_a_fixed_number_of_replicas():
    cfg = config.load("distributed_knockoff", ["serve.autoscaling.max_replicas=3"])
    assert cfg.serve.autoscaling.max_replicas == 3 and cfg.serve.shards_for(cpus=8) == 3
    with pytest.raises(ConfigError, match="serve.replicas=2 and serve.autoscaling are both set"):
        config.load("distributed_knockoff", ["serve.autoscaling.max_replicas=3", "serve.replicas=2"])
    with pytest.raises(ConfigError, match=r"min_replicas \(5\) must be <= max_replicas \(4\)"):
        config.load("distributed_knockoff", ["serve.autoscaling.min_replicas=5"])
    with pytest.raises(ConfigError, match="unknown key 'serve.autoscaling.max'"):
        config.load("distributed_knockoff", ["serve.autoscaling.max=3"])


def test_an_interrupted_runs_message_says_what_it_kept():
    from sim.errors import Interrupted

    assert str(Interrupted("querying", "runs/x", 1200)) == ("interrupted during querying; the run directory runs/x "
                                                            "keeps its query log (1,200 rows, compacted) and a "
                                                            "summary marked interrupted")
    assert str(Interrupted("deploying the victim", "runs/x", 0)) == (
        "interrupted during deploying the victim, before any query was logged; the run directory runs/x keeps a "
        "summary marked interrupted")


def test_a_run_stopped_by_a_mistake_before_its_queries_leaves_no_directory_of_its_config_alone(tmp_path):
    from sim.engine import _remove_stub, prepare_run_dir

    stub = config.load("single_knockoff", [f"run_dir={tmp_path / 'stub'}"])
    prepare_run_dir(stub, "r-1-a")
    _remove_stub(stub.run_dir)
    assert not (tmp_path / "stub").exists()
    kept = config.load("single_knockoff", [f"run_dir={tmp_path / 'kept'}"])
    prepare_run_dir(kept, "r-1-a")
    (tmp_path / "kept" / "notes.txt").write_text("the user's")
    _remove_stub(kept.run_dir)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]


def test_relative_paths_are_made_absolute_once_checked(tmp_path, monkeypatch):
    """A relative path names the same file in every process of a run, whatever its working directory (a sweep's
    trials run in their own): the loaded scenario holds it absolute, and loads again from anywhere."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    images = np.zeros((6, 1, 8, 8), np.uint8)
    np.savez(tmp_path / "data" / "my.npz", x_train=images, y_train=np.arange(6) % 2, x_test=images,
             y_test=np.arange(6) % 2)
    cfg = config.load("single_knockoff", ["victim.dataset=npz:data/my.npz", "cache_dir=cache", "data.root=~/datasets",
                                          "attackers.single.pool=npz:data/my.npz+digits"])
    mine = f"npz:{tmp_path}/data/my.npz"
    assert cfg.victim.dataset == mine and cfg.attackers["single"].params()["pool"] == f"{mine}+digits"
    assert cfg.cache_dir == str(tmp_path / "cache") and cfg.data.root == "~/datasets"  # ~ is every process's own
    monkeypatch.chdir(tmp_path / "data")
    again = config.load(cfg.model_dump())
    assert again.victim.dataset == mine and again.attackers["single"].params()["pool"] == f"{mine}+digits"


def test_a_runs_batches_must_fit_the_victims_max_images_which_serve_mode_does_not_ask():
    for override, message in (("attackers.single.batch_size=1000", "attackers.single.batch_size=1000 exceeds "
                                                                   "serve.max_images=256, so every request"),
                              ("benign.batch_size=300", "benign.batch_size=300 exceeds serve.max_images=256")):
        cfg = config.load("single_knockoff", [override])  # serve mode takes it: its clients are someone else's
        with pytest.raises(ConfigError, match=message):
            cfg.check_run()
    config.load("single_knockoff", ["serve.max_images=8"])
    for override, message in (("serve.keys=/x.json", "serve.keys='/x.json' is read by serve mode only"),
                              ("serve.accounts=3", "serve.accounts=3 is read by serve mode only")):
        cfg = config.load("single_knockoff", [override])  # serve mode's own settings
        with pytest.raises(ConfigError, match=message):
            cfg.check_run()


@pytest.mark.parametrize("overrides, message", [
    (["victim.dp.noise_multiplier=0.5"], "victim.dp.noise_multiplier=0.5 has no effect unless victim.training=dp_sgd; "
                                         "expected victim.training=dp_sgd, or no victim.dp.noise_multiplier"),
    (["victim.oe_weight=0.3"], "victim.oe_weight=0.3 has no effect unless victim.training=outlier_exposure"),
    (["victim.adversarial.steps=3"], "victim.adversarial.steps=3 has no effect unless victim.training=adversarial or "
                                     "robustness.enabled=true"),
    (["victim.quant.epochs=2"], "victim.quant.epochs=2 has no effect unless victim.quantization=ptq, qat or divqat"),
    (["victim.quantization=qat", "victim.divqat.alpha=0.1"], "victim.divqat.alpha=0.1 has no effect unless "
                                                             "victim.quantization=divqat"),
    (["serve.http=false", "serve.port=8123"], "serve.port=8123 has no effect unless serve.http=true"),
    (["benign.popular_images=5"], "benign.popular_images=5 has no effect unless benign.popular above 0"),
    (["victim.url=http://127.0.0.1:9/v", "victim.epochs=3"], "victim.epochs=3 trains the victim, but "
     "victim.url='http://127.0.0.1:9/v' is one this tool does not serve; expected no victim.epochs with a url"),
    (["victim.training=dp_sgd", "victim.dp.noise_multiplier=0.5"], None),
    (["robustness.enabled=true", "victim.adversarial.steps=3"], None),
    (["victim.quantization=divqat", "victim.quant.epochs=1", "victim.divqat.alpha=0.1"], None),
])
def test_a_setting_given_where_the_others_leave_it_without_effect_is_refused(overrides, message):
    """On the command line (or a list of overrides): what a scenario file gives is its own, for the variants it runs
    in (quantized_vs_knockoff's quant settings serve its float cells too)."""
    if message is None:
        config.load("single_knockoff", overrides)
    else:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            config.load("single_knockoff", overrides)
    assert config.load("quantized_vs_knockoff", ["victim.quantization=none"]).victim.quant.epochs == 3


@pytest.mark.parametrize("overrides, message", [
    (["serve.burst=300"], "serve.burst=300 has no effect unless serve.rate=RATE"),
    (["serve.limit_by=cohort"], "serve.limit_by=cohort has no effect unless serve.quota=N or serve.rate=RATE"),
    (["serve.replica_gpus=1", "device=cpu"], "serve.replica_gpus=1.0 has no effect unless device=cuda or device=auto"),
    (["serve.rate=5", "serve.burst=300", "serve.limit_by=cohort"], None),
    (["serve.quota=50", "serve.limit_by=actor"], None),
])
def test_limit_settings_without_a_limit_are_refused(overrides, message):
    if message is None:
        config.load("single_knockoff", overrides)
        return
    with pytest.raises(ConfigError, match=message):
        config.load("single_knockoff", overrides)


@pytest.mark.parametrize("overrides, message", [
    (["attackers.distributed.account_cap=74"], "attackers.distributed: account_cap=74 x accounts=20 is less than "
                                               "budget=1500; expected account_cap >= 75 or more accounts"),
    (["attackers.distributed.account_cap=75"], None),  # 20 accounts x 75 = the budget: every query has room
    (["attackers.distributed.account_cap=100", "attackers.distributed.accounts=15"], None),
    (["attackers.distributed.account_cap=100", "attackers.distributed.accounts=14"],
     "account_cap=100 x accounts=14 is less than budget=1500; expected account_cap >= 108 or more accounts"),
    (["serve.rate=5", "serve.burst=255"], "serve: serve.burst=255 is below serve.max_images=256: a request of more "
                                          "images than the burst could never pass"),
    (["serve.rate=5", "serve.burst=256"], None),  # a burst that holds the largest request
])
def test_a_cap_or_a_burst_too_small_for_what_it_limits_is_refused_at_its_bound(overrides, message):
    if message is None:
        config.load("distributed_knockoff", overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load("distributed_knockoff", overrides)


def test_training_settings_given_beside_a_checkpoint_are_refused(tmp_path):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"")
    for override in ("victim.epochs=1", "victim.lr=0.5", "victim.batch_size=7"):
        key, value = override.split("=")
        with pytest.raises(ConfigError, match=rf"^{key}={value} trains the victim, but victim.checkpoint='{ckpt}' is "
                                              rf"a trained one; expected no {key} with a checkpoint"):
            config.load("single_knockoff", [f"victim.checkpoint={ckpt}", override])
    # a scenario file's own are for when it trains: they pass
    (tmp_path / "mine.yaml").write_text("extends: single_knockoff\nvictim: {epochs: 30, lr: 0.01}\n")
    assert config.load(str(tmp_path / "mine.yaml"), [f"victim.checkpoint={ckpt}"]).victim.epochs == 30


def test_serve_mode_says_what_its_clients_meet():
    from types import SimpleNamespace

    from sim.cli import _in_effect
    from sim.summarize import DetectorInfo

    cfg = config.load("single_knockoff", ["defense=mad", "defense.eps=0.5", "serve.quota=30", "serve.rate=2",
                                          "serve.burst=300", "serve.limit_by=cohort"])
    dets = SimpleNamespace(info={"prada": DetectorInfo("prada", True, "account", {"delta": 0.95, "min_pool": 50})},
                           rules={"prada": {"action": "refuse"}})
    lines = _in_effect(cfg, dets)
    assert lines[0] == "defense:   mad (eps=0.5)"
    assert lines[1:] == ["detectors: prada (delta=0.95, min_pool=50): refuse",
                         "limits:    quota 30 queries, rate 2/s (burst 300) per cohort"]
    assert _in_effect(config.load("single_knockoff"), SimpleNamespace(info={}, rules={})) == [
        "defense:   identity", "detectors: none", "limits:    none"]

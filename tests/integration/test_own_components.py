"""docs/own-components.md, run as written: the worked-example plug-ins installed (entry points), its prepare script,
its commands (each validated: a run through Serve costs the suite ~25 s), and its Python example run end to end
through Serve with a smaller budget and the test's own cache and run directories."""

import re
import shlex
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

import analysis
from sim import zoo
from sim.config import load
from sim.plan import make_plan

DOC = Path(__file__).resolve().parents[2] / "docs" / "own-components.md"
QUICK = ["attackers.single.budget=300", "attackers.single.replica.epochs=8", "attackers.single.replica.lr=0.01",
         "benign.users=1", "benign.queries=40", "victim.epochs=2", "ray.num_cpus=2"]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def workdir(installed, tmp_path_factory):
    """An empty folder where the page's prepare script has run."""
    import os

    folder = tmp_path_factory.mktemp("own")
    here = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(blocks("python")[0], "prepare.py", "exec"), {})
        yield folder
    finally:
        os.chdir(here)


def _commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        for line in block.strip().splitlines():
            if line.startswith("python -m sim "):
                out.append(shlex.split(line)[3:])
    return out


def test_every_command_of_the_page_validates(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "mypkg").symlink_to(Path(__import__("mypkg").__file__).parent)  # "where mypkg/ is a folder"
    commands = _commands()
    assert len(commands) == 5
    for args in commands:  # what a run checks before it trains or starts Ray: settings, data, the attack's plan
        scenario = args[0].split("=", 1)[1]
        cfg = load(scenario, args[1:])
        cfg.check_run()
        assert cfg.attackers and make_plan(cfg, zoo.load_data(cfg.victim, cfg.data)).clients
    ds = __import__("sim").data.load("folder:data/mydigits")
    assert ds.num_classes == 10 and len(ds.x_train) + len(ds.x_test) == 100


def test_the_python_example_serves_your_model_data_and_plug_in_components(workdir, monkeypatch, ray_serve, cache_dir):
    """The page's Python example, one real run through Serve: the prepared checkpoint as a live module, measured on
    the npz test split; the unlabeled folder as the attacker's pool; the plug-in defense, stateful detector
    (refusing) and attack by their registered names. (A checkpoint given by path: test_plugins.py.)"""
    import torch
    from mypkg.models import make_net

    monkeypatch.chdir(workdir)
    run_dir = workdir / "run"
    extra = [f"cache_dir={cache_dir}", f"run_dir={run_dir}", "detectors.mine.limit=200", "undefended_baseline=false",
             *QUICK]
    code = blocks("python")[1].replace('"attackers.single.attack=noisy"]',
                                       '"attackers.single.attack=noisy", ' + ", ".join(map(repr, extra)) + "]")
    scope: dict = {}
    exec(compile(code, "example.py", "exec"), scope)
    s = scope["summary"]
    net = make_net((1, 28, 28), 10)
    net.load_state_dict(torch.load("ckpt/net.pt"))
    mine = np.load("data/my.npz")
    with torch.no_grad():
        own = (net.eval()(torch.tensor(mine["x_test"], dtype=torch.float32) / 255).argmax(1).numpy()
               == mine["y_test"]).mean()
    assert s.victim.test_accuracy == round(float(own), 4) > 0.5
    assert (s.victim.source, s.victim.trained_now) == ("python", False)
    assert s.defense.name == "smooth" and s.victim.defended_test_accuracy == s.victim.test_accuracy
    single = s.attackers[0]
    assert (single.attack, single.params["noisy.noise"], single.queries) == ("noisy", 0.1, 300)
    assert 0 < single.refused <= 100 and single.accounts_flagged_by["mine"] == 1  # refused past 200 queries
    assert s.benign.refused == 0 and single.replica.test_accuracy > 0.2  # a tiny replica learnt something
    table = analysis.read_run(str(run_dir))
    assert table.num_rows == 300 + 40
    rows = analysis.scored_rows(table)
    again = analysis.replay(table, "burst", {"limit": 200}, order="mine")  # the tier's state, replayed offline
    assert np.array_equal(again["flags"], rows.column("mine_flagged").to_numpy(zero_copy_only=False))
    assert np.array_equal(again["scores"], rows.column("mine_score").to_numpy(zero_copy_only=False))
    answered = table.filter(pc.equal(table.column("action"), "answered"))
    probs = np.asarray(answered.column("returned_probs").to_pylist())
    assert probs.min() >= 0.2 / 10 - 1e-6  # smooth (strength 0.2) mixes every answer with the uniform distribution


def test_a_plug_in_only_the_driver_can_import_is_one_line(tmp_path, monkeypatch, ray_serve):
    """A plug-in whose module imports a helper found on the driver's sys.path only: the workers, given the plug-in's
    folder, cannot import it, and the run says so before deploying anything."""
    from sim import ConfigError
    from sim.engine import check_plugins_in_workers

    (tmp_path / "plug").mkdir()
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "driver_only_helper.py").write_text("STRENGTH = 0.1\n")
    (tmp_path / "plug" / "helped.py").write_text(
        "import driver_only_helper\nfrom sim.defenses import Defense\n\n\n"
        "class Helped(Defense):\n    def _perturb(self, y, inputs):\n        return y\n")
    monkeypatch.syspath_prepend(str(tmp_path / "helpers"))
    monkeypatch.syspath_prepend(str(tmp_path / "plug"))
    cfg = load("single_knockoff", ["defense=helped:Helped"])
    with pytest.raises(ConfigError, match=r"^defense 'helped:Helped' loads here but not in Ray workers: importing "
                                          r"'helped' failed: No module named 'driver_only_helper'; expected its module "
                                          r"importable there too"):
        check_plugins_in_workers(cfg)

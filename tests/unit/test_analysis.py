"""Offline analysis over a log written by the real victim service (no Ray): replay, metrics, report, CLI."""

import json
import os
import re

import numpy as np
import pytest

import analysis
from analysis.__main__ import main as cli
from sim import data, detectors, models, querylog
from sim.errors import SimError
from sim.policy import Rule
from sim.protocol import Account
from sim.service import VictimService
from sim.summary import SUMMARY_VERSION, write_interrupted
from sim.training import train_classifier


def _jbda_like(seed_images, rounds=12, eps=0.1, seed=0):
    rng = np.random.default_rng(seed)
    cur = seed_images.astype(np.float32) / 255
    for _ in range(rounds):
        cur = np.clip(cur + eps * rng.choice([-1.0, 1.0], size=cur.shape), 0, 1)
        yield np.rint(cur * 255).astype(np.uint8)


def _victim(ds, seed=0):
    """A LeNet trained briefly, the same whatever ran before (an untrained one's labels are noise, and which
    accounts linking flagged then hung on the global generator's state, so on which tests ran first)."""
    import torch

    torch.manual_seed(seed)
    model = models.build("lenet", ds.input_shape, 10)
    train_classifier(model, ds.x_train[:1000], ds.y_train[:1000], epochs=1, seed=seed)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose log holds two benign users, one JBDA-like account, and five sybils sharing
    one more JBDA-like stream, with PRADA per account, PRADA per cohort and max-softmax online."""
    root = tmp_path_factory.mktemp("run")
    ds = data.load("mnist5k")
    model = _victim(ds)
    accounts = {"k-b0": Account("benign-0", "benign", cohort="benign-0"),
                "k-b1": Account("benign-1", "benign", cohort="benign-1"),
                "k-a": Account("solo-0000", "attacker", "jbda", "solo-c0")}
    accounts.update({f"k-s{i}": Account(f"sybil-{i:04d}", "attacker", "jbda", "sybil-c0") for i in range(5)})
    writer = querylog.QueryLogWriter(str(root / "queries"), ds.input_shape, "w0", detectors=["prada", "cohort", "msp"])
    svc = VictimService(model=model, victim="v", run_id="r", accounts=accounts, input_shape=ds.input_shape,
                        detectors={"prada": detectors.build("prada", min_pool=50),
                                   "cohort": detectors.build("prada", min_pool=50),
                                   "msp": detectors.build("msp")},
                        rules={"cohort": Rule(group="cohort")}, writer=writer)
    solo = _jbda_like(ds.x_test[:10], seed=1)
    sybil = _jbda_like(ds.x_test[10:20], seed=2)
    for r in range(12):
        svc.query("k-a", next(solo), "actor-a")
        svc.query(f"k-s{r % 5}", next(sybil), "actor-s")
        for u in range(2):
            svc.query(f"k-b{u}", ds.x_test[500 + 200 * u + 10 * r:500 + 200 * u + 10 * (r + 1)], f"actor-b{u}")
    writer.close()
    querylog.compact(str(root / "queries"))
    return str(root)


def test_the_python_functions_say_in_one_line_what_they_were_given_instead_of_a_log(run_dir, tmp_path):
    from sim.errors import SimError

    with pytest.raises(SimError, match=r"^run_dir='.*nope' holds no query log .*; expected the directory of a run"):
        analysis.read_run(str(tmp_path / "nope"))  # a typo: not an empty table that every metric then reads as {}
    with pytest.raises(SimError, match=r"^columns: the log has no column 'nope'; expected names of its columns"):
        analysis.read_run(run_dir, ["nope"])
    part = analysis.read_run(run_dir, ["account_id", "action"])
    assert sum(analysis.per_account_counts(part).values()) == part.num_rows
    for call in (lambda: analysis.detection_report(part), lambda: analysis.replay(part, "prada", {})):
        with pytest.raises(SimError, match=r"^the detection analysis needs the log's columns input_sha1, role, attack, "
                                           r"which this table lacks; expected the table read_run gives"):
            call()
    with pytest.raises(SimError, match=r"^per_account_counts takes a query-log table \(analysis.read_run\(RUN_DIR\)\), "
                                       r"got str"):
        analysis.per_account_counts(run_dir)


def test_replaying_prada_reproduces_the_online_flags_exactly(run_dir):
    table = analysis.read_run(run_dir)
    rows = analysis.scored_rows(table)
    online = rows.column("prada_flagged").to_numpy(zero_copy_only=False)
    again = analysis.replay(table, "prada", {"delta": 0.95, "min_pool": 50})
    assert np.array_equal(again["flags"], online) and online.any()
    np.testing.assert_allclose(again["scores"], rows.column("prada_score").to_numpy(zero_copy_only=False),
                               rtol=1e-6, equal_nan=True)
    cohort = analysis.replay(table, "prada", {"min_pool": 50}, group="cohort")
    assert np.array_equal(cohort["flags"], rows.column("cohort_flagged").to_numpy(zero_copy_only=False))
    accounts = np.asarray(rows.column("account_id").to_pylist())
    # the sybils (24 queries each) escape PRADA per account, not PRADA over their sign-up cohort
    assert not online[np.char.startswith(accounts, "sybil")].any()
    assert cohort["flags"][np.char.startswith(accounts, "sybil")].any()
    stricter = analysis.replay(table, "prada", {"delta": 0.5, "min_pool": 50})
    assert stricter["flags"].sum() < online.sum()
    # a logged order keyed like the replay (or coarser) orders each key's queries; one keyed finer would interleave
    # the accounts of a cohort by their own positions (each account's first query, then each one's second, …)
    in_order = analysis.replay(table, "prada", {"min_pool": 50}, group="cohort", order="cohort")
    assert np.array_equal(in_order["flags"], cohort["flags"]) and in_order["gaps"] == {}
    coarser = analysis.replay(table, "prada", {"min_pool": 50}, order="cohort")
    assert np.array_equal(coarser["flags"], online)
    assert coarser["gaps"] == {}  # an account's positions in its cohort's history are no gaps in its own
    with pytest.raises(SimError, match="^order='prada' is not an order of each cohort's queries: two queries of one "
                                       "cohort key share a position in it"):
        analysis.replay(table, "prada", {}, group="cohort", order="prada")


def test_a_stateless_replay_calibrates_its_threshold_as_the_run_does_or_says_what_it_needs(run_dir):
    """msp with no threshold flags above the (1 - target_fpr) quantile of its scores on benign calibration images,
    as a run calibrates it; without those images it says so (it flagged nothing, silently, before)."""
    table = analysis.read_run(run_dir)
    with pytest.raises(SimError, match=r"^replay of msp: no threshold, and target_fpr=0.05 needs benign images"):
        analysis.replay(table, "msp")
    ds = data.load("mnist5k")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.2), size=400).astype(np.float32)  # a victim's answers on benign images
    x = ds.x_train[:400]
    for fpr in (0.05, 0.3):
        out = analysis.replay(table, "msp", {"target_fpr": fpr}, calibration=(x, probs))
        assert out["threshold"] == pytest.approx(np.quantile(1 - probs.max(1), 1 - fpr))
        assert np.array_equal(out["flags"], out["scores"] > out["threshold"])
        fixed = analysis.replay(table, "msp", {"threshold": out["threshold"]})  # the same as a given threshold
        assert np.array_equal(fixed["flags"], out["flags"]) and fixed["threshold"] == out["threshold"]
    assert analysis.replay(table, "msp", {"target_fpr": 0.3}, calibration=(x, probs))["flags"].sum() > \
        analysis.replay(table, "msp", {"target_fpr": 0.05}, calibration=(x, probs))["flags"].sum()


def test_a_cli_replay_of_a_stateless_detector_calibrates_unless_the_runs_threshold_fits(run_dir, tmp_path, capsys,
                                                                                         monkeypatch):
    """--replay msp on a run without it calibrates on the run's victim data; the run's own calibrated threshold is
    kept for its own settings, and calibrated again once --param changes them (it was kept, silently, before)."""
    import shutil

    from sim import config

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = config.load("single_knockoff", ["victim.epochs=1", f"cache_dir={tmp_path / 'cache'}"])
    (run / "config.yaml").write_text(config.to_yaml(cfg))
    assert cli([str(run), "--replay", "msp"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"replay_msp: threshold \S+, calibrated as the run calibrates: for target_fpr=0.05 on the "
                     r"benign images of the victim's calibration split", out), out
    replay_mod = __import__("importlib").import_module("analysis.replay")  # (analysis.replay is the function)
    monkeypatch.setattr(replay_mod, "run_settings", lambda *a: ("msp", {"threshold": 0.9, "target_fpr": 0.05}))
    assert cli([str(run), "--replay", "msp", "--name", "own"]) == 0  # the run's threshold, for the run's settings
    out = capsys.readouterr().out
    assert "calibrated" not in out and "threshold=0.9" in out
    assert cli([str(run), "--replay", "msp", "--param", "target_fpr=0.3", "--name", "fpr"]) == 0
    assert "calibrated as the run calibrates: for target_fpr=0.3" in capsys.readouterr().out
    assert cli([str(run), "--replay", "msp", "--param", "threshold=0.5", "--name", "given"]) == 0
    assert "calibrated" not in capsys.readouterr().out


def test_replay_needs_logged_images_for_image_detectors(run_dir, tmp_path):
    table = analysis.read_run(run_dir)
    no_inputs = table.set_column(table.schema.get_field_index("input"), "input",
                                 __import__("pyarrow").nulls(table.num_rows, __import__("pyarrow").binary()))
    with pytest.raises(Exception, match="replay of prada needs the query images"):
        analysis.replay(no_inputs, "prada")
    msp = analysis.replay(no_inputs, "msp", {"threshold": 0.5})  # the softmax baseline reads the logged probabilities
    rows = analysis.scored_rows(table)
    np.testing.assert_allclose(msp["scores"], rows.column("msp_score").to_numpy(zero_copy_only=False), atol=1e-6)
    with pytest.raises(Exception, match="group='ip' is not a grouping"):
        analysis.replay(table, "prada", group="ip")


def test_queries_a_limit_refused_are_neither_scored_nor_replayed_nor_counted_as_queries(tmp_path, monkeypatch):
    """A run's clients wait out a refusal over the rate and send the same query again: the refused attempt is
    logged, but no detector saw it, so replay (in arrival order and in the detector's own), the detection metrics
    and the report's query counts leave it out."""
    from types import SimpleNamespace

    from sim import tier
    from sim.limits import Limits

    clock = [1000.0]  # the limits' clock moves only when a client waits (real time made refusals a matter of speed)
    monkeypatch.setattr(tier, "time", SimpleNamespace(time=lambda: clock[0]))
    ds = data.load("mnist5k")
    accounts = {"k-a": Account("solo-0000", "attacker", "jbda"), "k-b": Account("benign-0", "benign")}
    writer = querylog.QueryLogWriter(str(tmp_path / "queries"), ds.input_shape, "w0", detectors=["prada"])
    svc = VictimService(model=models.build("lenet", ds.input_shape, 10), victim="v", run_id="r", accounts=accounts,
                        input_shape=ds.input_shape, detectors={"prada": detectors.build("prada", min_pool=5)},
                        writer=writer, limits=Limits(rate=40.0, burst=10))
    attempts = 0
    for r, x in enumerate(_jbda_like(ds.x_test[:10], rounds=8)):
        for key, images in (("k-a", x), ("k-b", ds.x_test[100 + 10 * r:110 + 10 * r])):
            while (reply := svc.query(key, images, key)).status == 429:
                assert reply.retry_after == pytest.approx(0.25)  # 10 tokens at 40 per second
                attempts += 1
                clock[0] += reply.retry_after
    writer.close()
    querylog.compact(str(tmp_path / "queries"))
    table = analysis.read_run(str(tmp_path))
    # each round spends both buckets; the attacker, first in rounds 2 to 8, waits for its refill, which refills the
    # benign user's bucket too
    assert attempts == 7 and table.num_rows == 160 + 10 * attempts
    rows = analysis.scored_rows(table)
    assert rows.num_rows == 160 and rows.column("refusal_reason").null_count == 160
    online = rows.column("prada_flagged").to_numpy(zero_copy_only=False)
    for order in (None, "prada"):
        again = analysis.replay(table, "prada", {"min_pool": 5}, order=order)
        assert np.array_equal(again["flags"], online) and again["gaps"] == {}
    # a request the tier scored and no row records (a Serve replica killed before writing it): the replay names the
    # account and the first position its log lacks
    import pyarrow.compute as pc

    seq = rows.column("prada_seq").to_numpy(zero_copy_only=False)
    accounts_of = np.asarray(rows.column("account_id").to_pylist())
    lost = rows.column("request_id")[int(np.flatnonzero((accounts_of == "solo-0000") & (seq == 10))[0])]
    gapped = analysis.replay(table.filter(pc.not_equal(table.column("request_id"), lost)), "prada", {"min_pool": 5},
                             order="prada")
    assert gapped["gaps"] == {"solo-0000": 10}
    report = analysis.replication_report(table, None)
    solo = report["attackers"][0]
    assert (solo["queries"], solo["answered"], solo["refused"]) == (80, 80, 0)
    assert solo["rate_limited"] + report["benign"]["rate_limited"] == 10 * attempts
    with pytest.raises(Exception, match="detector prada logged no order"):
        analysis.replay(table.drop_columns(["prada_seq"]).append_column(
            "prada_seq", __import__("pyarrow").nulls(table.num_rows, __import__("pyarrow").int64())), "prada",
            order="prada")


class _LaggingTier:
    """The detection tier as on Ray, in one process: account linking's verdicts reach the shards ``lag`` requests
    after the linker pulled its round, so queries in between are scored with the previous round's verdict."""

    def __init__(self, det, shards=3, lag=4):
        import copy

        from sim import tier
        self.tier, self.lag, self.waiting = tier, lag, None
        self.shards = [tier.Shard({"link": copy.deepcopy(det)}) for _ in range(shards)]
        self.linker = tier.Linker(det)

    def score(self, request_id, items, x, labels, probs):
        out = {}
        for s, own in self.tier.by_owner(items, len(self.shards)).items():
            out.update(self.shards[s].score(request_id, own, x, labels, probs))
        if self.waiting is not None:
            self.waiting[0] -= 1
            if self.waiting[0] == 0:
                for i, shard in enumerate(self.shards):
                    shard.publish("link", self.linker.pulls, {a: v for a, v in self.waiting[1].items()
                                                              if self.tier.owner(a, len(self.shards)) == i})
                self.waiting = None
        elif sum(s.detectors["link"].since for s in self.shards) >= self.linker.linker.values["every"]:
            self.linker.ingest([s.pull("link", self.linker.pulls + 1) for s in self.shards])
            self.waiting = [self.lag, self.linker.verdicts()]
        return out


def test_replaying_linking_round_by_round_reproduces_its_delayed_online_flags(tmp_path):
    from .test_link import _jbda_like as jbda
    params = {"every": 100, "min_queries": 10, "min_pool": 50}
    ds = data.load("mnist5k")
    model = _victim(ds)
    keys = {f"k-s{i}": Account(f"sybil-{i:02d}", "attacker", "jbda") for i in range(15)}
    keys.update({f"k-b{u}": Account(f"benign-{u}", "benign") for u in range(2)})
    writer = querylog.QueryLogWriter(str(tmp_path / "queries"), ds.input_shape, "w0", detectors=["link"])
    det = detectors.build("link", **params)
    svc = VictimService(model=model, victim="v", run_id="r", accounts=keys, input_shape=ds.input_shape,
                        detectors={"link": det}, writer=writer, tier=_LaggingTier(det))
    x, _ = jbda()
    benign = np.random.default_rng(1).permutation(len(ds.x_test))[:300]
    for r, start in enumerate(range(0, len(x), 10)):
        svc.query(f"k-s{r % 15}", x[start:start + 10], "sybils")
        svc.query(f"k-b{r % 2}", ds.x_test[benign[(r * 5) % 300:(r * 5) % 300 + 5]], f"user-{r % 2}")
    writer.close()
    table = querylog.read(str(tmp_path / "queries"))
    rows = analysis.scored_rows(table)
    rounds, as_of = (rows.column(f"link_{c}").to_numpy() for c in ("round", "as_of"))
    assert (as_of < rounds - 1).any() and as_of.max() >= 3  # some queries were scored before their round's verdict
    online = rows.column("link_flagged").to_numpy(zero_copy_only=False)
    again = analysis.replay(table, "link", params, order="link")
    flagged = set(np.asarray(rows.column("account_id").to_pylist())[online])
    assert len(flagged) >= 5 and not {"benign-0", "benign-1"} & flagged, flagged
    assert np.array_equal(again["flags"], online)
    np.testing.assert_array_equal(np.float32(again["scores"]),
                                  rows.column("link_score").to_numpy(zero_copy_only=False))
    # other parameters at the same publication points: a cut so tight no two accounts link flags nothing
    assert not analysis.replay(table, "link", {**params, "distance": 1e-6}, order="link")["flags"].any()
    with pytest.raises(Exception, match="order='nope'"):
        analysis.replay(table, "link", params, order="nope")
    older = table.drop_columns(["link_round", "link_as_of"])  # a log of schema 4 and older: no rounds logged
    with pytest.raises(SimError, match="^order='link': some scored queries have no link_round; expected the run's "
                                       "account-linking detector, logged by this version"):
        analysis.replay(older, "link", params, order="link")


def test_detection_report_per_detector_attack_and_level(run_dir):
    rep = analysis.detection_report(analysis.read_run(run_dir))
    assert set(rep) == {"prada", "cohort", "msp"}
    q = rep["prada"]["query"]["jbda"]
    assert q["positives"] == 240 and q["negatives"] == 240
    # per account, the sybils never get a score (no evidence: lowest); pooled per cohort they do
    assert rep["cohort"]["query"]["jbda"]["auroc"] > q["auroc"]
    acc = rep["cohort"]["account"]["all"]
    assert acc["positives"] == 6 and acc["negatives"] == 2 and acc["auroc"] == 1.0
    f = rep["prada"]["flagged"]
    assert f["attacker_accounts"] == 1 and f["attacker_total"] == 6 and f["benign_total"] == 2
    assert set(analysis.detection_report(analysis.read_run(run_dir), ["msp"])) == {"msp"}
    with pytest.raises(SimError, match=r"^detectors=\['nosuch'\]: the log has no scores of nosuch; expected "
                                       r"detectors of the run \(prada, cohort, msp\)"):
        analysis.detection_report(analysis.read_run(run_dir), ["msp", "nosuch"])  # ({} without a word, before)


def test_cli_writes_a_report_with_figures(run_dir, capsys):
    assert cli([run_dir, "--replay", "prada", "--group", "all", "--param", "delta=0.9"]) == 0
    text = open(os.path.join(run_dir, "report.md")).read()
    assert "## Detection" in text and "| replay_prada | query |" in text and "| cohort | account |" in text
    assert re.search(r"\| replay_prada \| query \| .* \| accounts \d+/6 / \d+/2; queries ", text)  # its flags too
    from analysis.report import _flagged_cell

    f = analysis.detection_report(analysis.read_run(run_dir))["prada"]["flagged"]
    assert "| prada | query |" in text and f"| {_flagged_cell(f)} |" in text
    assert _flagged_cell({"attacker_accounts": 3, "attacker_total": 6, "benign_accounts": 0, "benign_total": 2,
                          "attacker_queries": 30, "attacker_queries_total": 120, "benign_queries": 1,
                          "benign_queries_total": 40}) == "accounts 3/6 / 0/2; queries 25.0% / 2.5%"
    for png in ("roc_prada.png", "roc_replay_prada.png", "scores_prada.png"):
        path = os.path.join(run_dir, "report", png)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"


def test_a_cli_replay_starts_from_the_runs_own_settings(run_dir, tmp_path, capsys):
    """--replay KIND takes the settings of the run's detector of that kind (or --order's), --param and --group over
    them; the settings it used are printed."""
    import shutil

    from sim import config

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = config.load("single_knockoff", ["detectors.prada.min_pool=7", "detectors.cohort.kind=prada",
                                          "detectors.cohort.group=cohort", "detectors.cohort.delta=0.9"])
    (run / "config.yaml").write_text(config.to_yaml(cfg))
    assert cli([str(run), "--replay", "prada"]) == 0
    assert (f"{run}: replaying prada with the settings of the run's detector 'prada': delta=0.95, min_pool=7, "
            f"skip_repeats=False, group=account") in capsys.readouterr().out
    assert cli([str(run), "--replay", "prada", "--order", "cohort", "--param", "delta=0.8", "--name", "c"]) == 0
    assert ("with the settings of the run's detector 'cohort' and --param over them: delta=0.8, min_pool=100, "
            "skip_repeats=False, group=cohort") in capsys.readouterr().out
    # each call's replay is kept: the report shows both, and a plain call (no --replay) keeps them
    assert cli([str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "| replay_prada | query |" in text and "| c | query |" in text
    assert "replay_prada: prada (delta=0.95, min_pool=7, skip_repeats=False, group=account)" in text
    assert "c: prada (delta=0.8, min_pool=100, skip_repeats=False, group=cohort, in the order of cohort)" in text
    assert cli([str(run), "--replay", "prada", "--param", "delta=0.5", "--name", "c"]) == 0  # the same name: replaced
    text = (run / "report.md").read_text()
    assert "c: prada (delta=0.5, " in text and "delta=0.8" not in text and "| replay_prada | query |" in text
    capsys.readouterr()
    assert cli([str(run), "--replay", "prada", "--group", "all", "--param", "group=cohort"]) == 2
    assert capsys.readouterr().err.startswith("error: --group all and --param group=cohort disagree")
    for args, message in ((["--replay", "prada", "--param", "delta=1.5"], "--param delta must be a number in (0, 1], "
                                                                          "got 1.5"),
                          (["--replay", "nosuch"], "--replay='nosuch' is not a known detector"),
                          (["--replay", "prada", "--name", "cohort"], "--name 'cohort' is a detector of the run"),
                          (["--replay", "prada", "--name", "../../x"], "--name '../../x' names a file under "
                                                                       "RUN_DIR/report/replays; expected letters"),
                          (["--replay", "msp", "--group", "cohort"], "--group cohort: msp scores each query alone"),
                          (["--replay", "prada", "--order", "nosuch"], "order='nosuch': the log has no nosuch_seq")):
        assert cli([str(run), *args]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith(f"error: {message}")  # nothing said of a replay that cannot run
    table = analysis.read_run(str(run))
    assert np.array_equal(analysis.replay(table, "prada", {"group": "cohort"})["flags"],
                          analysis.replay(table, "prada", {}, "cohort")["flags"])  # the parameter groups too


def test_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    assert cli([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().endswith("nope' does not exist; expected a run directory "
                                                    "(runs/<scenario>/<time>)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli([str(empty)]) == 2
    assert capsys.readouterr().err.strip().endswith("empty' holds no query log; expected a run directory "
                                                    "(runs/<scenario>/<time>) whose clients sent queries")
    stopped = tmp_path / "stopped"  # a run stopped before its clients sent anything: its summary says where
    stopped.mkdir()
    write_interrupted(str(stopped), "r1", "single_knockoff", "deploying the victim", 0)  # as a run writes it
    assert json.loads((stopped / "summary.json").read_text()) == {
        "version": SUMMARY_VERSION, "interrupted": "deploying the victim", "run_id": "r1",
        "scenario": "single_knockoff", "run_dir": str(stopped), "logged": 0}
    assert cli([str(stopped)]) == 2
    assert capsys.readouterr().err.strip().endswith("stopped' holds no query log (the run was interrupted during "
                                                    "deploying the victim, before any query was logged); expected a "
                                                    "run directory (runs/<scenario>/<time>) whose clients sent queries")
    assert cli([str(empty), "--replay", "prada", "--param", "delta"]) == 2
    assert "must look like KEY=VALUE" in capsys.readouterr().err
    assert cli([str(empty), "--param", "delta=0.9", "--group", "all"]) == 2  # a replay's settings without a replay
    assert capsys.readouterr().err.strip() == ("error: --param, --group are settings of a replay; expected --replay "
                                               "KIND with them")
    assert cli([str(empty), "--group", "account"]) == 2  # the default, named, is a replay's setting all the same
    assert capsys.readouterr().err.strip() == "error: --group is a setting of a replay; expected --replay KIND with it"
    (tmp_path / "afile").write_text("")
    assert cli([str(empty), str(empty), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; expected a directory for the comparison" in capsys.readouterr().err
    assert cli([str(run_dir), str(run_dir), "--out", str(tmp_path / "afile" / "cmp")]) == 2  # cannot be made
    assert capsys.readouterr().err.strip().endswith("cmp' cannot be written ([Errno 20] Not a directory: "
                                                    f"'{tmp_path / 'afile' / 'cmp'}'); expected a directory this user "
                                                    "can write")
    assert cli([str(empty), "--out", str(tmp_path / "cmp")]) == 2  # one run: no comparison to write
    assert capsys.readouterr().err.strip().endswith("1 run is given; expected two or more RUN_DIRs (a run's own "
                                                    "report is written in its directory)")


def test_a_log_without_judgeable_queries_reports_why_instead_of_failing(run_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    table = analysis.read_run(run_dir)
    external = table.set_column(table.schema.get_field_index("role"), "role",
                                pa.array(["external"] * table.num_rows, pa.string()))  # serve mode: no ground truth
    rep = analysis.detection_report(external)
    assert "needs both attacker" in rep["prada"]["query"]["all"]["error"]
    assert rep["prada"]["account"]["all"]["positives"] == 0
    refused_only = table.filter(pc.equal(table.column("account_id"), "nobody"))
    assert "needs both attacker" in analysis.detection_report(refused_only)["prada"]["query"]["all"]["error"]
    (tmp_path / "summary.json").write_text('{"run_id": "x"}')  # not a run summary: the report ignores it
    with pytest.raises(ValueError, match="summary.json: not a run summary: .*expected the summary of a finished run"):
        analysis.read_summary(str(tmp_path))


def test_a_run_without_a_readable_summary_is_reported_from_its_log_alone(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "summary.json").write_text("{bad")  # an interrupted write, a hand edit
    assert cli([str(run)]) == 0
    assert re.search(r"summary.json: Expecting .*; expected the summary of a finished run \(the report comes from the "
                     r"query log alone\)", capsys.readouterr().out)
    assert "(the query log alone: it has no readable summary.json" in (run / "report.md").read_text()


def test_a_serve_mode_log_reports_its_external_clients_their_alerts_and_its_run_id(tmp_path, capsys):
    """Serve mode's log: external accounts only, no summary. The report shows what they sent and got, and the alerts
    count them as external (not as benign)."""
    ds = data.load("mnist5k")
    accounts = {f"k{i}": Account(f"external-{i:03d}", "external") for i in range(3)}
    writer = querylog.QueryLogWriter(str(tmp_path / "queries"), ds.input_shape, "w0", detectors=["prada"])
    svc = VictimService(model=models.build("lenet", ds.input_shape, 10), victim="v", run_id="serve-run-7",
                        accounts=accounts, input_shape=ds.input_shape, writer=writer,
                        detectors={"prada": detectors.build("prada", min_pool=5, delta=0.99)})
    for x in _jbda_like(ds.x_test[:10], rounds=4):
        svc.query("k0", x)
    svc.query("k1", ds.x_test[100:130])
    svc.query_json("k2", b"[1]")
    writer.close()
    querylog.compact(str(tmp_path / "queries"))
    report = analysis.replication_report(analysis.read_run(str(tmp_path)), None)
    assert report["attackers"] == [] and report["benign"] is None
    assert (report["external"]["queries"], report["external"]["answered"], report["external"]["accounts_used"]) == (
        71, 70, 3)  # the malformed request is one refused row
    text = open(analysis.write_report(str(tmp_path))).read()
    assert "Run `serve-run-7` in" in text and "| external | – | 71 | 70 | 0 | 1 | 3 |" in text
    flagged = re.search(r"\| prada \| detector \| \d+ \| (\d+) \((\d+) external\) \|", text)
    assert flagged and flagged[1] == flagged[2] != "0", text
    assert "this log has no attacker or benign account (serve mode's clients are external)" in text
    (tmp_path / "served.json").write_text("{}")  # what serve mode leaves beside its log: the CLI says what it is
    assert cli([str(tmp_path)]) == 0
    assert f"{tmp_path}: a serve-mode run, which writes no summary (the report comes from the query log alone)" in (
        capsys.readouterr().out)


def test_cli_param_values_that_are_not_yaml_are_one_line_errors(run_dir, capsys):
    assert cli([run_dir, "--replay", "prada", "--param", "delta=[1"]) == 2
    assert capsys.readouterr().err.startswith("error: --param 'delta=[1': '[1' is not a value")
    with pytest.raises(SystemExit) as info:  # argparse's own mistakes too: one line, not the usage first
        cli([run_dir, "--bogus"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --bogus (see python -m analysis --help)\n"


def test_a_replay_gets_the_models_its_detector_needs_or_says_why_not(run_dir, tmp_path):
    """PRADA needs no models, so a log without its run's config replays; SAME needs the run's own, which
    only a run directory written by python -m sim can say how to make, and only for a log with the images they
    score (refused before any training)."""
    import shutil

    from analysis.replay import prepare
    from sim import config
    from sim.errors import SimError

    assert prepare(run_dir, "prada", {"delta": 0.9}) is None
    with pytest.raises(SimError, match="the run has no config.yaml, so the models this replay needs cannot be made"):
        prepare(run_dir, "same")
    run, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(run_dir, run)
    cfg = config.load("same_detection", ["log.inputs=false", f"cache_dir={cache}"])
    (run / "config.yaml").write_text(config.to_yaml(cfg))
    with pytest.raises(SimError, match="replay of same needs the query images, but this run's log has none"):
        prepare(str(run), "same")
    assert not cache.exists()  # nothing trained


def test_perturbation_targets_on_hand_worked_answers():
    from analysis.replication import perturbation_targets

    clean = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]]
    returned = [[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3]]
    t = perturbation_targets(clean, returned)
    # the third answer is unchanged; the others all gained most on class 2, whatever their label
    assert (t["answers"], t["changed"], t["top_target"], t["shares"]) == (4, 3, 2, [0.0, 0.0, 1.0])
    assert t["target_entropy_bits"] == 0 and t["label_information_bits"] == pytest.approx(0)
    assert t["toward_least_likely"] == pytest.approx(2 / 3)  # the second answer's least likely class is 0 (a tie)
    # targets that follow the label: one bit of a one-bit entropy
    t = perturbation_targets([[0.9, 0.1], [0.1, 0.9]] * 2, [[0.5, 0.5], [0.5, 0.5]] * 2)
    assert t["target_entropy_bits"] == pytest.approx(1) and t["label_information_bits"] == pytest.approx(1)
    assert t["toward_least_likely"] == 1
    assert perturbation_targets(clean, clean)["changed"] == 0
    assert perturbation_targets(clean, clean)["top_target"] is None
    with pytest.raises(ValueError, match="must both be"):
        perturbation_targets(clean, returned[:2])


def test_the_report_says_where_a_defense_moved_each_clients_answers(tmp_path):
    """MAD's identity ablation sends every answer to its least likely class; no defense moves nothing."""
    from sim import defenses

    ds = data.load("mnist5k")
    model = models.build("lenet", ds.input_shape, 10)
    accounts = {"k-a": Account("knock-0000", "attacker", "knockoff", "c0"), "k-b": Account("benign-0", "benign")}
    for name, defense in (("mad", defenses.build("mad", victim=model, eps=0.5, objective="identity")),
                          ("none", None)):
        root = tmp_path / name
        writer = querylog.QueryLogWriter(str(root / "queries"), ds.input_shape, "w0")
        svc = VictimService(model=model, victim="v", run_id="r", accounts=accounts, input_shape=ds.input_shape,
                            defense=defense, writer=writer)
        svc.query("k-a", ds.x_test[:40], "actor-a")
        svc.query("k-b", ds.x_test[40:50], "actor-b")
        writer.close()
        rep = analysis.replication_report(analysis.read_run(str(root)), None)
        (attacker,), benign = rep["attackers"], rep["benign"]
        assert attacker["targets"]["answers"] == 40 and benign["targets"]["answers"] == 10
        clean = np.array(analysis.read_run(str(root), ["clean_probs"]).column("clean_probs").to_pylist())
        assert attacker["clean_top1_mean"] == pytest.approx(clean[:40].max(1).mean())  # the attacker's 40 first
        assert cli([str(root)]) == 0
        text = open(root / "report.md").read()
        if defense is None:
            assert attacker["targets"]["changed"] == 0 and benign["targets"]["changed"] == 0
            assert "Where the defense moved" not in text
        else:
            assert attacker["targets"]["changed"] == 40 and attacker["targets"]["toward_least_likely"] == 1
            assert "## Where the defense moved the answers" in text and "| knock | 40 of 40 |" in text


def test_a_log_without_its_summary_keeps_attackers_of_one_attack_apart(run_dir):
    """An interrupted run's report: the single JBDA account and the five JBDA sybils are two attackers (their accounts
    are named after them), not one row for the attack."""
    from analysis.replication import replication_report

    rows = replication_report(analysis.read_run(run_dir), None)["attackers"]
    assert [(r["id"], r["attack"], r["accounts_used"], r["queries"]) for r in rows] == [
        ("solo", "jbda", 1, 120), ("sybil", "jbda", 5, 120)]


def test_an_attacker_whose_id_is_anothers_prefix_is_counted_apart(tmp_path):
    """Attackers kn (one account, kn-0000) and kn-2 (kn-2-0000 …): the report counts each its own queries and
    accounts; matching accounts by the prefix 'kn-' gave kn every query of kn-2 as well."""
    from types import SimpleNamespace

    from analysis.replication import replication_report

    model = models.build("lenet", (1, 28, 28), 10)
    accounts = {"k0": Account("kn-0000", "attacker", "knockoff", "kn-c0")}
    accounts.update({f"k2{i}": Account(f"kn-2-{i:04d}", "attacker", "knockoff", "kn-2-c0") for i in range(4)})
    writer = querylog.QueryLogWriter(str(tmp_path / "queries"), (1, 28, 28), "w0", detectors=[])
    svc = VictimService(model=model, victim="v", run_id="r", accounts=accounts, input_shape=(1, 28, 28),
                        detectors={}, writer=writer)
    images = np.zeros((5, 1, 28, 28), np.uint8)
    svc.query("k0", images, "kn-actor0")
    for i in range(4):
        svc.query(f"k2{i}", images, "kn-2-actor0")
    writer.close()
    querylog.compact(str(tmp_path / "queries"))
    attacker = lambda aid: SimpleNamespace(id=aid, attack="knockoff", accounts_flagged=0, accounts_burned=0,  # noqa
                                           replica=None, undefended=None)
    summary = SimpleNamespace(attackers=[attacker("kn"), attacker("kn-2")],
                              victim=SimpleNamespace(test_accuracy=0.9, defended_test_accuracy=0.9),
                              defense=SimpleNamespace(name="identity", test_l1_mean=0.0, test_top1_preserved_rate=1.0))
    for given in (summary, None):  # read with the run's summary, and from the log alone
        rows = replication_report(analysis.read_run(str(tmp_path)), given)["attackers"]
        assert [(r["id"], r["accounts_used"], r["queries"]) for r in rows] == [("kn", 1, 5), ("kn-2", 4, 20)]


def test_arrival_order_keeps_each_writers_sequence_through_a_clock_step_back():
    """Two Serve replicas' rows: writer a's clock steps back at its third row (30 s, then 20 s). Its rows keep their
    sequence, and b's interleave by time: a0 (10), b0 (15), b1 (25), a1 (30), a2 (stepped back, after a1)."""
    import pyarrow as pa

    from analysis.replay import arrival_order

    rows = pa.table({"timestamp": pa.array([30, 15, 10, 25, 20], pa.int64()).cast(pa.timestamp("s")),
                     "writer": ["a", "b", "a", "b", "a"], "seq": [1, 0, 0, 1, 2]})
    named = [f"{w}{q}" for w, q in zip(rows.column("writer").to_pylist(), rows.column("seq").to_pylist())]
    assert [named[i] for i in arrival_order(rows)] == ["a0", "b0", "b1", "a1", "a2"]


def test_a_replay_keeps_a_stateful_detectors_flags_for_good_as_the_tier_does(tmp_path, monkeypatch):
    """The replay holds the keys flagged so far, as a shard does: a detector that forgets its flag (it flags a key's
    10th query only) still leaves the key flagged for the rest of its queries, and another key unflagged."""
    import sys

    from .test_tier import _Forgetful

    replay_module = sys.modules["analysis.replay"]  # (the package's name ``replay`` is the function)
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w")
    probs = np.full((8, 10), 0.1, np.float32)
    for r, account in enumerate(["a", "a", "a", "b"]):
        writer.write(run_id="r", victim="v", request_id=f"req-{r}", account_id=account, actor_id="c", role="attacker",
                     attack="x", actions=["answered"] * 8, refusal_reason=[None] * 8, latency_ms=1.0,
                     clean_probs=probs, returned_probs=probs, returned_label=probs.argmax(1), input_sha1=["h"] * 8,
                     inputs=np.zeros((8, 1, 28, 28), np.uint8))
    writer.close()
    monkeypatch.setattr(replay_module.detector_registry, "build", lambda kind, **params: _Forgetful())
    done = replay_module.replay(querylog.read(str(tmp_path)), "forgetful")
    assert done["flags"].tolist() == [False] * 9 + [True] * 15 + [False] * 8


def test_the_detection_report_counts_flagged_accounts_by_role_and_scores_a_detector_without_scores_as_chance(run_dir):
    table = analysis.read_run(run_dir)
    rows = analysis.scored_rows(table)
    flagged = {}
    for account, role, hit in zip(*(rows.column(c).to_pylist() for c in ("account_id", "role", "prada_flagged"))):
        flagged.setdefault(role, set())
        if hit:
            flagged[role].add(account)
    report = analysis.detection_report(table, scores={"none": np.full(rows.num_rows, np.nan)})
    counts = report["prada"]["flagged"]
    assert counts["attacker_accounts"] == len(flagged["attacker"]) > 0  # some of each: a count by role is tested
    assert counts["benign_accounts"] == len(flagged["benign"]) > 0
    assert (counts["attacker_total"], counts["benign_total"]) == (6, 2)
    assert report["none"]["query"]["all"]["auroc"] == 0.5  # no scores at all: every query alike


def test_the_reports_cells_are_percentages_in_the_order_they_are_headed_and_stale_replays_are_left_out(tmp_path):
    from analysis.report import _metrics_cell, _pct, kept_replays

    assert _metrics_cell({"auroc": 0.9, "aupr": 0.8, "fpr95": 0.3, "fpr90": 0.2}) == "90.00 / 80.00 / 30.00 / 20.00"
    assert _pct(0.123) == "12.3" and _pct(None) == "–"
    folder = tmp_path / "report" / "replays"
    folder.mkdir(parents=True)
    for name, n in (("fits", 10), ("stale", 3)):  # a replay kept before the log grew
        np.savez(folder / f"{name}.npz", scores=np.zeros(n), flags=np.zeros(n, bool), about="x")
    assert list(kept_replays(str(tmp_path), rows=10)) == ["fits"]


def test_answered_challenges_are_scored_once_and_external_users_are_judged_neither_way(tmp_path):
    """A challenged query's answer after its proof of work is a second row of the same query, not a second query; an
    external user (serve mode) is neither attacker nor benign, so it counts on neither side of a metric."""
    writer = querylog.QueryLogWriter(str(tmp_path), (1, 28, 28), "w", detectors=["msp"])
    probs = np.full((2, 10), 0.1, np.float32)
    for r, (account, role, action, again) in enumerate((("a", "attacker", "challenged", False),
                                                        ("a", "attacker", "answered", True),
                                                        ("a", "attacker", "answered", False),
                                                        ("b", "benign", "answered", False),
                                                        ("e", "external", "answered", False))):
        writer.write(run_id="r", victim="v", request_id=f"req-{r}", account_id=account, actor_id="c", role=role,
                     attack="x" if role == "attacker" else None, actions=[action] * 2, refusal_reason=[None] * 2,
                     latency_ms=1.0, clean_probs=probs, returned_probs=probs, returned_label=probs.argmax(1),
                     input_sha1=["h"] * 2, resubmission=again,
                     detections={"msp": detectors.Detection(np.array([0.9, 0.1 * r]), np.array([True, False]))})
    writer.close()
    table = querylog.read(str(tmp_path))
    assert analysis.scored_rows(table).num_rows == 8  # the resubmission's 2 rows left out
    report = analysis.detection_report(table)["msp"]
    assert report["query"]["all"]["positives"] == 4 and report["query"]["all"]["negatives"] == 2
    assert report["flagged"]["attacker_queries_total"] == 4 and report["flagged"]["benign_total"] == 1


def test_a_sweeps_finished_trial_without_a_log_is_skipped_and_the_others_get_their_reports(run_dir, tmp_path,
                                                                                            capsys):
    """``python -m analysis SWEEP_DIR`` reports every finished trial it can: one whose run directory lost its log
    (or the directory itself) is named and skipped, not the end of the others' reports."""
    import shutil

    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "runs").mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text("name: t\nscenario: single_knockoff\nspace: {mad: {eps: [0.5, 1.0, 2.0]}}\n")
    trials = {tid: {"trial_id": tid, "curve": "mad", "defense": {"name": "mad", "eps": eps}}
              for tid, eps in (("t0", 0.5), ("t1", 1.0), ("t2", 2.0))}
    (sweep_dir / "sweep.json").write_text(json.dumps({"trials": {t: {**info, "status": "done"}
                                                                 for t, info in trials.items()}}))
    for tid, info in trials.items():
        run = sweep_dir / "runs" / tid
        if tid == "t1":
            shutil.copytree(run_dir, run)  # the one trial whose log is there
        else:
            run.mkdir()
        (run / "trial.json").write_text(json.dumps(info))
    shutil.rmtree(sweep_dir / "runs" / "t2")  # its directory deleted since: sweep.json still names it
    assert cli([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{sweep_dir / 'runs' / 't0'}: a finished trial of the sweep, skipped: it holds no query log" in out
    assert f"{sweep_dir / 'runs' / 't2'}: a finished trial of the sweep, skipped: its directory is gone" in out
    report = sweep_dir / "runs" / "t1" / "report.md"
    assert os.path.isfile(report) and f"{report}" in out
    assert cli([str(sweep_dir / "runs" / "t0")]) == 2  # named by itself: still an error
    assert re.search(r"RUN_DIR='.*t0' holds no query log", capsys.readouterr().err)

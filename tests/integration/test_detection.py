"""Detectors and response policies in a real run: Serve, client actors solving proof-of-work puzzles,
the log, the summary and the offline report."""

import os

import numpy as np
import pyarrow.compute as pc

import analysis
import sim


def test_same_msp_and_cross_account_detectors_with_proof_of_work(ray_serve, small_overrides, tmp_path):
    overrides = small_overrides + [
        "attackers.distributed.budget=160", "attackers.distributed.replica.epochs=2",
        "detectors.same.enabled=true", "detectors.same.patch=7", "detectors.same.dim=16",
        "detectors.same.decoder_dim=16", "detectors.same.depth=1", "detectors.same.heads=2",
        "detectors.same.epochs=2", "detectors.same.aux_epochs=1",
        "detectors.msp.enabled=true", "detectors.msp.action=proof_of_work", "detectors.msp.target_fpr=0.2",
        "detectors.msp.pow.bits_min=4", "detectors.msp.pow.bits_max=8",
        "detectors.pooled_prada.enabled=true", "detectors.pooled_prada.group=cohort",
        "detectors.link.enabled=true", "detectors.link.every=100",
    ]
    s = sim.run("distributed_knockoff", overrides, quiet=True)
    run_dir = str(tmp_path / "run")
    assert set(s.detection) == {"prada", "pooled_prada", "same", "msp", "link"}
    msp = s.detection["msp"]
    assert msp.action == "proof_of_work" and msp.calibration["target_fpr"] == 0.2 and not msp.stateful
    assert msp.threshold == msp.calibration["threshold"]
    assert s.detection["link"].stateful and s.detection["pooled_prada"].kind == "prada"
    q = s.queries
    assert q.challenged > 0 and q.refused == 0
    # every challenged query was solved and answered in a resubmission: the clients got all they asked for
    assert q.answered == q.total and q.logged == q.total + q.challenged  # challenge + answer rows
    paid = [a.pow for a in s.attackers] + [s.benign.pow]
    assert sum(p.queries for p in paid) == q.challenged and sum(p.seconds for p in paid) > 0
    assert all(4 <= p.max_bits for p in paid if p.puzzles)
    assert all(a.queries == 160 and a.replica is not None for a in s.attackers)

    table = analysis.read_run(run_dir)
    challenged = table.filter(pc.equal(table.column("action"), "challenged"))
    assert challenged.column("returned_probs").null_count == challenged.num_rows  # never answered before the proof
    assert pc.min(challenged.column("pow_bits")).as_py() >= 4
    resub = table.filter(table.column("resubmission"))
    assert resub.num_rows == challenged.num_rows and set(resub.column("action").to_pylist()) == {"answered"}
    assert sorted(resub.column("input_sha1").to_pylist()) == sorted(challenged.column("input_sha1").to_pylist())
    for name in ("same", "msp", "link", "pooled_prada"):
        assert f"{name}_score" in table.column_names
    assert np.isfinite(table.column("same_score").to_numpy(zero_copy_only=False)[~resub_mask(table)]).all()

    # replaying PRADA over the logged stream gives the online flags back, query by query
    again = analysis.replay(table, "prada", s.detection["prada"].params)  # the run's own settings
    online = analysis.scored_rows(table).column("prada_flagged").to_numpy(zero_copy_only=False)
    assert np.array_equal(again["flags"], online)

    # the summary's detection quality is the offline analysis's
    rep = analysis.detection_report(table)
    assert s.detection["msp"].query_level.auroc == round(rep["msp"]["query"]["all"]["auroc"], 4)
    assert analysis.write_report(run_dir).endswith("report.md")
    assert os.path.exists(os.path.join(run_dir, "report", "roc_same.png"))


def resub_mask(table):
    return np.asarray(table.column("resubmission").to_pylist(), bool)

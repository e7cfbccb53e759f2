"""Rollback: ``vitrail rollback`` moves champion back on the reference and edge models together, tags the move, and
the restored champion predicts exactly what it predicted when it was champion; with approval it waits for a
reviewer on the Prefect server (the test harness's) like a promotion does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from registry_support import (
    EDGE,
    REFERENCE,
    FlowThread,
    alias_version,
    log_candidate,
    registry_store,
    version_tags,
    wait_for_paused_run,
)

import tasks.approval
from flows.cli import main
from flows.promote import PromoteParams, promote
from flows.rollback import RollbackParams, rollback

TILES = np.random.default_rng(7).normal(size=(4, 3, 8, 8)).astype(np.float32)


def _champion_logits() -> dict[str, np.ndarray]:
    from tasks.prediction import load_model

    return {name: load_model(f"models:/{name}@champion").predict_logits(TILES) for name in (REFERENCE, EDGE)}


def test_rollback_restores_the_previous_champion_pair_and_its_predictions(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "work"
    with registry_store(workdir):
        first = log_candidate(workdir, "first", edge_metric=0.85, scale=2.0)
        assert promote(PromoteParams(**first.promote_params(workdir))).alias == "champion"
        recorded = _champion_logits()  # what version 1 predicted while it was champion
        second = log_candidate(workdir, "second", edge_metric=0.90, scale=3.0)
        assert promote(PromoteParams(**second.promote_params(workdir))).alias == "champion"
        replaced = _champion_logits()
        assert not np.allclose(replaced[EDGE], recorded[EDGE])  # the two champions really differ

        code = main(["rollback", "--model", EDGE, "--reason", "false alarms on cloud edges", "--by", "ops",
                     "--workdir", str(workdir)])
        assert code == 0, capsys.readouterr()
        assert (alias_version(REFERENCE, "champion"), alias_version(EDGE, "champion")) == ("1", "1")
        restored = _champion_logits()
        for name in (REFERENCE, EDGE):
            np.testing.assert_array_equal(restored[name], recorded[name])
            tags = version_tags(name, "1")
            assert tags["vitrail.rollback.replaced_version"] == "2" and tags["vitrail.rollback.by"] == "ops"
            assert tags["vitrail.rollback.reason"] == "false alarms on cloud edges"
            assert tags["vitrail.champion_since"] >= tags["vitrail.rollback.restored_at"]
            assert version_tags(name, "2")["vitrail.rolled_back_to"] == "1"

        # Version 2 was rolled back from: a plain rollback never picks it again, and there is nothing earlier.
        code = main(["rollback", "--model", REFERENCE, "--workdir", str(workdir)])
        assert code == 2
        assert "no earlier champion of satellite-tile-classification is recorded" in capsys.readouterr().err
        code = main(["rollback", "--model", REFERENCE, "--to", "9", "--workdir", str(workdir)])
        assert code == 2 and "has no version 9" in capsys.readouterr().err


def test_rollback_with_approval_waits_for_the_reviewer(tmp_path: Path, monkeypatch) -> None:
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(tasks.approval, "APPROVAL_POLL_S", 1)
    workdir = tmp_path / "work"
    with registry_store(workdir):
        for label, metric, scale in (("first", 0.85, 2.0), ("second", 0.90, 3.0)):
            candidate = log_candidate(workdir, label, edge_metric=metric, scale=scale)
            promote(PromoteParams(**candidate.promote_params(workdir)))
        approval = {"required": True, "timeout_s": 300}

        refused = FlowThread(rollback, (RollbackParams(model=EDGE, to_version="1", workdir=str(workdir),
                                                       approval=approval),))
        paused = wait_for_paused_run("rollback-champion")
        with pytest.raises(RuntimeError, match="Validation failed.*reviewer"):
            resume_flow_run(paused.id, run_input={"approve": True})
        resume_flow_run(paused.id, run_input={"approve": False, "reviewer": "lee", "comment": "2 is fine"})
        receipt = refused.join()
        assert (receipt.rolled_back, receipt.approval, receipt.edge_model) == (False, "refused", f"{EDGE}/2")
        assert alias_version(EDGE, "champion") == "2" and alias_version(REFERENCE, "champion") == "2"
        assert version_tags(EDGE, "1")["vitrail.rollback_approval.status"] == "refused"

        approved = FlowThread(rollback, (RollbackParams(model=EDGE, workdir=str(workdir), approval=approval),))
        paused = wait_for_paused_run("rollback-champion")
        resume_flow_run(paused.id, run_input={"approve": True, "reviewer": "lee", "comment": "drift on site C"})
        receipt = approved.join()
        assert (receipt.rolled_back, receipt.approval, receipt.previous) == (True, "approved", "2 + 2")
        assert alias_version(EDGE, "champion") == "1" and alias_version(REFERENCE, "champion") == "1"
        tags = version_tags(REFERENCE, "1")
        assert (tags["vitrail.rollback_approval.reviewer"], tags["vitrail.rollback.by"]) == ("lee", "lee")

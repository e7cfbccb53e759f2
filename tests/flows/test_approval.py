"""Human approval of a promotion: the real promote flow pauses on a Prefect server (the test harness's server
process) with a typed form; the test answers it with ``resume_flow_run`` as the UI would.

The promote flow runs in a background thread, since a paused flow blocks its caller.
"""

from __future__ import annotations

from pathlib import Path

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
from flows.promote import PromoteParams, promote
from tasks.approval import ApprovalTimeout


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch):
    monkeypatch.setattr(tasks.approval, "APPROVAL_POLL_S", 1)


def _start(workdir: Path, approval: dict) -> FlowThread:
    candidate = log_candidate(workdir, "first", edge_metric=0.9, scale=2.0)
    return FlowThread(promote, (PromoteParams(**candidate.promote_params(workdir, approval=approval)),))


def _read_form(run) -> tuple[str, dict]:
    """(report shown above the form, the form's JSON schema) of a paused run, as the UI reads them."""
    import json

    from prefect import get_client

    keyset = run.state.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        description = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
        schema = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
    return description, schema


def test_approved_promotion_sets_the_reviewers_alias_after_invalid_answers_are_rejected(tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.flow_runs import resume_flow_run

    workdir = tmp_path / "work"
    with registry_store(workdir):
        running = _start(workdir, {"required": True, "timeout_s": 300})
        paused = wait_for_paused_run("promote-model")
        # Registered with the gate's verdict, but no alias moves before the reviewer answers.
        assert alias_version(EDGE, "champion") is None and alias_version(REFERENCE, "champion") is None
        assert version_tags(EDGE, "1")["vitrail.gate"] == "passed"

        report, schema = _read_form(paused)
        assert f"`{EDGE}` version 1 as **champion**" in report and "edge macro_f1 0.9000 >= minimum" in report
        assert schema["properties"]["alias"]["default"] == "champion"  # the gate's suggestion, preselected
        assert set(schema["required"]) >= {"reviewer"}
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts()
        assert any(a.key == "approval-request" and a.data == report for a in artifacts)

        # The server validates answers against the form's schema; a rejected answer leaves the run paused.
        for bad, field in (({"approve": True, "alias": "king", "reviewer": "ana"}, "alias"),
                           ({"approve": True, "alias": "champion", "reviewer": ""}, "reviewer"),
                           ({"approve": True, "alias": "champion"}, "reviewer")):
            with pytest.raises(RuntimeError, match=f"Validation failed.*{field}"):
                resume_flow_run(paused.id, run_input=bad)
            with get_client(sync_client=True) as client:
                assert client.read_flow_run(paused.id).state.is_paused()
        assert alias_version(EDGE, "champion") is None

        resume_flow_run(paused.id, run_input={"approve": True, "alias": "challenger", "reviewer": "ana@lab.org",
                                              "comment": "shadow it for a week first"})
        receipt = running.join()

    assert receipt.approval == "approved" and receipt.alias == "challenger"
    with registry_store(workdir):
        assert (alias_version(REFERENCE, "challenger"), alias_version(EDGE, "challenger")) == ("1", "1")
        assert alias_version(EDGE, "champion") is None
        for name in (REFERENCE, EDGE):
            tags = version_tags(name, "1")
            assert tags["vitrail.approval.status"] == "approved"
            assert tags["vitrail.approval.reviewer"] == "ana@lab.org"
            assert tags["vitrail.approval.comment"] == "shadow it for a week first"
            assert tags["vitrail.approval.alias"] == "challenger"
            assert tags["vitrail.approval.at"].endswith("+00:00")


def test_refused_promotion_moves_no_alias_and_records_the_refusal(tmp_path: Path) -> None:
    from prefect.flow_runs import resume_flow_run

    workdir = tmp_path / "work"
    with registry_store(workdir):
        running = _start(workdir, {"required": True, "timeout_s": 300})
        paused = wait_for_paused_run("promote-model")
        resume_flow_run(paused.id, run_input={"approve": False, "alias": "champion", "reviewer": "bo",
                                              "comment": "labels of site B are being redone"})
        receipt = running.join()
        assert receipt.approval == "refused" and receipt.alias is None and receipt.passed
        assert alias_version(EDGE, "champion") is None and alias_version(REFERENCE, "champion") is None
        tags = version_tags(EDGE, "1")
        assert (tags["vitrail.approval.status"], tags["vitrail.approval.reviewer"]) == ("refused", "bo")
        assert "vitrail.approval.alias" not in tags


def test_unanswered_approval_times_out_with_aliases_unchanged(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    with registry_store(workdir):
        running = _start(workdir, {"required": True, "timeout_s": 2, "on_timeout": "fail"})
        with pytest.raises(ApprovalTimeout, match="no reviewer answered within 2 s; aliases left unchanged"):
            running.join()
        assert alias_version(EDGE, "champion") is None and alias_version(REFERENCE, "champion") is None
        assert version_tags(REFERENCE, "1")["vitrail.approval.status"] == "timed-out"
        assert version_tags(EDGE, "1")["vitrail.approval.status"] == "timed-out"

        # Without approval required the same flow moves the alias at once (no pause).
        second = log_candidate(workdir, "second", edge_metric=0.9, scale=3.0)
        receipt = promote(PromoteParams(**second.promote_params(workdir)))
        assert (receipt.approval, receipt.alias) == ("not-required", "champion")
        assert alias_version(EDGE, "champion") == "2"
        assert "vitrail.approval.status" not in version_tags(EDGE, "2")

"""``vitrail lineage``: the chain of a version promoted through the real promote flow (with a reviewer's approval on
the harness's Prefect server), read back from the registry and its runs, as JSON and as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_support import (
    EDGE,
    REFERENCE,
    FlowThread,
    log_candidate,
    registry_store,
    wait_for_paused_run,
)

import tasks.approval
from flows.cli import main
from flows.promote import PromoteParams, promote
from tasks.tracking import git_commit


def test_lineage_of_an_approved_champion(tmp_path: Path, capsys, monkeypatch) -> None:
    from prefect import get_client
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(tasks.approval, "APPROVAL_POLL_S", 1)
    workdir = tmp_path / "work"
    with registry_store(workdir):
        candidate = log_candidate(workdir, "first", edge_metric=0.9, scale=2.0)
        running = FlowThread(promote, (PromoteParams(**candidate.promote_params(
            workdir, approval={"required": True, "timeout_s": 300})),))
        paused = wait_for_paused_run("promote-model")
        resume_flow_run(paused.id, run_input={"approve": True, "alias": "champion", "reviewer": "ana",
                                              "comment": "ok"})
        running.join()

    assert main(["lineage", f"models:/{EDGE}@champion", "--json", "--workdir", str(workdir)]) == 0
    lineage = json.loads(capsys.readouterr().out)
    assert lineage["model"]["uri"] == f"models:/{EDGE}/1" and lineage["model"]["aliases"] == ["champion"]
    assert lineage["model"]["twin"] == {"name": REFERENCE, "version": "1"}
    [dataset] = lineage["datasets"]
    assert dataset["digest"] == "d" * 64 and dataset["task"] == "classification"
    assert dataset["sources"] == ["/data/satellite/scenes/S2A_T31UFU_20240612", "/data/satellite/labels/t31ufu.tif"]
    assert dataset["locations"] == [str((workdir / "dataset").resolve())]
    assert lineage["code"] == [git_commit()]
    stages = {run["stage"]: run for run in lineage["runs"]}
    assert set(stages) == {"finetune", "compress", "validate", "promote"}
    assert stages["promote"]["prefect_flow_run"] == {"id": str(paused.id), "name": paused.name}
    with get_client(sync_client=True) as client:  # the recorded id is a real Prefect flow run
        assert client.read_flow_run(paused.id).name == paused.name
    assert lineage["parent"]["finetune_model"] == candidate.reference_uri
    assert lineage["foundation_backbone"]["name"] == "vit_tiny_patch16_224"
    assert lineage["foundation_backbone"]["weights_file"] == "/weights/ssl4eo.pth"
    assert lineage["adapter"] == {"method": "lora", "rank": "8"}
    assert lineage["parameters"]["train.epochs"] == "3"
    assert lineage["compression"] == {"edge_variant": "onnx-int8", "recipe": {"edge_variant": "auto", "threads": "2"}}
    assert lineage["gate"]["result"] == "passed" and lineage["gate"]["alias_granted"] == "champion"
    assert any(reason.startswith("edge macro_f1 0.9000 >= minimum") for reason in lineage["gate"]["reasons"])
    assert lineage["gate"]["metrics"]["vitrail.edge_macro_f1"] == "0.900000"
    approvals = lineage["approvals"]
    assert (approvals["vitrail.approval.status"], approvals["vitrail.approval.reviewer"]) == ("approved", "ana")
    assert "vitrail.champion_since" in approvals and lineage["missing"] == []

    assert main(["lineage", f"models:/{REFERENCE}/1", "--workdir", str(workdir)]) == 0
    text = capsys.readouterr().out
    for expected in (f"models:/{REFERENCE}/1  @ champion", "digest     " + "d" * 64, "S2A_T31UFU_20240612",
                     f"code         {git_commit()}", "promote", "backbone     vit_tiny_patch16_224  weights file",
                     "gate         passed -> champion", "vitrail.approval.reviewer = ana"):
        assert expected in text, f"{expected!r} not in:\n{text}"


@pytest.mark.parametrize("uri, message", [("runs:/abc/model", "needs a registered model URI"),
                                          ("models:/x/latest", "a version number"),
                                          (f"models:/{EDGE}@champion", "no version of")])
def test_lineage_refuses_what_it_cannot_trace(tmp_path: Path, capsys, uri: str, message: str) -> None:
    assert main(["lineage", uri, "--workdir", str(tmp_path / "empty")]) == 2
    assert message in capsys.readouterr().err

"""The radiology pretrain and probe deployments of deploy/prefect.yaml, run by a process worker on a real Prefect
server: `pretrain-backbone/radiology-mae-smoke` registers an encoder, then `probe-backbone/radiology-foundation-probe`
scores it. Radiology is the non-satellite case with its own mask ratio (0.9) and a multilabel probe target.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml
from integration_support import REPO_ROOT, PrefectServer

RUN_WAIT_S = 300
QUEUE = "foundation-test"
FAST_PROBE = {"bootstrap": 100, "shots": [1], "few_shot_draws": 1, "label_fractions": [0.5, 1.0], "threads": 1}


def _parameters(name: str, dataset: Path, workdir: Path) -> dict:
    [deployment] = [d for d in yaml.safe_load((REPO_ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
                    if d["name"] == name]
    params = {**deployment["parameters"]["params"], "dataset": str(dataset), "workdir": str(workdir)}
    if "mae" in params:  # the smoke preset shrunk to the test's dataset
        params["mae"] = {**params["mae"], "max_tiles": 64}
        params["train"] = {**params["train"], "batch_size": 16, "threads": 1}
        params["probe_gate"] = {"settings": {**FAST_PROBE, "knn_k": [5]}}
    else:
        params["settings"] = {**params["settings"], **FAST_PROBE}
    return {"params": params}


def _run_through_worker(server: PrefectServer, client, deployment_id, parameters: dict, cwd: Path):
    from prefect.client.schemas.objects import StateType

    flow_run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters, work_queue_name=QUEUE)
    worker = server.cli("worker", "start", "--pool", "vitrail-cpu", "--work-queue", QUEUE, "--type", "process",
                        "--run-once", cwd=cwd, timeout=RUN_WAIT_S, check=False)
    finished = client.read_flow_run(flow_run.id)
    assert finished.state is not None and finished.state.type == StateType.COMPLETED, (
        f"flow run ended {finished.state}; worker output:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}")
    return finished


@pytest.mark.integration
@pytest.mark.slow
def test_radiology_pretrain_then_probe_deployments_complete_through_a_worker(prefect_api: PrefectServer,
                                                                              tmp_path: Path) -> None:
    from prefect import get_client

    from domains import get_domain
    from flows.ingest import IngestParams, ingest_dataset

    server = prefect_api
    started = time.monotonic()
    # The demo's phantoms: 80 patients give both outcomes of "any finding" to train and test.
    example = get_domain("radiology").prepare_demo(tmp_path / "example")
    dataset, workdir = tmp_path / "dataset", tmp_path / "work"
    ingest_dataset(IngestParams(domain="radiology", source=str(example["source"]), labels=str(example["labels"]),
                                out=str(dataset), tiling={"tile_size": 8, "stride": 8}))
    server.cli("work-pool", "create", "vitrail-cpu", "--type", "process", check=False)  # another test may have made it
    server.cli("deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "radiology-mae-smoke",
               "--name", "radiology-foundation-probe", extra_env={"VITRAIL_HOME": str(REPO_ROOT)})
    with get_client(sync_client=True) as client:
        client.create_work_queue(name=QUEUE, work_pool_name="vitrail-cpu")
        pretrain = client.read_deployment_by_name("pretrain-backbone/radiology-mae-smoke")
        probe = client.read_deployment_by_name("probe-backbone/radiology-foundation-probe")
        _run_through_worker(server, client, pretrain.id,
                            _parameters("radiology-mae-smoke", dataset, workdir), tmp_path)
        _run_through_worker(server, client, probe.id,
                            _parameters("radiology-foundation-probe", dataset, workdir), tmp_path)

    [description] = (workdir / "encoders").glob("radiology-*/encoder.json")
    assert json.loads(description.read_text())["mask_ratio"] == 0.9
    [table] = (workdir / "probes").glob("radiology-*/probe-table.csv")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["backbone"] for r in rows} == {"foundation", "random-init", "random-conv", "channel-stats"}
    assert {r["target"] for r in rows} == {"any finding"}
    print(f"\ntimings: ingest, deploy and both worker runs {time.monotonic() - started:.1f} s")

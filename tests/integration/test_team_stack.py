"""The stack a team runs, end to end: the satellite pipeline deployment through a worker, with everything it
records landing in the servers' PostgreSQL databases and the object store, behind authentication.

The stack (tests/integration/team_stack.py) is the one deploy/compose.yaml and the README's "Run it for a team"
describe: Prefect API server + services on PostgreSQL and Redis, a process worker, MLflow with basic auth on
PostgreSQL proxying artifacts to SeaweedFS. Here the deployment is registered with ``prefect deploy`` from
deploy/prefect.yaml and run with the smallest settings the pipeline accepts (one-block ViT on 8 px tiles, one
epoch), so the test measures the stack rather than the training.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from integration_support import REPO_ROOT
from team_stack import (ARTIFACTS_PREFIX, BUCKET, TeamStack, deploy_pipeline, pipeline_parameters,
                        wait_for_flow_run)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_TIMEOUT_S = 600
REFERENCE, EDGE = "satellite-tile-classification", "satellite-tile-classification-edge"
# Where a client-side MLflow store would appear if tracking fell back to files (sqlite + ./mlruns).
LOCAL_STORE_NAMES = ("mlruns", "mlartifacts", "mlflow.db")


def _local_store_stamps() -> dict[str, float]:
    return {name: (REPO_ROOT / name).stat().st_mtime for name in LOCAL_STORE_NAMES if (REPO_ROOT / name).exists()}


def test_pipeline_deployment_runs_on_the_team_stack(team_stack: TeamStack, tmp_path: Path,
                                                    record_property) -> None:
    stack = team_stack
    print(f"\nstack ready after (s, from the start): {stack.startup_s}")
    record_property("stack_startup_s", stack.startup_s["total"])

    # Both servers refuse anonymous and wrongly signed requests; health probes stay open for orchestrators.
    assert httpx.post(f"{stack.prefect_api}/flow_runs/filter", json={}).status_code == 401
    assert httpx.post(f"{stack.prefect_api}/flow_runs/filter", json={}, auth=("vitrail-team", "wrong")
                      ).status_code == 401
    assert httpx.get(f"{stack.prefect_api}/health").status_code == 200
    search = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search"
    assert httpx.post(search, json={"max_results": 1}).status_code == 401
    assert httpx.post(search, json={"max_results": 1}, auth=(stack.mlflow_pipeline[0], "wrong")).status_code == 401
    assert httpx.post(search, json={"max_results": 1}, auth=stack.mlflow_pipeline).status_code == 200

    started = time.monotonic()
    deployment_id = deploy_pipeline(stack)
    deploy_s = time.monotonic() - started
    parameters, workdir = pipeline_parameters(tmp_path)
    stamps = _local_store_stamps()
    # Rows other tests on this stack (the browser test) may have written already; this run's are the others.
    runs_before = {row[0] for row in stack.query("mlflow", "SELECT run_uuid FROM runs")}
    versions_before = set(stack.query("mlflow", "SELECT name, version FROM model_versions"))
    with stack.prefect_http() as client:
        response = client.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    run = wait_for_flow_run(stack, flow_run_id, RUN_TIMEOUT_S)
    run_s = time.monotonic() - started - deploy_s

    # The flow run is a row of the Prefect server's PostgreSQL database, run by the stack's worker.
    [(state, row_deployment, worker_pool)] = stack.query(
        "prefect", "SELECT fr.state_type, fr.deployment_id, wp.name FROM flow_run fr "
                   "JOIN work_queue wq ON wq.id = fr.work_queue_id JOIN work_pool wp ON wp.id = wq.work_pool_id "
                   "WHERE fr.id = %s", (flow_run_id,))
    assert (state, str(row_deployment), worker_pool) == ("COMPLETED", deployment_id, "vitrail-cpu")
    assert run["parameters"]["params"]["train"]["epochs"] == 1
    prefect_runs = {str(row[0]) for row in stack.query("prefect", "SELECT id FROM flow_run")}
    # Task runs reach the database through events: the API server publishes them to Redis and the separate
    # services process records them. Rows here mean the two halves of the server talk to each other.
    [(task_runs,)] = stack.query(
        "prefect", "SELECT count(*) FROM task_run tr JOIN flow_run fr ON fr.id = tr.flow_run_id "
                   "WHERE fr.id = %s OR fr.parent_task_run_id IN (SELECT id FROM task_run WHERE flow_run_id = %s)",
        (flow_run_id, flow_run_id))
    assert task_runs > 0, f"no task run of the pipeline was recorded:\n{stack.log_tails()}"

    # Every MLflow run of the pipeline is a row of MLflow's PostgreSQL database, tagged with a Prefect flow run of
    # this server (the pipeline's own or one of its stage subflows), and ran as the pipeline's MLflow user.
    runs = stack.query(
        "mlflow", "SELECT r.run_uuid, r.status, r.user_id, stage.value, flow_run.value FROM runs r JOIN experiments e "
                  "ON e.experiment_id = r.experiment_id "
                  "JOIN tags stage ON stage.run_uuid = r.run_uuid AND stage.key = 'vitrail.stage' "
                  "JOIN tags flow_run ON flow_run.run_uuid = r.run_uuid "
                  "AND flow_run.key = 'vitrail.prefect_flow_run_id' "
                  "WHERE e.name = 'satellite'")
    runs = [row[1:] for row in runs if row[0] not in runs_before]
    assert sorted(stage for _, _, stage, _ in runs) == ["compress", "finetune", "promote", "validate"], runs
    assert {(status, user) for status, user, _, _ in runs} == {("FINISHED", stack.mlflow_pipeline[0])}, runs
    assert {tag for _, _, _, tag in runs} <= prefect_runs, "an MLflow run names a flow run the server never saw"
    [(location,)] = stack.query("mlflow", "SELECT artifact_location FROM experiments WHERE name = 'satellite'")
    assert location.startswith("mlflow-artifacts:/"), location  # proxied: clients never write the bucket

    # One new version of each registered model, rows of the registry; the tiny gate passes, so both twins hold
    # champion (or challenger, if a run before this one on the stack holds champion with a score as good).
    versions = [row for row in stack.query("mlflow", "SELECT name, version, status FROM model_versions ORDER BY name")
                if row[:2] not in versions_before]
    assert [(name, status) for name, _, status in versions] == [(REFERENCE, "READY"), (EDGE, "READY")], versions
    aliases = {(name, version): alias for name, alias, version in stack.query(
        "mlflow", "SELECT name, alias, version FROM registered_model_aliases")}
    reference_alias, edge_alias = (aliases.get((name, version)) for name, version, _ in versions)
    assert reference_alias == edge_alias and reference_alias in ("champion", "challenger"), aliases
    [champion] = [version for (name, version), alias in aliases.items() if name == REFERENCE and alias == "champion"]

    # The model files are objects in SeaweedFS under the server's artifact destination.
    keys = stack.s3_keys(f"{ARTIFACTS_PREFIX}/")
    assert any(key.endswith("/MLmodel") for key in keys), keys[:20]
    assert any(key.endswith("model.safetensors") for key in keys), keys[:20]
    assert any(key.endswith(".onnx") for key in keys), keys[:20]
    # ... and the bucket is not open to anyone: a request signed with an unknown key is refused.
    import boto3
    from botocore.exceptions import ClientError

    stranger = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id="stranger",
                            aws_secret_access_key="not-the-key", region_name="us-east-1")
    with pytest.raises(ClientError):
        stranger.list_objects_v2(Bucket=BUCKET)

    # No MLflow file landed on the client side: not in the worker's folder, not in the work folder, not in the
    # checkout the deployment's pull step runs from.
    assert sorted(p.name for p in stack.client_folder.iterdir()) == []
    assert not [p for name in LOCAL_STORE_NAMES for p in workdir.rglob(name)]
    assert not list(workdir.rglob("MLmodel"))
    assert _local_store_stamps() == stamps

    # A reader (READ on the registered model) sees the champion but cannot move it: 403, alias unchanged.
    admin, reader = stack.mlflow_admin, ("reader", "reader-password-1")
    api = f"{stack.mlflow_url}/api"
    assert httpx.post(f"{api}/2.0/mlflow/users/create", auth=admin,
                      json={"username": reader[0], "password": reader[1]}).status_code == 200
    granted = httpx.post(f"{api}/3.0/mlflow/users/permissions/grant", auth=admin,
                         json={"username": reader[0], "resource_type": "registered_model", "resource_id": REFERENCE,
                               "permission": "READ"})
    assert granted.status_code == 200, granted.text
    alias = f"{api}/2.0/mlflow/registered-models/alias"
    seen = httpx.get(alias, params={"name": REFERENCE, "alias": "champion"}, auth=reader)
    assert seen.status_code == 200 and seen.json()["model_version"]["version"] == str(champion), seen.text
    moved = httpx.post(alias, json={"name": REFERENCE, "alias": "test-move", "version": str(champion)}, auth=reader)
    assert moved.status_code == 403, moved.text
    dropped = httpx.delete(alias, params={"name": REFERENCE, "alias": "champion"}, auth=reader)
    assert dropped.status_code == 403, dropped.text
    assert stack.query("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s AND "
                                 "alias IN ('champion', 'test-move')", (REFERENCE,)) == [("champion", champion)]
    print(f"timings: prefect deploy {deploy_s:.1f} s, pipeline run through the worker {run_s:.1f} s")

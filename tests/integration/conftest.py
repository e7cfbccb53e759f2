"""Fixtures of the integration tests: free ports and a real Prefect server shared by the session."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING, Callable, Iterator

import pytest
from integration_support import PrefectServer, find_free_port, running_prefect_server, stop_process_group

if TYPE_CHECKING:
    from team_stack import TeamStack

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture()
def free_port() -> Callable[[], int]:
    """Call it once per port a test needs (127.0.0.1)."""
    return find_free_port


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real ``prefect server start`` with a temporary PREFECT_HOME; stopped (whole process group) at the end."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server


@pytest.fixture()
def prefect_api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """Point this test process's Prefect client at the real server (over any harness another folder set up)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    forget_concurrency_clients()
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server
    forget_concurrency_clients()


def forget_concurrency_clients() -> None:
    """Stop Prefect's cached slot-acquisition services, so the next acquisition opens a client on the current API.

    Prefect keeps one acquisition service per set of limit names for the life of the process, holding the client
    it opened first. Earlier tests in this process promoted the same model against the ephemeral server, so
    without this a lock taken here would be leased there, and the first renewal on the real server would fail
    (410) and cancel the test.
    """
    from prefect.concurrency.services import (
        ConcurrencySlotAcquisitionService,
        ConcurrencySlotAcquisitionWithLeaseService,
    )

    # drain_all() would stop every Prefect queue service (events, logs) too: pick the acquisition services only.
    services = (ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService)
    for instance in list(ConcurrencySlotAcquisitionService._instances.values()):
        if isinstance(instance, services):
            instance.drain()


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator["TeamStack"]:
    """The team's stack (Prefect server + services + worker, MLflow with basic auth, PostgreSQL, Redis, SeaweedFS)
    on 127.0.0.1, shared by the tests that need it; every process stopped and every database dropped at the end."""
    from team_stack import running_team_stack

    with running_team_stack(tmp_path_factory.mktemp("team-stack")) as stack:
        yield stack


@pytest.fixture()
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts (each in its own group); any still running at teardown are stopped, group and all."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        stop_process_group(process, grace_s=5)

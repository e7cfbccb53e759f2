"""Flow tests run against Prefect's test harness (a throwaway server and database)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def local_mlflow(monkeypatch):
    """Force the per-workdir SQLite store even if the caller's shell points at an MLflow server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

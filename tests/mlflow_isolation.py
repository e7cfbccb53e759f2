"""Test helper shared by the flow and integration tests: a per-test MLflow store that leaves no global behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def mlflow_sandbox() -> Iterator["pytest.MonkeyPatch"]:
    """Undo, on exit, every global change MLflow makes when Vitrail points it at a store.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` keep the URI in module globals *and* export it as
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``; both are restored here, so a temporary store never
    leaks into later tests or into the environment of subprocesses. Inside, MLflow starts as in a fresh
    process: no URI chosen, both variables unset.
    """
    import pytest
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            patch.setenv(name, "placeholder")  # records the original value (or its absence) for undo
            patch.delenv(name)
        patch.setattr(tracking_utils, "_tracking_uri", None)
        patch.setattr(registry_utils, "_registry_uri", None)
        yield patch


@contextmanager
def mlflow_store(workdir: Path) -> Iterator[str]:
    """Point this process's MLflow at ``<workdir>/mlflow.db`` inside :func:`mlflow_sandbox`."""
    from tasks import tracking

    with mlflow_sandbox():
        yield tracking.configure_tracking(workdir)

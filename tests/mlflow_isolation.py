"""Test helper shared by the flow and integration tests: a per-test MLflow store that leaves no global behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def mlflow_store(workdir: Path) -> Iterator[str]:
    """Point this process's MLflow at ``<workdir>/mlflow.db`` and undo every global change on exit.

    ``mlflow.set_tracking_uri`` keeps the URI in module globals and exports ``MLFLOW_TRACKING_URI``; both are
    restored, so the store never leaks into later tests or into the environment of subprocesses.
    """
    import pytest
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from tasks import tracking

    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            patch.setenv(name, "placeholder")  # records the original value (or its absence) for undo
            patch.delenv(name)
        patch.setattr(tracking_utils, "_tracking_uri", None)
        patch.setattr(registry_utils, "_registry_uri", None)
        yield tracking.configure_tracking(workdir)

"""Per-epoch progress: a line in the terminal, a progress bar in the Prefect UI, metrics in MLflow."""

from __future__ import annotations

import logging

from tasks import tracking


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("vitrail.training")


class EpochReporter:
    """Callable handed to the training loop; reports each finished epoch everywhere people look."""

    def __init__(self, run_id: str, title: str):
        self.run_id = run_id
        self.title = title
        self._artifact_id = None

    def _update_progress(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(progress=percent, description=self.title)
        else:
            update_progress_artifact(self._artifact_id, progress=percent)

    def __call__(self, epoch: int, total: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(metrics, step=epoch, run_id=self.run_id)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "learning_rate")
        _run_logger().info("%s epoch %d/%d  %s", self.title, epoch, total, shown)
        self._update_progress(100.0 * epoch / total)

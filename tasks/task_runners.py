"""Where a flow's mapped tasks run: Prefect's thread pool on this machine, or a Dask cluster (prefect-dask)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class TaskRunnerParams(BaseModel):
    """Where the per-source work of a flow runs."""

    kind: Literal["local", "dask"] = Field("local", description="local: threads of this process; dask: a Dask "
                                                                "cluster (prefect-dask), for many or large sources")
    address: str = Field("", max_length=300, pattern=r"^(|[A-Za-z0-9+.\-]+://[^\s]+|[^\s:/]+:[0-9]{1,5})$",
                         description="Dask scheduler address (tcp://host:8786); empty starts a temporary Dask "
                                     "cluster on this machine for the run (dask only)")
    workers: int = Field(2, ge=1, le=256,
                         description="Sources read at the same time (threads, or workers of a temporary Dask "
                                     "cluster); each holds one batch of its source in memory")


@contextmanager
def open_task_runner(params: TaskRunnerParams) -> Iterator[object]:
    """A started Prefect task runner for ``params``; tasks mapped on it must finish inside the ``with``.

    ``local`` is Prefect's ``ThreadPoolTaskRunner`` with ``workers`` threads (the readers and the
    store release the GIL while decoding and compressing). ``dask`` connects to ``address``, or starts a
    temporary ``distributed.LocalCluster`` of ``workers`` single-threaded processes and stops it
    afterwards. Parts are written where every worker can reach them only if the dataset's location is
    shared (an ``s3://`` URL, or a file system mounted on every worker).
    """
    if params.kind == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=params.workers)
    else:
        runner = _dask_runner(params)
    with runner:
        yield runner


def _dask_runner(params: TaskRunnerParams):
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:  # an install without the dependency: say which package is missing
        raise RuntimeError("the dask task runner needs prefect-dask and distributed: pip install prefect-dask "
                           "distributed") from error
    if params.address:
        return DaskTaskRunner(address=params.address)
    # One thread per worker process: a reader holds the GIL between its decode calls, processes do not share it.
    # The workers report their task runs to the flow's own Prefect API: without it, in ephemeral mode each
    # worker process would start a throwaway server of its own and the runs would not show in this flow.
    api = _flow_api_url()
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.workers, "threads_per_worker": 1,
                                          "host": "127.0.0.1", "dashboard_address": None,
                                          "env": {"PREFECT_API_URL": api} if api else {}})


def _flow_api_url() -> str:
    """The Prefect API this process talks to: the configured one, or the ephemeral server it started."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one ephemeral server, if a flow run started it
    return server.api_url if server.server_process is not None else ""

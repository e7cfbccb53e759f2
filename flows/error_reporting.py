"""How Vitrail reports failures: bad input reads as one sentence, a bug keeps its traceback.

Prefect logs every failed task and flow with a full traceback. For a truncated band file or a
dataset edited after ingest that buries the one sentence a user needs under two stack dumps. Input
errors therefore lose their traceback in Prefect's run loggers (it stays available at DEBUG level,
``PREFECT_LOGGING_LEVEL=DEBUG``), and a flow that fails on bad input ends in a Failed state whose
message is exactly that sentence, which is what the Prefect UI shows. Any other exception is left
alone: unexpected errors keep their tracebacks everywhere.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
import typing
from typing import Callable, ParamSpec, TypeVar

from pydantic import ValidationError

from domains import DomainInputError
from tasks.dataset import DatasetError
from tasks.request_errors import RequestError

# The errors that mean "the input or the request is wrong", not "Vitrail is wrong". A missing file the
# user named is one of them; every other built-in exception is treated as a bug and keeps its traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (DomainInputError, DatasetError, RequestError, ValidationError,
                                                 FileNotFoundError)

# Prefect's engines log task and flow failures on these loggers (through run-scoped adapters).
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")

P = ParamSpec("P")
R = TypeVar("R")


def is_input_error(error: BaseException | None) -> bool:
    """True for errors caused by the caller's input or request, whose message is the whole story."""
    return isinstance(error, INPUT_ERRORS)


def describe_error(error: BaseException) -> str:
    """The one sentence shown for an input error (pydantic's own summary for invalid parameters)."""
    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in item['loc']) or 'parameters'}: {item['msg']}"
                             for item in error.errors())
        return f"invalid parameters: {problems}"
    return str(error)


class QuietInputErrors(logging.Filter):
    """Drops the traceback from log records about input errors and re-logs it at DEBUG level."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if is_input_error(error) and not getattr(record, "vitrail_traceback", False):
            record.exc_info = None
            record.exc_text = None
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(logging.DEBUG):
                # Same run ids as the original record, so the API handler files it under the same run.
                run_ids = {key: getattr(record, key) for key in ("flow_run_id", "task_run_id") if hasattr(record, key)}
                logger.debug("traceback of the input error above:\n%s",
                             "".join(traceback.format_exception(error)).rstrip(),
                             extra={"vitrail_traceback": True, **run_ids})
        return True


def install_quiet_input_errors() -> None:
    """Attach the filter to Prefect's run loggers once (idempotent)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietInputErrors) for f in logger.filters):
            logger.addFilter(QuietInputErrors())


def report_input_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Make a flow that fails on bad input end in a Failed state whose message is the error's sentence.

    Put it directly under ``@flow``. Calling the flow still raises the original exception (Prefect
    raises a failed state's data), so the CLI and parent flows see the same error type. Decorating
    also installs :class:`QuietInputErrors`, so any process that imports a flow (CLI, worker,
    server-side runner) logs input errors the same way.
    """
    install_quiet_input_errors()
    from prefect.logging import get_run_logger
    from prefect.states import Failed

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except INPUT_ERRORS as error:
            get_run_logger().debug("traceback of the input error:\n%s",
                                   "".join(traceback.format_exception(error)).rstrip())
            return Failed(message=describe_error(error), data=error)  # type: ignore[return-value]

    # Prefect resolves string annotations (``from __future__ import annotations``) in the globals of
    # the function it is given, which for this wrapper are this module's: hand it resolved types.
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    wrapper.__annotations__ = typing.get_type_hints(fn)
    return wrapper

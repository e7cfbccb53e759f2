"""Session-wide test hygiene shared by every test folder."""

from __future__ import annotations

import logging
import sys

import pytest


def _closed(stream: object) -> bool:
    return bool(getattr(stream, "closed", False))


@pytest.fixture(autouse=True)
def _log_handlers_never_keep_a_closed_capture():
    """A logging handler created (or repointed) while a test captured output keeps that test's stream.

    Once the capture is closed every later log line fails inside the handler (and Prefect's console
    handler then recurses into its own error reporting), so the failures would show up in unrelated
    tests. After each test, handlers holding a closed stream are pointed at the current stderr.
    """
    yield
    _repoint_handlers(sys.stderr, only_closed=True)


def _repoint_handlers(stream: object, only_closed: bool) -> None:
    loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for handler in (handler for logger in loggers for handler in logger.handlers):
        if isinstance(handler, logging.StreamHandler) and (_closed(handler.stream) or not only_closed):
            handler.stream = stream  # not setStream(): it would flush the closed stream first
        console = getattr(handler, "console", None)  # Prefect's rich console handler writes through this
        if console is not None and (_closed(getattr(console, "file", None)) or not only_closed):
            console.file = stream


def pytest_unconfigure(config: pytest.Config) -> None:
    """Servers that tests started in the background stop at interpreter exit, after pytest has closed every
    capture stream; their last lines ("Stopping temporary server ...") go to the process's own stderr
    instead of failing, with a traceback each, in a handler still holding a test's closed capture."""
    _repoint_handlers(sys.__stderr__, only_closed=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scheduling groups for ``pytest -n N --dist loadgroup`` (what ``make test`` runs).

    A file's tests stay on one worker, so module fixtures (trained models, datasets) are built once; every
    test that starts real servers shares one group, so the session's Prefect server and team stack start once.
    Without xdist the marks are inert.
    """
    for item in items:
        path = item.path.relative_to(config.rootpath).as_posix()
        group = "servers" if path.startswith("tests/integration/") else path
        item.add_marker(pytest.mark.xdist_group(group))

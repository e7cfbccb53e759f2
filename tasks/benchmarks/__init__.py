"""Benchmarks run by ``vitrail bench NAME --workdir DIR``: side-by-side measurements, never timed tests.

Each module here is one benchmark and exposes::

    def run_benchmark(workdir: Path, options: dict[str, str]) -> dict   # measure; return the JSON payload
    def format_table(result: dict) -> str                               # the table printed for people

The CLI writes the payload to ``DIR/bench/<name>.json``. Adding a benchmark is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from tasks.request_errors import RequestError


def benchmark_names() -> list[str]:
    """Names of the benchmark modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def load_benchmark(name: str):
    """Import benchmark ``name``; raise a clear error listing the known ones."""
    if name not in benchmark_names():
        raise RequestError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names()) or 'none'}")
    return importlib.import_module(f"tasks.benchmarks.{name}")

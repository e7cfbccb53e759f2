"""Shared fixtures of the domain tests."""

from __future__ import annotations

from typing import Callable, Iterable

import pytest

from domains.spec import SampleSet
# This folder is on sys.path because it holds a conftest.py (pytest's default "prepend" import mode).
from sample_batches import collect_batches


@pytest.fixture
def collect() -> Callable[[SampleSet | Iterable[SampleSet]], SampleSet]:
    """:func:`collect_batches`, for tests that look at a whole source at once."""
    return collect_batches

"""Fixtures of the hyperspectral tests: tiny ENVI captures written through the domain's own writers."""

from __future__ import annotations

from pathlib import Path

import pytest

from domains.hyperspectral.examples import write_example


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The same tiny capture (seed 0) in all three interleaves; tests must not modify these files."""
    return {il: write_example(tmp_path_factory.mktemp(f"hs-{il}"), seed=0, interleave=il) for il in ("bsq", "bil", "bip")}


@pytest.fixture
def example(examples) -> dict[str, Path]:
    return examples["bil"]

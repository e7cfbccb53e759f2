"""``vitrail dataset verify``: one line for a sound dataset, exit 2 naming the chunk for a damaged one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from domains import Channel, SampleSet
from flows.cli import main


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(0)
    n = 40
    samples = SampleSet(images=rng.integers(0, 4000, (n, 2, 8, 8), dtype=np.uint16),
                        labels=np.arange(n) % 2, groups=np.array([f"g{i // 4}" for i in range(n)]),
                        locations=np.stack([np.arange(n), np.zeros(n, int)], axis=1), source="scene",
                        channels=(Channel("B04"), Channel("B08")), class_names=("a", "b"),
                        scaling=((1e-4, 0.0), (1e-4, 0.0)))
    write_dataset(samples, "satellite", "classification", tmp_path / "ds", SplitParams())
    return tmp_path / "ds"


def test_verify_prints_one_line_for_a_sound_dataset(dataset: Path, capsys) -> None:
    assert main(["dataset", "verify", str(dataset)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{dataset}: ok, 40 samples, 1 chunks")


def test_verify_names_a_damaged_chunk_and_exits_2(dataset: Path, tmp_path: Path, capsys) -> None:
    import zarr

    damaged = tmp_path / "damaged"
    shutil.copytree(dataset, damaged)
    images = zarr.open_group(zarr.storage.LocalStore(damaged), mode="r+")["images"]
    images[39, 1, 7, 7] = images[39, 1, 7, 7] + 1  # the last sample: only a full check reaches it
    assert main(["dataset", "verify", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert "vitrail dataset: error:" in err and f"{damaged}/images/c/0/0/0/0" in err and "Traceback" not in err


def test_verify_refuses_a_folder_that_is_not_a_dataset(tmp_path: Path, capsys) -> None:
    assert main(["dataset", "verify", str(tmp_path)]) == 2
    assert "no dataset.json" in capsys.readouterr().err

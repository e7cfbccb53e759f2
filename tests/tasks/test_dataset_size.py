"""Compact storage: a dataset of uint16 tiles stays within 1.3x the raw size of the tiles it samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tasks_support import CHANNELS, make_samples

from tasks.dataset import SplitParams, build_dataset, load_dataset, write_dataset
from tasks.dataset_store import DatasetFiles


def test_a_real_scene_ingested_as_uint16_tiles_stays_within_1_3x_their_native_size(tmp_path: Path) -> None:
    from domains.satellite.examples import write_example
    from domains.spec import IngestRequest

    example = write_example(tmp_path / "example", seed=0)
    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12, stride=12,
                            block_size=12)
    info = build_dataset("satellite", request, tmp_path / "dataset", SplitParams(seed=1))
    samples = sum(info.split_counts.values())
    native = samples * len(info.channels) * info.tile_size**2 * np.dtype(info.stored_dtype).itemsize
    stored = DatasetFiles(tmp_path / "dataset").total_bytes()
    print(f"satellite example: {samples} tiles, stored {stored} B / native {native} B = {stored / native:.3f}")
    assert info.stored_dtype == "uint16" and info.scaling is not None
    assert stored <= 1.3 * native


def test_uint16_imagery_tiles_compress_below_their_native_size(tmp_path: Path) -> None:
    # Imagery-like counts: a smooth field per tile plus sensor noise, as Sentinel-2 L1C digital numbers.
    rng = np.random.default_rng(0)
    base = make_samples(n_groups=12, per_group=32, size=32)
    field = rng.uniform(500, 4000, size=(len(base.images), len(CHANNELS), 1, 1))
    counts = (field + rng.normal(0, 30, size=(len(base.images), len(CHANNELS), 32, 32))).astype(np.uint16)
    samples = type(base)(**{**base.__dict__, "images": counts, "scaling": ((1e-4, 0.0),) * len(CHANNELS)})
    info = write_dataset(samples, "satellite", "classification", tmp_path / "ds", SplitParams())
    stored = DatasetFiles(tmp_path / "ds").total_bytes()
    print(f"synthetic uint16: stored {stored} B / native {counts.nbytes} B = {stored / counts.nbytes:.3f}")
    assert info.stored_dtype == "uint16" and stored <= 1.3 * counts.nbytes
    train = load_dataset(tmp_path / "ds").splits["train"]
    assert np.allclose(train.images[0], 1e-4 * counts[int(train.images.members[0])], rtol=1e-6)

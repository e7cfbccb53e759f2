"""The benchmarks' dense held-out splits: re-tiled inside held-out blocks only, each split at its own stride."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains import get_domain
from domains.spec import IngestRequest
from tasks.compression.held_out import choose_stride, dense_held_out
from tasks.dataset import SplitParams, build_dataset, load_dataset

GRID, TILE, BLOCK = (120, 120), 12, 36


@pytest.fixture(scope="module")
def scene_dataset(tmp_path_factory):
    from domains.satellite.examples import write_example

    root = tmp_path_factory.mktemp("held-out")
    example = write_example(root / "example", seed=0, size=GRID[0])
    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=TILE, stride=TILE,
                            block_size=BLOCK)
    build_dataset("satellite", request, root / "dataset", SplitParams(seed=1))
    return load_dataset(root / "dataset"), request


def test_each_split_gets_the_largest_stride_that_gives_it_enough_tiles(scene_dataset) -> None:
    dataset, request = scene_dataset
    groups = {s: set(dataset.splits[s].groups.tolist()) for s in ("test", "val")}
    wanted = {s: choose_stride(g, GRID, TILE, BLOCK, TILE, 60) for s, g in groups.items()}
    assert wanted["test"] != wanted["val"]  # the case one shared stride got wrong

    held_out = dense_held_out(dataset, min_samples=60)

    assert held_out.strides == wanted and held_out.stride == wanted["test"]
    for split, stride in wanted.items():
        # Exactly the labelled tiles the domain's reader cuts at that stride inside the split's blocks.
        images, labels = [], []
        for batch in get_domain("satellite").read_samples(IngestRequest(**{**request.__dict__, "stride": stride})):
            keep = np.isin(batch.groups, list(groups[split])) & (batch.labels >= 0)
            images.append(batch.in_units(None, np.flatnonzero(keep)))
            labels.append(batch.labels[keep])
        np.testing.assert_array_equal(held_out.labels[split], np.concatenate(labels))
        np.testing.assert_array_equal(held_out.images[split], np.concatenate(images))
        assert held_out.images[split].dtype == np.float32
        assert held_out.counts[split] == len(held_out.labels[split]) > len(dataset.splits[split])
    assert f"{wanted['test']} px (test), {wanted['val']} px (val)" in held_out.note


def test_no_dense_tile_comes_from_a_training_block(scene_dataset) -> None:
    dataset, _ = scene_dataset
    train = dataset.splits["train"]
    held_out = dense_held_out(dataset, min_samples=200)
    assert held_out.strides == {"test": 1, "val": 1}
    # Stride 1 passes every position of the training lattice too: were training blocks re-tiled, their
    # tiles would be among the dense ones.
    train_tiles = {np.asarray(t).tobytes() for t in train.images[:]}
    for split in ("test", "val"):
        assert not any(t.tobytes() in train_tiles for t in held_out.images[split])

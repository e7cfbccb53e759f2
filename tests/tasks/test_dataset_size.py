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


def test_the_writer_holds_one_batch_and_one_chunk_not_the_source(tmp_path: Path) -> None:
    import tracemalloc

    from domains import Channel, SampleSet

    per_batch, shape = 64, (4, 32, 32)

    def stream(batches: int):
        for b in range(batches):  # each batch is made here and dropped by the writer before the next
            rng = np.random.default_rng(b)
            counts = (rng.uniform(500, 4000, (per_batch, 4, 1, 1)) + rng.normal(0, 30, (per_batch, *shape)))
            yield SampleSet(images=counts.astype(np.uint16), labels=np.arange(per_batch) % 3,
                            groups=np.array([f"blk-{(b * per_batch + i) // 128}" for i in range(per_batch)]),
                            locations=np.zeros((per_batch, 2), dtype=np.int64), source="big-scene",
                            channels=(*CHANNELS, Channel("B08")), class_names=("a", "b", "c"),
                            scaling=((1e-4, 0.0),) * 4)

    def peak_of(batches: int) -> int:
        tracemalloc.start()
        info = write_dataset(stream(batches), "satellite", "classification", tmp_path / str(batches), SplitParams())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sum(info.split_counts.values()) == batches * per_batch
        return peak

    peak_of(6)  # imports (zarr codecs, pyarrow) land here, not in the measured writes
    small, large = peak_of(12), peak_of(96)
    large_source = 96 * per_batch * int(np.prod(shape)) * 2
    print(f"writer peak {small / 2**20:.1f} MiB for 12 batches, {large / 2**20:.1f} MiB for 96 batches "
          f"({large_source / 2**20:.0f} MiB of samples)")
    assert large < 1.3 * small and large < large_source / 2  # set by batch and chunk, not by the source

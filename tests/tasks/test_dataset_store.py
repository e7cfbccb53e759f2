"""The chunk writer stores the bytes zarr itself would store, so any zarr v3 reader reads the arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.dataset_store import (
    BATCHES_IN_FLIGHT,
    BLOSC_BLOCKSIZE,
    BLOSC_LEVEL,
    BLOSC_SHUFFLE,
    ChunkedArrayWriter,
    DatasetFiles,
    chunk_digest,
    chunk_key,
    handed_over,
)


def _zarr_written(folder: Path, samples: np.ndarray, chunk_samples: int) -> Path:
    """The same samples written through zarr's own write path, with the writer's codec settings."""
    from zarr.codecs import BloscCodec

    group = DatasetFiles(folder).zarr_group("w")
    shuffle = BLOSC_SHUFFLE if samples.dtype.itemsize > 1 else "noshuffle"
    array = group.create_array("x", shape=samples.shape, chunks=(chunk_samples, *samples.shape[1:]),
                               dtype=samples.dtype, compressors=[BloscCodec(cname="zstd", clevel=BLOSC_LEVEL,
                                                                            shuffle=shuffle,
                                                                            blocksize=BLOSC_BLOCKSIZE)],
                               fill_value=0)
    array[:] = samples
    return folder


# (13, 64, 64) uint16: chunks of several Blosc blocks.
@pytest.mark.parametrize(("dtype", "sample_shape"), [(np.uint16, (3, 8, 8)), (np.uint8, (2, 5, 5)),
                                                     (np.int64, ()), (np.float32, (4, 4)),
                                                     (np.uint16, (13, 64, 64))])
def test_chunks_are_byte_identical_to_zarrs_and_read_back(tmp_path: Path, dtype, sample_shape) -> None:
    import zarr

    rng = np.random.default_rng(0)
    samples = (rng.normal(size=(23, *sample_shape)) * 1000).astype(dtype)
    chunk_samples = 5  # 4 whole chunks and a partial one
    files = DatasetFiles(tmp_path / "ours")
    writer = ChunkedArrayWriter(files.zarr_group("w"), "x", sample_shape, np.dtype(dtype), chunk_samples,
                                files=files)
    for start, stop in ((0, 3), (3, 14), (14, 15), (15, 23)):  # batches that straddle chunk boundaries
        writer.append(samples[start:stop])
    writer.close()
    reference = _zarr_written(tmp_path / "zarr", samples, chunk_samples)
    ndim = 1 + len(sample_shape)
    for index in range(5):
        key = chunk_key("x", index, ndim)
        assert (tmp_path / "ours" / key).read_bytes() == (reference / key).read_bytes(), key
    stored = zarr.open_group(str(tmp_path / "ours"), mode="r")["x"]
    np.testing.assert_array_equal(stored[:], samples)
    assert writer.digests == [chunk_digest(samples[i:i + chunk_samples]) for i in range(0, 23, chunk_samples)]


def test_a_batch_changed_after_append_is_stored_as_it_was(tmp_path: Path) -> None:
    files = DatasetFiles(tmp_path)
    writer = ChunkedArrayWriter(files.zarr_group("w"), "x", (4,), np.dtype(np.uint16), 2, files=files)
    batch = np.arange(12, dtype=np.uint16).reshape(3, 4)
    writer.append(batch)
    batch[:] = 0  # the reader reuses its array at once
    writer.append(batch[:1] + 7)
    writer.close()
    import zarr

    stored = zarr.open_group(str(tmp_path), mode="r")["x"][:]
    np.testing.assert_array_equal(stored, np.concatenate([np.arange(12).reshape(3, 4), np.full((1, 4), 7)]))


def test_a_read_only_view_is_copied_and_a_handed_over_batch_is_stored_as_it_is(tmp_path: Path) -> None:
    import zarr

    files = DatasetFiles(tmp_path)
    writer = ChunkedArrayWriter(files.zarr_group("w"), "x", (4,), np.dtype(np.uint16), 2, files=files)
    owner = np.arange(12, dtype=np.uint16).reshape(3, 4)
    view = owner[:]
    view.flags.writeable = False
    assert not handed_over(view, np.dtype(np.uint16))  # its owner may still change it
    writer.append(view)
    owner[:] = 0
    fresh = np.full((3, 4), 9, dtype=np.uint16)
    assert not handed_over(fresh, np.dtype(np.uint16))  # writeable: the caller may change it
    fresh.flags.writeable = False
    assert handed_over(fresh, np.dtype(np.uint16)) and not handed_over(fresh, np.dtype(np.int16))
    writer.append(fresh)
    writer.close()
    stored = zarr.open_group(str(tmp_path), mode="r")["x"][:]
    np.testing.assert_array_equal(stored, np.concatenate([np.arange(12).reshape(3, 4), np.full((3, 4), 9)]))
    assert writer.digests == [chunk_digest(stored[i:i + 2]) for i in range(0, 6, 2)]


def test_a_failed_chunk_store_is_raised_by_a_later_append(tmp_path: Path, monkeypatch) -> None:
    files = DatasetFiles(tmp_path)
    writer = ChunkedArrayWriter(files.zarr_group("w"), "x", (4,), np.dtype(np.uint16), 2, files=files)

    def disk_full(key: str, encoded: bytes) -> None:
        raise OSError(f"{key}: no space left on device")

    # The chunk threads' write, local file or object-store put alike (a local chunk is no longer written
    # through files.write_bytes, so patching that would never fail).
    monkeypatch.setattr(writer, "_write_chunk", disk_full)
    with pytest.raises(OSError, match="no space left"):  # at the latest once the queue of batches is full
        for _ in range(BATCHES_IN_FLIGHT + 1):
            writer.append(np.zeros((4, 4), dtype=np.uint16))
    writer.abandon()

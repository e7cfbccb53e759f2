"""The chunk writer stores the bytes zarr itself would store, so any zarr v3 reader reads the arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.dataset_store import (
    BATCHES_IN_FLIGHT,
    BLOSC_BLOCKSIZE,
    BLOSC_CODEC,
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
                               dtype=samples.dtype, compressors=[BloscCodec(cname=BLOSC_CODEC, clevel=BLOSC_LEVEL,
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


def _write_and_compare(tmp_path: Path, samples: np.ndarray, chunk_samples: int) -> ChunkedArrayWriter:
    """Write ``samples`` with the chunk writer and assert every chunk file equals zarr's own."""
    files = DatasetFiles(tmp_path / "ours")
    writer = ChunkedArrayWriter(files.zarr_group("w"), "x", samples.shape[1:], samples.dtype, chunk_samples,
                                files=files)
    writer.append(samples)
    writer.close()
    reference = _zarr_written(tmp_path / "zarr", samples, chunk_samples)
    for index in range(-(-len(samples) // chunk_samples)):
        key = chunk_key("x", index, samples.ndim)
        assert (tmp_path / "ours" / key).read_bytes() == (reference / key).read_bytes(), key
    return writer


def test_chunks_written_with_direct_io_have_their_exact_length(tmp_path: Path) -> None:
    """Direct writes go in whole 4 KiB blocks; the file is cut back to the encoded length."""
    import os

    from tasks.dataset_store import DIRECT_ALIGNMENT

    rng = np.random.default_rng(1)
    samples = rng.integers(0, 4000, size=(7, 3, 33, 35), dtype=np.uint16)  # encodes to no multiple of 4 KiB
    writer = _write_and_compare(tmp_path, samples, chunk_samples=3)
    sizes = [os.path.getsize(tmp_path / "ours" / chunk_key("x", i, 4)) for i in range(3)]
    assert any(size % DIRECT_ALIGNMENT for size in sizes)
    if not writer._direct:
        pytest.skip("this file system refuses O_DIRECT: the buffered path wrote the chunks")


def test_a_file_system_refusing_direct_io_gets_buffered_writes(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    import tasks.dataset_store as store

    real_open = os.open
    refused = []

    def no_direct(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store.os, "open", no_direct)
    samples = np.random.default_rng(2).integers(0, 9000, size=(5, 2, 16, 16), dtype=np.uint16)
    writer = _write_and_compare(tmp_path, samples, chunk_samples=2)
    assert len(refused) == 1 and not writer._direct  # asked once, then buffered for every other chunk


def test_a_direct_write_refused_midway_leaves_no_file_behind(tmp_path: Path, monkeypatch) -> None:
    import errno

    import tasks.dataset_store as store

    def refuse(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(store.os, "pwrite", refuse)
    target = tmp_path / "chunk"
    assert store._write_direct(str(target), b"x" * 5000) is False
    assert not target.exists()


def test_chunk_digests_name_blake3_and_legacy_sha256_digests_still_verify(tmp_path: Path) -> None:
    import hashlib

    from tasks.dataset_store import ChunkSource, DatasetError, digest_algorithm

    block = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    digest = chunk_digest(block)
    assert digest.startswith("blake3:") and len(digest) == len("blake3:") + 64
    assert chunk_digest(block) != chunk_digest(block + 1) != chunk_digest(block.reshape(2, 12))
    legacy = hashlib.sha256(block.tobytes())
    legacy.update(f"{block.shape}{block.dtype.str}".encode())
    assert chunk_digest(block, "sha256") == legacy.hexdigest()
    assert digest_algorithm(legacy.hexdigest()) == "sha256" and digest_algorithm(digest) == "blake3"
    with pytest.raises(ValueError, match="unknown chunk digest algorithm"):
        chunk_digest(block, "md5")

    files = DatasetFiles(tmp_path)
    writer = ChunkedArrayWriter(files.zarr_group("w"), "x", (3, 4), np.dtype(np.uint16), 2, files=files)
    writer.append(block)
    writer.close()
    array = files.zarr_group("r")["x"]
    # A dataset written before BLAKE3 records bare SHA-256 digests: read and verified as such.
    ChunkSource(files, array, "x", [legacy.hexdigest()]).check(0, block)
    ChunkSource(files, array, "x", writer.digests).check(0, block)
    with pytest.raises(DatasetError, match="does not match its digest"):
        ChunkSource(files, array, "x", [chunk_digest(block + 1, "sha256")]).check(0, block)

"""Sentinel-2's coarse bands stored at their own resolution: read back bit for bit, smaller, verified, resumable."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from domains.satellite.examples import write_example
from domains.satellite.tiling import read_samples
from domains.spec import IngestRequest
from tasks.dataset import SplitParams, load_dataset, verify_dataset, write_dataset
from tasks.dataset_parts import part_batches, write_part
from tasks.dataset_store import DatasetError


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # 96 px: tiles of 20 px every 10 px start at every phase of the 20 m and 60 m grids; a nodata corner.
    return write_example(tmp_path_factory.mktemp("coarse-scene"), seed=3, size=96)


def _request(scene: dict[str, Path]) -> IngestRequest:
    return IngestRequest(source=scene["scene_dir"], labels=scene["labels"], tile_size=20, stride=10, block_size=40,
                         batch_samples=7)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _stored_samples(dataset) -> np.ndarray:
    """Every sample of every split, in stored order, as the split's source decodes it (stored dtype)."""
    parts = {}
    for split in dataset.splits.values():
        source = split.images.source
        for index in split.images.members.tolist():
            parts[index] = source.chunk(index // source.chunk_samples)[index % source.chunk_samples]
    return np.stack([parts[i] for i in range(len(parts))])


def test_the_dataset_stores_coarse_bands_at_their_resolution_and_reads_back_the_readers_tiles(
        scene: dict[str, Path], tmp_path: Path) -> None:
    batches = list(read_samples(_request(scene)))
    expected = np.concatenate([b.images for b in batches])
    assert batches[0].coarse is not None and {g.factor for g in batches[0].coarse.grids} == {2, 6}
    info = write_dataset(iter(batches), "satellite", "classification", tmp_path / "ds", SplitParams())
    assert {g.factor: len(g.channels) for g in info.coarse_grids} == {2: 6, 6: 3}
    assert {"images", "coarse-2", "coarse-6", "valid"} <= set(info.chunks)
    import zarr

    assert zarr.open_group(str(tmp_path / "ds"), mode="r")["images"].shape[1] == 4  # the 10 m bands only
    dataset = load_dataset(tmp_path / "ds")
    np.testing.assert_array_equal(_stored_samples(dataset), expected)  # nodata fill and rounding included
    # As training reads them: physical float32, the same values a dense store gives.
    dense = write_dataset([replace(b, coarse=None) for b in batches], "satellite", "classification",
                          tmp_path / "dense", SplitParams())
    dense_set = load_dataset(tmp_path / "dense")
    for name, split in dataset.splits.items():
        np.testing.assert_array_equal(split.images[:], dense_set.splits[name].images[:])
    assert dense.coarse_grids == () and dense.channel_mean == info.channel_mean
    assert _folder_bytes(tmp_path / "ds") < 0.7 * _folder_bytes(tmp_path / "dense")
    assert verify_dataset(tmp_path / "ds").chunks == sum(len(v) for v in info.chunks.values())


def test_a_changed_coarse_patch_is_named(scene: dict[str, Path], tmp_path: Path) -> None:
    import zarr

    write_dataset(read_samples(_request(scene)), "satellite", "classification", tmp_path / "ds", SplitParams())
    patches = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ds"), mode="r+")["coarse-2"]
    patches[0, 0, 1, 1] = patches[0, 0, 1, 1] + 1  # re-encoded: a valid chunk whose pixels differ
    with pytest.raises(DatasetError, match="coarse-2.*does not match its digest"):
        verify_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="coarse-2.*does not match its digest"):
        for split in load_dataset(tmp_path / "ds").splits.values():
            split.images[:]


def test_parts_carry_the_patches_and_give_back_the_readers_tiles(scene: dict[str, Path], tmp_path: Path) -> None:
    batches = list(read_samples(_request(scene)))
    info = write_part(iter(batches), "classification", str(tmp_path / "part"), "key", str(scene["scene_dir"]))
    assert info.coarse_grids
    back = list(part_batches(info))
    np.testing.assert_array_equal(np.concatenate([b.images for b in back]),
                                  np.concatenate([b.images for b in batches]))
    for g in range(len(info.coarse_grids)):
        np.testing.assert_array_equal(np.concatenate([b.coarse.patches[g] for b in back]),
                                      np.concatenate([b.coarse.patches[g] for b in batches]))
    combined = write_dataset(iter(back), "satellite", "classification", tmp_path / "ds", SplitParams())
    direct = write_dataset(iter(batches), "satellite", "classification", tmp_path / "direct", SplitParams())
    assert combined.chunks == direct.chunks and combined.digest == direct.digest


def test_batches_that_disagree_on_coarse_channels_are_refused(scene: dict[str, Path], tmp_path: Path) -> None:
    batches = [b for b in read_samples(_request(scene)) if len(b.images)]
    with pytest.raises(DatasetError, match="channels stored coarse"):
        write_dataset([batches[0], replace(batches[1], coarse=None)], "satellite", "classification",
                      tmp_path / "ds", SplitParams())


def test_the_rebuilt_source_pickles_into_workers(scene: dict[str, Path], tmp_path: Path) -> None:
    write_dataset(read_samples(_request(scene)), "satellite", "classification", tmp_path / "ds", SplitParams())
    split = load_dataset(tmp_path / "ds").splits["train"]
    copy = pickle.loads(pickle.dumps(split.images))
    np.testing.assert_array_equal(copy[: len(copy)], split.images[:])


def test_pixels_invalid_in_any_band_hold_the_recorded_fill(scene: dict[str, Path]) -> None:
    from tasks.coarse_bands import fine_channels, rebuild_samples

    batch = next(b for b in read_samples(_request(scene)) if len(b.images) and not b.coarse.valid.all())
    coarse = replace(batch.coarse, fill=tuple(7.0 + i for i in range(len(batch.channels))))
    fine = np.ascontiguousarray(batch.images[:, fine_channels(coarse.grids, len(batch.channels))])
    rebuilt = rebuild_samples(fine, coarse, len(batch.channels))
    invalid = ~coarse.valid
    for grid in coarse.grids:
        for channel in grid.channels:
            assert (rebuilt[:, channel][invalid] == 7 + channel).all()
            np.testing.assert_array_equal(rebuilt[:, channel][~invalid], batch.images[:, channel][~invalid])


def test_patches_only_batches_rebuild_to_the_full_batches_and_store_the_same_dataset(
        scene: dict[str, Path], tmp_path: Path) -> None:
    """Read as ingest reads (coarse bands as patches only, never upsampled), every batch rebuilds bit for bit to
    what the full reader gives, nodata corner included; the dataset written is the same one, chunk for chunk,
    and its statistics (coarse channels summed from the patches) agree to far below a digital number."""
    from tasks.coarse_bands import fine_channels, rebuild_samples

    full = list(read_samples(_request(scene)))
    patched = list(read_samples(replace(_request(scene), coarse_as_patches=True)))
    assert len(full) == len(patched) and sum(len(b.images) for b in patched) > 20
    for whole, only in zip(full, patched, strict=True):
        assert only.fine_only and not whole.fine_only and only.images.shape[1] == 4
        np.testing.assert_array_equal(rebuild_samples(only.images, only.coarse, len(only.channels)), whole.images)
        np.testing.assert_array_equal(only.coarse.valid, whole.coarse.valid)
        np.testing.assert_array_equal(only.locations, whole.locations)
        np.testing.assert_array_equal(only.labels, whole.labels)
    assert not all(b.coarse.valid.all() for b in patched)  # the nodata corner reaches some tiles
    with pytest.raises(ValueError, match="rebuild them"):
        patched[0].physical()
    reference = write_dataset(iter(full), "satellite", "classification", tmp_path / "full", SplitParams())
    written = write_dataset(iter(patched), "satellite", "classification", tmp_path / "patched", SplitParams())
    assert written.chunks == reference.chunks and written.digest == reference.digest
    # Within 0.05 of a digital number (1e-4 reflectance each): the coarse channels' sums are of the values
    # before rounding; on these small, smooth tiles the rounding shows most (about 0.007 DN).
    np.testing.assert_allclose(written.channel_mean, reference.channel_mean, rtol=0, atol=0.05e-4)
    np.testing.assert_allclose(written.channel_std, reference.channel_std, rtol=0, atol=0.05e-4)
    assert written.channel_std != reference.channel_std  # summed from the patches, not from rebuilt tiles
    fine = fine_channels(written.coarse_grids, len(written.channels))  # summed exactly either way
    assert [written.channel_mean[c] for c in fine] == [reference.channel_mean[c] for c in fine]

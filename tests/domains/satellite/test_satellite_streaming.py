"""Streaming ingest: strips of the scene give the same tiles as the whole-scene reader, in bounded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.satellite import tiling
from domains.satellite.demo import prepare_demo
from domains.satellite.labels import read_label_raster
from domains.satellite.scene import read_scene
from domains.satellite.tiling import read_samples, strip_rows, tile_scene
from domains.spec import DomainInputError, IngestRequest

# Bands Sentinel-2 stores at 10 m: read as stored, so they must match the whole-scene reader bit for bit.
NATIVE_10M = {"B02", "B03", "B04", "B08"}


def summed_drops(batches) -> dict[str, int]:
    total: dict[str, int] = {}
    for batch in batches:
        for reason, count in batch.dropped.items():
            total[reason] = total.get(reason, 0) + count
    return total


def assert_same_tiles(batches, reference, batch_samples: int) -> None:
    """The streamed batches hold the reference's tiles, in its order, in its physical units."""
    assert all(len(b.images) <= batch_samples for b in batches)
    assert all(b.images.dtype == np.uint16 for b in batches)
    assert all(b.scaling == ((1e-4, 0.0),) * len(reference.channels) for b in batches)
    locations = np.concatenate([b.locations for b in batches])
    np.testing.assert_array_equal(locations, reference.locations)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), reference.labels)
    np.testing.assert_array_equal(np.concatenate([b.groups for b in batches]), reference.groups)
    assert summed_drops(batches) == reference.dropped
    provenance: dict[str, str] = {}
    for batch in batches:
        provenance.update(batch.provenance)
    assert provenance == reference.provenance
    physical = np.concatenate([b.physical() for b in batches])
    for i, channel in enumerate(reference.channels):
        if channel.name in NATIVE_10M:
            np.testing.assert_array_equal(physical[:, i], reference.images[:, i], err_msg=channel.name)
        else:
            # 20 m and 60 m bands are resampled (bilinear, as before) and rounded back to whole digital
            # numbers: at most half a DN (5e-5 reflectance) from the whole-scene float result.
            np.testing.assert_allclose(physical[:, i], reference.images[:, i], rtol=0, atol=0.5e-4 + 1e-6,
                                       err_msg=channel.name)


def test_demo_scene_streams_the_whole_scene_readers_tiles(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    request = IngestRequest(source=demo["source"], labels=demo["labels"], tile_size=32, stride=32, block_size=128,
                            batch_samples=100)
    scene = read_scene(demo["source"])
    reference = tile_scene(scene, read_label_raster(demo["labels"], scene), request)
    batches = list(read_samples(request))
    assert len(batches) > 3 and len(reference.images) > 300
    assert_same_tiles(batches, reference, 100)
    # Each batch's array is its own and read-only: a dataset writer keeps it without a staging copy.
    assert all(not b.images.flags.writeable and b.images.flags.owndata for b in batches)


def test_overlapping_tiles_across_many_strips(example: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget of one byte gives one row of tiles per strip: every strip boundary is exercised.
    monkeypatch.setattr(tiling, "STRIP_BYTES", 1)
    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12, stride=4,
                            block_size=24, batch_samples=7)
    scene = read_scene(example["scene_dir"])
    reference = tile_scene(scene, read_label_raster(example["labels"], scene), request)
    assert_same_tiles(list(read_samples(request)), reference, 7)


def test_strips_keep_tiles_whole_and_memory_bounded() -> None:
    # A full Sentinel-2 tile with 224 px tiles, half overlapping.
    request = IngestRequest(source=Path("unused"), tile_size=224, stride=112, block_size=448)
    strips = strip_rows(request, (10980, 10980), channels=13, itemsize=2)
    starts = [row for strip in strips for row in strip]
    assert starts == list(range(0, 10980 - 224 + 1, 112))
    spans = [strip[-1] + 224 - strip[0] for strip in strips]
    assert max(spans) * 10980 * 13 * 2 <= tiling.STRIP_BYTES
    # However narrow the budget, a strip holds one whole row of tiles.
    assert min(len(s) for s in strip_rows(request, (10980, 400000), channels=13, itemsize=2)) == 1


def test_bad_label_raster_fails_before_any_pixel_is_read(example: dict[str, Path], tmp_path: Path, write_tif) -> None:
    floats = write_tif(tmp_path / "float_labels.tif", np.zeros((60, 60), dtype=np.float32))
    with pytest.raises(DomainInputError, match="integer class ids") as error:
        read_samples(IngestRequest(source=example["scene_dir"], labels=floats, tile_size=10, block_size=20))
    assert error.value.path == str(floats)


def test_scene_without_valid_pixels_is_refused(tmp_path: Path, write_tif) -> None:
    path = write_tif(tmp_path / "empty.tif", np.zeros((4, 40, 40), dtype=np.uint16),
                     descriptions=("B02", "B03", "B04", "B08"))
    batches = read_samples(IngestRequest(source=path, tile_size=10, block_size=20))
    with pytest.raises(DomainInputError, match="no valid pixel") as error:
        list(batches)
    assert error.value.path == str(path)


@pytest.mark.parametrize("band", ["B05", "B09"])
def test_numpy_upsampling_is_gdals_bilinear_warp(example: dict[str, Path], band: str) -> None:
    import rasterio
    from rasterio.warp import Resampling, reproject

    from domains.satellite.scene import valid_pixels
    from domains.satellite.sensors import SENTINEL2_L1C
    from domains.satellite.strips import integer_upsampling, upsample_bilinear

    path = next(example["scene_dir"].glob(f"*_{band}.tif"))
    with rasterio.open(path) as ds:
        dn, coarse = ds.read(1), ds.transform
    with rasterio.open(next(example["scene_dir"].glob("*_B04.tif"))) as ds:
        fine, shape, crs = ds.transform, ds.shape, ds.crs
    factor = integer_upsampling(coarse, fine)
    assert factor == (2 if band == "B05" else 6)
    valid = valid_pixels(dn, 0, 0, SENTINEL2_L1C)
    values = np.where(valid, dn.astype(np.float32), np.float32(np.nan))
    warped = np.full(shape, np.nan, dtype=np.float32)
    reproject(values, warped, src_transform=coarse, src_crs=crs, dst_transform=fine, dst_crs=crs,
              src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.bilinear)
    ours, ours_valid = upsample_bilinear(dn, valid, factor, 0, 0, shape[0], shape[1])
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(warped))
    np.testing.assert_allclose(ours, warped, rtol=1e-5, equal_nan=True)
    assert ours_valid.sum() < ours_valid.size


def _gathered_bilinear(x: np.ndarray, factor: int, source_row: int, top: int, bottom: int, width: int) -> np.ndarray:
    """Reference: separable float32 bilinear by index gathers, columns first (the reader's former code)."""

    def axis(first: int, stop: int, start: int, length: int):
        position = (np.arange(first, stop, dtype=np.float64) + 0.5) / factor - 0.5 - start
        lower = np.floor(position)
        weight = (position - lower).astype(np.float32)
        lower = lower.astype(np.int64)
        return np.clip(lower, 0, length - 1), np.clip(lower + 1, 0, length - 1), weight

    rows_low, rows_high, row_weight = axis(top, bottom, source_row, x.shape[0])
    cols_low, cols_high, col_weight = axis(0, width, 0, x.shape[1])
    x = x.astype(np.float32)
    cols = x[:, cols_low] * (1 - col_weight) + x[:, cols_high] * col_weight
    return cols[rows_low] * (1 - row_weight[:, None]) + cols[rows_high] * row_weight[:, None]


@pytest.mark.parametrize("factor", [2, 3, 6])
def test_phase_wise_upsampling_is_the_gathered_float32_result_bit_for_bit(factor: int, monkeypatch) -> None:
    from domains.satellite import strips

    # Small blocks: many block edges, each a chance to get the neighbours of a block's first row wrong.
    monkeypatch.setattr(strips, "RESAMPLE_BLOCK_BYTES", 4 * 50 * factor * 3)
    rng = np.random.default_rng(factor)
    coarse = rng.integers(0, 10000, size=(40, 17), dtype=np.uint16)
    width = 17 * factor - 1  # a partial last coarse column
    for source_row, top, bottom in [(0, 0, 40 * factor), (5, 5 * factor + 1, 30 * factor + 2), (3, 7, 11)]:
        expected = _gathered_bilinear(coarse, factor, source_row, top, bottom, width)
        out = np.empty((bottom - top, width), dtype=np.float32)
        strips.upsample_into(out, coarse, factor, source_row, top, round_values=False)
        np.testing.assert_array_equal(out, expected)
        rounded = np.empty((bottom - top, width), dtype=np.uint16)
        strips.upsample_into(rounded, coarse, factor, source_row, top, round_values=True)
        np.testing.assert_array_equal(rounded, np.rint(expected).astype(np.uint16))


def test_stopping_early_leaves_no_read_in_flight(example: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(tiling, "STRIP_BYTES", 1)  # many strips
    batches = read_samples(IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12,
                                         stride=4, block_size=24, batch_samples=3))
    first = next(batches)
    batches.close()
    assert len(first.images) == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("vitrail-strip")]


def test_one_reading_thread_gives_the_same_tiles(example: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from domains.satellite import strips

    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12, stride=6,
                            block_size=24, batch_samples=50)
    threaded = list(read_samples(request))
    monkeypatch.setattr(strips, "READ_THREADS", 1)
    monkeypatch.setattr(strips.StripReader.__init__, "__defaults__", (1, False, frozenset()))
    single = list(read_samples(request))
    for a, b in zip(threaded, single, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.locations, b.locations)


def test_strips_read_in_order_reuse_block_rows_and_equal_strips_read_alone(tmp_path: Path) -> None:
    """Rows decoded past a strip (to the end of its row of blocks) are the file's rows, for every band."""
    import rasterio

    from domains.satellite.scene import inspect_scene
    from domains.satellite.strips import StripReader
    from domains.satellite.demo import demo_scene_dir

    tiled = tmp_path / "scene"
    tiled.mkdir()
    for source in sorted(demo_scene_dir().glob("*.tif")):
        with rasterio.open(source) as src:
            profile = dict(src.profile, tiled=True, blockxsize=64, blockysize=64, compress="deflate")
            with rasterio.open(tiled / source.name, "w", **profile) as out:
                out.write(src.read())
    layout = inspect_scene(tiled, None, None, None)
    height = layout.shape[0]
    # Strips ending inside rows of blocks, some overlapping the previous one, one out of order.
    ranges = [(0, 100), (100, 150), (140, 260), (260, 261), (261, 500), (30, 90), (500, height)]
    with StripReader(layout) as in_order:
        strips = [in_order.read_rows(top, bottom) for top, bottom in ranges]
    for (top, bottom), (raw, valid) in zip(ranges, strips, strict=True):
        with StripReader(layout) as alone:
            expected_raw, expected_valid = alone.read_rows(top, bottom)
        np.testing.assert_array_equal(raw, expected_raw, err_msg=f"rows {top}:{bottom}")
        np.testing.assert_array_equal(valid, expected_valid, err_msg=f"rows {top}:{bottom}")


@pytest.mark.parametrize("factor", [2, 6])
def test_masked_upsampling_by_dirty_rows_is_the_whole_window_result_bit_for_bit(factor: int) -> None:
    from domains.satellite import strips

    rng = np.random.default_rng(10 + factor)
    coarse = rng.integers(1, 10000, size=(30, 13), dtype=np.uint16)
    valid = np.ones(coarse.shape, dtype=bool)
    valid[[4, 5, 17], [3, 12, 0]] = False  # nodata inside, at the right edge and at the left edge
    valid[29, 6] = False  # and on the window's last row
    width = 13 * factor - 1
    for source_row, top, bottom in [(0, 0, 30 * factor), (2, 2 * factor + 3, 25 * factor), (0, 0, 3 * factor)]:
        window, window_valid = coarse[source_row:], valid[source_row:]
        values, mask = strips.upsample_bilinear(window, window_valid, factor, source_row, top, bottom, width)
        rounded = np.empty((bottom - top, width), dtype=np.uint16)
        rounded_mask = strips.upsample_valid_into(rounded, window, window_valid, factor, source_row, top, True)
        exact = np.empty((bottom - top, width), dtype=np.float32)
        exact_mask = strips.upsample_valid_into(exact, window, window_valid, factor, source_row, top, False)
        expected_mask = mask if not mask.all() else None
        for got in (rounded_mask, exact_mask):
            if expected_mask is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got, expected_mask)
        np.testing.assert_array_equal(exact[mask], values[mask])
        np.testing.assert_array_equal(rounded[mask], np.rint(values[mask]).astype(np.uint16))


def test_reusable_arrays_hand_out_only_arrays_nobody_else_holds() -> None:
    from domains.array_memory import ReusableArrays

    pool = ReusableArrays((4, 5), np.uint16, keep=2)
    first = pool.take()
    assert first.shape == (4, 5) and first.flags.owndata and first.flags.writeable
    first.flags.writeable = False  # handed over read-only, still held
    second = pool.take()
    assert second is not first
    kept = second[1:]  # a view keeps its base alive
    del second
    third = pool.take()
    assert third is not kept.base and third is not first
    address = first.__array_interface__["data"][0]
    del first
    again = pool.take()
    assert again.__array_interface__["data"][0] == address and again.flags.writeable
    smaller = pool.take((2, 3))  # another shape: a view of a free buffer large enough
    assert smaller.shape == (2, 3) and smaller.base is not None


@pytest.mark.parametrize("nodata", [None, 0.0, 7.0, 65535.0, 2.5])
def test_window_valid_is_valid_pixels_or_none_when_all_valid(nodata: float | None) -> None:
    from affine import Affine

    from domains.satellite.scene import BandSource, valid_pixels
    from domains.satellite.sensors import IDENTITY, SENTINEL2_L1C
    from domains.satellite.strips import window_valid

    rng = np.random.default_rng(3)
    dn = rng.integers(5, 9, size=(6, 7), dtype=np.uint16)
    for scale in (SENTINEL2_L1C, IDENTITY):
        band = BandSource(path=Path("b.tif"), index=1, name="B04", transform=Affine.identity(), shape=dn.shape,
                          nodata=nodata, dtype=dn.dtype, scale=scale)
        for window in (dn, np.where(dn == 8, 0, dn).astype(np.uint16)):
            expected = valid_pixels(window, nodata, 0, scale)
            got = window_valid(window, band, 0)
            if expected.all():
                assert got is None
            else:
                np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
def test_factor_two_integer_upsampling_is_the_general_float32_result_bit_for_bit(dtype, monkeypatch) -> None:
    from domains.satellite import strips

    monkeypatch.setattr(strips, "RESAMPLE_BLOCK_BYTES", 4 * 50 * 2 * 3)
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    coarse = rng.integers(info.min, info.max, size=(40, 17), endpoint=True).astype(dtype)
    coarse[0, :3] = [info.min, info.max, info.min]  # the extremes side by side
    for width in (34, 33):
        for source_row, top, bottom in [(0, 0, 80), (5, 11, 62), (3, 7, 9)]:
            expected = _gathered_bilinear(coarse, 2, source_row, top, bottom, width)
            out = np.empty((bottom - top, width), dtype=np.float32)
            strips.upsample_into(out, coarse, 2, source_row, top, round_values=False)
            np.testing.assert_array_equal(out, expected)
            rounded = np.empty((bottom - top, width), dtype=dtype)
            strips.upsample_into(rounded, coarse, 2, source_row, top, round_values=True)
            np.testing.assert_array_equal(rounded, np.rint(expected).astype(dtype))

"""A tile's coarse window upsampled alone gives the values the strip reader gives that tile, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.satellite.scene import inspect_scene
from domains.satellite.strips import CoarseRows, StripReader, integer_upsampling, upsample_valid_into, window_valid
from domains.satellite.tile_windows import (
    CoarsePatchBatches,
    upsample_tile,
    upsample_tiles,
    upsampled_sums,
    window_side,
    window_span,
)
from domains.spec import CoarseGrid


def _tile_from_window(coarse: np.ndarray, valid: np.ndarray | None, factor: int, row: int, col: int, size: int,
                      dtype) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    rows = window_span(row, size, factor, coarse.shape[0])
    cols = window_span(col, size, factor, coarse.shape[1])
    window = coarse[rows[0]:rows[1], cols[0]:cols[1]]
    window_mask = None if valid is None else valid[rows[0]:rows[1], cols[0]:cols[1]]
    out = np.empty((size, size), dtype=dtype)
    mask = upsample_tile(out, window, window_mask, factor, (rows[0], cols[0]), (row, col),
                         round_values=np.issubdtype(dtype, np.integer))
    return out, mask, window.shape


@pytest.mark.parametrize("factor", [2, 3, 6])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiles_upsampled_from_their_windows_are_the_whole_bands_values(factor: int, dtype) -> None:
    rng = np.random.default_rng(factor)
    coarse = rng.integers(1, 10000, size=(14, 15), dtype=np.uint16)
    valid = np.ones(coarse.shape, dtype=bool)
    valid[[0, 6, 13, 9], [4, 14, 0, 7]] = False  # nodata on the edges and inside
    height, width = 14 * factor, 15 * factor - 1  # the last coarse column half covered, as in real grids
    whole = np.empty((height, width), dtype=dtype)
    whole_mask = upsample_valid_into(whole, coarse, valid, factor, 0, 0, np.issubdtype(dtype, np.integer))
    for size in (5, 2 * factor + 1, 17):
        for row in range(0, height - size + 1, 3):
            for col in range(0, width - size + 1, 4):
                tile, mask, shape = _tile_from_window(coarse, valid, factor, row, col, size, dtype)
                assert max(shape) <= window_side(size, factor)
                expected_mask = whole_mask[row:row + size, col:col + size]
                got_mask = np.ones((size, size), dtype=bool) if mask is None else mask
                np.testing.assert_array_equal(got_mask, expected_mask, err_msg=f"mask of tile {row},{col}")
                expected = whole[row:row + size, col:col + size]
                np.testing.assert_array_equal(tile[expected_mask], expected[expected_mask],
                                              err_msg=f"tile {row},{col} of {size} px")


def test_a_window_without_nodata_gives_no_mask_and_the_plain_values() -> None:
    coarse = np.arange(1, 1 + 20 * 20, dtype=np.uint16).reshape(20, 20) * 7
    tile, mask, _ = _tile_from_window(coarse, None, 2, 9, 13, 11, np.uint16)
    whole = np.empty((40, 40), dtype=np.uint16)
    assert upsample_valid_into(whole, coarse, np.ones_like(coarse, dtype=bool), 2, 0, 0, True) is None
    assert mask is None
    np.testing.assert_array_equal(tile, whole[9:20, 13:24])


def test_a_tile_before_its_window_is_refused() -> None:
    with pytest.raises(ValueError, match="starts before its window"):
        upsample_tile(np.empty((4, 4), np.uint16), np.ones((4, 4), np.uint16), None, 2, (0, 3), (0, 4), True)


def test_the_strip_readers_tiles_come_back_from_the_coarse_bands_windows(example: dict[str, Path]) -> None:
    """On a real Sentinel-2-like scene (20 m and 60 m bands, a nodata corner), tiles at every phase."""
    import rasterio

    layout = inspect_scene(example["scene_dir"], None, None, None)
    height, width = layout.shape
    with StripReader(layout) as reader:
        raw, valid = reader.read_rows(0, height)
    size, checked = 20, 0
    for index, band in enumerate(layout.bands):
        factor = integer_upsampling(band.transform, layout.transform)
        if factor is None:
            continue
        with rasterio.open(band.path) as ds:
            dn = ds.read(band.index)
        band_valid = window_valid(dn, band, layout.sensor.fill_dn)
        for row in range(0, height - size + 1, 7):
            for col in range(0, width - size + 1, 5):
                tile, _, _ = _tile_from_window(dn, band_valid, factor, row, col, size, raw.dtype)
                kept = valid[row:row + size, col:col + size]  # the reader fills pixels invalid in any band
                np.testing.assert_array_equal(tile[kept], raw[index, row:row + size, col:col + size][kept],
                                              err_msg=f"{band.name} tile {row},{col}")
                checked += 1
    assert checked > 100 and not valid.all()


@pytest.mark.parametrize("factor", [2, 3, 6])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("nodata", [False, True])
def test_many_tiles_at_once_are_each_tiles_values_bit_for_bit(factor: int, dtype, nodata: bool) -> None:
    rng = np.random.default_rng(20 + factor)
    coarse = rng.integers(1, 10000, size=(13, 16), dtype=np.uint16).astype(dtype)
    # Scattered nodata (a tenth of the pixels): upsample_tiles weighs it out as upsample_tile does.
    coarse_valid = rng.random(coarse.shape) > 0.1 if nodata else np.ones(coarse.shape, dtype=bool)
    size = 2 * factor + 3
    side = window_side(size, factor)
    height, width = 13 * factor, 16 * factor - 1
    starts = [(r, c) for r in range(0, height - size + 1, 5) for c in range(0, width - size + 1, 7)]
    patches = np.zeros((len(starts), 2, side, side), dtype=dtype)
    patch_valid = np.ones(patches.shape, dtype=bool)
    spans = np.zeros((len(starts), 4), dtype=np.int32)
    expected = np.empty((len(starts), 2, size, size), dtype=dtype)
    expected_valid = np.ones(expected.shape, dtype=bool)
    for k, (row, col) in enumerate(starts):
        rows = window_span(row, size, factor, coarse.shape[0])
        cols = window_span(col, size, factor, coarse.shape[1])
        window = coarse[rows[0]:rows[1], cols[0]:cols[1]]
        window_valid = coarse_valid[rows[0]:rows[1], cols[0]:cols[1]]
        for channel, flip in enumerate((False, True)):
            values, valid = (window[::-1, ::-1].copy(), window_valid[::-1, ::-1].copy()) if flip else (window, window_valid)
            patches[k, channel, :window.shape[0], :window.shape[1]] = values
            patch_valid[k, channel, :window.shape[0], :window.shape[1]] = valid
            mask = upsample_tile(expected[k, channel], values, None if valid.all() else valid, factor,
                                 (rows[0], cols[0]), (row, col), np.issubdtype(dtype, np.integer))
            if mask is not None:
                expected_valid[k, channel] = mask
        spans[k] = (*window.shape, row - rows[0] * factor, col - cols[0] * factor)
    got = np.empty_like(expected)
    upsample_tiles(got, patches, spans, factor, np.issubdtype(dtype, np.integer), patch_valid if nodata else None)
    assert nodata == (not expected_valid.all())
    np.testing.assert_array_equal(got[expected_valid], expected[expected_valid])


def test_a_reused_batch_slot_holds_only_its_new_tile() -> None:
    """Batches come from reused memory: a slot that held an interior tile (full span, some nodata) and then an
    edge tile (shorter span, all valid) must read as if fresh: zero padding marked valid beyond the span."""
    size, factor, side = 8, 2, window_side(8, 2)
    grids = (CoarseGrid(factor, (1,), side),)
    band_shapes = [(32, 32), (16, 16)]
    rng = np.random.default_rng(3)
    noisy = CoarseRows(factor, 0, rng.integers(1, 1000, (16, 16)).astype(np.uint16), rng.random((16, 16)) > 0.2)
    clean = CoarseRows(factor, 0, rng.integers(1, 1000, (16, 16)).astype(np.uint16), None)
    valid = np.ones((size, size), dtype=bool)

    def fill(batches: CoarsePatchBatches, coarse: CoarseRows, row: int, col: int):
        batch = batches.new()
        batch.add(0, row, col, {1: coarse}, valid)
        return batch.take(1)

    pooled = CoarsePatchBatches(grids, band_shapes, 1, size, np.dtype(np.uint16), (0.0, 0.0), keep=1)
    first = fill(pooled, noisy, 9, 9)  # an odd start: the widest span
    assert first.spans[0][0, :2].tolist() == [side, side] and not first.patch_valid[0].all()
    address = first.patches[0].__array_interface__["data"][0]  # not a reference: that would keep it in use
    del first
    reused = fill(pooled, clean, 24, 24)  # bottom-right corner: the span is cut at the band's edge
    assert reused.patches[0].__array_interface__["data"][0] == address
    fresh = fill(CoarsePatchBatches(grids, band_shapes, 1, size, np.dtype(np.uint16), (0.0, 0.0)), clean, 24, 24)
    rows, cols = (int(v) for v in reused.spans[0][0, :2])
    assert rows < side and cols < side
    for name in ("patches", "patch_valid", "spans"):
        np.testing.assert_array_equal(getattr(reused, name)[0], getattr(fresh, name)[0])
    assert (reused.patches[0][0, 0, rows:] == 0).all() and reused.patch_valid[0].all()


@pytest.mark.parametrize("factor", [2, 3, 6])
def test_sums_from_patches_are_those_of_the_upsampled_tiles(factor: int) -> None:
    """upsampled_sums (Gram matrices of the interpolation, no upsampling) against upsample_tiles' float values,
    for tiles at every phase and at the band's edges (spans cut short)."""
    rng = np.random.default_rng(factor)
    size, height = 24, 90
    side = window_side(size, factor)
    band = rng.integers(0, 5000, (2, -(-height // factor), -(-height // factor))).astype(np.uint16)
    tiles = [(0, 0), (height - size, height - size), *((int(r), int(c)) for r, c in rng.integers(0, height - size, (10, 2)))]
    patches = np.zeros((len(tiles), 2, side, side), dtype=np.uint16)
    spans = np.zeros((len(tiles), 4), dtype=np.int32)
    for k, (row, col) in enumerate(tiles):
        first_row, stop_row = window_span(row, size, factor, band.shape[1])
        first_col, stop_col = window_span(col, size, factor, band.shape[2])
        patches[k, :, :stop_row - first_row, :stop_col - first_col] = band[:, first_row:stop_row, first_col:stop_col]
        spans[k] = (stop_row - first_row, stop_col - first_col, row - first_row * factor, col - first_col * factor)
    assert (spans[:, :2] < side).any()  # some spans are cut at the edge
    upsampled = np.empty((len(tiles), 2, size, size), dtype=np.float32)
    upsample_tiles(upsampled, patches, spans, factor, round_values=False)
    sums, squares = upsampled_sums(patches, spans, factor, size)
    values = upsampled.astype(np.float64)
    # float32 upsampling against float64 algebra: equal to a few parts in 10^8.
    np.testing.assert_allclose(sums, values.sum(axis=(2, 3)), rtol=1e-7)
    np.testing.assert_allclose(squares, (values**2).sum(axis=(2, 3)), rtol=1e-7)

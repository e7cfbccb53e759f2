"""Streaming ingest of a capture: the same tiles as the whole-cube stack, in bounded batches, in flat memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from domains.hyperspectral.bands import select_channels
from domains.hyperspectral.cube import open_cube
from domains.hyperspectral.stack import compute_stack
from domains.hyperspectral.streaming import compute_window, fit_statistics, plan_stack
from domains.hyperspectral.tiling import read_mask, read_samples
from domains.spec import IngestRequest


def _whole_cube_tiles(request: IngestRequest) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """The pre-streaming ingest: the whole stack in memory, then every tile that is not dropped."""
    cube = open_cube(request.source)
    stack, invalid = compute_stack(cube, select_channels(cube, request.channels))
    labels = read_mask(request.labels, cube) if request.labels else np.full(cube.grid, -1, np.int16)
    labels[invalid] = -1
    size, block, tiles = request.tile_size, request.block_size, {}
    for r in range(0, cube.grid[0] - size + 1, request.stride):
        for c in range(0, cube.grid[1] - size + 1, request.stride):
            window = (slice(r, r + size), slice(c, c + size))
            if (r // block == (r + size - 1) // block and c // block == (c + size - 1) // block
                    and invalid[window].mean() <= request.max_nodata_fraction
                    and (not request.labels or (labels[window] >= 0).any())):
                tiles[(r, c)] = (stack[(slice(None), *window)], labels[window])
    return tiles


@pytest.mark.parametrize("channels", [None, ("red", "ch4_mf", "ch4_ace")])
def test_windows_computed_apart_equal_the_whole_cube_stack(examples, channels):
    """Several detector windows (statistics fitted chunk by chunk), scored rectangle by rectangle."""
    cube = open_cube(examples["bsq"]["source"])
    sources = select_channels(cube, channels)
    expected, expected_invalid = compute_stack(cube, sources, tile=(20, 17))
    plan = fit_statistics(plan_stack(cube, sources, tile=(20, 17)))
    assert len(plan.row_windows) * len(plan.col_windows) == 9
    for rows, cols in [((0, 48), (0, 48)), ((5, 29), (11, 40)), ((40, 48), (0, 7))]:
        stack, invalid = compute_window(plan, rows, cols)
        window = (slice(*rows), slice(*cols))
        assert np.array_equal(invalid, expected_invalid[window])
        np.testing.assert_allclose(stack, expected[(slice(None), *window)], rtol=2e-4, atol=2e-3)


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
def test_streamed_tiles_equal_the_whole_cube_tiles(examples, interleave):
    request = IngestRequest(source=examples[interleave]["source"], labels=examples[interleave]["labels"],
                            tile_size=8, stride=4, block_size=16, batch_samples=7)
    expected = _whole_cube_tiles(request)
    batches = list(read_samples(request))
    assert max(len(b.images) for b in batches) == 7 and len(batches) > 3
    got = {tuple(loc): (img, lab) for b in batches for loc, img, lab in zip(b.locations.tolist(), b.images, b.labels)}
    assert sum(len(b.images) for b in batches) == len(got) == len(expected)
    assert set(got) == set(expected)
    for key, (image, labels) in expected.items():
        np.testing.assert_allclose(got[key][0], image, rtol=2e-4, atol=2e-3)
        assert np.array_equal(got[key][1], labels)
    # Counts over the batches give the whole capture's, and the provenance is stated once.
    dropped = {k: sum(b.dropped.get(k, 0) for b in batches) for k in ("straddles_block", "nodata", "unlabelled")}
    positions = len(range(0, 48 - 8 + 1, 4)) ** 2
    assert sum(dropped.values()) + len(expected) == positions and dropped["straddles_block"] > 0
    assert batches[0].provenance["grid_shape"] == "48x48" and float(batches[0].provenance["plume_fraction"]) > 0
    assert all(b.images.dtype == np.float32 and b.scaling is None for b in batches)


def test_multiband_geotiff_streams_through_rasterio_windows(example, tmp_path):
    """The same capture as a tiled, compressed GeoTIFF (bands tagged with wavelengths): same tiles again."""
    import rasterio
    from affine import Affine

    cube = open_cube(example["source"])
    tif = tmp_path / "capture.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=48, height=48, count=cube.bands, dtype="float32",
                       nodata=cube.ignore_value, tiled=True, blockxsize=16, blockysize=16, compress="deflate",
                       crs=cube.crs, transform=Affine(*cube.transform)) as ds:
        ds.write(cube.read())
        for band, (wave, fwhm) in enumerate(zip(cube.wavelengths_nm, cube.fwhm_nm), start=1):
            ds.update_tags(band, wavelength=f"{wave:.4f}", fwhm=f"{fwhm:.4f}")
    request = IngestRequest(source=tif, labels=example["labels"], tile_size=8, stride=8, block_size=16,
                            batch_samples=5)
    expected = _whole_cube_tiles(request)
    got = {tuple(loc): img for b in read_samples(request) for loc, img in zip(b.locations.tolist(), b.images)}
    assert set(got) == set(expected) and len(got) > 10 and open_cube(tif).kind == "geotiff"
    for key, (image, _) in expected.items():
        np.testing.assert_allclose(got[key], image, rtol=2e-4, atol=2e-3)


def test_demo_capture_streams_to_the_whole_cube_tiles(tmp_path):
    """The demo capture spans four detector windows of 272 px; its streamed tiles match the old path."""
    from domains.hyperspectral.demo import prepare_demo

    demo = prepare_demo(tmp_path)
    request = IngestRequest(source=demo["source"], labels=demo["labels"], tile_size=32, stride=32, block_size=64,
                            batch_samples=64)
    expected = _whole_cube_tiles(request)
    got = {tuple(loc): img for b in read_samples(request) for loc, img in zip(b.locations.tolist(), b.images)}
    assert set(got) == set(expected) and len(got) > 200
    for key, (image, _) in expected.items():
        np.testing.assert_allclose(got[key], image, rtol=2e-4, atol=2e-2)


_MEASURE = """
import sys, tracemalloc
from domains.hyperspectral.tiling import read_samples
from domains.spec import IngestRequest
tracemalloc.start()
count = 0
for batch in read_samples(IngestRequest(source=sys.argv[1], tile_size=16, stride=16, block_size=64, batch_samples=32)):
    count += len(batch.images)
print(tracemalloc.get_traced_memory()[1], count)
"""


def _mosaic(example: dict[str, Path], folder: Path, copies: int) -> Path:
    """A copies x copies mosaic of the example capture, written row band by row band (never whole)."""
    from domains.hyperspectral.envi import read_envi_header, write_envi, write_envi_rows

    header = read_envi_header(example["source"])
    cube = open_cube(example["source"])
    tile = cube.read()
    data = write_envi(folder / f"mosaic{copies}.bil", None, cube.wavelengths_nm, cube.fwhm_nm, interleave="bil",
                      ignore_value=cube.ignore_value, bad_bands=cube.bad_bands, dtype=header.dtype.name,
                      shape=(cube.bands, 48 * copies, 48 * copies))
    band = np.tile(tile, (1, 1, copies))
    for row in range(copies):
        write_envi_rows(data, band, row * 48)
    return data.with_suffix(".hdr")


def test_peak_memory_does_not_grow_with_the_capture(example, tmp_path):
    """Traced peak of a 4x larger capture (in pixels) stays within 1.3x of the smaller one's."""
    peaks = {}
    for copies in (6, 12):
        source = _mosaic(example, tmp_path, copies)
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(source)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[3])
        peak, count = map(int, run.stdout.split())
        assert count == (48 * copies // 16) ** 2
        peaks[copies] = peak
    print(json.dumps({"peak_traced_bytes": peaks}))
    assert peaks[12] <= 1.3 * peaks[6], peaks


def test_bands_of_an_integer_cube_stay_in_its_type_with_unit_scaling(example, tmp_path):
    """uint16 counts requested as bands only are stored as read; a methane product makes the batch float32."""
    from domains.hyperspectral.envi import read_envi_header, write_envi

    cube = open_cube(example["source"])
    counts = np.clip(np.rint(cube.read() * 10), 0, 65000).astype(np.uint16)
    data = write_envi(tmp_path / "counts.bsq", counts, cube.wavelengths_nm, cube.fwhm_nm, interleave="bsq",
                      bad_bands=cube.bad_bands)
    assert read_envi_header(data.with_suffix(".hdr")).dtype == np.uint16
    request = IngestRequest(source=data.with_suffix(".hdr"), tile_size=8, stride=8, block_size=16,
                            channels=("evenly-spaced:4",), batch_samples=4)
    batches = list(read_samples(request))
    assert all(b.images.dtype == np.uint16 and b.scaling == ((1.0, 0.0),) * 4 for b in batches)
    expected = _whole_cube_tiles(request)
    got = {tuple(loc): img for b in batches for loc, img in zip(b.locations.tolist(), b.physical())}
    assert set(got) == set(expected)
    assert all(np.array_equal(got[key], image) for key, (image, _) in expected.items())
    with_product = next(iter(read_samples(IngestRequest(source=data.with_suffix(".hdr"), tile_size=8, stride=8,
                                                        block_size=16, batch_samples=4))))
    assert with_product.images.dtype == np.float32 and with_product.scaling is None

"""Reading a capture and its plume mask into segmentation samples grouped by spatial block."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from domains.hyperspectral.bands import select_channels
from domains.hyperspectral.cube import Cube, open_cube
from domains.hyperspectral.streaming import StackPlan, compute_window, fit_statistics, plan_stack
from domains.input_guards import check_encodable_name, check_readable, input_errors_named
from domains.spec import DomainInputError, IngestRequest, SampleSet

DEFAULT_CLASS_NAMES = ("background", "plume")
MASK_NODATA = 255
# Side of the largest rectangle whose channels are computed at once (leakage blocks are usually smaller).
RECTANGLE_PX = 256


@dataclass(frozen=True)
class MaskRaster:
    """A plume mask raster checked against a cube's grid, read window by window."""

    path: Path
    target: Path
    nodata: float

    def read(self, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Labels of a window: int16 (rows, cols), 0 background, 1 plume, -1 unlabelled.

        Raises:
            DomainInputError: unreadable window, or values other than 0/1/nodata.
        """
        import rasterio
        from rasterio.windows import Window

        try:
            with input_errors_named(self.path), rasterio.open(self.target) as ds:
                r0, r1, _ = rows.indices(ds.height)
                c0, c1, _ = cols.indices(ds.width)
                data = ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        except rasterio.errors.RasterioIOError as error:
            raise DomainInputError(self.path, f"cannot be read as a mask raster: {error}") from None
        unlabelled = data == self.nodata
        values = np.unique(data[~unlabelled])
        if not set(values.tolist()) <= {0, 1}:
            raise DomainInputError(self.path, f"plume mask holds values {values.tolist()[:10]}; expected 0 "
                                              f"(background), 1 (plume) and {self.nodata:g} (unlabelled)")
        labels = data.astype(np.int16)
        labels[unlabelled] = -1
        return labels


def open_mask(path: Path | str, cube: Cube) -> MaskRaster:
    """Check a plume mask raster (GeoTIFF or ENVI, one band) against ``cube`` from its header, reading no pixel.

    Raises:
        DomainInputError: missing or unreadable file, more than one band, or a grid not matching the cube.
    """
    import rasterio

    path = Path(path)
    if not path.exists():
        raise DomainInputError(path, "plume mask does not exist")
    target = path
    if path.suffix.lower() == ".hdr":
        from domains.hyperspectral.envi import find_header_and_data

        target = find_header_and_data(path)[1]
    check_readable(target, "file")
    check_encodable_name(target)
    try:
        with input_errors_named(path), rasterio.open(target) as ds:
            if ds.count != 1:
                raise DomainInputError(path, f"plume mask must have 1 band, it has {ds.count}")
            if ds.shape != cube.grid:  # from the header, before reading a mask of the wrong size
                raise DomainInputError(path, f"plume mask is {ds.height}x{ds.width} px but the cube "
                                             f"{cube.path.name} is {cube.grid[0]}x{cube.grid[1]}")
            if cube.transform is not None and ds.crs is not None and not _same_transform(tuple(ds.transform)[:6],
                                                                                         cube.transform):
                raise DomainInputError(path, f"plume mask is not on the cube's grid: its geotransform "
                                             f"{tuple(round(v, 3) for v in tuple(ds.transform)[:6])} differs from "
                                             f"{cube.path.name}'s {tuple(round(v, 3) for v in cube.transform)}")
            nodata = ds.nodata if ds.nodata is not None else MASK_NODATA
    except rasterio.errors.RasterioIOError as error:
        raise DomainInputError(path, f"cannot be read as a mask raster: {error}") from None
    return MaskRaster(path, target, float(nodata))


def read_mask(path: Path | str, cube: Cube) -> np.ndarray:
    """Read a whole plume mask raster aligned with ``cube``: int16 (H, W), -1 unlabelled.

    Values: 0 background, 1 plume, the raster's nodata (default 255) unlabelled.

    Raises:
        DomainInputError: unreadable file, grid not matching the cube, or values other than 0/1/nodata.
    """
    return open_mask(path, cube).read()


def _same_transform(mask: tuple[float, ...], cube: tuple[float, ...]) -> bool:
    """Same pixel grid: equal pixel sizes, origins within a tenth of a pixel."""
    pixel = max(abs(cube[0]), abs(cube[4]), 1e-12)
    return all(abs(a - b) <= 0.1 * pixel for a, b in zip(mask, cube))


def check_geometry(request: IngestRequest, grid: tuple[int, int], path: Path) -> None:
    """Validate tile size, stride, block size and nodata fraction against a grid."""
    if request.tile_size < 1 or request.tile_size > min(grid):
        raise DomainInputError(path, f"tile_size {request.tile_size} must be between 1 and the cube's smaller side "
                                     f"({min(grid)} px)")
    if request.stride < 1:
        raise DomainInputError(path, f"stride {request.stride} must be at least 1")
    if request.block_size < request.tile_size:
        raise DomainInputError(path, f"block_size {request.block_size} must be at least tile_size {request.tile_size}")
    if not 0.0 <= request.max_nodata_fraction <= 1.0:
        raise DomainInputError(path, f"max_nodata_fraction {request.max_nodata_fraction} must be within [0, 1]")


def read_samples(request: IngestRequest) -> Iterator[SampleSet]:
    """Read a capture (channels per ``request.channels``, default RGB + Mag1c-SAS) and cut it into tiles.

    Tiles of ``tile_size`` start every ``stride`` px; a tile is dropped (and counted) when it straddles two
    spatial blocks of ``block_size`` px (so no pixel is shared across a split), when more than
    ``max_nodata_fraction`` of it is invalid, or, with a mask, when none of its pixels is labelled. Labels
    are per pixel: 0 background, 1 plume, -1 for unlabelled or invalid pixels.

    The capture is streamed: this call opens it, checks the request and reads it once to fit the methane
    statistics (so a bad file fails here); the returned iterator then computes the channels one leakage
    block at a time (at most :data:`RECTANGLE_PX` square) and yields batches of at most
    ``request.batch_samples`` tiles, in block order: float32, except bands alone from an 8- or 16-bit integer
    cube, which stay in its type with unit ``scaling``. The first batch carries the provenance; each batch
    carries the ``dropped`` counts since the one before (the last may hold no tile, only counts). Memory is
    one rectangle of bands plus one batch, whatever the capture's size.

    Raises:
        DomainInputError: a bad cube, mask or geometry (no other exception escapes for a bad file).
    """
    # One capture per ingest: whatever fails on a bad file becomes one error naming the source.
    with input_errors_named(request.source):
        plan, mask, facts = _prepare(request)
    return _stream_tiles(request, plan, mask, facts)


def _prepare(request: IngestRequest) -> tuple[StackPlan, MaskRaster | None, dict]:
    cube = open_cube(request.source)
    class_names = tuple(request.class_names) if request.class_names else DEFAULT_CLASS_NAMES
    if len(class_names) != 2:
        raise DomainInputError(cube.path, f"plume segmentation has two classes (background, plume), got {class_names}")
    check_geometry(request, cube.grid, cube.path)
    if request.batch_samples < 1:
        raise DomainInputError(cube.path, f"batch_samples {request.batch_samples} must be at least 1")
    sources = select_channels(cube, request.channels)
    mask = open_mask(request.labels, cube) if request.labels is not None else None
    plumes = [0]

    def count_plumes(rows: slice, cols: slice, invalid: np.ndarray) -> None:
        labels = mask.read(rows, cols)  # also checks the mask's values, before anything is yielded
        plumes[0] += int(((labels == 1) & ~invalid).sum())

    with input_errors_named(cube.path):  # GeoTIFF tiles are decoded here: a truncated file fails now
        plan = fit_statistics(plan_stack(cube, sources), count_plumes if mask is not None else None)
    pixels = cube.grid[0] * cube.grid[1]
    return plan, mask, {"class_names": class_names, "valid_fraction": 1 - plan.invalid_pixels / pixels,
                        "plume_fraction": plumes[0] / pixels}


def tile_starts(length: int, size: int, stride: int, block: int) -> tuple[int, list[list[int]]]:
    """Tile start positions along one axis: how many there are, and the ones inside a block, grouped.

    Groups hold starts of one block whose tiles span at most :data:`RECTANGLE_PX` (or one tile), so a
    group's pixels can be computed at once.
    """
    starts = list(range(0, length - size + 1, stride))
    groups: list[list[int]] = []
    for start in starts:
        if start // block != (start + size - 1) // block:
            continue
        last = groups[-1] if groups else None
        if last and last[0] // block == start // block and start + size - last[0] <= max(RECTANGLE_PX, size):
            last.append(start)
        else:
            groups.append([start])
    return len(starts), groups


def _stream_tiles(request: IngestRequest, plan: StackPlan, mask: MaskRaster | None, facts: dict) -> Iterator[SampleSet]:
    cube = plan.cube
    size, stride, block = request.tile_size, request.stride, request.block_size
    height, width = cube.grid
    all_rows, row_groups = tile_starts(height, size, stride, block)
    all_cols, col_groups = tile_starts(width, size, stride, block)
    kept_positions = sum(map(len, row_groups)) * sum(map(len, col_groups))
    # Counts since the last batch: each batch carries its own, so they add up however batches are consumed.
    dropped = {"straddles_block": all_rows * all_cols - kept_positions, "nodata": 0, "unlabelled": 0}
    centres = cube.wavelengths_nm
    provenance = {
        "format": cube.kind,
        "grid_shape": f"{height}x{width}",
        "bands": str(cube.bands),
        "wavelength_range_nm": f"{min(centres):.1f}-{max(centres):.1f}" if centres else "",
        "channel_sources": ",".join(f"{s.channel.name}<-{'band ' + str(s.band) if s.band >= 0 else s.product}"
                                    for s in plan.sources),
        "crs": cube.crs or "",
        "transform": ", ".join(repr(v) for v in cube.transform) if cube.transform else "",
        "valid_fraction": f"{facts['valid_fraction']:.4f}",
        "plume_fraction": f"{facts['plume_fraction']:.5f}" if mask is not None else "",
        "tile_size": str(size), "stride": str(stride), "block_size": str(block),
        "labels": str(request.labels or ""),
    }
    channels = tuple(s.channel for s in plan.sources)
    # Bands alone from an integer cube are stored as read (exact: float32 holds these integers), with unit
    # scaling; computed products make every channel float32 physical values.
    native = cube.dtype if cube.dtype.kind in "iu" and cube.dtype.itemsize <= 2 and not plan.products else None
    scaling = tuple((1.0, 0.0) for _ in channels) if native is not None else None
    dtype = native if native is not None else np.dtype(np.float32)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    kept: list[tuple[int, int]] = []
    first = True

    def batch() -> SampleSet:
        nonlocal first
        out = SampleSet(
            images=np.stack(images) if images else np.zeros((0, len(channels), size, size), dtype),
            labels=np.stack(labels) if labels else np.zeros((0, size, size), np.int16),
            groups=np.array([f"{cube.cube_id}:block-{r // block}-{c // block}" for r, c in kept], dtype=str),
            locations=np.array(kept, dtype=np.int64).reshape(-1, 2),
            source=str(cube.path), channels=channels, class_names=facts["class_names"],
            dropped=dict(dropped), provenance=provenance if first else {}, task="segmentation", scaling=scaling)
        first = False
        dropped.update({"straddles_block": 0, "nodata": 0, "unlabelled": 0})
        images.clear(), labels.clear(), kept.clear()
        return out

    with input_errors_named(cube.path):
        for rows in row_groups:
            for cols in col_groups:
                r0, r1, c0, c1 = rows[0], rows[-1] + size, cols[0], cols[-1] + size
                stack, invalid = compute_window(plan, (r0, r1), (c0, c1))
                window_labels = mask.read(slice(r0, r1), slice(c0, c1)) if mask is not None else None
                if window_labels is not None:
                    window_labels[invalid] = -1
                for row in rows:
                    for col in cols:
                        tile = (slice(row - r0, row - r0 + size), slice(col - c0, col - c0 + size))
                        if invalid[tile].mean() > request.max_nodata_fraction:
                            dropped["nodata"] += 1
                        elif window_labels is not None and not (window_labels[tile] >= 0).any():
                            dropped["unlabelled"] += 1
                        else:
                            # Copies, so a batch does not keep every rectangle it drew from alive.
                            images.append(stack[(slice(None), *tile)].astype(dtype))
                            labels.append(window_labels[tile].copy() if window_labels is not None
                                          else np.full((size, size), -1, dtype=np.int16))
                            kept.append((row, col))
                            if len(kept) == request.batch_samples:
                                yield batch()
                del stack, invalid, window_labels
        if kept or first or any(dropped.values()):
            yield batch()

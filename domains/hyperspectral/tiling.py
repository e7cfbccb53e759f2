"""Reading a capture and its plume mask into segmentation samples grouped by spatial block."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domains.hyperspectral.bands import select_channels
from domains.hyperspectral.cube import Cube, open_cube
from domains.hyperspectral.stack import compute_stack
from domains.input_guards import check_encodable_name, check_readable, input_errors_named
from domains.spec import DomainInputError, IngestRequest, SampleSet

DEFAULT_CLASS_NAMES = ("background", "plume")
MASK_NODATA = 255


def read_mask(path: Path | str, cube: Cube) -> np.ndarray:
    """Read a plume mask raster (GeoTIFF or ENVI, one band) aligned with ``cube``: int16 (H, W), -1 unlabelled.

    Values: 0 background, 1 plume, the raster's nodata (default 255) unlabelled.

    Raises:
        DomainInputError: unreadable file, grid not matching the cube, or values other than 0/1/nodata.
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
            data = ds.read(1)
            nodata = ds.nodata if ds.nodata is not None else MASK_NODATA
    except rasterio.errors.RasterioIOError as error:
        raise DomainInputError(path, f"cannot be read as a mask raster: {error}") from None
    unlabelled = data == nodata
    values = np.unique(data[~unlabelled])
    if not set(values.tolist()) <= {0, 1}:
        raise DomainInputError(path, f"plume mask holds values {values.tolist()[:10]}; expected 0 (background), "
                                     f"1 (plume) and {nodata:g} (unlabelled)")
    labels = data.astype(np.int16)
    labels[unlabelled] = -1
    return labels


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


def read_samples(request: IngestRequest) -> SampleSet:
    """Read a capture (channels per ``request.channels``, default RGB + Mag1c-SAS) and cut it into tiles.

    Tiles of ``tile_size`` start every ``stride`` px; a tile is dropped (and counted) when it straddles two
    spatial blocks of ``block_size`` px (so no pixel is shared across a split), when more than
    ``max_nodata_fraction`` of it is invalid, or, with a mask, when none of its pixels is labelled. Labels
    are per pixel: 0 background, 1 plume, -1 for unlabelled or invalid pixels.

    Raises:
        DomainInputError: a bad cube, mask or geometry (no other exception escapes for a bad file).
    """
    # One capture per ingest: whatever fails on a bad file becomes one error naming the source.
    with input_errors_named(request.source):
        return _read_samples(request)


def _read_samples(request: IngestRequest) -> SampleSet:
    cube = open_cube(request.source)
    class_names = tuple(request.class_names) if request.class_names else DEFAULT_CLASS_NAMES
    if len(class_names) != 2:
        raise DomainInputError(cube.path, f"plume segmentation has two classes (background, plume), got {class_names}")
    check_geometry(request, cube.grid, cube.path)
    sources = select_channels(cube, request.channels)
    labels = read_mask(request.labels, cube) if request.labels is not None else None
    with input_errors_named(cube.path):  # GeoTIFF tiles are decoded here: a truncated file fails now
        stack, invalid = compute_stack(cube, sources)
    if labels is not None:
        labels[invalid] = -1

    size, stride, block = request.tile_size, request.stride, request.block_size
    height, width = cube.grid
    dropped = {"straddles_block": 0, "nodata": 0, "unlabelled": 0}
    kept: list[tuple[int, int]] = []
    for row in range(0, height - size + 1, stride):
        for col in range(0, width - size + 1, stride):
            if row // block != (row + size - 1) // block or col // block != (col + size - 1) // block:
                dropped["straddles_block"] += 1
            elif invalid[row : row + size, col : col + size].mean() > request.max_nodata_fraction:
                dropped["nodata"] += 1
            elif labels is not None and not (labels[row : row + size, col : col + size] >= 0).any():
                dropped["unlabelled"] += 1
            else:
                kept.append((row, col))
    images = np.stack([stack[:, r : r + size, c : c + size] for r, c in kept]) if kept else \
        np.zeros((0, len(sources), size, size), np.float32)
    if labels is None:
        tile_labels = np.full((len(kept), size, size), -1, dtype=np.int16)
    else:
        tile_labels = np.stack([labels[r : r + size, c : c + size] for r, c in kept]) if kept else \
            np.zeros((0, size, size), np.int16)
    groups = np.array([f"{cube.cube_id}:block-{r // block}-{c // block}" for r, c in kept], dtype=str)
    centres = cube.wavelengths_nm
    return SampleSet(
        images=images.astype(np.float32, copy=False),
        labels=tile_labels.astype(np.int16, copy=False),
        groups=groups,
        locations=np.array(kept, dtype=np.int64).reshape(-1, 2),
        source=str(cube.path),
        channels=tuple(s.channel for s in sources),
        class_names=class_names,
        dropped=dropped,
        provenance={
            "format": cube.kind,
            "grid_shape": f"{height}x{width}",
            "bands": str(cube.bands),
            "wavelength_range_nm": f"{min(centres):.1f}-{max(centres):.1f}" if centres else "",
            "channel_sources": ",".join(f"{s.channel.name}<-{'band ' + str(s.band) if s.band >= 0 else s.product}"
                                        for s in sources),
            "crs": cube.crs or "",
            "transform": ", ".join(repr(v) for v in cube.transform) if cube.transform else "",
            "valid_fraction": f"{1 - invalid.mean():.4f}",
            "plume_fraction": f"{(labels == 1).mean():.5f}" if labels is not None else "",
            "tile_size": str(size), "stride": str(stride), "block_size": str(block),
            "labels": str(request.labels or ""),
        },
        task="segmentation",
    )

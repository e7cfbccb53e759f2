"""Sliding-window plume segmentation of a capture: a mask GeoTIFF in its geometry plus a plume list JSON."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from domains.hyperspectral.bands import PRODUCTS, ChannelSource, locate_channels
from domains.hyperspectral.cascade import CascadeCounts, screened, screening_channel
from domains.hyperspectral.cube import GEOTIFF_SUFFIXES, Cube, is_cube_file, open_cube
from domains.hyperspectral.stack import compute_stack
from domains.confinement import confined_path
from domains.input_guards import check_readable, input_errors_named
from domains.spec import DomainInputError, PredictionRequest, PredictionSummary, convert_units, printable_path

PREDICTION_NODATA = 255


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Tile offsets every ``stride`` with a last tile flush with the end, so every pixel is covered."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def segment_stack(stack: np.ndarray, invalid: np.ndarray, request: PredictionRequest) -> np.ndarray:
    """Average per-pixel class probabilities (K, H, W) of ``request.infer`` over overlapping tiles.

    ``stack`` holds the capture's values as read (band radiance or digital numbers, derived products in
    their own units), which is what datasets store (integer bands with unit scaling); each batch is
    converted to the model's ``input_scaling`` (the identity for a model trained on such a dataset).
    """
    k = len(request.class_names)
    size = request.tile_size
    height, width = invalid.shape
    positions = [(r, c) for r in tile_starts(height, size, request.stride) for c in tile_starts(width, size, request.stride)
                 if not invalid[r : r + size, c : c + size].all()]
    probabilities = np.zeros((k, height, width), dtype=np.float32)
    coverage = np.zeros((height, width), dtype=np.float32)
    for first in range(0, len(positions), request.batch_size):
        batch_positions = positions[first : first + request.batch_size]
        batch = convert_units(np.stack([stack[:, r : r + size, c : c + size] for r, c in batch_positions]), None,
                              request.input_scaling)
        output = np.asarray(request.infer(batch), dtype=np.float32)
        expected = (len(batch_positions), k, size, size)
        if output.shape != expected:
            raise ValueError(f"infer returned shape {output.shape} for a batch of {len(batch_positions)}; expected {expected}")
        if not np.isfinite(output).all():
            raise ValueError(f"infer returned non-finite probabilities for {request.input}")
        for (r, c), probs in zip(batch_positions, output):
            probabilities[:, r : r + size, c : c + size] += probs
            coverage[r : r + size, c : c + size] += 1.0
    covered = coverage > 0
    probabilities[:, covered] /= coverage[covered]
    return probabilities


def plume_list(classes: np.ndarray, probability: np.ndarray, enhancement: np.ndarray | None, cube: Cube,
               plume_class: int = 1) -> list[dict]:
    """Connected plume components (8-connected) with area, centroid, peak and integrated enhancement."""
    from scipy import ndimage

    labelled, count = ndimage.label(classes == plume_class, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(classes, dtype=np.float64), labelled, index)
    centroids = ndimage.center_of_mass(np.ones_like(classes, dtype=np.float64), labelled, index)
    mean_prob = ndimage.mean(probability, labelled, index)
    pixel_area = abs(cube.transform[0] * cube.transform[4]) if cube.transform else None
    plumes = []
    for i, (area, (row, col), prob) in enumerate(zip(areas, centroids, mean_prob), start=1):
        item = {"id": i, "area_px": int(area), "centroid_row": round(float(row), 2), "centroid_col": round(float(col), 2),
                "mean_probability": round(float(prob), 4)}
        if pixel_area:
            t = cube.transform
            item["area_m2"] = float(area * pixel_area)
            item["centroid_x"] = float(t[2] + (col + 0.5) * t[0] + (row + 0.5) * t[1])
            item["centroid_y"] = float(t[5] + (col + 0.5) * t[3] + (row + 0.5) * t[4])
        if enhancement is not None:
            values = enhancement[labelled == i]
            item["peak_enhancement_ppmm"] = round(float(values.max()), 2)
            item["integrated_enhancement_ppmm_px"] = round(float(values.sum()), 2)
            if pixel_area:
                item["integrated_enhancement_ppmm_m2"] = float(values.sum() * pixel_area)
        plumes.append(item)
    return sorted(plumes, key=lambda p: -p["area_px"])


def write_mask_raster(path: Path, cube: Cube, classes: np.ndarray, probability: np.ndarray,
                      request: PredictionRequest, sources: list[ChannelSource]) -> None:
    """Two uint8 bands on the cube's grid: class id and plume probability in percent (255 = no data)."""
    import warnings

    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    profile = dict(driver="GTiff", width=cube.grid[1], height=cube.grid[0], count=2, dtype="uint8",
                   nodata=PREDICTION_NODATA, compress="deflate")
    if cube.transform is not None:
        profile["transform"] = Affine(*cube.transform)
    if cube.crs is not None:
        profile["crs"] = cube.crs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an ungeoreferenced capture gives an ungeoreferenced mask
            with rasterio.open(partial, "w", **profile) as ds:
                # Tags before pixels: a tag set after GDAL flushed a block moves the TIFF directory, so
                # the bytes would depend on the shared block cache's timing (see the satellite writer).
                ds.set_band_description(1, "class")
                ds.set_band_description(2, "plume_probability_percent")
                ds.write_colormap(1, {0: (0, 0, 0, 0), 1: (255, 40, 0, 255), PREDICTION_NODATA: (0, 0, 0, 0)})
                ds.update_tags(class_names=",".join(request.class_names),
                               channels=",".join(s.channel.name for s in sources),
                               channel_sources=",".join(f"{s.channel.name}<-{s.band if s.band >= 0 else s.product}"
                                                        for s in sources),
                               tile_size=str(request.tile_size), stride=str(request.stride),
                               source=printable_path(request.input))  # tags are UTF-8: escape non-UTF-8 names
                ds.write(classes, 1)
                ds.write(probability, 2)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def plume_list_path(output: Path) -> Path:
    """Where the plume list of a mask raster goes: ``<mask stem>.plumes.json`` beside it."""
    return output.with_name(output.stem + ".plumes.json")


def predict_capture(request: PredictionRequest) -> PredictionSummary:
    """Segment plumes over a whole capture and write the mask raster and the plume list (see :func:`run_capture`)."""
    return run_capture(request)[0]


def run_capture(request: PredictionRequest, timings: dict[str, float] | None = None,
                ) -> tuple[PredictionSummary, np.ndarray, list[ChannelSource]]:
    """Segment plumes over a whole capture and write the mask raster and the plume list.

    The model's channels are located in the capture by wavelength (so a model trained on one sensor can
    run on another whose bands cover the same wavelengths), derived products are recomputed, tiles of
    ``tile_size`` move by ``stride`` with a flush last row/column, and overlapping probabilities are
    averaged. The plume list sits beside the mask as ``<mask stem>.plumes.json``; peak and integrated
    enhancement come from the model's methane channel (or a Mag1c-SAS product computed for the list).

    Raises:
        DomainInputError: a bad cube, channels that cannot be mapped, or a cube smaller than a tile.
        ValueError: ``infer`` misbehaves or the request is malformed.

    Returns:
        The receipt, the channel stack the model saw (C, H, W) and where each channel came from; with
        ``timings`` given, the seconds spent reading + deriving channels (``read_and_products``), in the
        model (``inference``) and writing (``write``) are stored in it.
    """
    import time

    clock = time.perf_counter()
    if len(request.class_names) != 2:
        raise ValueError(f"plume segmentation has two classes, got {request.class_names}")
    if request.stride < 1 or request.batch_size < 1:
        raise ValueError(f"stride ({request.stride}) and batch_size ({request.batch_size}) must be at least 1")
    cube = open_cube(request.input)
    if request.tile_size < 1 or request.tile_size > min(cube.grid):
        raise DomainInputError(cube.path, f"capture grid {cube.grid[0]}x{cube.grid[1]} is smaller than the model's "
                                          f"tile size {request.tile_size}")
    sources = locate_channels(cube, tuple(request.channels))
    with input_errors_named(cube.path):  # GeoTIFF tiles are decoded here: a truncated file fails now
        stack, invalid = compute_stack(cube, sources)
    after_read = time.perf_counter()
    cascade = CascadeCounts()
    if request.screen_ppmm is not None:
        request = replace(request, infer=_screened_infer(request, cascade))
    probabilities = segment_stack(stack, invalid, request)
    after_inference = time.perf_counter()
    predicted = ~invalid & (probabilities.sum(axis=0) > 0)
    classes = probabilities.argmax(axis=0).astype(np.uint8)
    plume_prob = np.rint(np.clip(probabilities[1], 0, 1) * 100).astype(np.uint8)
    classes[~predicted] = PREDICTION_NODATA
    plume_prob[~predicted] = PREDICTION_NODATA

    product = next((i for i, s in enumerate(sources) if s.product == "mag1c_sas"), None)
    if product is None:
        product = next((i for i, s in enumerate(sources) if s.product == "mf"), None)
    if product is not None:
        enhancement = stack[product]
    elif (classes == 1).any():
        enhancement = compute_stack(cube, [ChannelSource(sources[0].channel, product=PRODUCTS["ch4_mag1c"])])[0][0]
    else:
        enhancement = None

    output = Path(request.output)
    if output.is_dir():
        output = confined_path(output, cube.cube_id, "_plumes.tif")
    write_mask_raster(output, cube, classes, plume_prob, request, sources)
    plumes = plume_list(classes, probabilities[1], enhancement, cube)
    plume_list_path(output).write_text(json.dumps({
        "source": printable_path(request.input), "mask": printable_path(output), "crs": cube.crs,
        "plume_count": len(plumes),
        "enhancement_unit": "ppm·m (Mag1c-SAS)" if enhancement is not None else None, "plumes": plumes,
    }, indent=2))
    counts = np.bincount(classes[predicted], minlength=2)
    if timings is not None:
        timings.update(read_and_products=after_read - clock, inference=after_inference - after_read,
                       write=time.perf_counter() - after_inference)
        if request.screen_ppmm is not None:
            timings.update(screening=cascade.screen_seconds, model=cascade.model_seconds, tiles=cascade.tiles,
                           model_tiles=cascade.model_tiles)
    summary = PredictionSummary(input=printable_path(request.input), output=str(output),
                             samples=int(len(tile_starts(cube.grid[0], request.tile_size, request.stride))
                                         * len(tile_starts(cube.grid[1], request.tile_size, request.stride))),
                             class_counts={n: int(c) for n, c in zip(request.class_names, counts)})
    return summary, stack, sources


def _screened_infer(request: PredictionRequest, counts: CascadeCounts):
    """``request.infer`` behind the screening cascade (:mod:`domains.hyperspectral.cascade`) on the model's
    methane channel, the threshold converted to the units the model takes."""
    product = screening_channel(request.channels)
    threshold = float(request.screen_ppmm)
    if request.input_scaling is not None:
        scale, offset = request.input_scaling[product]
        threshold = (threshold - offset) / scale
    return screened(request.infer, product, threshold, len(request.class_names), background=0, counts=counts)


def list_prediction_inputs(path: Path | str) -> list[Path]:
    """Expand a path into captures: a cube file (ENVI header/data, GeoTIFF) is itself; a folder lists its cubes.

    Raises:
        DomainInputError: the path does not exist or holds no cube.
    """
    path = check_readable(path, "any")
    if path.is_file():
        if path.suffix.lower() in (".hdr", *GEOTIFF_SUFFIXES):
            return [path]
        for header in (path.with_suffix(".hdr"), path.with_name(path.name + ".hdr")):
            if header.is_file():
                return [path]
        raise DomainInputError(path, "is not a capture: expected an ENVI header/data pair or a GeoTIFF")
    cubes = sorted(p for p in path.iterdir() if not p.name.startswith(".") and is_cube_file(p)
                   and not p.name.endswith(("_plumes.tif", "mask.tif")))
    if not cubes:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise DomainInputError(path, f"holds no capture (an ENVI .hdr + data file, or a GeoTIFF); found: {found}")
    return cubes

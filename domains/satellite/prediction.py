"""Sliding-window prediction over a scene, read and written strip by strip as a class GeoTIFF on its grid."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from domains.confinement import confined_path
from domains.input_guards import check_readable, input_errors_named
from domains.satellite.clouds import CloudRows, plan_cloud_mask
from domains.satellite.scene import SceneLayout, describe_scales, inspect_scene
from domains.satellite.stac import write_prediction_item
from domains.satellite.strips import StripReader
from domains.satellite.timeseries import is_time_series, time_series_members
from domains.satellite.tiling import STRIP_BYTES
from domains.satellite.sensors import is_band_folder
from domains.spec import DomainInputError, PredictionRequest, PredictionSummary, convert_units, printable_path

# Value of unpredicted pixels in both output bands; class ids and percentages stay below it.
PREDICTION_NODATA = 255
SCENE_FILE_SUFFIXES = (".tif", ".tiff", ".json")

# Colours for the domain's default classes, then a qualitative palette for any others.
_CLASS_COLOURS = {
    "water": (31, 120, 180),
    "vegetation": (51, 160, 44),
    "bare_or_built": (202, 160, 110),
}
_PALETTE = (
    (228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0),
    (255, 255, 51), (166, 86, 40), (247, 129, 191), (153, 153, 153), (0, 0, 0),
)


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``size`` every ``stride`` along ``length``, the last one flush with the end.

    The extra flush tile makes the tiles cover every pixel even when ``length - size`` is not a multiple
    of ``stride``.
    """
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def predict_scene(request: PredictionRequest) -> PredictionSummary:
    """Classify every pixel of a scene by sliding the model over it, and write a class GeoTIFF.

    The scene is read with the bands named in ``request.channels`` (in that order), strip by strip as
    ingest reads it (:class:`~domains.satellite.strips.StripReader`), and the output is written strip by
    strip too, so memory follows the scene's width, not its size. Tiles of ``request.tile_size`` move by
    ``request.stride`` and the last row and column of tiles sit flush with the border, so every pixel is
    covered. Each tile's class probabilities are spread over its pixels and averaged where tiles overlap.
    Tiles without any valid pixel are skipped; invalid pixels inside a tile are filled with 0, as in
    training.

    The output GeoTIFF has the scene's exact CRS, transform and shape and two uint8 bands: class id (with
    a colour table) and confidence in percent (the averaged probability of the winning class). Both are
    255 where the scene is invalid. Tags record ``class_names`` (comma-joined), the channels and the tile
    geometry. It is written under a hidden name and renamed when complete.

    Args:
        request: input scene, output path (a file, or an existing folder to write
            ``<scene>_classes.tif`` into), channels, class names, tile geometry and ``infer``.

    Returns:
        Receipt with the number of tiles inferred and the pixel count of each class.

    Raises:
        DomainInputError: the scene is bad, lacks a band the model needs, or is smaller than a tile.
        ValueError: ``infer`` returned the wrong shape or non-finite values, or the request is malformed.
    """
    class_names = tuple(request.class_names)
    if request.task not in ("classification", "segmentation"):
        raise ValueError(f"satellite models classify tiles or segment pixels; got a {request.task} model")
    if not class_names or len(class_names) >= PREDICTION_NODATA:
        raise ValueError(f"between 1 and {PREDICTION_NODATA - 1} class names are needed, got {len(class_names)}")
    if any("," in name for name in class_names):
        raise ValueError(f"class names must not contain commas (they are stored comma-joined): {class_names}")
    if request.stride < 1 or request.batch_size < 1:
        raise ValueError(f"stride ({request.stride}) and batch_size ({request.batch_size}) must be at least 1")
    source = check_readable(request.input, "any")
    contract = request.input_contract or {}
    with input_errors_named(source):
        if source.is_dir() and is_time_series(source) and not all(c.name.startswith("t") and ":" in c.name
                                                                 for c in request.channels):
            dates = ", ".join(d for d, _ in time_series_members(source))
            raise DomainInputError(source, f"is a time series ({dates}) but the model takes one date: give each "
                                           "date's scene, or use a model trained on a time series")
        hint = _single(contract.get("sensor"))
        # The scene as its names show it first, so that a sensor or level mismatch is what gets reported
        # (not a band the other sensor lacks); then with the model's bands, in the model's order.
        whole = None
        for sensor in dict.fromkeys((None, hint)):
            try:
                whole = inspect_scene(source, None, sensor, None)
                break
            except DomainInputError:
                continue
        if whole is not None:
            check_input_contract(contract, whole)
        layout = inspect_scene(source, tuple(c.name for c in request.channels), hint, None)
        check_input_contract(contract, layout)
        masker = plan_cloud_mask(_single(contract.get("cloud_policy")) or "none", layout)
    height, width = layout.shape
    size = request.tile_size
    if size < 1 or size > min(height, width):
        raise DomainInputError(
            request.input, f"scene grid {height}x{width} is smaller than the model's tile size {size}"
        )
    output_path = Path(request.output)
    if output_path.is_dir():
        output_path = confined_path(output_path, layout.path.name if layout.path.is_dir() else layout.path.stem,
                                    "_classes.tif")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial")
    try:
        cloud_mask = masker.description if masker is not None else "none"
        with input_errors_named(source), StripReader(layout) as reader, \
                _open_prediction_raster(partial, layout, class_names, request, cloud_mask) as out, \
                (CloudRows(layout, masker) if masker is not None else nullcontext()) as clouds:
            samples, counts, cloud_pixels = _predict_strips(reader, out, request, class_names, clouds)
        _add_tag_after_pixels(partial, "cloud_pixels", str(cloud_pixels))
        os.replace(partial, output_path)
        # A STAC item beside the map, so that a catalogue picks the prediction up.
        write_prediction_item(output_path, layout, class_names, source)
    finally:
        partial.unlink(missing_ok=True)
    return PredictionSummary(
        input=printable_path(request.input),
        output=str(output_path),
        samples=samples,
        class_counts={name: int(n) for name, n in zip(class_names, counts)},
    )


def _single(value: str | None) -> str | None:
    """A contract value recorded for one source, or None when sources differed (stored as a JSON object)."""
    return None if not value or value.startswith("{") else value


def _values(value: str | None) -> set[str]:
    import json

    if not value:
        return set()
    return set(json.loads(value).values()) if value.startswith("{") else {value}


def check_input_contract(contract: dict, layout: SceneLayout) -> None:
    """Refuse a scene whose sensor, processing level or units differ from what the model was trained on.

    ``contract`` holds the dataset facts a satellite model carries (``sensor``, ``level``, ``channels``,
    ``scaling_units``, ``cloud_policy``); a fact the model or the scene does not know is not compared (a
    flat Sentinel-2 export does not say whether it is L1C or L2A). Band order is the model's own: the scene
    is read in that order. The per-scene coefficients (an MTL file's) may differ; the unit they lead to
    may not.

    Raises:
        DomainInputError: naming each fact that differs, the model's value and the scene's.
    """
    differences = []
    sensors = _values(contract.get("sensor"))
    if sensors and layout.sensor.name not in sensors:
        differences.append(f"sensor {layout.sensor.name} (the model was trained on {', '.join(sorted(sensors))})")
    levels = _values(contract.get("level")) - {""}
    if levels and layout.level and layout.level not in levels:
        differences.append(f"processing level {layout.level} (the model was trained on {', '.join(sorted(levels))})")
    units = _values(contract.get("scaling_units"))
    if units and contract.get("channels") and not contract["channels"].startswith("{"):
        trained = dict(zip(contract["channels"].split(","), next(iter(units)).split(","))) if len(units) == 1 else {}
        for band in layout.bands:
            if band.name in trained and trained[band.name] != band.scale.unit:
                differences.append(f"band {band.name} in {band.scale.unit} (the model was trained on "
                                   f"{trained[band.name]})")
    if differences:
        raise DomainInputError(layout.path, "does not match the model's radiometric contract: " + "; ".join(differences))


def _predict_strips(reader: StripReader, out: Any, request: PredictionRequest, class_names: tuple[str, ...],
                    clouds: CloudRows | None = None) -> tuple[int, np.ndarray, int]:
    """Infer tile rows strip by strip; write every output row once no later tile can touch it.

    The model is fed the scene's digital numbers converted to its own raw units (``request.input_scaling``,
    the stored units of its training dataset): a scene of the same product convention gives the stored
    numbers exactly; one whose scaling differs (another Sentinel-2 processing baseline and its -1000 DN
    offset, a Landsat scene's own MTL coefficients) is converted through reflectance, so the model sees
    what it was trained on. Invalid pixels get the raw value of physical 0, as the dataset reader writes.
    Cloud masking works on physical values (reflectance thresholds).
    """
    from rasterio.windows import Window

    layout = reader.layout
    height, width = layout.shape
    size, k = request.tile_size, len(class_names)
    scale = np.array([s for s, _ in reader.scaling], dtype=np.float32)[:, None, None]
    offset = np.array([o for _, o in reader.scaling], dtype=np.float32)[:, None, None]
    row_starts = tile_starts(height, size, request.stride)
    col_starts = tile_starts(width, size, request.stride)
    # Physical 0 in the model's units: what the dataset reader stores on invalid pixels (see fill_values).
    fill = convert_units(np.zeros((1, len(reader.scaling), 1), np.float32), None, request.input_scaling)[0, :, 0]
    per_strip = max(1, (STRIP_BYTES // max(1, len(layout.bands) * width * 4) - size) // request.stride + 1)
    strips = [row_starts[i : i + per_strip] for i in range(0, len(row_starts), per_strip)]
    counts = np.zeros(k, dtype=np.int64)
    samples = valid_seen = cloud_pixels = 0
    segmentation = request.task == "segmentation"
    # Rows from `pending` down to the current strip's bottom still collect probabilities.
    pending = 0
    probabilities = np.zeros((k, 0, width), dtype=np.float32)
    coverage = np.zeros((0, width), dtype=np.float32)
    valid_rows = np.zeros((0, width), dtype=bool)
    for index, rows in enumerate(strips):
        top, bottom = rows[0], rows[-1] + size
        raw, valid = reader.read_rows(top, bottom)
        if clouds is not None:
            # Cloud and shadow pixels are nodata: the model never saw them as land cover.
            cloudy = clouds.rows(top, bottom, raw.astype(np.float32) * scale + offset, valid)
            first_new = (pending + coverage.shape[0]) - top
            cloud_pixels += int(np.count_nonzero(cloudy[max(0, first_new):]))
            valid = valid & ~cloudy
        data = convert_units(raw[None], reader.scaling, request.input_scaling)[0]
        data[:, ~valid] = fill[:, None]
        del raw
        # Grow the accumulators to the strip's bottom (strips may overlap rows already pending).
        grow = bottom - (pending + coverage.shape[0])
        probabilities = np.concatenate([probabilities, np.zeros((k, grow, width), dtype=np.float32)], axis=1)
        coverage = np.concatenate([coverage, np.zeros((grow, width), dtype=np.float32)])
        valid_rows = np.concatenate([valid_rows[: top - pending], valid])
        positions = [(r, c) for r in rows for c in col_starts if valid[r - top : r - top + size, c : c + size].any()]
        for first in range(0, len(positions), request.batch_size):
            batch_positions = positions[first : first + request.batch_size]
            batch = np.stack([data[:, r - top : r - top + size, c : c + size] for r, c in batch_positions])
            output = np.asarray(request.infer(batch))
            # Segmentation models give a class distribution per pixel, tile models one per tile.
            expected = (len(batch_positions), k, size, size) if segmentation else (len(batch_positions), k)
            if output.shape != expected:
                raise ValueError(
                    f"infer returned shape {output.shape} for a batch of {len(batch_positions)}; expected {expected}"
                )
            if not np.isfinite(output).all():
                raise ValueError(f"infer returned non-finite probabilities for {request.input}")
            for (row, col), probs in zip(batch_positions, output.astype(np.float32)):
                local = row - pending
                probabilities[:, local : local + size, col : col + size] += (probs if segmentation
                                                                             else probs[:, None, None])
                coverage[local : local + size, col : col + size] += 1.0
        samples += len(positions)
        done = height if index == len(strips) - 1 else strips[index + 1][0]
        finished = done - pending
        classes, confidence = _classify_rows(probabilities[:, :finished], coverage[:finished],
                                             valid_rows[:finished])
        predicted = classes != PREDICTION_NODATA
        counts += np.bincount(classes[predicted], minlength=k)[:k]
        valid_seen += int(valid_rows[:finished].sum())
        out.write(classes, 1, window=Window(0, pending, width, finished))
        out.write(confidence, 2, window=Window(0, pending, width, finished))
        probabilities, coverage = probabilities[:, finished:], coverage[finished:]
        valid_rows = valid_rows[finished:]
        pending = done
    if valid_seen == 0:
        raise DomainInputError(layout.path, "holds no valid pixel: every pixel is nodata in at least one band")
    return samples, counts, cloud_pixels


def _classify_rows(probabilities: np.ndarray, coverage: np.ndarray,
                   valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and confidence (percent) of finished rows; 255 where invalid or not covered."""
    covered = coverage > 0
    probabilities = probabilities.copy()
    probabilities[:, covered] /= coverage[covered]
    classes = probabilities.argmax(axis=0).astype(np.uint8)
    confidence = np.rint(np.clip(probabilities.max(axis=0), 0.0, 1.0) * 100).astype(np.uint8)
    predicted = valid & covered
    classes[~predicted] = PREDICTION_NODATA
    confidence[~predicted] = PREDICTION_NODATA
    return classes, confidence


@contextmanager
def _open_prediction_raster(path: Path, layout: SceneLayout, class_names: tuple[str, ...],
                            request: PredictionRequest, cloud_mask: str) -> Iterator[Any]:
    """Open the two-band uint8 class/confidence GeoTIFF on the scene's grid, tags and colours set.

    Every tag known before the pixels is set before them: GDAL writes the TIFF directory with the first
    block it flushes, and a tag changed after that moves the directory to the end of the file, so the
    bytes would depend on when GDAL's shared block cache happened to flush (other scenes being written
    on other threads), not only on what was written.
    """
    import rasterio

    height, width = layout.shape
    profile = dict(
        driver="GTiff", width=width, height=height, count=2, dtype="uint8", crs=layout.crs,
        transform=layout.transform, nodata=PREDICTION_NODATA, compress="deflate",
    )
    colours = {
        i: (*_CLASS_COLOURS.get(name, _PALETTE[i % len(_PALETTE)]), 255) for i, name in enumerate(class_names)
    }
    colours[PREDICTION_NODATA] = (0, 0, 0, 0)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write_colormap(1, colours)
        ds.set_band_description(1, "class")
        ds.set_band_description(2, "confidence_percent")
        ds.update_tags(
            class_names=",".join(class_names),
            channels=",".join(c.name for c in layout.channels),
            sensor=layout.sensor.name,
            scaling=describe_scales(layout.channels, layout.scales),
            tile_size=str(request.tile_size),
            stride=str(request.stride),
            source=printable_path(request.input),  # tags are UTF-8: escape non-UTF-8 names
            cloud_mask=cloud_mask,
        )
        yield ds


def _add_tag_after_pixels(path: Path, name: str, value: str) -> None:
    """Add a tag known only once every pixel is written, on the closed file: the directory then always moves
    to the end, whatever the block cache did while the pixels were written (see _open_prediction_raster)."""
    import rasterio

    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**{name: value})


def _looks_like_scene(child: Path) -> bool:
    """A GeoTIFF (or a link named like one, even a broken one) or a band folder; unreadable folders too.

    Anything that looks like an input is listed, so that predicting it reports what is wrong with it,
    rather than it vanishing from the batch without a word.
    """
    if child.suffix.lower() in SCENE_FILE_SUFFIXES and (child.is_file() or child.is_symlink()):
        return True
    if not child.is_dir():
        return False
    try:
        return is_band_folder(child) or is_time_series(child) or (child / "catalog.json").is_file()
    except OSError:  # no permission to list it: report it when it is read
        return True


def list_prediction_inputs(path: Path | str) -> list[Path]:
    """Expand a path into the scenes it holds.

    * a GeoTIFF file, or a folder whose rasters are recognised band files, is one scene: ``[path]``;
    * any other folder is a drop folder: each child that is a GeoTIFF or a band folder, sorted by name.
      Other children (notes, sub-folders without band files) are skipped.

    Args:
        path: a scene or a drop folder.

    Returns:
        The scene paths.

    Raises:
        DomainInputError: the path does not exist, is not a GeoTIFF, or holds no scene.
    """
    path = check_readable(path, "any")
    if path.is_file():
        if path.suffix.lower() not in SCENE_FILE_SUFFIXES:
            raise DomainInputError(path, f"is not a scene: expected a GeoTIFF or a STAC item "
                                         f"({', '.join(SCENE_FILE_SUFFIXES)})")
        return [path]
    if is_band_folder(path) or is_time_series(path) or (path / "catalog.json").is_file():
        return [path]
    children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    scenes = [child for child in children if _looks_like_scene(child)]
    if not scenes:
        found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in children) or "nothing"
        raise DomainInputError(
            path, f"holds no scene (a GeoTIFF, or a folder of band files such as ..._B04.tif); found: {found}"
        )
    return scenes


"""Per-slide predictions: a heatmap (pyramidal OME-TIFF), a QuPath GeoJSON of confident tiles, a JSON report.

A slide is scored tile by tile exactly as it was read at ingest (tissue mask, the same grid at the same
mpp, the same quality filters). Three files per slide, side by side in the output folder:

- ``<name>.json`` (the prediction the predict stage lists): slide scores per class (mean, mean of the
  top-k tiles ``top_k_mean``, max), the classes present (``top_k_mean`` at least :data:`THRESHOLD`), the
  top tiles per class with their coordinates, counts.
- ``<name>.heatmap.ome.tif``: float32 (classes, rows, cols) probabilities, one pixel per tile step, NaN
  where no tile was scored; PhysicalSizeX/Y = the tile step in micrometres, and pixel (0, 0) starts at the
  slide's scanned-area offset, so it lies over the slide when scaled by the step.
- ``<name>.tiles.geojson``: a QuPath FeatureCollection with one detection per tile whose top class
  probability is at least :data:`THRESHOLD`, in QuPath coordinates (level-0 pixels minus the slide's
  bounds offset), classified by that class, with the probabilities as measurements.

A slide-level model (attention MIL, trained on bags of a slide's tiles) scores the slide as a whole: the
report's ``slide_score`` holds the model's class probabilities for the slide, ``top_tiles`` the tiles with the
most attention, the heatmap has one channel, ``attention`` (each tile's weight times the number of tiles
scored: 1 is an average tile), and the GeoJSON outlines the tiles with at least :data:`ATTENTION_FACTOR`
times the average attention, classified by the slide's predicted class. A slide with more tissue tiles than
the model's ``bag_max_tiles`` is scored on an even spread of them (the report says how many).

Only pseudonyms name a slide in these outputs; nothing from the slide's metadata but its resolution.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from domains.confinement import confined_path
from domains.histopathology.reader import UINT8_SCALING, DEFAULT_TILE_MPP, list_slides, plan_slide_tiles, \
    quality_filtered, slide_pseudonym
from domains.spec import DomainInputError, PredictionRequest, PredictionSummary, convert_units

REPORT_FORMAT = "vitrail-histopathology-slide/1"
THRESHOLD = 0.5
TOP_K = 16
"""Slide score: mean probability of the k most confident tiles per class (a simple stand-in for MIL)."""
TOP_TILES = 8
HEATMAP_SUFFIX = ".heatmap.ome.tif"
GEOJSON_SUFFIX = ".tiles.geojson"
MAX_NODATA_FRACTION = 0.5
HEATMAP_MIN_LEVEL_SIDE = 64
ATTENTION_FACTOR = 2.0
"""Slide models: tiles with at least this many times the average attention are outlined in the GeoJSON."""


def prediction_name(path: Path) -> str:
    """Output name of one slide: ``slide-<keyed hash of its file name>`` (slide names often carry identity)."""
    return "slide-" + slide_pseudonym(Path(path).name).split("-", 1)[1]


def list_prediction_inputs(path: Path | str) -> list[Path]:
    """One input per slide: a slide file is itself; a folder gives its slide files (see :func:`list_slides`)."""
    path = Path(path)
    if path.is_dir():
        return list_slides(path) or [path]
    return [path]


def model_inputs(request: PredictionRequest, tiles: np.ndarray) -> np.ndarray:
    """8-bit RGB tiles (N, H, W, 3) as the model's input (N, 3, H, W) float32 in ``request.input_scaling`` units.

    A model trained on a Vitrail dataset takes the 8-bit values themselves (its ``input_scaling`` is the
    dataset's 1/255); a model of physical units (logged before models recorded their units) gets [0, 1].
    """
    return convert_units(tiles.transpose(0, 3, 1, 2), UINT8_SCALING, request.input_scaling)


def _infer(request: PredictionRequest, tiles: np.ndarray) -> np.ndarray:
    images = model_inputs(request, tiles)
    out = []
    for start in range(0, len(images), request.batch_size):
        part = images[start:start + request.batch_size]
        probabilities = np.asarray(request.infer(part), dtype=np.float32)
        if probabilities.shape != (len(part), len(request.class_names)):
            raise ValueError(f"infer returned shape {probabilities.shape}; expected ({len(part)}, "
                             f"{len(request.class_names)})")
        if not np.isfinite(probabilities).all():
            raise ValueError("infer returned non-finite scores")
        out.append(probabilities)
    return np.concatenate(out) if out else np.zeros((0, len(request.class_names)), np.float32)


def _heatmap(geometry, origins: np.ndarray, scores: np.ndarray, step: tuple[float, float]) -> np.ndarray:
    """(K, rows, cols) float32 heatmap on the tile-step grid starting at the bounds offset; NaN unscored."""
    cols = max(1, int(np.ceil((geometry.width - geometry.bounds_x) / step[0])))
    rows = max(1, int(np.ceil((geometry.height - geometry.bounds_y) / step[1])))
    heat = np.full((scores.shape[1], rows, cols), np.nan, dtype=np.float32)
    if len(origins):
        c = np.clip(np.round((origins[:, 0] - geometry.bounds_x) / step[0]).astype(int), 0, cols - 1)
        r = np.clip(np.round((origins[:, 1] - geometry.bounds_y) / step[1]).astype(int), 0, rows - 1)
        heat[:, r, c] = scores.T
    return heat


def _downsample(heat: np.ndarray) -> np.ndarray:
    k, rows, cols = heat.shape
    rows2, cols2 = rows // 2, cols // 2
    blocks = heat[:, :rows2 * 2, :cols2 * 2].reshape(k, rows2, 2, cols2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN block (no tissue) stays NaN
        return np.nanmean(blocks, axis=(2, 4)).astype(np.float32)


def write_heatmap(path: Path, heat: np.ndarray, pixel_um: tuple[float, float], class_names: tuple[str, ...]) -> Path:
    """Write a (K, rows, cols) heatmap as a pyramidal OME-TIFF (SubIFD levels halving until small)."""
    import tifffile

    levels = [heat]
    while min(levels[-1].shape[1:]) // 2 >= HEATMAP_MIN_LEVEL_SIDE:
        levels.append(_downsample(levels[-1]))
    metadata = {"axes": "CYX", "PhysicalSizeX": pixel_um[0], "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": pixel_um[1], "PhysicalSizeYUnit": "µm", "Channel": {"Name": list(class_names)}}
    tile = (64, 64) if min(heat.shape[1:]) >= 64 else None
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, tile=tile, compression="zlib",
                  photometric="minisblack")
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=tile if min(level.shape[1:]) >= 64 else None,
                      compression="zlib", photometric="minisblack")
    return path


def tile_features(origins: np.ndarray, scores: np.ndarray, size_level0: tuple[float, float],
                  bounds: tuple[int, int], class_names: tuple[str, ...], threshold: float = THRESHOLD) -> dict:
    """QuPath GeoJSON (FeatureCollection) of the tiles whose top probability reaches ``threshold``."""
    features = []
    top = scores.argmax(axis=1) if len(scores) else np.zeros(0, int)
    for (x, y), probabilities, best in zip(origins, scores, top):
        if probabilities[best] < threshold:
            continue
        x0, y0 = float(x - bounds[0]), float(y - bounds[1])
        x1, y1 = x0 + size_level0[0], y0 + size_level0[1]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "detection", "isLocked": True,
                           "classification": {"name": class_names[best]},
                           "measurements": {f"probability {n}": round(float(p), 6)
                                            for n, p in zip(class_names, probabilities)}},
        })
    return {"type": "FeatureCollection", "features": features}


def _slide_scores(scores: np.ndarray, origins: np.ndarray, bounds: tuple[int, int],
                  class_names: tuple[str, ...]) -> tuple[dict, dict]:
    summary, top_tiles = {}, {}
    k = min(TOP_K, len(scores))
    for index, name in enumerate(class_names):
        column = scores[:, index]
        order = np.argsort(-column, kind="stable")
        summary[name] = {"mean": round(float(column.mean()), 6),
                         "top_k_mean": round(float(column[order[:k]].mean()), 6),
                         "max": round(float(column.max()), 6)}
        top_tiles[name] = [{"level0_xy": [int(origins[i, 0]), int(origins[i, 1])],
                            "qupath_xy": [int(origins[i, 0] - bounds[0]), int(origins[i, 1] - bounds[1])],
                            "probability": round(float(column[i]), 6)} for i in order[:TOP_TILES]]
    return summary, top_tiles


def predict_slide(request: PredictionRequest) -> PredictionSummary:
    """Score every tissue tile of one slide and write the report, heatmap and GeoJSON (see the module doc).

    A slide without any tissue tile gets its report too, with no slide score, an empty GeoJSON and an
    all-NaN heatmap.

    Raises:
        DomainInputError: the slide cannot be opened (unreadable, no mpp and none given, ...);
            ValueError: ``infer`` returned the wrong shape or non-finite values.
    """
    from domains.histopathology.slide import open_slide

    if request.task != "classification":
        raise DomainInputError(request.input, f"histopathology predicts tile classification, not {request.task}")
    tile_mpp = request.tile_mpp or DEFAULT_TILE_MPP
    names = tuple(request.class_names)
    name = slide_pseudonym(Path(request.input).name)
    output = Path(request.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    if request.infer_bag is not None:
        return _predict_slide_bag(request, tile_mpp, names, name, output, stem)
    with open_slide(request.input, mpp=request.mpp) as slide:
        geometry = slide.geometry
        plan = plan_slide_tiles(slide, request.tile_size, tile_mpp, request.stride, MAX_NODATA_FRACTION)
        kept_origins, kept_scores = [], []
        for tiles, origins in slide.iter_tiles(plan.origins, request.tile_size, tile_mpp, batch=request.batch_size * 4):
            good = quality_filtered(tiles, plan.dropped)
            if good.any():
                kept_scores.append(_infer(request, tiles[good]))
                kept_origins.append(origins[good])
    # A slide without tissue (blank glass, a failed scan) is a result, not an input error: its report says so.
    scores = np.concatenate(kept_scores) if kept_scores else np.zeros((0, len(names)), np.float32)
    origins = np.concatenate(kept_origins) if kept_origins else np.zeros((0, 2), np.int64)
    step = (request.stride * tile_mpp / geometry.mpp_x, request.stride * tile_mpp / geometry.mpp_y)
    bounds = (geometry.bounds_x, geometry.bounds_y)
    heat_path = write_heatmap(confined_path(output.parent, stem, HEATMAP_SUFFIX),
                              _heatmap(geometry, origins, scores, step),
                              (step[0] * geometry.mpp_x, step[1] * geometry.mpp_y), names)
    size_level0 = (request.tile_size * tile_mpp / geometry.mpp_x, request.tile_size * tile_mpp / geometry.mpp_y)
    geojson_path = confined_path(output.parent, stem, GEOJSON_SUFFIX)
    geojson = tile_features(origins, scores, size_level0, bounds, names)
    geojson_path.write_text(json.dumps(geojson))
    k = min(TOP_K, len(scores))
    if len(scores):
        summary, top_tiles = _slide_scores(scores, origins, bounds, names)
        # "Present" rather than one argmax class: every slide holds normal tissue; what a slide has is the
        # set of classes some of its tiles are confidently (a tumour is present if a few tiles are tumour).
        present = [n for n in names if summary[n]["top_k_mean"] >= THRESHOLD]
    else:
        summary, top_tiles, present = None, {}, []
    counts = np.bincount(scores.argmax(axis=1), minlength=len(names))
    report = {
        "format": REPORT_FORMAT, "slide": name, "task": "tile-classification", "classes": list(names),
        "resolution": {"mpp_x": geometry.mpp_x, "mpp_y": geometry.mpp_y, "mpp_source": geometry.mpp_source,
                       "width": geometry.width, "height": geometry.height, "bounds": list(bounds)},
        "tiles": {"size": request.tile_size, "mpp": tile_mpp, "stride": request.stride, "scored": int(len(scores)),
                  "dropped": {k2: int(v) for k2, v in plan.dropped.items() if v},
                  "per_class": {n: int(c) for n, c in zip(names, counts)}},
        "slide_score": {"aggregation": "top_k_mean: mean of the k most probable tiles per class (mean and max "
                                       "beside it); null when no tissue tile was found",
                        "k": k, "threshold": THRESHOLD, "per_class": summary, "present": present},
        "top_tiles": top_tiles,
        "outputs": {"heatmap": heat_path.name, "geojson": geojson_path.name,
                    "heatmap_pixel_um": [step[0] * geometry.mpp_x, step[1] * geometry.mpp_y],
                    "heatmap_origin_level0": list(bounds), "geojson_threshold": THRESHOLD,
                    "geojson_tiles": len(geojson["features"])},
        "quarantine": [],
    }
    output.write_text(json.dumps(report, indent=2))
    return PredictionSummary(input=name, output=str(output), samples=int(len(scores)),
                             class_counts={n: int(c) for n, c in zip(names, counts)})



def _even_spread(count: int, most: int) -> np.ndarray:
    """Indices of at most ``most`` of ``count`` items, spread evenly (all of them when there are few)."""
    if count <= most:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, most).round().astype(np.int64))


def _predict_slide_bag(request: PredictionRequest, tile_mpp: float, names: tuple[str, ...], name: str,
                       output: Path, stem: str) -> PredictionSummary:
    """A slide model's prediction: every kept tile (at most ``bag_max_tiles``) in one bag, attention as the map."""
    from domains.histopathology.slide import open_slide

    with open_slide(request.input, mpp=request.mpp) as slide:
        geometry = slide.geometry
        plan = plan_slide_tiles(slide, request.tile_size, tile_mpp, request.stride, MAX_NODATA_FRACTION)
        tissue_tiles = len(plan.origins)
        chosen = plan.origins[_even_spread(tissue_tiles, request.bag_max_tiles)]
        kept_tiles, kept_origins = [], []
        for tiles, origins in slide.iter_tiles(chosen, request.tile_size, tile_mpp, batch=request.batch_size * 4):
            good = quality_filtered(tiles, plan.dropped)
            kept_tiles.append(tiles[good])
            kept_origins.append(origins[good])
    tiles = np.concatenate(kept_tiles) if kept_tiles else np.zeros((0, request.tile_size, request.tile_size, 3), np.uint8)
    origins = np.concatenate(kept_origins) if kept_origins else np.zeros((0, 2), np.int64)
    probabilities, attention = None, np.zeros(0, np.float32)
    if len(tiles):
        probabilities, attention = request.infer_bag(model_inputs(request, tiles))
        probabilities, attention = np.asarray(probabilities, np.float64), np.asarray(attention, np.float64)
        if probabilities.shape != (len(names),) or attention.shape != (len(tiles),):
            raise ValueError(f"infer_bag returned shapes {probabilities.shape} and {attention.shape}; expected "
                             f"({len(names)},) and ({len(tiles)},)")
        if not (np.isfinite(probabilities).all() and np.isfinite(attention).all()):
            raise ValueError("infer_bag returned non-finite scores")
    relative = (attention * len(attention)).astype(np.float32)[:, None]  # 1 = an average tile
    step = (request.stride * tile_mpp / geometry.mpp_x, request.stride * tile_mpp / geometry.mpp_y)
    bounds = (geometry.bounds_x, geometry.bounds_y)
    heat_path = write_heatmap(confined_path(output.parent, stem, HEATMAP_SUFFIX),
                              _heatmap(geometry, origins, relative, step),
                              (step[0] * geometry.mpp_x, step[1] * geometry.mpp_y), ("attention",))
    size_level0 = (request.tile_size * tile_mpp / geometry.mpp_x, request.tile_size * tile_mpp / geometry.mpp_y)
    predicted = names[int(np.argmax(probabilities))] if probabilities is not None else None
    features = []
    for (x, y), weight in zip(origins, relative[:, 0]):
        if weight < ATTENTION_FACTOR:
            continue
        x0, y0 = float(x - bounds[0]), float(y - bounds[1])
        x1, y1 = x0 + size_level0[0], y0 + size_level0[1]
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                                                          [x0, y0]]]},
                         "properties": {"objectType": "detection", "isLocked": True,
                                        "classification": {"name": predicted},
                                        "measurements": {"relative attention": round(float(weight), 6)}}})
    geojson_path = confined_path(output.parent, stem, GEOJSON_SUFFIX)
    geojson_path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    order = np.argsort(-attention, kind="stable")[:TOP_TILES]
    top_tiles = [{"level0_xy": [int(origins[i, 0]), int(origins[i, 1])],
                  "qupath_xy": [int(origins[i, 0] - bounds[0]), int(origins[i, 1] - bounds[1])],
                  "attention": round(float(attention[i]), 6), "relative_attention": round(float(relative[i, 0]), 4)}
                 for i in order]
    per_class = None if probabilities is None else {n: round(float(p), 6) for n, p in zip(names, probabilities)}
    report = {
        "format": REPORT_FORMAT, "slide": name, "task": "slide-classification", "classes": list(names),
        "resolution": {"mpp_x": geometry.mpp_x, "mpp_y": geometry.mpp_y, "mpp_source": geometry.mpp_source,
                       "width": geometry.width, "height": geometry.height, "bounds": list(bounds)},
        "tiles": {"size": request.tile_size, "mpp": tile_mpp, "stride": request.stride, "scored": int(len(tiles)),
                  "tissue_tiles": int(tissue_tiles), "bag_max_tiles": request.bag_max_tiles,
                  "dropped": {k: int(v) for k, v in plan.dropped.items() if v}},
        "slide_score": {"aggregation": "attention-mil: the slide model's class probabilities for the bag of the "
                                       "slide's tiles; null when no tissue tile was found",
                        "per_class": per_class, "predicted": predicted, "threshold": THRESHOLD,
                        "present": [n for n in names if per_class is not None and per_class[n] >= THRESHOLD]},
        "top_tiles": {"by_attention": top_tiles},
        "outputs": {"heatmap": heat_path.name, "heatmap_channels": ["attention"], "geojson": geojson_path.name,
                    "heatmap_pixel_um": [step[0] * geometry.mpp_x, step[1] * geometry.mpp_y],
                    "heatmap_origin_level0": list(bounds), "geojson_min_relative_attention": ATTENTION_FACTOR,
                    "geojson_tiles": len(features)},
        "quarantine": [],
    }
    output.write_text(json.dumps(report, indent=2))
    counts = {n: int(n == predicted) for n in names}
    return PredictionSummary(input=name, output=str(output), samples=int(len(tiles)), class_counts=counts)

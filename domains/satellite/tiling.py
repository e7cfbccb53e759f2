"""Cutting a scene (and its labels) into square tiles grouped by spatial block."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domains.input_guards import input_errors_named
from domains.satellite.labels import read_label_raster
from domains.satellite.scene import Scene, read_scene
from domains.spec import DomainInputError, IngestRequest, SampleSet

DEFAULT_CLASS_NAMES = ("water", "vegetation", "bare_or_built")


def check_tiling(request: IngestRequest, shape: tuple[int, int], path: Path) -> None:
    """Validate the tile geometry of ``request`` against a grid of ``shape``.

    Raises:
        DomainInputError: a size is out of range; the message names the source and the bad value.
    """
    height, width = shape
    if request.tile_size < 1 or request.tile_size > min(height, width):
        raise DomainInputError(
            path,
            f"tile_size {request.tile_size} must be between 1 and the scene's smaller side ({min(height, width)} px)",
        )
    if request.stride < 1:
        raise DomainInputError(path, f"stride {request.stride} must be at least 1")
    if request.block_size < request.tile_size:
        raise DomainInputError(
            path,
            f"block_size {request.block_size} must be at least tile_size {request.tile_size} (a tile must fit a block)",
        )
    if not 0.0 <= request.max_nodata_fraction <= 1.0:
        raise DomainInputError(path, f"max_nodata_fraction {request.max_nodata_fraction} must be within [0, 1]")


def tile_scene(scene: Scene, labels: np.ndarray | None, request: IngestRequest) -> SampleSet:
    """Cut a scene into square tiles labelled by majority class and grouped by spatial block.

    Tiles of ``request.tile_size`` start every ``request.stride`` pixels from the top-left corner. A tile is
    dropped, and counted under one reason in ``dropped``, when:

    * ``straddles_block``: it covers pixels of two spatial blocks of ``request.block_size`` pixels. Keeping
      every tile inside one block means no pixel is shared by two groups, so overlapping tiles
      (``stride < tile_size``) cannot leak across a train/validation split;
    * ``nodata``: more than ``request.max_nodata_fraction`` of its pixels are invalid in the scene;
    * ``unlabelled``: a label raster was given but fewer than half of the tile's pixels carry a label.

    Without a label raster every tile is kept with label -1. With one, a tile's label is the most
    frequent class among its labelled pixels (ties go to the lower class id). Invalid pixels inside a
    kept tile are filled with 0, and their labels are ignored.

    Args:
        scene: the scene, from :func:`~domains.satellite.scene.read_scene`.
        labels: int (H, W) class ids on the scene grid, -1 for unlabelled; or None.
        request: tile geometry and class names.

    Returns:
        The kept tiles with group ids ``"<scene_id>:block-<by>-<bx>"`` and provenance of the grid.

    Raises:
        DomainInputError: the geometry does not fit the scene, or a label is outside the class names.
    """
    class_names = tuple(request.class_names) if request.class_names else DEFAULT_CLASS_NAMES
    check_tiling(request, scene.shape, scene.path)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        label_path = request.labels if request.labels is not None else scene.path
        if labels.shape != scene.shape:
            raise DomainInputError(label_path, f"labels have shape {labels.shape}, the scene grid is {scene.shape}")
        top = int(labels.max()) if labels.size else -1
        if top >= len(class_names):
            raise DomainInputError(
                label_path,
                f"label value {top} is outside 0..{len(class_names) - 1} for classes {', '.join(class_names)}",
            )
        # Labels under invalid pixels describe pixels the model never sees.
        labels = np.where(scene.valid, labels, -1)

    size, stride, block = request.tile_size, request.stride, request.block_size
    height, width = scene.shape
    pixels = size * size
    scene_id = scene.scene_id
    dropped = {"straddles_block": 0, "nodata": 0, "unlabelled": 0}
    kept: list[tuple[int, int, int]] = []
    for row in range(0, height - size + 1, stride):
        for col in range(0, width - size + 1, stride):
            if row // block != (row + size - 1) // block or col // block != (col + size - 1) // block:
                dropped["straddles_block"] += 1
                continue
            invalid = pixels - int(np.count_nonzero(scene.valid[row : row + size, col : col + size]))
            if invalid / pixels > request.max_nodata_fraction:
                dropped["nodata"] += 1
                continue
            label = -1
            if labels is not None:
                window = labels[row : row + size, col : col + size]
                labelled = window[window >= 0]
                if 2 * labelled.size < pixels:
                    dropped["unlabelled"] += 1
                    continue
                label = int(np.bincount(labelled, minlength=len(class_names)).argmax())
            kept.append((row, col, label))

    images = np.zeros((len(kept), len(scene.channels), size, size), dtype=np.float32)
    for i, (row, col, _) in enumerate(kept):
        # scene.data is already 0 on invalid pixels, so a copy fills them.
        images[i] = scene.data[:, row : row + size, col : col + size]
    locations = np.array([(r, c) for r, c, _ in kept], dtype=np.int64).reshape(-1, 2)
    groups = np.array([f"{scene_id}:block-{r // block}-{c // block}" for r, c, _ in kept], dtype=str)
    return SampleSet(
        images=images,
        labels=np.array([lab for _, _, lab in kept], dtype=np.int64),
        groups=groups,
        locations=locations,
        source=str(scene.path),
        channels=scene.channels,
        class_names=class_names,
        dropped=dropped,
        provenance=scene_provenance(scene) | {
            "tile_size": str(size),
            "stride": str(stride),
            "block_size": str(block),
            "labels": str(request.labels) if labels is not None and request.labels is not None else "",
        },
    )


def scene_provenance(scene: Scene) -> dict[str, str]:
    """Small string facts about a scene's grid and units, stored with every dataset cut from it."""
    epsg = scene.crs.to_epsg()
    t = scene.transform
    xres, yres = scene.resolution
    return {
        "crs": f"EPSG:{epsg}" if epsg else scene.crs.to_wkt(),
        "transform": ", ".join(f"{v!r}" for v in (t.a, t.b, t.c, t.d, t.e, t.f)),
        "sensor": scene.sensor,
        "scaling": scene.scaling,
        "grid_shape": f"{scene.shape[0]}x{scene.shape[1]}",
        "resolution": f"{xres:g}x{yres:g}",
        "channels": ",".join(scene.band_names),
        "valid_fraction": f"{scene.valid.mean():.4f}",
    }


def read_samples(request: IngestRequest) -> SampleSet:
    """Read a scene and its optional label raster, then tile it (the domain's ingest reader).

    Args:
        request: source scene, optional label raster, tile geometry, channels and sensor.

    Returns:
        The tiles of the scene, see :func:`tile_scene`.

    Raises:
        DomainInputError: the scene or label raster is bad, or the geometry does not fit.
    """
    # One scene per ingest: whatever fails on a bad file becomes one error naming the source.
    with input_errors_named(request.source):
        scene = read_scene(request.source, channels=request.channels, sensor=request.sensor)
        labels = read_label_raster(request.labels, scene) if request.labels is not None else None
        return tile_scene(scene, labels, request)

"""Cutting a scene (and its labels) into square tiles grouped by spatial block."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from domains.array_memory import ReusableArrays
from domains.input_guards import check_readable, input_errors_named
from domains.satellite.clouds import CloudMasker, CloudRows, plan_cloud_mask
from domains.satellite.labels import LabelWindows
from domains.satellite.scene import Scene, SceneLayout, describe_scales, inspect_scene
from domains.satellite.strips import StripReader
from domains.satellite.tile_windows import CoarsePatchBatch, CoarsePatchBatches, coarse_grids
from domains.spec import DomainInputError, IngestRequest, SampleSet

DEFAULT_CLASS_NAMES = ("water", "vegetation", "bare_or_built")
# Stored values held by the strips of the scene in memory at once (all channels, full width): the strip
# being cut into tiles and the next one, read ahead (StripReader.read_strips), half of this each. A strip is
# at least one row of tiles whatever this says, so memory follows the scene's width, never its height.
STRIP_BYTES = 128 * 2**20
STRIPS_IN_MEMORY = 2


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
    if not 0.0 <= request.max_cloud_fraction <= 1.0:
        raise DomainInputError(path, f"max_cloud_fraction {request.max_cloud_fraction} must be within [0, 1]")


def tile_scene(scene: Scene, labels: np.ndarray | None, request: IngestRequest) -> SampleSet:
    """Cut a scene already in memory into square tiles labelled by majority class and grouped by spatial block.

    Ingest reads scenes strip by strip instead (:func:`read_samples`); this whole-scene form is the
    reference the streaming reader is tested against, and applies the same rules (see
    :func:`select_tiles`). Invalid pixels inside a kept tile are filled with 0, and their labels are ignored.

    Args:
        scene: the scene, from :func:`~domains.satellite.scene.read_scene`.
        labels: int (H, W) class ids on the scene grid, -1 for unlabelled; or None.
        request: tile geometry and class names.

    Returns:
        The kept tiles (float32, physical units) with group ids ``"<scene_id>:block-<by>-<bx>"`` and
        provenance of the grid.

    Raises:
        DomainInputError: the geometry does not fit the scene, or a label is outside the class names.
    """
    class_names = tuple(request.class_names) if request.class_names else DEFAULT_CLASS_NAMES
    check_tiling(request, scene.shape, scene.path)
    label_path = request.labels if request.labels is not None else scene.path
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != scene.shape:
            raise DomainInputError(label_path, f"labels have shape {labels.shape}, the scene grid is {scene.shape}")
        labels = checked_labels(labels, scene.valid, class_names, label_path)
    size, stride = request.tile_size, request.stride
    height, width = scene.shape
    dropped = {"straddles_block": 0, "nodata": 0, "unlabelled": 0}
    kept = select_tiles(scene.valid, labels, 0, list(range(0, height - size + 1, stride)), width, request,
                        len(class_names), dropped)
    images = np.zeros((len(kept), len(scene.channels), size, size), dtype=np.float32)
    for i, (row, col, _) in enumerate(kept):
        # scene.data is already 0 on invalid pixels, so a copy fills them.
        images[i] = scene.data[:, row : row + size, col : col + size]
    return SampleSet(
        images=images,
        labels=np.array([lab for _, _, lab in kept], dtype=np.int64),
        groups=tile_groups(scene.scene_id, kept, request.block_size),
        locations=np.array([(r, c) for r, c, _ in kept], dtype=np.int64).reshape(-1, 2),
        source=str(scene.path),
        channels=scene.channels,
        class_names=class_names,
        dropped=dropped,
        provenance=scene_provenance(scene) | units_provenance(scene.scales)
        | tiling_provenance(request, labels is not None) | cloud_provenance(None, None, request, 0, 0),
    )


def checked_labels(labels: np.ndarray, valid: np.ndarray, class_names: tuple[str, ...], path: Path) -> np.ndarray:
    """Labels with -1 under invalid pixels and for any negative value; a class id beyond ``class_names`` is refused,
    naming ``path``."""
    top = int(labels.max()) if labels.size else -1
    if top >= len(class_names):
        raise DomainInputError(
            path, f"label value {top} is outside 0..{len(class_names) - 1} for classes {', '.join(class_names)}"
        )
    if labels.size and int(labels.min()) < -1:
        labels = np.maximum(labels, labels.dtype.type(-1))
    # Labels under invalid pixels describe pixels the model never sees.
    if valid.all():
        return labels
    return np.where(valid, labels, labels.dtype.type(-1))


def select_tiles(
    valid: np.ndarray,
    labels: np.ndarray | None,
    top: int,
    rows: list[int],
    width: int,
    request: IngestRequest,
    num_classes: int,
    dropped: dict[str, int],
    cloudy: np.ndarray | None = None,
) -> list[tuple[int, int, int]]:
    """Decide which tiles starting on ``rows`` are kept, and their labels.

    ``valid`` and ``labels`` cover grid rows ``top:`` (a strip, or the whole scene with ``top`` 0).
    Tiles of ``request.tile_size`` start every ``request.stride`` pixels. A tile is dropped, and counted
    in ``dropped`` under one reason, when:

    * ``straddles_block``: it covers pixels of two spatial blocks of ``request.block_size`` pixels. Keeping
      every tile inside one block means no pixel is shared by two groups, so overlapping tiles
      (``stride < tile_size``) cannot leak across a train/validation split;
    * ``nodata``: more than ``request.max_nodata_fraction`` of its pixels are invalid;
    * ``unlabelled``: labels were given but fewer than half of the tile's pixels carry one;
    * ``cloudy``: ``cloudy`` (cloud or shadow pixels, same rows as ``valid``) covers more than
      ``request.max_cloud_fraction`` of its pixels.

    Without labels every kept tile has label -1; with them, the most frequent class among its labelled
    pixels (ties go to the lower class id).

    Returns:
        ``(row, col, label)`` of each kept tile on the scene grid, row by row.
    """
    size, stride, block = request.tile_size, request.stride, request.block_size
    pixels = size * size
    kept: list[tuple[int, int, int]] = []
    for row in rows:
        local = row - top
        for col in range(0, width - size + 1, stride):
            if row // block != (row + size - 1) // block or col // block != (col + size - 1) // block:
                dropped["straddles_block"] += 1
                continue
            invalid = pixels - int(np.count_nonzero(valid[local : local + size, col : col + size]))
            if invalid / pixels > request.max_nodata_fraction:
                dropped["nodata"] += 1
                continue
            if cloudy is not None and (np.count_nonzero(cloudy[local : local + size, col : col + size]) / pixels
                                       > request.max_cloud_fraction):
                dropped["cloudy"] = dropped.get("cloudy", 0) + 1
                continue
            label = -1
            if labels is not None:
                # Pixels per class id + 1: unlabelled (-1) first, then each class.
                counts = np.bincount((labels[local : local + size, col : col + size] + 1).ravel(),
                                     minlength=num_classes + 1)
                if 2 * (pixels - int(counts[0])) < pixels:
                    dropped["unlabelled"] += 1
                    continue
                label = int(counts[1:].argmax())
            kept.append((row, col, label))
    return kept


def tile_groups(scene_id: str, kept: list[tuple[int, int, int]], block: int) -> np.ndarray:
    """Leakage group of each tile: the spatial block holding it, ``"<scene_id>:block-<by>-<bx>"``."""
    return np.array([f"{scene_id}:block-{r // block}-{c // block}" for r, c, _ in kept], dtype=str)


def tiling_provenance(request: IngestRequest, labelled: bool) -> dict[str, str]:
    """The tile geometry and label file, stored with the dataset."""
    return {
        "tile_size": str(request.tile_size),
        "stride": str(request.stride),
        "block_size": str(request.block_size),
        "labels": str(request.labels) if labelled and request.labels is not None else "",
    }


def grid_provenance(crs: Any, transform: Any, shape: tuple[int, int], sensor: str, scaling: str,
                    channels: tuple[str, ...], valid_fraction: float, level: str = "") -> dict[str, str]:
    """Small string facts about a scene's grid and units, stored with every dataset cut from it."""
    epsg = crs.to_epsg()
    t = transform
    return {
        "crs": f"EPSG:{epsg}" if epsg else crs.to_wkt(),
        "transform": ", ".join(f"{v!r}" for v in (t.a, t.b, t.c, t.d, t.e, t.f)),
        "sensor": sensor,
        "level": level,
        "scaling": scaling,
        "grid_shape": f"{shape[0]}x{shape[1]}",
        "resolution": f"{abs(t.a):g}x{abs(t.e):g}",
        "channels": ",".join(channels),
        "valid_fraction": f"{valid_fraction:.4f}",
    }


def scene_provenance(scene: Scene) -> dict[str, str]:
    """Provenance of a scene read whole (see :func:`grid_provenance`)."""
    return grid_provenance(scene.crs, scene.transform, scene.shape, scene.sensor, scene.scaling, scene.band_names,
                           float(scene.valid.mean()))


def time_provenance(dates: tuple[str, ...]) -> dict[str, str]:
    """The dates of a time series and how its channels are laid out (nothing for one date)."""
    if not dates:
        return {}
    return {"dates": ",".join(dates), "time_steps": str(len(dates)), "channel_layout": "time-major"}


def units_provenance(scales: tuple[Any, ...]) -> dict[str, str]:
    """The physical unit of each channel (part of a model's radiometric contract)."""
    return {"scaling_units": ",".join(scale.unit for scale in scales)}


def cloud_provenance(masker: CloudMasker | None, clouds: CloudRows | None, request: IngestRequest,
                     cloud_pixels: int, valid_pixels: int) -> dict[str, str]:
    """How clouds were masked (method, mask model and version), the drop threshold and the scene's cloud share."""
    if masker is None:
        return {"cloud_policy": request.cloud_mask, "cloud_mask": "none"}
    version = f" ({clouds.model_version})" if clouds is not None and clouds.model_version else ""
    return {
        "cloud_policy": request.cloud_mask,
        "cloud_mask": masker.description + version,
        "max_cloud_fraction": f"{request.max_cloud_fraction:g}",
        "cloud_fraction": f"{cloud_pixels / valid_pixels if valid_pixels else 0.0:.4f}",
    }


def strip_rows(request: IngestRequest, shape: tuple[int, int], channels: int, itemsize: int) -> list[list[int]]:
    """Tile start rows grouped into strips that keep every tile whole.

    A strip holds whole rows of tiles: ``k`` tile rows span ``(k - 1) * stride + tile_size`` grid rows
    (overlapping tiles re-read ``tile_size - stride`` rows of the previous strip). ``k`` is the most that
    fits a :data:`STRIPS_IN_MEMORY` share of :data:`STRIP_BYTES` of stored values, at least one, so memory
    follows the scene's width only.
    """
    height, width = shape
    size, stride = request.tile_size, request.stride
    starts = list(range(0, height - size + 1, stride))
    budget_rows = STRIP_BYTES // STRIPS_IN_MEMORY // max(1, channels * width * itemsize)
    per_strip = max(1, (budget_rows - size) // stride + 1)
    return [starts[i : i + per_strip] for i in range(0, len(starts), per_strip)]


def read_samples(request: IngestRequest) -> Iterator[SampleSet]:
    """Read a scene and its optional label raster strip by strip and yield its tiles in bounded batches.

    The scene and label headers are checked before this returns (so a bad file fails at once, naming
    it); pixels are then read one strip at a time (:class:`~domains.satellite.strips.StripReader`), and
    tiles are yielded as SampleSets of at most ``request.batch_samples`` tiles in the source's dtype with
    each channel's ``scaling`` to physical units. Tiles, labels, groups and drop rules are those of
    :func:`tile_scene`; every batch carries the drops counted since the previous one, and the last batch
    (possibly empty) carries the scene's valid fraction.

    Args:
        request: source scene, optional label raster, tile geometry, channels, sensor and batch size.

    Returns:
        An iterator of SampleSets.

    Raises:
        DomainInputError: the scene or label raster is bad, or the geometry does not fit (raised by the
            call for what headers show, by the iteration for what only pixels show).
    """
    source = check_readable(request.source, "any")
    with input_errors_named(source):
        layout = inspect_scene(source, request.channels, request.sensor, None)
        check_tiling(request, layout.shape, layout.path)
        plan_cloud_mask(request.cloud_mask, layout)  # a mask that cannot be made fails before any pixel is read
        if request.task not in (None, "classification", "segmentation"):
            raise DomainInputError(layout.path, f"task {request.task!r}: satellite scenes learn 'classification' "
                                                "(a class per tile) or 'segmentation' (a class per pixel)")
        if request.labels is not None:
            # Opened here once only for its header checks: a bad label file fails before any pixel is read.
            with LabelWindows(request.labels, layout.crs, layout.transform, layout.shape, layout.path.name):
                pass
    return _stream_tiles(layout, request)


def _stream_tiles(layout: SceneLayout, request: IngestRequest) -> Iterator[SampleSet]:
    class_names = tuple(request.class_names) if request.class_names else DEFAULT_CLASS_NAMES
    size = request.tile_size
    height, width = layout.shape
    scene_id = layout.path.name if layout.path.is_dir() else layout.path.stem
    channels = layout.channels
    base_provenance = tiling_provenance(request, request.labels is not None)
    with ExitStack() as stack:
        stack.enter_context(input_errors_named(layout.path))
        # Coarser bands are also kept as the patches of coarse pixels each tile is upsampled from: a dataset
        # stores those instead of the upsampled bands (see domains.satellite.tile_windows). Asked for patches
        # only, the reader does not upsample them at all (cloud masks need every band on the strip's grid).
        grids = coarse_grids(layout, size)
        patches_only = request.coarse_as_patches and plan_cloud_mask(request.cloud_mask, layout) is None
        coarse_only = frozenset(c for grid in grids for c in grid.channels) if patches_only else frozenset()
        reader = stack.enter_context(StripReader(layout, keep_coarse=True, coarse_only=coarse_only))
        labels = (stack.enter_context(LabelWindows(request.labels, layout.crs, layout.transform, layout.shape,
                                                   layout.path.name))
                  if request.labels is not None else None)
        strips = strip_rows(request, layout.shape, len(channels), reader.dtype.itemsize)
        capacity = max(1, request.batch_samples)
        masker = plan_cloud_mask(request.cloud_mask, layout)
        clouds = stack.enter_context(CloudRows(layout, masker)) if masker is not None else None
        scale = np.array([s for s, _ in reader.scaling], dtype=np.float32)[:, None, None]
        offset = np.array([o for _, o in reader.scaling], dtype=np.float32)[:, None, None]
        cloud_pixels_seen = 0

        segmentation = request.task == "segmentation"
        pixel_labels: list[np.ndarray] = []
        fill = tuple(float(v) for v in reader.fill)
        band_shapes = [band.shape for band in layout.bands]

        patch_batches = CoarsePatchBatches(grids, band_shapes, capacity, size, reader.dtype, fill) if grids else None

        def new_patches() -> CoarsePatchBatch | None:
            return patch_batches.new() if patch_batches is not None else None

        def batch(images: np.ndarray, kept: list, dropped: dict[str, int], provenance: dict[str, str],
                  patches: CoarsePatchBatch | None) -> SampleSet:
            if segmentation:
                # A class per pixel (-1 where unlabelled or invalid), the tile's own window of the label raster.
                tile_labels = (np.stack(pixel_labels) if pixel_labels
                               else np.full((len(kept), size, size), -1, dtype=np.int16)).astype(np.int16)
            else:
                tile_labels = np.array([lab for _, _, lab in kept], dtype=np.int64)
            return SampleSet(
                images=images,
                labels=tile_labels, task="segmentation" if segmentation else None,
                groups=tile_groups(scene_id, kept, request.block_size),
                locations=np.array([(r, c) for r, c, _ in kept], dtype=np.int64).reshape(-1, 2),
                source=str(layout.path), channels=channels, class_names=class_names, dropped=dropped,
                provenance=provenance, scaling=reader.scaling,
                coarse=patches.take(len(kept)) if patches is not None else None,
            )

        # Batches are handed over read-only; a batch that its consumer (the dataset writer) has let go of is
        # filled again instead of a fresh one (whose pages the kernel would zero first).
        batch_arrays = ReusableArrays((capacity, len(reader.strip_channels), size, size), reader.dtype, keep=4)
        images = batch_arrays.take()
        patches = new_patches()
        kept: list[tuple[int, int, int]] = []
        dropped = {"straddles_block": 0, "nodata": 0, "unlabelled": 0}
        valid_pixels_seen = 0
        # The last strip runs to the bottom edge so that the valid fraction covers the whole grid.
        ranges = [(rows[0], height if index == len(strips) - 1 else rows[-1] + size)
                  for index, rows in enumerate(strips)]
        strip_pixels = reader.read_strips(ranges)
        stack.callback(strip_pixels.close)  # the strip read ahead finishes before the reader closes
        label_rows = _read_ahead(labels.read_rows, ranges, stack) if labels is not None else None
        for index, (rows, (raw, valid)) in enumerate(zip(strips, strip_pixels)):
            top, bottom = ranges[index]
            coarse = reader.take_coarse(top)
            last = index == len(strips) - 1
            counted_until = bottom if last else strips[index + 1][0]
            valid_pixels_seen += int(np.count_nonzero(valid[: counted_until - top]))
            cloudy = None
            if clouds is not None:
                physical = raw.astype(np.float32) * scale + offset if masker.method == "model" else None
                cloudy = clouds.rows(top, bottom, physical, valid)
                cloud_pixels_seen += int(np.count_nonzero(cloudy[: counted_until - top]))
            strip_labels = None
            if labels is not None:
                label_path = request.labels if request.labels is not None else layout.path
                strip_labels = checked_labels(next(label_rows), valid, class_names, label_path)
            for row, col, label in select_tiles(valid, strip_labels, top, rows, width, request, len(class_names),
                                                dropped, cloudy):
                images[len(kept)] = raw[:, row - top : row - top + size, col : col + size]
                if patches is not None:
                    patches.add(len(kept), row, col, coarse, valid[row - top : row - top + size, col : col + size])
                kept.append((row, col, label))
                if segmentation:
                    pixel_labels.append(
                        strip_labels[row - top : row - top + size, col : col + size].astype(np.int16)
                        if strip_labels is not None else np.full((size, size), -1, dtype=np.int16))
                if len(kept) == capacity:
                    # Read-only: never written again, so a dataset writer may keep it without a copy.
                    images.flags.writeable = False
                    yield batch(images, kept, dropped, base_provenance, patches)
                    images = batch_arrays.take()
                    patches = new_patches()
                    kept = []
                    pixel_labels = []
                    dropped = {"straddles_block": 0, "nodata": 0, "unlabelled": 0}
            del raw, valid, strip_labels, coarse
        if valid_pixels_seen == 0:
            raise DomainInputError(layout.path, "holds no valid pixel: every pixel is nodata in at least one band")
        provenance = grid_provenance(
            layout.crs, layout.transform, layout.shape, layout.sensor.name,
            describe_scales(channels, layout.scales), tuple(c.name for c in channels),
            valid_pixels_seen / (height * width), layout.level,
        ) | units_provenance(layout.scales) | time_provenance(layout.dates) | base_provenance | cloud_provenance(masker, clouds, request, cloud_pixels_seen, valid_pixels_seen)
        last_images = images[: len(kept)].copy()
        last_images.flags.writeable = False
        yield batch(last_images, kept, dropped, provenance, patches)


def _read_ahead(read_rows, ranges: list[tuple[int, int]], stack: ExitStack) -> Iterator[np.ndarray]:
    """``read_rows(top, bottom, compact=True)`` of each range in turn, the next one read on a thread of its own.

    The label raster's strips are decoded while the caller cuts tiles (a tenth of a full-tile ingest's
    main-thread time when read in line). The thread is stopped, after finishing the read in flight, when
    ``stack`` closes, before the label raster it reads from closes.
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitrail-labels"))
    pending = pool.submit(read_rows, *ranges[0], compact=True) if ranges else None
    for following in [*ranges[1:], None]:
        rows = pending.result()
        pending = pool.submit(read_rows, *following, compact=True) if following is not None else None
        yield rows

"""Class-per-pixel label rasters: reading them onto a scene's grid and writing them from one."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from domains.input_guards import check_source_size, input_errors_named
from domains.satellite.scene import Scene, open_raster, read_band
from domains.satellite.strips import WINDOW_MARGIN, shifted_transform
from domains.spec import DomainInputError

# uint8 label rasters keep 255 free for "unlabelled", as land-cover products such as ESA WorldCover do.
LABEL_NODATA = 255


def read_label_raster(path: Path | str, scene: Scene) -> np.ndarray:
    """Read a class raster onto the scene's grid.

    The raster is aligned by its georeference, not by pixel position: it is reprojected with nearest
    neighbour onto the scene's CRS, transform and shape, so a label raster in another CRS or at another
    resolution works. Its nodata value, and scene pixels it does not cover, become -1.

    Args:
        path: a single-band integer GeoTIFF of class ids.
        scene: the scene whose grid the labels must match.

    Returns:
        int64 (H, W) class ids, -1 where unlabelled.

    Raises:
        DomainInputError: the file is missing, unreadable, not single-band, not integer, has no CRS, or
            does not overlap the scene.
    """
    with LabelWindows(path, scene.crs, scene.transform, scene.shape, scene.path.name) as labels:
        return labels.read_rows(0, scene.shape[0])


class LabelWindows:
    """A class raster opened once and read onto rows of a scene's grid, strip by strip.

    Opening checks the header (single band, integer, georeferenced, overlapping the scene) before any pixel
    is read. :meth:`read_rows` reprojects (nearest neighbour) only the part of the raster under the rows
    asked for, so a label raster as large as a Sentinel-2 tile costs a strip of memory, not a tile.

    Args:
        path: a single-band integer GeoTIFF of class ids.
        crs: the scene's CRS.
        transform: the scene grid's transform.
        shape: the scene grid's (rows, columns).
        scene_name: the scene's name, for error messages.
    """

    def __init__(self, path: Path | str, crs: Any, transform: Any, shape: tuple[int, int], scene_name: str):
        self.path = Path(path)
        self.crs, self.transform, self.shape, self.scene_name = crs, transform, tuple(shape), scene_name
        self._stack = ExitStack()
        self._dataset: Any = None
        self._nodata: int | None = None

    def __enter__(self) -> LabelWindows:
        path = self.path
        if not path.is_file() and not path.is_symlink():
            raise DomainInputError(path, "label raster does not exist")
        self._stack.__enter__()
        try:
            self._stack.enter_context(input_errors_named(path))
            self._dataset = self._stack.enter_context(open_raster(path))
            self._check_header()
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._dataset = None
        self._stack.__exit__(*exc)

    def _check_header(self) -> None:
        from rasterio.transform import array_bounds
        from rasterio.warp import transform_bounds

        ds, path = self._dataset, self.path
        check_source_size(path, (ds.height, ds.width, ds.count), "rows x columns x bands")
        if ds.crs is None or ds.transform.is_identity:
            raise DomainInputError(path, "label raster has no CRS: it cannot be aligned with the scene")
        if ds.count != 1:
            raise DomainInputError(path, f"a label raster must hold 1 band, this one holds {ds.count}")
        dtype = np.dtype(ds.dtypes[0])
        if not np.issubdtype(dtype, np.integer):
            raise DomainInputError(path, f"label raster must hold integer class ids, not {dtype}")
        west, south, east, north = array_bounds(*self.shape, self.transform)
        scene_box = (min(west, east), min(south, north), max(west, east), max(south, north))
        label_box = transform_bounds(ds.crs, self.crs, *ds.bounds, densify_pts=21)
        overlaps = (
            label_box[0] < scene_box[2]
            and label_box[2] > scene_box[0]
            and label_box[1] < scene_box[3]
            and label_box[3] > scene_box[1]
        )
        if not overlaps:
            raise DomainInputError(
                path,
                f"label raster does not overlap the scene {self.scene_name}: its extent in "
                f"{self.crs.to_string()} is {tuple(round(v, 1) for v in label_box)}, "
                f"the scene's is {tuple(round(v, 1) for v in scene_box)}",
            )
        nodata = ds.nodata
        self._nodata = int(nodata) if nodata is not None and not np.isnan(nodata) else None

    def read_rows(self, top: int, bottom: int, compact: bool = False) -> np.ndarray:
        """Class ids on rows ``top:bottom`` of the scene grid: int64 (rows, W), -1 where unlabelled.

        With ``compact`` the ids come in the smallest signed integer type holding both the raster's values
        and -1 (int16 for a uint8 raster): the same ids in a quarter of the memory or less, which a
        streaming reader checks and counts per strip.
        """
        from rasterio.transform import array_bounds
        from rasterio.warp import Resampling, reproject, transform_bounds
        from rasterio.windows import Window

        ds, path = self._dataset, self.path
        height, width = bottom - top, self.shape[1]
        if ds.crs == self.crs and ds.shape == self.shape and ds.transform.almost_equals(self.transform):
            # Already on the scene's grid (as labels made from the scene are): nearest neighbour is the identity.
            same_grid = read_band(ds, 1, path, Window(0, top, width, height)).astype(self._dtype(compact))
            if self._nodata is not None:
                same_grid[same_grid == self._nodata] = -1
            same_grid[same_grid < 0] = -1
            return same_grid
        strip_transform = shifted_transform(self.transform, 0, top)
        target = np.full((height, width), -1, dtype=np.int32)
        # The strip's extent in the label raster's pixels, widened so nearest neighbour near the edges
        # picks the pixels a whole-raster reprojection would pick.
        west, south, east, north = array_bounds(height, width, strip_transform)
        box = transform_bounds(self.crs, ds.crs, min(west, east), min(south, north), max(west, east),
                               max(south, north), densify_pts=21)
        inverse = ~ds.transform
        corners = [inverse @ (x, y) for x in (box[0], box[2]) for y in (box[1], box[3])]
        cols, rows = [c for c, _ in corners], [r for _, r in corners]
        row_start = max(0, int(np.floor(min(rows))) - WINDOW_MARGIN)
        col_start = max(0, int(np.floor(min(cols))) - WINDOW_MARGIN)
        row_stop = min(ds.height, int(np.ceil(max(rows))) + WINDOW_MARGIN)
        col_stop = min(ds.width, int(np.ceil(max(cols))) + WINDOW_MARGIN)
        if row_stop <= row_start or col_stop <= col_start:
            return target.astype(self._dtype(compact))
        read_window = Window(col_start, row_start, col_stop - col_start, row_stop - row_start)
        source = read_band(ds, 1, path, read_window).astype(np.int32)
        if self._nodata is not None:
            source[source == self._nodata] = -1
        source[source < 0] = -1
        reproject(
            source, target, src_transform=shifted_transform(ds.transform, col_start, row_start), src_crs=ds.crs,
            dst_transform=strip_transform, dst_crs=self.crs, src_nodata=-1, dst_nodata=-1,
            resampling=Resampling.nearest,
        )
        return target.astype(self._dtype(compact))

    def _dtype(self, compact: bool) -> np.dtype:
        if not compact:
            return np.dtype(np.int64)
        return np.promote_types(np.dtype(self._dataset.dtypes[0]), np.int8)


def write_label_raster(labels: np.ndarray, scene: Scene, path: Path | str) -> Path:
    """Write class ids as a uint8 GeoTIFF on the scene's grid, 255 (nodata) where ``labels`` is negative.

    Args:
        labels: integer (H, W) class ids, -1 for unlabelled; shape must equal the scene's.
        scene: the scene whose CRS and transform the raster takes.
        path: output file; parent folders are created.

    Returns:
        The path written.

    Raises:
        ValueError: the shape differs from the scene's or a class id does not fit in uint8.
    """
    import rasterio

    labels = np.asarray(labels)
    if labels.shape != scene.shape:
        raise ValueError(f"labels have shape {labels.shape}, the scene grid is {scene.shape}")
    if labels.size and labels.max() >= LABEL_NODATA:
        raise ValueError(f"class id {labels.max()} does not fit a uint8 label raster (255 is nodata)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.where(labels < 0, LABEL_NODATA, labels).astype(np.uint8)
    profile = dict(
        driver="GTiff", width=scene.shape[1], height=scene.shape[0], count=1, dtype="uint8", crs=scene.crs,
        transform=scene.transform, nodata=LABEL_NODATA, compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(out, 1)
    return path

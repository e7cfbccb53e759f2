"""Class-per-pixel label rasters: reading them onto a scene's grid and writing them from one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domains.input_guards import check_source_size, input_errors_named
from domains.satellite.scene import Scene, open_raster, read_band
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
    from rasterio.transform import array_bounds
    from rasterio.warp import Resampling, reproject, transform_bounds

    path = Path(path)
    if not path.is_file() and not path.is_symlink():
        raise DomainInputError(path, "label raster does not exist")
    with input_errors_named(path), open_raster(path) as ds:
        check_source_size(path, (ds.height, ds.width, ds.count), "rows x columns x bands")
        if ds.crs is None or ds.transform.is_identity:
            raise DomainInputError(path, "label raster has no CRS: it cannot be aligned with the scene")
        if ds.count != 1:
            raise DomainInputError(path, f"a label raster must hold 1 band, this one holds {ds.count}")
        dtype = np.dtype(ds.dtypes[0])
        if not np.issubdtype(dtype, np.integer):
            raise DomainInputError(path, f"label raster must hold integer class ids, not {dtype}")
        west, south, east, north = array_bounds(*scene.shape, scene.transform)
        scene_box = (min(west, east), min(south, north), max(west, east), max(south, north))
        label_box = transform_bounds(ds.crs, scene.crs, *ds.bounds, densify_pts=21)
        overlaps = (
            label_box[0] < scene_box[2]
            and label_box[2] > scene_box[0]
            and label_box[1] < scene_box[3]
            and label_box[3] > scene_box[1]
        )
        if not overlaps:
            raise DomainInputError(
                path,
                f"label raster does not overlap the scene {scene.path.name}: its extent in "
                f"{scene.crs.to_string()} is {tuple(round(v, 1) for v in label_box)}, "
                f"the scene's is {tuple(round(v, 1) for v in scene_box)}",
            )
        source = read_band(ds, 1, path).astype(np.int32)
        nodata = ds.nodata
        source_nodata = int(nodata) if nodata is not None and not np.isnan(nodata) else None
        if source_nodata is not None:
            source[source == source_nodata] = -1
        source[source < 0] = -1
        target = np.full(scene.shape, -1, dtype=np.int32)
        reproject(
            source, target, src_transform=ds.transform, src_crs=ds.crs, dst_transform=scene.transform,
            dst_crs=scene.crs, src_nodata=-1, dst_nodata=-1, resampling=Resampling.nearest,
        )
    return target.astype(np.int64)


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

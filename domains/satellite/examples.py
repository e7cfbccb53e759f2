"""A tiny synthetic Sentinel-2 scene in real on-disk formats, for tests, fixtures and docs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from domains.satellite.labels import LABEL_NODATA
from domains.satellite.sensors import SENTINEL2

EXAMPLE_CRS = "EPSG:32618"
# Upper-left corner of the bundled demo crop, so the example sits somewhere plausible on Earth.
EXAMPLE_ORIGIN = (438120.0, 4177080.0)
EXAMPLE_GRANULE = "T18SUJ_20230615T155821"

# Typical top-of-atmosphere reflectance x 10000 of each class in bands B01..B12 (table order), read off
# the bundled demo crop: water is dark beyond the red edge, vegetation bright in the NIR plateau
# (B07-B8A) and bare or built land rises steadily towards SWIR1 (B11).
_SPECTRA = np.array(
    [
        # B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09  B10   B11   B12
        [1300, 1100, 950, 650, 550, 450, 400, 350, 320, 120, 10, 180, 120],  # water
        [1250, 950, 850, 550, 1050, 2500, 3000, 3300, 3400, 950, 15, 1800, 900],  # vegetation
        [1500, 1400, 1500, 1700, 1900, 2100, 2200, 2400, 2500, 750, 20, 2900, 2500],  # bare_or_built
    ],
    dtype=np.float32,
)


def example_class_map(size: int) -> np.ndarray:
    """The example's ground truth on its 10 m grid: 0 water, 1 vegetation, 2 bare or built.

    A river meanders across the middle; above it vegetation lies west and a town east, below it
    fields lie west and woodland east.
    """
    rows, cols = np.mgrid[0:size, 0:size] / size
    centre = 0.5 + 0.1 * np.sin(2 * np.pi * 1.2 * cols)
    classes = np.where(rows < centre, np.where(cols < 0.5, 1, 2), np.where(cols < 0.4, 2, 1))
    classes[np.abs(rows - centre) < 0.08] = 0
    return classes.astype(np.uint8)


def _block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    h, w = values.shape
    return values.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _write_geotiff(path: Path, bands: np.ndarray, resolution: float, nodata: int, descriptions=None) -> None:
    import rasterio
    from affine import Affine

    count, height, width = bands.shape
    profile = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=bands.dtype.name, crs=EXAMPLE_CRS,
        transform=Affine(resolution, 0.0, EXAMPLE_ORIGIN[0], 0.0, -resolution, EXAMPLE_ORIGIN[1]),
        nodata=nodata, compress="deflate", predictor=2, interleave="band",
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(bands)
        for i, description in enumerate(descriptions or ()):
            ds.set_band_description(i + 1, description)


def write_example(directory: Path | str, seed: int = 0, size: int = 60) -> dict[str, Path]:
    """Write a tiny Sentinel-2 L1C scene with labels, in the formats the domain reads.

    Files written under ``directory``:

    * ``scenes/<granule>/<granule>_B01.tif`` ... ``_B12.tif``: the 13 bands as uint16 DN (reflectance x
      10000, nodata 0), EPSG:32618, at native resolution: ``size`` px at 10 m, ``size/2`` at 20 m and
      ``size/6`` at 60 m, covering the same extent. A 60 m-aligned corner in the north-east is nodata in
      every band, like the edge of an orbit swath;
    * ``scenes/<granule>_multiband.tif``: the same scene as one 13-band GeoTIFF on the 10 m grid (as
      :func:`~domains.satellite.scene.read_scene` resamples it), with band descriptions B01..B12;
    * ``labels/labels.tif``: the ground-truth class per 10 m pixel (uint8, 0 water, 1 vegetation,
      2 bare or built, nodata 255 in the nodata corner);
    * ``labels/labels_wgs84.tif``: the same labels reprojected (nearest neighbour) to EPSG:4326.

    Args:
        directory: where to write; created if missing.
        seed: seed of the texture and noise, so the same seed writes the same pixels.
        size: side of the 10 m grid in pixels; a multiple of 6 so every resolution tiles the extent.

    Returns:
        Paths by role: ``scene_dir``, ``multiband``, ``labels``, ``labels_wgs84``.
    """
    import rasterio
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from domains.satellite.scene import read_scene

    if size < 12 or size % 6:
        raise ValueError(f"size must be a multiple of 6 and at least 12, got {size}")
    directory = Path(directory)
    scene_dir = directory / "scenes" / EXAMPLE_GRANULE
    label_dir = directory / "labels"
    scene_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    classes = example_class_map(size)
    # Smooth brightness variation within classes (field-to-field differences) plus sensor noise.
    rows, cols = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = 1.0 + 0.06 * np.sin(2 * np.pi * 2 * cols + phase[0]) * np.cos(2 * np.pi * 1.5 * rows + phase[1])
    corner = 6 * max(1, size // 30)
    nodata = np.zeros((size, size), dtype=bool)
    nodata[:corner, size - corner :] = True

    for index, channel in enumerate(SENTINEL2.channels):
        fine = _SPECTRA[classes, index] * texture
        factor = int(round(channel.resolution_m / 10.0))
        band = _block_mean(fine, factor) if factor > 1 else fine
        band = band + rng.normal(0.0, 0.01 * _SPECTRA[:, index].mean(), size=band.shape)
        dn = np.clip(np.rint(band), 1, 65535).astype(np.uint16)
        dn[nodata[::factor, ::factor]] = 0
        _write_geotiff(scene_dir / f"{EXAMPLE_GRANULE}_{channel.name}.tif", dn[None], channel.resolution_m, 0)

    labels = np.where(nodata, LABEL_NODATA, classes).astype(np.uint8)
    labels_path = label_dir / "labels.tif"
    _write_geotiff(labels_path, labels[None], 10.0, LABEL_NODATA)

    labels_wgs84 = label_dir / "labels_wgs84.tif"
    with rasterio.open(labels_path) as src:
        with warnings.catch_warnings():
            # rasterio 1.4 still multiplies Affine objects with `*`, which affine 3 flags as pending deprecation.
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            transform, width, height = calculate_default_transform(
                src.crs, "EPSG:4326", src.width, src.height, *src.bounds
            )
        warped = np.full((height, width), LABEL_NODATA, dtype=np.uint8)
        reproject(
            labels, warped, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
            dst_crs="EPSG:4326", src_nodata=LABEL_NODATA, dst_nodata=LABEL_NODATA, resampling=Resampling.nearest,
        )
        profile = dict(src.profile, crs="EPSG:4326", transform=transform, width=width, height=height)
    with rasterio.open(labels_wgs84, "w", **profile) as ds:
        ds.write(warped, 1)

    scene = read_scene(scene_dir)
    multiband = directory / "scenes" / f"{EXAMPLE_GRANULE}_multiband.tif"
    stack = np.clip(np.rint(scene.data * 10000), 0, 65535).astype(np.uint16)
    stack[:, ~scene.valid] = 0
    _write_geotiff(multiband, stack, 10.0, 0, descriptions=scene.band_names)
    return {"source": scene_dir, "scene_dir": scene_dir, "multiband": multiband, "labels": labels_path, "labels_wgs84": labels_wgs84}

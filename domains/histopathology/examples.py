"""Tiny real-format histopathology examples: pyramidal tiled TIFF slides, a manifest CSV and QuPath GeoJSON.

:func:`write_pyramid_tiff` is also the demo's slide writer: a generic tiled TIFF, one page per pyramid
level (the layout OpenSlide's generic-tiff reader expects), with the resolution in the TIFF resolution
tags (pixels per centimetre), so the mpp contract finds it the way it finds a scanner's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

EXAMPLE_PATIENTS = ("CASE-A", "CASE-B", "CASE-C")
EXAMPLE_MPP = 0.5
EXAMPLE_SIZE = 384
EXAMPLE_CLASSES = ("normal", "tumor")


def write_pyramid_tiff(path: Path | str, rgb: np.ndarray, mpp: float, tile: int = 128, min_level_side: int = 64,
                       compression: str | None = "jpeg", description: str | None = None) -> Path:
    """Write ``rgb`` (H, W, 3) uint8 as a tiled pyramidal TIFF at ``mpp`` um/px (levels halve until small).

    Args:
        path: the ``.tif`` to write.
        rgb: level-0 pixels.
        mpp: level-0 microns per pixel, stored as XResolution/YResolution in pixels per centimetre.
        tile: tile side (a multiple of 16).
        min_level_side: no level is made whose shorter side would fall below this.
        compression: ``jpeg`` (as scanners store H&E), ``zlib``/``None`` for lossless.
        description: the ImageDescription text (tests plant scanner metadata here).
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    while min(levels[-1].shape[:2]) // 2 >= min_level_side:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    options = {"compression": compression} if compression else {}
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            downsample = rgb.shape[1] / level.shape[1]
            per_cm = 1e4 / (mpp * downsample)
            tif.write(level, photometric="rgb", tile=(tile, tile), resolution=(per_cm, per_cm),
                      resolutionunit="CENTIMETER", subfiletype=0 if index == 0 else 1,
                      description=description if index == 0 else None, metadata=None, **options)
    return path


def tissue_texture(rng: np.random.Generator, height: int, width: int, dense: bool = False) -> np.ndarray:
    """Pink (eosin) tissue with purple (haematoxylin) nuclei, float RGB in [0, 1] (H, W, 3).

    ``dense`` draws more, smaller and darker nuclei: the example's "tumor" texture.
    """
    image = np.empty((height, width, 3), np.float32)
    image[:] = (0.93, 0.62, 0.78)
    image += rng.normal(0, 0.03, (height, width, 1)).astype(np.float32)
    count = int(height * width / (60 if dense else 220))
    radius = 1.6 if dense else 2.6
    yy, xx = np.mgrid[0:height, 0:width]
    nuclei = np.zeros((height, width), np.float32)
    for cy, cx in zip(rng.uniform(0, height, count), rng.uniform(0, width, count)):
        y0, y1 = int(max(cy - 4, 0)), int(min(cy + 5, height))
        x0, x1 = int(max(cx - 4, 0)), int(min(cx + 5, width))
        d = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], np.exp(-d / (2 * radius**2)))
    purple = np.array((0.35, 0.2, 0.55) if dense else (0.45, 0.3, 0.62), np.float32)
    image = image * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    return np.clip(image, 0, 1)


def region_feature(name: str, ring: list[list[float]], holes: list[list[list[float]]] = ()) -> dict:
    """A QuPath-style GeoJSON annotation feature (classification name in its properties)."""
    return {"type": "Feature", "id": name, "geometry": {"type": "Polygon", "coordinates": [ring, *holes]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}


def write_geojson(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_example(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Three patients' slides (one has two), each a small pyramidal TIFF at 0.5 um/px, with a manifest.

    Each slide is tissue on white glass: a band of "normal" tissue with a "tumor" block of dense, dark
    nuclei, both outlined in a QuPath GeoJSON beside the manifest (the outlines cover all the tissue, so
    every tile the reader keeps is labelled). The manifest names each slide's patient, site, slide label
    and annotation file; the patient names are synthetic.

    Returns:
        ``{"source": <slides folder>, "labels": <manifest CSV>}``.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    slides = directory / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rows = []
    size, margin = EXAMPLE_SIZE, 32
    plan = [(EXAMPLE_PATIENTS[0], "A1"), (EXAMPLE_PATIENTS[1], "B1"), (EXAMPLE_PATIENTS[1], "B2"),
            (EXAMPLE_PATIENTS[2], "C1")]
    for index, (patient, name) in enumerate(plan):
        image = np.ones((size, size, 3), np.float32)
        inner = size - 2 * margin
        image[margin:size - margin, margin:size - margin] = tissue_texture(rng, inner, inner)
        split = margin + inner // 2
        image[margin:size - margin, split:size - margin] = tissue_texture(rng, inner, size - margin - split, dense=True)
        write_pyramid_tiff(slides / f"{name}.tif", (image * 255).round().astype(np.uint8), EXAMPLE_MPP, tile=64,
                           min_level_side=96)
        geojson = write_geojson(directory / f"{name}.geojson", [
            region_feature("normal", [[0, 0], [split, 0], [split, size], [0, size], [0, 0]]),
            region_feature("tumor", [[split, 0], [size, 0], [size, size], [split, size], [split, 0]]),
        ])
        rows.append([f"{name}.tif", patient, f"SITE-{index % 2}", "tumor", geojson.name])
    manifest = directory / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "site", "label", "annotations"])
        writer.writerows(rows)
    return {"source": slides, "labels": manifest}

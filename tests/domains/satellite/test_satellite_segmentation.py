"""Satellite segmentation: per-pixel labels from the class raster, a pixel class map from predict, and a champion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from domains.satellite.labels import read_label_raster
from domains.satellite.prediction import PREDICTION_NODATA, predict_scene
from domains.satellite.scene import read_scene
from domains.satellite.sensors import SENTINEL2
from domains.satellite.tiling import read_samples
from domains.spec import DomainInputError, IngestRequest, PredictionRequest


def test_segmentation_samples_carry_the_label_raster_window(example) -> None:
    request = IngestRequest(source=example["scene_dir"], labels=example["labels"], tile_size=12, stride=12,
                            block_size=12, task="segmentation", channels=("B03", "B04", "B08"))
    batches = list(read_samples(request))
    labels = np.concatenate([b.labels for b in batches])
    locations = np.concatenate([b.locations for b in batches])
    assert {b.task for b in batches} == {"segmentation"}
    assert labels.shape == (len(locations), 12, 12) and labels.dtype == np.int16
    with rasterio.open(example["labels"]) as ds:
        truth = ds.read(1).astype(np.int16)
    truth[truth == 255] = -1
    for (row, col), window in zip(locations, labels):
        assert np.array_equal(window, truth[row : row + 12, col : col + 12])
    # More than one class inside tiles: the point of segmentation over tile classification.
    assert any(len(np.unique(w[w >= 0])) > 1 for w in labels)


def test_an_unknown_task_is_refused(example) -> None:
    with pytest.raises(DomainInputError, match="task 'detection'"):
        read_samples(IngestRequest(source=example["scene_dir"], task="detection"))


def pixel_rule(channels: tuple[str, ...]):
    """A stand-in segmentation model: the demo's index rule per pixel, as one-hot probabilities (N, K, H, W)."""
    green, red, nir = (channels.index(b) for b in ("B03", "B04", "B08"))

    def infer(batch: np.ndarray) -> np.ndarray:
        ndwi = (batch[:, green] - batch[:, nir]) / (batch[:, green] + batch[:, nir] + 1e-6)
        ndvi = (batch[:, nir] - batch[:, red]) / (batch[:, nir] + batch[:, red] + 1e-6)
        winner = np.where(ndwi > 0, 0, np.where(ndvi > 0.4, 1, 2))
        return np.stack([(winner == k) for k in range(3)], axis=1).astype(np.float32)

    return infer


def test_segmentation_prediction_is_a_pixel_class_map(example, tmp_path: Path) -> None:
    names = ("B03", "B04", "B08")
    out = tmp_path / "pixels.tif"
    predict_scene(PredictionRequest(input=example["scene_dir"], output=out,
                                    channels=tuple(SENTINEL2.channel(n) for n in names),
                                    class_names=("water", "vegetation", "bare_or_built"), tile_size=12, stride=12,
                                    infer=pixel_rule(names), task="segmentation"))
    scene = read_scene(example["scene_dir"], channels=names)
    expected = pixel_rule(names)(scene.data[None])[0].argmax(axis=0)
    with rasterio.open(out) as ds:
        classes = ds.read(1)
        assert ds.crs == scene.crs and ds.transform == scene.transform
    valid = scene.valid
    assert (classes[~valid] == PREDICTION_NODATA).all()
    # Pixel by pixel, not a tile's majority: the river's edges are exact.
    assert np.array_equal(classes[valid], expected[valid])
    labels = read_label_raster(example["labels"], scene)
    assert (classes[valid] == labels[valid]).mean() > 0.9

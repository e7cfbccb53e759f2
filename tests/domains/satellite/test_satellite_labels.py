"""Label rasters aligned to the scene grid by georeference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.satellite.examples import example_class_map
from domains.satellite.labels import read_label_raster, write_label_raster
from domains.satellite.scene import read_scene
from domains.satellite.tiling import tile_scene
from domains.spec import DomainInputError, IngestRequest


@pytest.fixture(scope="module")
def scene(example: dict[str, Path]):
    return read_scene(example["scene_dir"])


def test_native_label_raster_matches_the_ground_truth(example: dict[str, Path], scene) -> None:
    labels = read_label_raster(example["labels"], scene)
    assert labels.dtype == np.int64 and labels.shape == scene.shape
    expected = example_class_map(60).astype(np.int64)
    expected[~scene.valid] = -1
    np.testing.assert_array_equal(labels, expected)


def test_label_raster_in_wgs84_is_reprojected_onto_the_scene(example: dict[str, Path], scene) -> None:
    native = read_label_raster(example["labels"], scene)
    warped = read_label_raster(example["labels_wgs84"], scene)
    assert warped.shape == scene.shape
    # Two nearest-neighbour warps move class borders by at most a pixel.
    assert (warped == native).mean() > 0.97
    request = IngestRequest(source=example["scene_dir"], tile_size=10, stride=10, block_size=30)
    from_native = tile_scene(scene, native, request)
    from_wgs84 = tile_scene(scene, warped, request)
    np.testing.assert_array_equal(from_native.locations, from_wgs84.locations)
    assert (from_native.labels != from_wgs84.labels).sum() <= 2


def test_coarser_label_raster_is_upsampled_by_nearest(scene, tmp_path: Path, write_tif) -> None:
    coarse = np.array([[0, 1, 2], [2, 1, 0], [1, 1, 1]], dtype=np.uint8)
    path = write_tif(tmp_path / "coarse.tif", coarse, resolution=200, nodata=255)
    labels = read_label_raster(path, scene)
    np.testing.assert_array_equal(labels[:20:, :20], 0)
    assert labels[25, 45] == 0 and labels[0, 59] == 2 and labels[59, 0] == 1


def test_partial_label_raster_leaves_the_rest_unlabelled(scene, tmp_path: Path, write_tif) -> None:
    path = write_tif(tmp_path / "half.tif", np.ones((60, 30), dtype=np.uint8), nodata=255)
    labels = read_label_raster(path, scene)
    assert (labels[:, :30] == 1).all() and (labels[:, 30:] == -1).all()


def test_label_raster_elsewhere_does_not_overlap(scene, tmp_path: Path, write_tif) -> None:
    path = write_tif(
        tmp_path / "far.tif", np.zeros((10, 10), dtype=np.uint8), resolution=0.001, crs="EPSG:4326",
        origin=(10.0, 50.0), nodata=255,
    )
    with pytest.raises(DomainInputError) as error:
        read_label_raster(path, scene)
    assert "far.tif" in str(error.value) and "does not overlap" in error.value.problem


def test_label_raster_without_crs(scene, tmp_path: Path, write_tif) -> None:
    path = write_tif(tmp_path / "nocrs.tif", np.zeros((60, 60), dtype=np.uint8), crs=None)
    with pytest.raises(DomainInputError) as error:
        read_label_raster(path, scene)
    assert "nocrs.tif" in str(error.value) and "no CRS" in error.value.problem


def test_float_label_raster_is_refused(scene, tmp_path: Path, write_tif) -> None:
    path = write_tif(tmp_path / "float.tif", np.zeros((60, 60), dtype=np.float32), nodata=None)
    with pytest.raises(DomainInputError, match="integer class ids"):
        read_label_raster(path, scene)


def test_truncated_label_raster(example: dict[str, Path], scene, tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    path.write_bytes(example["labels"].read_bytes()[:100])
    with pytest.raises(DomainInputError) as error:
        read_label_raster(path, scene)
    assert "cut.tif" in str(error.value)


def test_write_label_raster_round_trips(scene, tmp_path: Path) -> None:
    labels = np.where(scene.valid, example_class_map(60).astype(np.int64), -1)
    path = write_label_raster(labels, scene, tmp_path / "out" / "labels.tif")
    np.testing.assert_array_equal(read_label_raster(path, scene), labels)
    with pytest.raises(ValueError, match="shape"):
        write_label_raster(labels[:10], scene, tmp_path / "bad.tif")

"""Sliding-window prediction written as a GeoTIFF on the input's grid, and input discovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from domains.satellite import SPEC
from domains.satellite.demo import demo_scene_dir
from domains.satellite.labels import read_label_raster
from domains.satellite.prediction import list_prediction_inputs, predict_scene, tile_starts
from domains.satellite.scene import read_scene
from domains.satellite.sensors import SENTINEL2
from domains.spec import DomainInputError, PredictionRequest

CLASSES = ("water", "vegetation", "bare_or_built")


def spectral_infer(channels: tuple[str, ...]):
    """A stand-in model: the demo's index rule on each tile's mean reflectance, as soft probabilities."""
    green, red, nir = (channels.index(b) for b in ("B03", "B04", "B08"))

    def infer(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.shape[1] == len(channels)
        means = batch.mean(axis=(2, 3))
        ndwi = (means[:, green] - means[:, nir]) / (means[:, green] + means[:, nir] + 1e-6)
        ndvi = (means[:, nir] - means[:, red]) / (means[:, nir] + means[:, red] + 1e-6)
        winner = np.where(ndwi > 0, 0, np.where(ndvi > 0.4, 1, 2))
        probs = np.full((len(batch), 3), 0.1, dtype=np.float32)
        probs[np.arange(len(batch)), winner] = 0.8
        return probs

    return infer


def make_request(source: Path, output: Path, names=SENTINEL2.band_names, tile=16, stride=16, infer=None, **kw):
    channels = tuple(SENTINEL2.channel(n) for n in names)
    return PredictionRequest(
        input=source, output=output, channels=channels, class_names=CLASSES, tile_size=tile, stride=stride,
        infer=infer or spectral_infer(tuple(names)), **kw,
    )


def test_tile_starts_cover_the_border() -> None:
    assert tile_starts(60, 16, 16) == [0, 16, 32, 44]
    assert tile_starts(64, 16, 16) == [0, 16, 32, 48]
    assert tile_starts(16, 16, 5) == [0]
    assert tile_starts(20, 16, 8) == [0, 4]


def test_prediction_has_the_scene_geometry(example: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "out" / "pred.tif"
    summary = SPEC.predict(make_request(example["scene_dir"], output, batch_size=5))
    scene = read_scene(example["scene_dir"])
    with rasterio.open(output) as ds, rasterio.open(next(example["scene_dir"].glob("*_B02.tif"))) as band:
        assert ds.crs == band.crs and ds.transform == band.transform and ds.shape == band.shape
        assert ds.count == 2 and ds.dtypes == ("uint8", "uint8") and ds.nodata == 255
        assert ds.tags()["class_names"] == "water,vegetation,bare_or_built"
        assert ds.descriptions == ("class", "confidence_percent")
        assert ds.colormap(1)[0][:3] == (31, 120, 180)
        classes, confidence = ds.read()
    assert summary.output == str(output) and summary.input == str(example["scene_dir"])
    assert summary.samples == 16  # 4 x 4 tile starts, the last row and column flush with the border
    assert (classes[~scene.valid] == 255).all() and (confidence[~scene.valid] == 255).all()
    assert (classes[scene.valid] < 3).all() and (confidence[scene.valid] == 80).all()
    assert summary.class_counts == {name: int((classes == i).sum()) for i, name in enumerate(CLASSES)}
    assert sum(summary.class_counts.values()) == scene.valid.sum()
    truth = read_label_raster(example["labels"], scene)
    assert (classes[scene.valid] == truth[scene.valid]).mean() > 0.6
    assert not list(output.parent.glob(".*partial"))


def test_overlapping_tiles_are_averaged(example: dict[str, Path], tmp_path: Path) -> None:
    calls = []

    def infer(batch: np.ndarray) -> np.ndarray:
        # Alternate between two opinions, so overlapping pixels average them.
        first = len(calls) % 2 == 0
        calls.append(len(batch))
        return np.tile(np.array([[0.9, 0.1, 0.0]] if first else [[0.1, 0.3, 0.6]], dtype=np.float32), (len(batch), 1))

    request = make_request(example["scene_dir"], tmp_path / "p.tif", tile=20, stride=10, infer=infer, batch_size=1)
    summary = predict_scene(request)
    assert summary.samples == len(calls) == 25
    with rasterio.open(tmp_path / "p.tif") as ds:
        classes, confidence = ds.read()
    # The top-left pixel is covered by tile 0 only; pixel (10, 10) by tiles 0, 1, 5 and 6.
    assert classes[0, 0] == 0 and confidence[0, 0] == 90
    assert classes[10, 10] == 0 and confidence[10, 10] == 50


def test_prediction_reads_the_models_bands_by_name(example: dict[str, Path], tmp_path: Path) -> None:
    names = ("B08", "B04", "B03")
    folder = predict_scene(make_request(example["scene_dir"], tmp_path / "a.tif", names=names))
    stack = predict_scene(make_request(example["multiband"], tmp_path / "b.tif", names=names))
    assert folder.class_counts == stack.class_counts
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_output_folder_gets_a_file_per_scene(example: dict[str, Path], tmp_path: Path) -> None:
    summary = predict_scene(make_request(example["multiband"], tmp_path))
    assert summary.output == str(tmp_path / f"{example['multiband'].stem}_classes.tif")
    assert Path(summary.output).is_file()


def test_missing_model_band_is_named(scene_copy: Path, tmp_path: Path) -> None:
    next(scene_copy.glob("*_B8A.tif")).unlink()
    with pytest.raises(DomainInputError) as error:
        predict_scene(make_request(scene_copy, tmp_path / "p.tif"))
    assert str(scene_copy) in str(error.value) and "B8A" in error.value.problem


def test_tile_larger_than_scene(example: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DomainInputError, match="smaller than the model's tile size 64"):
        predict_scene(make_request(example["multiband"], tmp_path / "p.tif", tile=64, stride=64))


def test_infer_with_wrong_shape(example: dict[str, Path], tmp_path: Path) -> None:
    request = make_request(example["multiband"], tmp_path / "p.tif", infer=lambda b: np.zeros((len(b), 2)))
    with pytest.raises(ValueError, match="expected"):
        predict_scene(request)
    assert not (tmp_path / "p.tif").exists()


def test_list_prediction_inputs(example: dict[str, Path], tmp_path: Path) -> None:
    scenes = example["scene_dir"].parent
    assert SPEC.list_prediction_inputs(example["multiband"]) == [example["multiband"]]
    assert list_prediction_inputs(example["scene_dir"]) == [example["scene_dir"]]
    assert list_prediction_inputs(scenes) == [example["scene_dir"], example["multiband"]]
    assert list_prediction_inputs(demo_scene_dir()) == [demo_scene_dir()]


def test_list_prediction_inputs_finds_nothing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no scenes here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DomainInputError) as error:
        list_prediction_inputs(tmp_path)
    assert str(tmp_path) in str(error.value) and "holds no scene" in error.value.problem
    assert "notes.txt" in error.value.problem
    with pytest.raises(DomainInputError, match="does not exist"):
        list_prediction_inputs(tmp_path / "missing")
    with pytest.raises(DomainInputError, match="is not a scene"):
        list_prediction_inputs(tmp_path / "notes.txt")


def test_prediction_strip_by_strip_equals_one_strip(example: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from domains.satellite import prediction

    def infer(batch: np.ndarray) -> np.ndarray:
        # Depends on the pixels, so a tile read from the wrong rows changes the output.
        score = batch.reshape(len(batch), batch.shape[1], -1).mean(axis=2)[:, :3].astype(np.float32)
        return score / score.sum(axis=1, keepdims=True)

    whole = predict_scene(make_request(example["scene_dir"], tmp_path / "whole.tif", tile=20, stride=8, infer=infer))
    # A one-byte budget: one row of tiles per strip, overlapping the previous strip's rows.
    monkeypatch.setattr(prediction, "STRIP_BYTES", 1)
    strips = predict_scene(make_request(example["scene_dir"], tmp_path / "strips.tif", tile=20, stride=8, infer=infer))
    assert strips.samples == whole.samples and strips.class_counts == whole.class_counts
    with rasterio.open(tmp_path / "whole.tif") as a, rasterio.open(tmp_path / "strips.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert len(set(a.read(1).ravel().tolist())) > 2

"""Ingest tiling, prediction outputs (mask raster + plume list) and the demo capture's recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domains.hyperspectral import SPEC
from domains.hyperspectral.prediction import list_prediction_inputs, plume_list_path
from domains.hyperspectral.tiling import read_mask
from domains.hyperspectral.cube import open_cube
from domains.spec import DomainInputError, IngestRequest, PredictionRequest


def test_samples_are_segmentation_tiles_with_block_groups(example, collect):
    samples = collect(SPEC.read_samples(IngestRequest(source=example["source"], labels=example["labels"],
                                                      tile_size=16, stride=8, block_size=24)))
    assert samples.task == "segmentation" and samples.labels.dtype == np.int16
    assert [c.name for c in samples.channels] == ["red", "green", "blue", "ch4_mag1c"]
    assert samples.channels[3].wavelength_nm is None
    assert samples.dropped["straddles_block"] > 0
    assert all(r // 24 == (r + 15) // 24 and c // 24 == (c + 15) // 24 for r, c in samples.locations)
    assert (samples.labels == 1).any() and set(np.unique(samples.labels)) <= {0, 1}
    # Plume pixels carry a much higher methane product than background pixels.
    product = samples.images[:, 3]
    assert product[samples.labels == 1].mean() > 5 * product[samples.labels == 0].mean()


def test_channel_request_changes_the_stack(example, collect):
    samples = collect(SPEC.read_samples(IngestRequest(source=example["source"], tile_size=16, stride=16,
                                                      block_size=16, channels=("evenly-spaced:5", "ch4_ace"))))
    assert len(samples.channels) == 6 and samples.images.shape[1] == 6
    assert (samples.labels == -1).all()


def test_mask_not_matching_the_cube_is_named(example, tmp_path):
    from domains.hyperspectral.synthesis import write_mask

    bad = write_mask(tmp_path / "small_mask.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(DomainInputError, match="small_mask.tif: plume mask is 40x48 px"):
        read_mask(bad, open_cube(example["source"]))
    wrong = write_mask(tmp_path / "classes_mask.tif", np.full((48, 48), 3, np.uint8))
    with pytest.raises(DomainInputError, match=r"values \[3\]"):
        read_mask(wrong, open_cube(example["source"]))


def _plume_infer(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: plume where the methane channel (last), smoothed 5 x 5, exceeds 400 ppm·m."""
    from scipy.ndimage import uniform_filter

    plume = (uniform_filter(batch[:, -1], size=(1, 5, 5)) > 400).astype(np.float32)
    return np.stack([1 - plume, plume], axis=1)


def test_prediction_writes_georeferenced_mask_and_plume_list(example, tmp_path):
    import rasterio

    inputs = list_prediction_inputs(example["source"].parent)
    assert inputs == [example["source"]]  # the mask beside the cube is not an input
    output = tmp_path / "pred.tif"
    summary = SPEC.predict(PredictionRequest(input=inputs[0], output=output, channels=SPEC.default_channels,
                                             class_names=SPEC.default_class_names, tile_size=16, stride=8,
                                             infer=_plume_infer, task="segmentation"))
    with rasterio.open(output) as ds:
        assert ds.crs.to_epsg() == 32613 and ds.transform.a == 60.0 and ds.count == 2 and ds.shape == (48, 48)
        classes = ds.read(1)
    truth = read_mask(example["labels"], open_cube(example["source"])) == 1
    predicted = classes == 1
    assert (predicted & truth).sum() / (predicted | truth).sum() > 0.2
    report = json.loads(plume_list_path(output).read_text())
    assert report["plume_count"] >= 1 and summary.class_counts["plume"] == predicted.sum()
    biggest = report["plumes"][0]
    assert biggest["peak_enhancement_ppmm"] > 1000 and biggest["area_m2"] == biggest["area_px"] * 3600.0
    assert abs(biggest["centroid_row"] - 20) < 12 and abs(biggest["centroid_col"] - 14) < 16


def test_prediction_refuses_a_model_whose_bands_the_cube_lacks(example, tmp_path):
    from domains.spec import Channel

    with pytest.raises(DomainInputError, match="cannot be mapped onto this sensor"):
        SPEC.predict(PredictionRequest(input=example["source"], output=tmp_path / "x.tif",
                                       channels=(Channel("3100.0nm", 3100.0),), class_names=SPEC.default_class_names,
                                       tile_size=16, stride=16, infer=_plume_infer, task="segmentation"))


def test_prediction_inputs_errors(tmp_path):
    with pytest.raises(DomainInputError, match="does not exist"):
        list_prediction_inputs(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DomainInputError, match="holds no capture"):
        list_prediction_inputs(tmp_path)


def test_demo_recipe_is_documented_and_seeded():
    from domains.hyperspectral import demo

    assert "Beer-Lambert" in SPEC.demo_notes and str(demo.DEMO_SEED) in SPEC.demo_notes
    assert demo.DEMO_SHAPE[0] // 32 * (demo.DEMO_SHAPE[1] // 32) >= 250

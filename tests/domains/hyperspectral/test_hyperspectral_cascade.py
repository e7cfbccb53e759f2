"""The on-board screening cascade: only tiles with a methane footprint reach the model, in predict itself."""

from __future__ import annotations

import numpy as np
import pytest

from domains.hyperspectral import SPEC
from domains.hyperspectral.cascade import CascadeCounts, screen_tiles, screened
from domains.hyperspectral.prediction import run_capture
from domains.hyperspectral.tiling import read_mask
from domains.hyperspectral.cube import open_cube
from domains.spec import Channel, PredictionRequest


def test_screen_keeps_tiles_with_a_plume_footprint_not_a_single_noisy_pixel():
    batch = np.zeros((3, 4, 16, 16), dtype=np.float32)
    batch[:, 3] = 100.0  # background enhancement
    batch[1, 3, 5:9, 5:9] = 2000.0  # a plume footprint
    batch[2, 3, 3, 3] = 2800.0  # one hot pixel: its 3 x 3 mean is 400, not above a 400 threshold
    assert screen_tiles(batch, 3, 400.0).tolist() == [False, True, False]


def test_only_candidates_reach_the_model_and_quiet_pixels_are_background():
    batch = np.zeros((3, 4, 16, 16), dtype=np.float32)
    batch[1, 3, 5:9, 5:9] = 2000.0
    seen = []

    def model(tiles: np.ndarray) -> np.ndarray:  # votes plume everywhere it is asked
        seen.append(len(tiles))
        return np.stack([np.full(tiles.shape[:1] + tiles.shape[2:], 0.2, np.float32),
                         np.full(tiles.shape[:1] + tiles.shape[2:], 0.8, np.float32)], axis=1)

    counts = CascadeCounts()
    out = screened(model, product=3, threshold=400.0, classes=2, counts=counts)(batch)

    assert seen == [1] and (counts.tiles, counts.model_tiles) == (3, 1)
    assert out.shape == (3, 2, 16, 16) and np.allclose(out.sum(axis=1), 1.0)
    assert (out[[0, 2], 0] == 1.0).all()  # screened out: background
    enhanced = np.zeros((16, 16), bool)
    enhanced[4:10, 5:9] = enhanced[5:9, 4:10] = True  # a 3 x 3 mean over 400: the footprint and its edge neighbours
    assert np.allclose(out[1, 1][enhanced], 0.8) and (out[1, 1][~enhanced] == 0).all()


def _plume_model(batch: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    plume = (uniform_filter(batch[:, -1], size=(1, 5, 5)) > 400).astype(np.float32)
    return np.stack([1 - plume, plume], axis=1)


def _request(example, tmp_path, infer, **changes) -> PredictionRequest:
    return PredictionRequest(**{"input": example["source"], "output": tmp_path / "mask.tif",
                                "channels": SPEC.default_channels, "class_names": SPEC.default_class_names,
                                "tile_size": 8, "stride": 8, "infer": infer, "task": "segmentation", **changes})


def test_predict_with_the_cascade_runs_the_model_on_plume_tiles_only(example, tmp_path):
    calls = []

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return _plume_model(batch)

    timings: dict = {}
    summary, _, _ = run_capture(_request(example, tmp_path, counted, screen_ppmm=400.0), timings)

    assert timings["tiles"] == summary.samples == 36 and 0 < timings["model_tiles"] == sum(calls) < 36
    assert timings["screening"] > 0 and timings["model"] > 0
    truth = read_mask(example["labels"], open_cube(example["source"])) == 1
    import rasterio

    with rasterio.open(tmp_path / "mask.tif") as ds:
        predicted = ds.read(1) == 1
    assert (predicted & truth).sum() / (predicted | truth).sum() > 0.2


def test_the_threshold_is_applied_in_the_units_the_model_takes(example, tmp_path):
    plain: dict = {}
    run_capture(_request(example, tmp_path, _plume_model, screen_ppmm=400.0), plain)
    # A model taking the methane channel halved: the same tiles are candidates.
    halved: dict = {}
    scaling = ((1.0, 0.0),) * 3 + ((2.0, 0.0),)

    def on_halved(batch: np.ndarray) -> np.ndarray:
        return _plume_model(batch * np.array([1, 1, 1, 2], np.float32)[None, :, None, None])

    run_capture(_request(example, tmp_path, on_halved, screen_ppmm=400.0, input_scaling=scaling), halved)
    assert halved["model_tiles"] == plain["model_tiles"]


def test_screening_needs_a_methane_product_in_ppmm(example, tmp_path):
    rgb = (Channel("red", 640.0), Channel("green", 550.0), Channel("blue", 470.0))
    with pytest.raises(ValueError, match="needs a methane enhancement channel in ppm·m.*red, green, blue"):
        run_capture(_request(example, tmp_path, _plume_model, channels=rgb, screen_ppmm=400.0))


def test_predict_refuses_screening_outside_hyperspectral(tmp_path):
    from tasks.prediction import predict_inputs
    from tasks.request_errors import RequestError

    with pytest.raises(RequestError, match="hyperspectral models only, not satellite"):
        predict_inputs("satellite", "models:/nothing@champion", tmp_path, tmp_path / "out", screen_ppmm=400.0)

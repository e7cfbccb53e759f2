"""End-to-end satellite pipelines beyond tile classification: pixel segmentation reaches a champion."""

from __future__ import annotations

from pathlib import Path

import pytest
import rasterio

from domains.satellite.examples import write_example
from domains.satellite.prediction import PREDICTION_NODATA


@pytest.mark.slow
def test_satellite_segmentation_pipeline_reaches_a_champion(tmp_path: Path, local_mlflow) -> None:
    example = write_example(tmp_path / "example")
    from mlflow import MlflowClient

    from flows.pipeline import PipelineParams, pipeline

    receipt = pipeline(PipelineParams(
        source=str(example["scene_dir"]), labels=str(example["labels"]), workdir=str(tmp_path / "work"),
        bands=["B02", "B03", "B04", "B08"],
        tiling={"tile_size": 8, "stride": 8, "block_size": 16, "task": "segmentation"},
        split={"val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
        backbone={"name": "vit_tiny_patch16_224", "patch_size": 4, "depth": 1},
        train={"epochs": 2, "batch_size": 16},
        compression={"latency_repeats": 5, "throughput_batch": 4, "quantization": {"calibration_samples": 8}},
        gate={"min_metric": 0.0, "max_drop_vs_fp32": 1.0, "latency_budget_ms": 10000}))
    assert receipt.promote.passed and receipt.promote.alias == "champion", receipt.promote.reasons
    assert MlflowClient().get_model_version_by_alias("satellite-segmentation-edge", "champion")
    # Scores are per-class IoU.
    assert {f"onnx-fp32.test_iou_{name}" for name in ("water", "vegetation")} <= set(receipt.validation.metrics)
    with rasterio.open(receipt.predict.outputs[0]) as ds:
        classes = ds.read(1)
        assert ds.tags()["sensor"] == "sentinel2"
    # A pixel map, not a tile map: some 8 x 8 tile holds two predicted classes.
    tiles = classes[:56, :56].reshape(7, 8, 7, 8).swapaxes(1, 2).reshape(49, 64)
    assert any(len(set(t[t != PREDICTION_NODATA].tolist())) > 1 for t in tiles)

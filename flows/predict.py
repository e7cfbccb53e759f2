"""Predict: the promoted model (or any model URI) runs over a new input or a drop folder of inputs."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped
from pydantic import BaseModel, Field, field_validator

from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks.dataset import require_utf8_path
from tasks.prediction import predict_inputs_task
from tasks.prediction_fanout import merge_batches, plan_predictions_task, predict_scene_task
from tasks.promotion import resolve_model_uri
from tasks.task_runners import TaskRunnerParams, open_task_runner
from tasks.tracking import configure_tracking


class PredictParams(BaseModel):
    """Run a model on new scenes and write georeferenced predictions."""

    domain: DomainName = "satellite"
    input: str = Field(..., min_length=1, max_length=1000, description="One scene (folder of bands or multi-band "
                                                                      "GeoTIFF) or a drop folder of scenes")
    output: str = Field(..., min_length=1, max_length=1000,
                        description="Output GeoTIFF for one scene, or a folder for a drop folder; a local path or "
                                    "a URL (s3://bucket/prefix)")
    model_uri: str | None = Field(None, max_length=1000,
                                  description="MLflow model URI; empty uses the domain's edge champion")
    stride: int | None = Field(None, ge=1, le=4096, description="Tile step in pixels; empty uses the model's tile size")
    workdir: str = WorkdirField
    threads: int = Field(2, ge=1, le=256, description="CPU threads for inference")
    mpp: float | None = Field(None, gt=0.02, lt=100.0,
                              description="Resolution of the input in microns per pixel, for whole-slide images whose metadata states none "
                                                 "(never guessed from objective power); empty reads it from the slide")
    screen_ppmm: float | None = Field(None, gt=0, lt=1e6,
                                      description="Hyperspectral plume models: segment only tiles whose methane "
                                                  "enhancement (3 x 3 mean) exceeds this many ppm·m somewhere, the rest "
                                                  "being background (the on-board cascade; 400 suits the demo); empty "
                                                  "runs the model on every tile")
    runner: TaskRunnerParams | None = Field(None, description="Where the scenes are predicted: empty, one task "
                                                              "predicts them in turn with the model loaded once; "
                                                              "given, one task per scene on threads here or on a "
                                                              "Dask cluster (each task loads the model)")

    @field_validator("input", "output", mode="before")
    @classmethod
    def _text_paths(cls, value: object) -> object:
        return require_utf8_path(value)


class PredictReceipt(BaseModel):
    """What was written, and what failed with its reason."""

    model_uri: str
    outputs: list[str]
    failed: dict[str, str]


@flow(name="predict", flow_run_name="predict-{params.domain}", log_prints=True)
@report_input_errors
def predict(params: PredictParams) -> PredictReceipt:
    """Predict with the promoted edge model by default; bad inputs are reported, the rest still run."""
    configure_tracking(params.workdir)
    model_uri = resolve_model_uri(params.domain, params.model_uri)
    if params.runner is None:
        batch = predict_inputs_task(params.domain, model_uri, Path(params.input), params.output, params.stride,
                                    params.threads, params.mpp, params.screen_ppmm)
    else:
        pinned_uri, jobs = plan_predictions_task(params.domain, model_uri, Path(params.input), params.output,
                                                 params.screen_ppmm)
        with open_task_runner(params.runner) as runner:
            scenes = runner.map(predict_scene_task, {
                "domain_name": unmapped(params.domain), "model_uri": unmapped(pinned_uri), "job": jobs,
                "stride": unmapped(params.stride), "threads": unmapped(params.threads), "mpp": unmapped(params.mpp),
                "screen_ppmm": unmapped(params.screen_ppmm)})
            batch = merge_batches([scene.result() for scene in scenes])
    return PredictReceipt(model_uri=model_uri, outputs=[s.output for s in batch.written], failed=batch.failed)

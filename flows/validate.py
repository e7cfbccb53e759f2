"""Validate: test-split metrics and confusion matrices for the reference model and every edge variant."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks import tracking
from tasks.dataset import read_dataset_info
from tasks.tracking import load_reference_model_task
from tasks.validation import fetch_onnx_variants_task, record_validation_task, validate_variants_task


class ValidateParams(BaseModel):
    """Score a fine-tuned model and its compressed variants on the held-out test split."""

    domain: DomainName = "satellite"
    dataset: str = Field(..., min_length=1, max_length=1000,
                         description="Dataset folder or URL (s3://bucket/prefix) written by the ingest flow")
    model_uri: str = Field(..., min_length=1, max_length=1000, description="Reference model URI from the finetune flow")
    compress_run_id: str = Field(..., min_length=1, max_length=64, description="MLflow run id of the compress flow")
    workdir: str = WorkdirField
    threads: int = Field(2, ge=1, le=256, description="CPU threads for inference")


class ValidateReceipt(BaseModel):
    """The validate run and its metrics, keyed ``<variant>.test_<metric>``."""

    run_id: str
    metrics: dict[str, float]
    task: str = Field("classification", description="What the validated model predicts (the dataset's task, or "
                                                    "slide-classification for a slide model)")


@flow(name="validate-model", flow_run_name="validate-{params.domain}", log_prints=True)
@report_input_errors
def validate(params: ValidateParams) -> ValidateReceipt:
    """Score the reference model and every compressed variant on the test split, with the task's metrics and plots."""
    info = read_dataset_info(params.dataset)
    # The variants are downloaded beside the run's artifacts, not among them (they are the compress run's), into
    # a folder removed when validation ends.
    with tracking.stage_run(params.domain, "validate", params.workdir, params.model_dump(mode="json"), info,
                            params.dataset, {"vitrail.compress_run_id": params.compress_run_id}) as run, \
            tempfile.TemporaryDirectory(prefix="vitrail-variants-") as downloads:
        reference = load_reference_model_task(params.model_uri)
        variants = fetch_onnx_variants_task(params.compress_run_id, Path(downloads))
        result = validate_variants_task(params.dataset, reference, variants, run.artifact_dir, params.threads)
        metrics = record_validation_task(result)
    return ValidateReceipt(run_id=run.run_id, metrics=metrics, task=result.task)

"""Compress: export to ONNX, quantize, distil/prune/merge tokens, check parity at every step, measure every variant."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from flows.error_reporting import report_input_errors
from flows.parameters import DomainName, WorkdirField
from tasks import tracking
from tasks.compression.recipe import CompressParams, compress_model_task, record_compression_task
from tasks.dataset import read_dataset_info
from tasks.storage import join_location, staged_folder
from tasks.tracking import load_reference_model_task, logged_model_metadata_task


class CompressFlowParams(BaseModel):
    """Build and measure edge variants of a fine-tuned model."""

    domain: DomainName = "satellite"
    dataset: str = Field(..., min_length=1, max_length=1000, description="Dataset folder or URL (test split measures "
                                                                        "accuracy, training split calibrates int8)")
    model_uri: str = Field(..., min_length=1, max_length=1000, description="Reference model URI from the finetune flow")
    workdir: str = WorkdirField
    compression: CompressParams = Field(default_factory=CompressParams,
                                        description="Export, quantization, recipe (distil, prune, token reduction), "
                                                    "target profile and timing")


class CompressReceipt(BaseModel):
    """The compress run, its edge model and the report."""

    run_id: str
    edge_model_uri: str
    edge_variant: str
    edge_runtime: str = "onnxruntime"
    """What runs the edge artifact: ``onnxruntime`` or ``openvino`` (chosen with the variant, per the profile)."""
    report: str
    int8_vs_fp32_latency_ratio: float


@flow(name="compress-model", flow_run_name="compress-{params.domain}", log_prints=True)
@report_input_errors
def compress(params: CompressFlowParams) -> CompressReceipt:
    """Export to ONNX with a parity check, quantize, run the compression recipe, and measure every variant."""
    info = read_dataset_info(params.dataset)
    with tracking.stage_run(params.domain, "compress", params.workdir, params.model_dump(mode="json"), info,
                            params.dataset, {"vitrail.recipe": params.compression.recipe_label(),
                             "vitrail.profile": params.compression.profile}) as run:
        model = load_reference_model_task(params.model_uri)
        metadata = logged_model_metadata_task(params.model_uri)
        # ONNX Runtime and its quantizers need real files: a local folder, uploaded when the stage ends.
        with staged_folder(join_location(params.workdir, "compress", run.run_id)) as out_dir:
            report = compress_model_task(model, params.dataset, metadata, params.compression, out_dir)
            edge_uri = record_compression_task(report, metadata, params.workdir, run.artifact_dir)
    return CompressReceipt(run_id=run.run_id, edge_model_uri=edge_uri, edge_variant=report.edge_variant,
                           edge_runtime=report.variant(report.edge_variant).runtime,
                           report=join_location(params.workdir, "compress_report.json"),
                           int8_vs_fp32_latency_ratio=report.extra["int8_vs_fp32_latency_ratio"])

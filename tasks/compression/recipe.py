"""The compress stage's work: export, check parity, quantize, and measure every variant side by side."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field
from torch import nn

from tasks.compression.export import ParityError, ParityReport, check_parity, compare_logits, export_onnx
from tasks.compression.measure import VariantMeasurement, measure_variant
from tasks.compression.quantize import QuantizationParams, quantize_int8_dynamic, quantize_int8_static
from tasks.dataset import load_dataset
from tasks.onnx_runtime import open_session, session_predictor
from tasks.training import predict_logits

log = logging.getLogger(__name__)

BASELINE = "torch-fp32"
EdgeVariant = Literal["auto", "onnx-int8", "onnx-int8-dynamic", "onnx-fp32"]
ONNX_VARIANTS = ("onnx-fp32", "onnx-int8", "onnx-int8-dynamic")


class CompressParams(BaseModel):
    """Edge export and quantization settings, measured on the machine that runs the flow."""

    edge_variant: EdgeVariant = Field(
        "auto", description="Edge artifact: 'auto' picks the fastest ONNX variant within max_accuracy_drop on the "
                            "validation split, or name one variant")
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0,
                                     description="Largest validation accuracy drop versus fp32 that 'auto' accepts")
    parity_tolerance: float = Field(1e-3, gt=0, le=1.0,
                                    description="Largest |logit| difference allowed between torch and the fp32 ONNX export")
    quantization: QuantizationParams = Field(default_factory=QuantizationParams, description="Static int8 settings")
    threads: int = Field(2, ge=1, le=256, description="CPU threads for every measured variant (target: 2-core CPU)")
    latency_repeats: int = Field(100, ge=5, le=10000, description="Batch-1 calls timed per variant")
    throughput_batch: int = Field(32, ge=1, le=1024, description="Batch size for the throughput measurement")


@dataclass
class CompressReport:
    """Every variant's measurements, parity checks and files."""

    variants: list[VariantMeasurement]
    parity: dict[str, ParityReport]
    files: dict[str, Path]
    edge_variant: str
    threads: int
    test_samples: int
    extra: dict[str, float] = field(default_factory=dict)

    def variant(self, name: str) -> VariantMeasurement:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> dict:
        edge = self.variant(self.edge_variant)
        return {
            "baseline": BASELINE,
            "edge_variant": self.edge_variant,
            "threads": self.threads,
            "test_samples": self.test_samples,
            "int8_vs_fp32_latency_ratio": self.extra.get("int8_vs_fp32_latency_ratio"),
            "edge_accuracy_drop": self.variant(BASELINE).accuracy - edge.accuracy,
            "variants": [v.as_dict() for v in self.variants],
            "parity": {name: report.as_dict() for name, report in self.parity.items()},
        }

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def _torch_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def select_edge_variant(measured: list[VariantMeasurement], predictors: dict, reference_predict, images: np.ndarray,
                        labels: np.ndarray, class_names: tuple[str, ...], max_drop: float) -> str:
    """The fastest ONNX variant whose accuracy on (images, labels) is within ``max_drop`` of the fp32 model.

    fp32 ONNX passed its parity check, so it is always eligible and the choice never fails.
    """
    from tasks.evaluation import evaluate_predictor

    reference = evaluate_predictor(reference_predict, images, labels, class_names).accuracy
    latency = {v.name: v.latency_ms_p50 for v in measured}
    eligible = ["onnx-fp32"] + [
        name for name in ONNX_VARIANTS[1:]
        if reference - evaluate_predictor(predictors[name], images, labels, class_names).accuracy <= max_drop + 1e-9]
    choice = min(eligible, key=latency.__getitem__)
    log.info("edge variant: %s (eligible within %.3f accuracy drop: %s)", choice, max_drop, ", ".join(eligible))
    return choice


def compress_model(model: nn.Module, dataset_path: Path, metadata: dict, params: CompressParams,
                   out_dir: Path) -> CompressReport:
    """Export ``model`` to ONNX, quantize it to int8, and measure all variants on the test split.

    The fp32 export must match the torch model within ``parity_tolerance`` or the stage fails; the
    int8 variants' logit differences are recorded, and judged by their accuracy.
    """
    torch.set_num_threads(params.threads)
    dataset = load_dataset(dataset_path)
    test = dataset.splits.get("test")
    train = dataset.splits.get("train")
    if test is None or len(test) == 0:
        raise ValueError(f"{dataset.path}: no test split to measure compressed variants on")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()

    files = {"onnx-fp32": export_onnx(model, test.images, out_dir / "model-fp32.onnx", metadata)}
    parity = {"onnx-fp32": check_parity(model, files["onnx-fp32"], test.images, params.parity_tolerance, params.threads)}
    if not parity["onnx-fp32"].passed:
        raise ParityError(f"{files['onnx-fp32']}: ONNX export differs from the torch model by "
                          f"{parity['onnx-fp32'].max_abs_diff:.3g} > tolerance {params.parity_tolerance:g}")
    calibration = train.images if train is not None else np.empty((0,))
    files["onnx-int8"] = quantize_int8_static(files["onnx-fp32"], calibration, out_dir / "model-int8.onnx",
                                              params.quantization)
    files["onnx-int8-dynamic"] = quantize_int8_dynamic(files["onnx-fp32"], out_dir / "model-int8-dynamic.onnx")

    reference_logits = predict_logits(model, test.images)
    common = dict(test_images=test.images, test_labels=test.labels, class_names=dataset.info.class_names,
                  latency_repeats=params.latency_repeats, throughput_batch=params.throughput_batch)

    def torch_predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    variants = [measure_variant(BASELINE, "torch", torch_predict, _torch_size(model), **common)]
    predictors = {}
    for name in ONNX_VARIANTS:
        predict = predictors[name] = session_predictor(open_session(files[name], params.threads))
        if name != "onnx-fp32":
            parity[name] = compare_logits(reference_logits, predict(test.images), params.parity_tolerance)
        variants.append(measure_variant(name, "onnx", predict, files[name].stat().st_size, **common))

    base = variants[0]
    measured = []
    for variant in variants:
        check = parity.get(variant.name)
        measured.append(VariantMeasurement(
            **{**variant.as_dict(), "speedup_vs_fp32": base.latency_ms_p50 / variant.latency_ms_p50,
               "parity_max_abs_diff": check.max_abs_diff if check else None,
               "parity_agreement": check.agreement if check else None}))
    edge = params.edge_variant
    if edge == "auto":
        # Chosen on the validation split, never the test split that later judges the choice.
        selection = dataset.splits.get("val", train)
        edge = select_edge_variant(measured, predictors, torch_predict, selection.images, selection.labels,
                                   dataset.info.class_names, params.max_accuracy_drop)
    report = CompressReport(variants=measured, parity=parity, files=files, edge_variant=edge,
                            threads=params.threads, test_samples=len(test))
    int8 = report.variant("onnx-int8")
    report.extra["int8_vs_fp32_latency_ratio"] = int8.latency_ms_p50 / base.latency_ms_p50
    for v in measured:
        log.info("%-18s acc %.4f  p50 %7.3f ms  p95 %7.3f ms  %8.1f img/s  %9d B  x%.2f", v.name, v.accuracy,
                 v.latency_ms_p50, v.latency_ms_p95, v.throughput, v.size_bytes, v.speedup_vs_fp32)
    return report


compress_model_task = task(compress_model, name="compress-model", cache_policy=NONE)


def record_compression(report: CompressReport, metadata: dict, workdir: Path, artifact_dir: Path) -> str:
    """Write ``compress_report.json`` (workdir and MLflow), log every ONNX file, and the edge model; return its URI."""
    from tasks import tracking

    payload = report.write(artifact_dir / "compress_report.json")
    (Path(workdir) / "compress_report.json").write_text(payload.read_text())
    for variant in report.variants:
        tracking.log_metrics({f"{variant.name}.{key}": value for key, value in variant.as_dict().items()
                              if isinstance(value, (int, float)) and not isinstance(value, bool)})
    tracking.log_metrics({"int8_vs_fp32_latency_ratio": report.extra["int8_vs_fp32_latency_ratio"]})
    tracking.set_tags({"vitrail.edge_variant": report.edge_variant})
    for name, path in report.files.items():
        tracking.log_artifact(path, artifact_path="onnx")
    publish_compression_table(report)
    edge_file = report.files[report.edge_variant]
    size = metadata["tile_size"]
    example = np.zeros((1, len(metadata["channels"]), size, size), dtype=np.float32)
    return tracking.log_edge_model(edge_file, {**metadata, "variant": report.edge_variant}, example)


def publish_compression_table(report: CompressReport) -> None:
    """The variants table as a Prefect artifact, so the UI shows the trade-offs without opening MLflow."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    rows = [{"variant": v.name, "accuracy": round(v.accuracy, 4), "macro_f1": round(v.macro_f1, 4),
             "p50_ms": round(v.latency_ms_p50, 3), "p95_ms": round(v.latency_ms_p95, 3),
             "img_per_s": round(v.throughput, 1), "size_MB": round(v.size_bytes / 1e6, 2),
             "speedup_vs_fp32": round(v.speedup_vs_fp32, 2)} for v in report.variants]
    create_table_artifact(table=rows, key="compression-variants",
                          description=f"Variants measured on {report.threads} CPU threads; edge: {report.edge_variant}")


record_compression_task = task(record_compression, name="record-compression", cache_policy=NONE)

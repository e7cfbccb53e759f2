"""The compress stage's work: export, check parity, quantize, and measure every variant side by side."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field
from torch import nn

from tasks.atomic_files import remove_partials, write_text_atomic
from tasks.compression.distill import DistillParams, DistillStudent
from tasks.compression.export import ExportOnnx, ParityReport
from tasks.compression.openvino import ConvertOpenVino
from tasks.compression.measure import (
    VariantMeasurement,
    count_macs,
    measure_variant,
    plot_pareto,
    resident_bytes,
)
from tasks.compression.profiles import ProfileError, ProfileName, TargetProfile, budget_violations, get_profile
from tasks.compression.prune import PruneParams, PruneStructured
from tasks.compression.quantize import QuantizationParams, QuantizeOnnx
from tasks.compression.technique import PARITY_SAMPLES, REFERENCE_ROOT, CompressionContext, Variant, run_recipe
from tasks.compression.tokens import TokenReductionParams, reduce_tokens, token_variant_suffix
from tasks.models import input_scaling_of
from tasks.model_inputs import load_dataset_for
from tasks.evaluation import rows_per_batch
from tasks.onnx_runtime import open_predictor
from tasks.reproducibility import DEFAULT_THREADS, pin_determinism
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

BASELINE = "torch-fp32"
EdgeVariant = Literal["auto", "onnx-int8", "onnx-int8-dynamic", "onnx-fp32", "onnx-fp16", "openvino-int8",
                      "openvino-fp32", "openvino-bf16", "recipe"]
ONNX_VARIANTS = ("onnx-fp32", "onnx-int8", "onnx-int8-dynamic")


class CompressParams(BaseModel):
    """Edge export, quantization and the compression recipe, measured on the machine that runs the flow.

    The recipe's techniques run in a fixed order (distil -> prune -> token reduction -> export ->
    quantize); every step is exported to ONNX, checked for parity and measured as its own variant.
    """

    edge_variant: EdgeVariant = Field(
        "auto", description="Edge artifact: 'auto' picks the fastest (runtime, variant) pair within max_accuracy_drop "
                            "on the validation split and within the target profile's budget and runtimes; 'recipe' "
                            "takes the recipe's last step on the profile's best runtime; or name one variant")
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0,
                                     description="Largest validation drop versus fp32 that 'auto' accepts: the "
                                                 "larger of the accuracy drop and the drop in the gate's score "
                                                 "(macro-F1, macro AUROC or foreground IoU)")
    profile: ProfileName = Field("cpu-2core", description="Target hardware whose runtimes and latency/memory/size budget "
                                                          "the edge variant must meet (only cpu-2core is measured "
                                                          "here; it has ONNX Runtime and OpenVINO)")
    parity_tolerance: float = Field(1e-3, gt=0, le=1.0,
                                    description="Largest |logit| difference allowed between torch and each fp32 ONNX export")
    quantization: QuantizationParams = Field(default_factory=QuantizationParams, description="Static int8 settings")
    fp16: bool = Field(False, description="Also build an fp16 ONNX variant (fast on GPUs/ARM, usually slow on x86 CPUs)")
    distillation: DistillParams = Field(default_factory=DistillParams, description="Recipe step 1: distil into a student")
    pruning: PruneParams = Field(default_factory=PruneParams, description="Recipe step 2: prune heads and MLP channels")
    token_reduction: TokenReductionParams = Field(default_factory=TokenReductionParams,
                                                  description="Recipe step 3: merge or drop tokens at inference")
    recipe_quantization: Literal["int8", "int8-dynamic", "fp16", "none"] = Field(
        "int8", description="Recipe's last step: quantize its export (when any recipe step is enabled); on a "
                            "profile with OpenVINO the export is also quantized by NNCF (openvino-int8)")
    openvino_calibration_samples: int = Field(300, ge=1, le=10000,
                                              description="Training tiles NNCF calibrates OpenVINO int8 on")
    fuse_graph: bool = Field(False, description="Fuse attention, residual+LayerNorm and bias+GELU into ONNX Runtime "
                                                "contrib ops (com.microsoft) after export, parity-checked. Off by "
                                                "default: it measured no batch-1 gain on the 2-core CPU for the demo "
                                                "ViT, and fused files only run on ONNX Runtime")
    threads: int = Field(DEFAULT_THREADS, ge=1, le=256,
                         description="CPU threads for every measured variant (target: 2-core CPU) and for the recipe's "
                                     "training steps; part of the reproducibility contract (see README)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for the recipe's student initialisation and training")
    latency_repeats: int = Field(100, ge=5, le=10000, description="Batch-1 calls timed per variant")
    throughput_batch: int = Field(32, ge=1, le=1024, description="Batch size for the throughput measurement")

    def recipe_techniques(self) -> list:
        """The enabled torch techniques of the recipe plus its quantizer (empty when no step is enabled)."""
        steps: list = []
        if self.distillation.enabled:
            steps.append(DistillStudent(self.distillation))
        if self.pruning.enabled:
            steps.append(PruneStructured(self.pruning))
        if self.token_reduction.method != "none":
            steps.append(ReduceTokens(self.token_reduction))
        if steps and self.recipe_quantization != "none":
            steps.append(QuantizeOnnx(self.recipe_quantization, self.quantization))
            if "openvino" in _runtimes(self.profile) and not self.fuse_graph:
                steps.append(ConvertOpenVino("int8", self.openvino_calibration_samples))
        if steps:
            steps.append(ExportOnnx(fuse=self.fuse_graph))
        return steps

    def recipe_label(self) -> str:
        """Short tag of what the compress run did, e.g. ``export+int8`` or ``distill+prune+tome+int8``."""
        parts = [t.stage if t.stage != "tokens" else self.token_reduction.method for t in self.recipe_techniques()
                 if t.stage not in ("quantize", "export")]
        return "+".join(["export", "int8"] + (parts and [*parts, self.recipe_quantization]))


def _runtimes(profile: str) -> tuple[str, ...]:
    """The profile's edge runtimes that can run here (OpenVINO only where it is installed)."""
    from tasks import openvino_runtime

    return tuple(r for r in get_profile(profile).runtimes if r != "openvino" or openvino_runtime.available())


class ReduceTokens:
    """The token-reduction technique (ToMe or EViT), applied at inference without retraining."""

    stage = "tokens"

    def __init__(self, params: TokenReductionParams):
        self.params = params

    def apply(self, variant: Variant, context: CompressionContext) -> Variant:
        model, plan = reduce_tokens(variant.model, self.params)
        suffix = token_variant_suffix(self.params)
        name = suffix if variant.name == REFERENCE_ROOT else f"{variant.name}-{suffix}"
        return variant.then("tokens", name, {**self.params.model_dump(), "plan": plan.as_dict()}, model=model)


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
    profile: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    recipe: list[dict] = field(default_factory=list)
    plot: Path | None = None

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
            "edge_runtime": edge.runtime,
            "edge_drop": edge.drop,
            "edge_drop_interval": [edge.drop_low, edge.drop_high],
            "variants": [v.as_dict() for v in self.variants],
            "parity": {name: report.as_dict() for name, report in self.parity.items()},
            "profile": self.profile,
            "selection": self.selection,
            "recipe": self.recipe,
            # How the fine-tune's adapter reached the graphs (merged, kept as operations, or distilled away).
            "adapter": self.extra.get("adapter"),
        }

    def write(self, path: Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2, default=str))


def _torch_size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def select_edge_variant(measured: list[VariantMeasurement], predictors: dict, reference_predict, images: np.ndarray,
                        labels: np.ndarray, class_names: tuple[str, ...], max_drop: float,
                        profile: TargetProfile | None = None, reasons: dict | None = None,
                        task: str = "classification") -> str:
    """The fastest (runtime, variant) pair within ``max_drop`` of the fp32 model on (images, labels)
    and within ``profile``'s budget and runtimes.

    fp32 ONNX passed its parity check, so it is always within the accuracy budget; when no variant
    meets the profile's budget the choice fails with each variant's reasons.
    """
    from tasks.evaluation import evaluate_predictor

    # Judged on the same score the promotion gate uses by default (macro-F1, macro AUROC or foreground
    # IoU), so the variant chosen here is not one the gate then rejects for a minority-class drop.
    # The drop judged is the larger of the accuracy drop and the gate-score drop.
    reference = evaluate_predictor(reference_predict, images, labels, class_names, task=task)
    why: dict[str, list[str]] = {} if reasons is None else reasons
    for row in measured:
        if row.name not in predictors:
            continue
        problems = []
        if row.name != "onnx-fp32":
            report = evaluate_predictor(predictors[row.name], images, labels, class_names, task=task)
            drop = max(reference.selection - report.selection, reference.primary - report.primary)
            if drop > max_drop + 1e-9:
                problems.append(f"validation drop {drop:.4f} > {max_drop:g} (max of accuracy and gate score)")
        if profile is not None:
            # Budgets are per tile: a slide model's bag of T tiles may take T times a tile's budget.
            problems += budget_violations(profile, row.precision, row.latency_ms_per_tile, row.memory_bytes,
                                          row.size_bytes, row.runtime)
        why[row.name] = problems
    eligible = [row for row in measured if row.name in why and not why[row.name]]
    if not eligible:
        detail = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in why.items())
        raise ProfileError(f"no variant meets the budget of profile {profile.name if profile else '-'} "
                           f"within a {max_drop:g} accuracy drop ({detail})")
    choice = min(eligible, key=lambda row: row.latency_ms_p50).name
    log.info("edge variant: %s (eligible: %s)", choice, ", ".join(row.name for row in eligible))
    return choice


def _domain_flips(domain: str) -> bool:
    try:
        from domains import get_domain

        return bool(getattr(get_domain(domain), "train_flips", True))
    except Exception:  # an unregistered domain in a test dataset: flips are the loop's default
        return True


def _measure_onnx(variant: Variant, params: CompressParams, common: dict) -> tuple[VariantMeasurement, object]:
    before = resident_bytes()
    predict = open_predictor(variant.onnx, params.threads)
    images = common["test_images"]
    rows = rows_per_batch(images, params.throughput_batch)
    predict(np.resize(images[:rows], (rows, *images.shape[1:])))
    memory = max(0, resident_bytes() - before)
    row = measure_variant(variant.name, "onnx" if variant.runtime == "onnxruntime" else "openvino-ir", predict,
                          model_file_bytes(variant.onnx), **common)
    return replace(row, memory_bytes=memory, precision=variant.precision, runtime=variant.runtime), predict


def model_file_bytes(path: Path) -> int:
    """Bytes of a variant's model: the ONNX file, or an OpenVINO IR's .xml plus its .bin weights."""
    from tasks.openvino_runtime import bin_file, is_openvino_file

    return path.stat().st_size + (bin_file(path).stat().st_size if is_openvino_file(path) else 0)


def _score_drops(predictors: dict, test, info, seed: int) -> dict[str, dict]:
    """Each variant's drop versus the first predictor (the fp32 baseline) on the test split, with its 95%
    paired-bootstrap interval: the larger of the accuracy and gate-score drops (tile models; a slide model's
    bags are scored by the validate stage)."""
    from tasks.compression.scoring import collect_outcomes, score_drop

    if len(test.images.shape) > 4:
        return {}
    outcomes = {name: collect_outcomes(predict, test.images, test.labels, info.num_classes, info.task)
                for name, predict in predictors.items()}
    reference = next(iter(outcomes.values()))
    result = {}
    for name, outcome in outcomes.items():
        drop = score_drop(reference, outcome, seed=seed)
        result[name] = {"drop": drop.drop, "drop_low": drop.drop_low, "drop_high": drop.drop_high}
    return result


def _adapter_export(metadata: dict, params: CompressParams) -> dict:
    """How the fine-tune's adapter reached the exported graphs: merged into plain weights, or kept as operations."""
    method = metadata.get("adapter", "lora")
    if metadata.get("adapter_mergeable", True):
        return {"method": method, "mergeable": True,
                "export": "merged into plain weights before export: the graphs hold no adapter operation"}
    distilled = params.distillation.enabled
    return {"method": method, "mergeable": False,
            "export": ("the reference and its direct variants keep the adapter's operations in their graphs; the "
                       "distilled student is a plain ViT" if distilled else
                       "kept as operations in every graph (not mergeable); enable compression.distillation to "
                       "ship a plain ViT student instead")}


def build_variants(model: nn.Module, params: CompressParams, context: CompressionContext) -> list[Variant]:
    """The reference model's export and quantizations, then the recipe's steps (each exported and checked)."""
    reference = [ExportOnnx(fuse=params.fuse_graph), QuantizeOnnx("int8", params.quantization),
                 QuantizeOnnx("int8-dynamic")]
    if params.fp16:
        reference.append(QuantizeOnnx("fp16"))
    # Fused contrib ops are ONNX Runtime only; slide models (bags, two outputs) stay on ONNX Runtime.
    if "openvino" in _runtimes(params.profile) and not params.fuse_graph and not context.metadata.get("bags"):
        from tasks import openvino_runtime

        reference += [ConvertOpenVino("fp32"), ConvertOpenVino("int8", params.openvino_calibration_samples)]
        if openvino_runtime.supports_bf16():
            reference.append(ConvertOpenVino("bf16"))
    start = Variant(REFERENCE_ROOT, model)
    variants = run_recipe(start, reference, context)
    techniques = params.recipe_techniques()
    if techniques:
        variants += run_recipe(start, techniques, context)
    return variants


def compress_model(model: nn.Module, dataset_path: Path | str, metadata: dict, params: CompressParams,
                   out_dir: Path) -> CompressReport:
    """Export ``model`` to ONNX, quantize it, run the recipe, and measure all variants on the test split.

    Every fp32 export must match its torch model within ``parity_tolerance`` or the stage fails; the
    quantized variants' logit differences are recorded, and judged by their accuracy.
    """
    profile = get_profile(params.profile)
    pin_determinism(params.seed, params.threads)
    dataset = load_dataset_for(dataset_path, model)  # a slide model is measured on bags of each slide's tiles
    test = dataset.splits.get("test")
    if test is None or len(test) == 0:
        raise RequestError(f"{dataset.path}: no test split to measure compressed variants on")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partials(out_dir)  # temporaries of a killed run that wrote here; never read as results
    model = model.eval()
    # The units every exported graph takes are the reference model's own (models logged before the units
    # were recorded in their metadata still carry them in architecture.json).
    metadata = {**metadata, "input_scaling": _scaling_lists(input_scaling_of(model))}
    context = CompressionContext(dataset=dataset, metadata=metadata, out_dir=out_dir, parity_images=test.images[:rows_per_batch(test.images, PARITY_SAMPLES)],
                                 parity_tolerance=params.parity_tolerance, threads=params.threads, teacher=model,
                                 flips=_domain_flips(dataset.info.domain), seed=params.seed)
    variants = build_variants(model, params, context)

    common = dict(test_images=test.images, test_labels=test.labels, class_names=dataset.info.class_names,
                  latency_repeats=params.latency_repeats, throughput_batch=params.throughput_batch,
                  task=dataset.info.task)

    def torch_predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    rows = [replace(measure_variant(BASELINE, "torch", torch_predict, _torch_size(model), **common),
                    params=sum(p.numel() for p in model.parameters()), macs=count_macs(model, test.images))]
    predictors, parity, files = {}, {}, {}
    macs_of: dict[int, int] = {}
    for variant in variants:
        row, predictors[variant.name] = _measure_onnx(variant, params, common)
        key = id(variant.model)
        if key not in macs_of:
            macs_of[key] = count_macs(variant.model, test.images)
        rows.append(replace(row, params=sum(p.numel() for p in variant.model.parameters()), macs=macs_of[key]))
        parity[variant.name] = ParityReport(**{k: v for k, v in variant.records[-1]["parity"].items() if k != "passed"})
        files[variant.name] = variant.onnx

    base = rows[0]
    drops = _score_drops({BASELINE: torch_predict, **predictors}, test, dataset.info, params.seed)
    measured = [replace(row, speedup_vs_fp32=base.latency_ms_p50 / row.latency_ms_p50,
                        parity_max_abs_diff=parity[row.name].max_abs_diff if row.name in parity else None,
                        parity_agreement=parity[row.name].agreement if row.name in parity else None,
                        **drops.get(row.name, {}))
                for row in rows]
    names = [row.name for row in measured]
    edge = params.edge_variant
    reasons: dict[str, list[str]] = {}
    if edge == "recipe":
        if not params.recipe_techniques():
            raise RequestError("edge_variant 'recipe' needs at least one enabled recipe step")
        # The recipe's last quantized step, on the profile's fastest runtime.
        last = [v for v in variants if v.steps[:-1] == variants[-1].steps[:-1] and v.steps[-1] == "quantize"]
        edge = min(last, key=lambda v: next(r.latency_ms_p50 for r in measured if r.name == v.name)).name \
            if last else variants[-1].name
    elif edge == "auto":
        # Chosen on the validation split, never the test split that later judges the choice.
        selection = dataset.splits.get("val", dataset.splits.get("train"))
        edge = select_edge_variant(measured, predictors, torch_predict, selection.images, selection.labels,
                                   dataset.info.class_names, params.max_accuracy_drop, profile, reasons,
                                   task=dataset.info.task)
    elif edge not in names:
        raise RequestError(f"edge_variant {edge!r} was not built; built: {', '.join(names[1:])}")
    report = CompressReport(variants=measured, parity=parity, files=files, edge_variant=edge,
                            threads=params.threads, test_samples=len(test), profile=profile.as_dict(),
                            selection={"mode": params.edge_variant, "max_accuracy_drop": params.max_accuracy_drop,
                                       "split": "val", "rejected": {k: v for k, v in reasons.items() if v}},
                            recipe=[variant.records[-1] for variant in variants])
    report.extra["int8_vs_fp32_latency_ratio"] = report.variant("onnx-int8").latency_ms_p50 / base.latency_ms_p50
    report.extra["adapter"] = _adapter_export(metadata, params)
    report.plot = plot_pareto([row.as_dict() for row in measured],
                              f"{dataset.info.domain}: accuracy vs latency ({params.threads} threads, "
                              f"profile {profile.name})", out_dir / "pareto.png")
    for v in measured:
        log.info("%-34s acc %.4f  p50 %7.3f ms  p95 %7.3f ms  %8.1f img/s  %9d B  x%.2f", v.name, v.accuracy,
                 v.latency_ms_p50, v.latency_ms_p95, v.throughput, v.size_bytes, v.speedup_vs_fp32)
    return report


def _scaling_lists(scaling) -> list[list[float]] | None:
    return [[float(a), float(b)] for a, b in scaling] if scaling is not None else None


compress_model_task = task(compress_model, name="compress-model", cache_policy=NONE)


def record_compression(report: CompressReport, metadata: dict, workdir: Path | str, artifact_dir: Path) -> str:
    """Write ``compress_report.json`` (workdir and MLflow), log every ONNX file, and the edge model; return its URI.

    ``workdir`` is a local folder or a URL (``s3://bucket/prefix``); the report is published there whole.
    """
    from tasks import tracking
    from tasks.storage import StorageFolder

    payload = report.write(artifact_dir / "compress_report.json")
    StorageFolder(workdir).write_text("compress_report.json", payload.read_text())
    for variant in report.variants:
        tracking.log_metrics({f"{variant.name}.{key}": value for key, value in variant.as_dict().items()
                              if isinstance(value, (int, float)) and not isinstance(value, bool)})
    tracking.log_metrics({"int8_vs_fp32_latency_ratio": report.extra["int8_vs_fp32_latency_ratio"]})
    tracking.set_tags({"vitrail.edge_variant": report.edge_variant,
                       "vitrail.edge_runtime": report.variant(report.edge_variant).runtime})
    for name, path in report.files.items():
        if path.suffix == ".xml":  # an OpenVINO IR: its weights travel beside it
            tracking.log_artifact(path, artifact_path="openvino")
            tracking.log_artifact(path.with_suffix(".bin"), artifact_path="openvino")
        else:
            tracking.log_artifact(path, artifact_path="onnx")
    if report.plot is not None:
        tracking.log_artifact(report.plot, artifact_path="plots")
    publish_compression_table(report)
    edge_file = report.files[report.edge_variant]
    size = metadata["tile_size"]
    bag = (2,) if metadata.get("bags") else ()  # a slide model takes bags: (B, tiles, C, H, W)
    example = np.zeros((1, *bag, len(metadata["channels"]), size, size), dtype=np.float32)
    return tracking.log_edge_model(edge_file, {**metadata, "variant": report.edge_variant,
                                               "runtime": report.variant(report.edge_variant).runtime}, example)


def publish_compression_table(report: CompressReport) -> None:
    """The variants table as a Prefect artifact, so the UI shows the trade-offs without opening MLflow."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    rows = [{"variant": v.name, "accuracy": round(v.accuracy, 4), "macro_f1": round(v.macro_f1, 4),
             "p50_ms": round(v.latency_ms_p50, 3), "p95_ms": round(v.latency_ms_p95, 3),
             "img_per_s": round(v.throughput, 1), "size_MB": round(v.size_bytes / 1e6, 2),
             "params": v.params, "MMACs": None if v.macs is None else round(v.macs / 1e6, 2),
             "memory_MB": None if v.memory_bytes is None else round(v.memory_bytes / 1e6, 1),
             "speedup_vs_fp32": round(v.speedup_vs_fp32, 2)} for v in report.variants]
    profile = report.profile or {}
    note = f"; profile {profile.get('name')}: {profile.get('note')}" if profile else ""
    create_table_artifact(table=rows, key="compression-variants",
                          description=f"Variants measured on {report.threads} CPU threads; edge: "
                                      f"{report.edge_variant}{note}")
    if report.plot is not None:
        _publish_plot(report.plot)


def _publish_plot(path: Path) -> None:
    """The Pareto plot inline in the Prefect UI (a markdown artifact with the PNG as a data URI)."""
    import base64

    from prefect.artifacts import create_markdown_artifact

    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    create_markdown_artifact(markdown=f"![accuracy vs latency](data:image/png;base64,{encoded})",
                             key="compression-pareto", description="Accuracy versus batch-1 latency of every variant")


record_compression_task = task(record_compression, name="record-compression", cache_policy=NONE)

"""The validate stage's work: test-split scores and plots for every model variant, in the dataset's task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from torch import nn

from tasks.bags import SLIDE_TASK, bag_params_of
from tasks.model_inputs import load_dataset_for
from tasks.evaluation import (
    Report,
    any_labelled,
    evaluate_predictor,
    predict_in_batches,
    score_classification,
    score_outputs,
    softmax,
)
from tasks.onnx_runtime import open_predictor
from tasks.request_errors import RequestError

REFERENCE = "torch-fp32"


@dataclass
class ValidationResult:
    """Per-variant reports on the test split and where their plots were written.

    ``group_reports`` holds, for multilabel tasks and slide models, the same scores after aggregating each
    leakage group's images (a patient's radiographs, a study's slices, a patient's slides) into one
    prediction. ``task`` is what the validated model predicts: the dataset's task, or
    :data:`tasks.bags.SLIDE_TASK` for a slide model (its reports score slides, not tiles).
    """

    reports: dict[str, Report]
    plots: dict[str, Path]
    group_reports: dict[str, Report] = field(default_factory=dict)
    task: str = "classification"

    def flat_metrics(self) -> dict[str, float]:
        """``<variant>.test_<metric>`` for every variant, e.g. ``onnx-int8.test_macro_f1``; group-level
        scores as ``<variant>.test_group_<metric>``."""
        metrics: dict[str, float] = {}
        for name, report in self.reports.items():
            metrics.update(report.flat_metrics(prefix=f"{name}.test_"))
        for name, report in self.group_reports.items():
            metrics.update(report.flat_metrics(prefix=f"{name}.test_group_"))
        return metrics


def validate_variants(dataset_path: Path | str, reference: nn.Module, onnx_files: dict[str, Path], plot_dir: Path,
                      threads: int = 2) -> ValidationResult:
    """Score the torch reference and each ONNX variant on the test split; plot confusion matrices."""
    dataset = load_dataset_for(dataset_path, reference)  # a slide model is scored on each test slide's bag
    slides = bag_params_of(reference) is not None
    info = dataset.info
    test = dataset.splits.get("test")
    if test is None or len(test) == 0 or not any_labelled(test.labels):
        raise RequestError(f"{dataset_path}: no labelled test split to validate on")
    torch.set_num_threads(threads)
    reference = reference.eval()

    def torch_predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return reference(torch.from_numpy(images)).numpy()

    predictors = {REFERENCE: torch_predict}
    for name, path in sorted(onnx_files.items()):
        predictors[name] = open_predictor(path, threads)  # ONNX Runtime, or OpenVINO for an IR
    result = ValidationResult(reports={}, plots={}, task=SLIDE_TASK if slides else info.task)
    plot_kind = {"classification": "confusion", "multilabel": "roc", "segmentation": "pixel-confusion"}[info.task]
    for name, predict in predictors.items():
        if info.task == "segmentation":  # (N, K, H, W) outputs: scored batch by batch, never held whole
            report = evaluate_predictor(predict, test.images, test.labels, info.class_names, task=info.task)
        else:
            outputs = predict_in_batches(predict, test.images)
            report = score_outputs(info.task, test.labels, outputs, info.class_names)
        result.reports[name] = report
        result.plots[name] = report.plot(f"{info.domain} test split: {name}", plot_dir / f"{plot_kind}-{name}.png")
        grouped = None
        if info.task == "multilabel":
            grouped = score_outputs(info.task, test.labels, outputs, info.class_names, groups=test.groups)
        elif slides:
            grouped = score_per_patient(test.labels, outputs, test.groups, info.class_names)
        if grouped is not None:
            result.group_reports[name] = grouped
            result.plots[f"{name}-group"] = grouped.plot(f"{info.domain} test split, per group: {name}",
                                                         plot_dir / f"{plot_kind}-{name}-group.png")
    return result


def score_per_patient(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray,
                      class_names: tuple[str, ...]) -> Report:
    """Slide predictions combined per patient by one rule: a patient is of the highest class id among its
    slides (tumour wins over normal). That is its label, its prediction (the highest class predicted for
    any of its slides) and its probabilities: P(patient class >= k) is the highest P(slide class >= k) of
    its slides, so with two classes the tumour score is its most suspicious slide's and the normal score
    one minus that.

    Taking each class's highest slide probability and its argmax instead called a patient with a confident
    normal slide and a less confident tumour slide normal, and gave the two classes different AUROCs."""
    probabilities = softmax(logits)
    predicted = probabilities.argmax(axis=1)
    at_least = np.cumsum(probabilities[:, ::-1], axis=1)[:, ::-1]  # P(class >= k), per slide
    names = sorted(set(groups.tolist()))
    patient_at_least = np.stack([at_least[groups == name].max(axis=0) for name in names])
    scores = patient_at_least - np.concatenate([patient_at_least[:, 1:], np.zeros((len(names), 1))], axis=1)
    patient_labels = np.array([labels[groups == name].max() for name in names])
    patient_predictions = np.array([predicted[groups == name].max() for name in names])
    return score_classification(patient_labels, patient_predictions, class_names, scores=scores)


validate_variants_task = task(validate_variants, name="validate-variants", cache_policy=NONE)


# Variant names of files logged before compress runs named their files after their variants.
LEGACY_ONNX_FILES = {"model-fp32.onnx": "onnx-fp32", "model-int8.onnx": "onnx-int8",
                     "model-int8-dynamic.onnx": "onnx-int8-dynamic"}


def fetch_onnx_variants(compress_run_id: str, destination: Path) -> dict[str, Path]:
    """Download the ONNX variants a compress run logged under ``onnx/``, keyed by variant name (the file stem)."""
    from tasks import tracking

    folder = tracking.download_run_artifacts(compress_run_id, "onnx", destination)
    found = {LEGACY_ONNX_FILES.get(p.name, p.stem): p for p in folder.glob("*.onnx")}
    try:  # OpenVINO variants (IR .xml + .bin) of a profile that has OpenVINO
        openvino = tracking.download_run_artifacts(compress_run_id, "openvino", destination)
        found.update({p.stem: p for p in openvino.glob("*.xml")})
    except Exception:  # noqa: BLE001 - runs of profiles without OpenVINO logged none
        pass
    if not found:
        raise FileNotFoundError(f"compress run {compress_run_id} logged no ONNX variants under onnx/")
    return found


def record_validation(result: ValidationResult) -> dict[str, float]:
    """Log every variant's test metrics and confusion-matrix plot to the active run."""
    from tasks import tracking

    metrics = result.flat_metrics()
    tracking.log_metrics(metrics)
    tracking.set_tags({"vitrail.task": result.task})  # the gate's 'auto' metric follows what the model predicts
    for path in result.plots.values():
        tracking.log_artifact(path, artifact_path="plots")
    return metrics


fetch_onnx_variants_task = task(fetch_onnx_variants, name="fetch-onnx-variants", cache_policy=NONE)
record_validation_task = task(record_validation, name="record-validation", cache_policy=NONE)

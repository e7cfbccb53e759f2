"""Metrics shared by every domain, one report type per task.

- classification: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix;
- multilabel: per-label AUROC and AUPRC, sensitivity at a chosen specificity, optionally after
  aggregating image/slice scores per group (patient);
- segmentation: per-class IoU and Dice over pixels, foreground IoU, and object-level precision/recall
  of connected components.

Every report exposes ``primary`` (the task's headline metric: accuracy, macro AUROC, foreground IoU),
``selection`` (what model selection maximises: macro-F1 for classification, else ``primary``),
``headline()`` (two metrics for curves and summaries) and ``flat_metrics(prefix)`` with metric keys
identical across domains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]

# The headline metric of each task (each report's ``primary``) and the score model selection maximises
# (each report's ``selection``), by the keys they have in flat metrics.
PRIMARY_METRICS = {"classification": "accuracy", "multilabel": "macro_auroc", "segmentation": "foreground_iou"}
SELECTION_METRICS = {"classification": "macro_f1", "multilabel": "macro_auroc", "segmentation": "foreground_iou"}


class Report(Protocol):
    task: str
    primary_metric: str
    selection_metric: str
    samples: int

    @property
    def primary(self) -> float: ...

    @property
    def selection(self) -> float: ...

    def headline(self) -> dict[str, float]: ...

    def flat_metrics(self, prefix: str = "") -> dict[str, float]: ...

    def plot(self, title: str, path: Path) -> Path: ...


@dataclass(frozen=True)
class ClassificationReport:
    """Scores of one model on one labelled split."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    class_names: tuple[str, ...]
    samples: int
    macro_auroc: float = float("nan")
    """Mean one-vs-rest AUROC of the classes present (from the outputs' softmax); NaN without scores."""
    task = "classification"
    primary_metric = "accuracy"
    selection_metric = "macro_f1"

    @property
    def primary(self) -> float:
        return self.accuracy

    @property
    def selection(self) -> float:
        return self.macro_f1

    def headline(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}

    def plot(self, title: str, path: Path) -> Path:
        return plot_confusion_matrix(self, title, path)

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """Metric keys identical across domains, e.g. ``test_accuracy``, ``test_f1_water``."""
        flat = {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}
        if np.isfinite(self.macro_auroc):
            flat[f"{prefix}macro_auroc"] = self.macro_auroc
        for name, scores in self.per_class.items():
            for metric, value in scores.items():
                flat[f"{prefix}{metric}_{name}"] = value
        return flat


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes; entries labelled -1 (unlabelled) are skipped."""
    labels, predictions = labels.reshape(-1).astype(np.int64), predictions.reshape(-1).astype(np.int64)
    keep = labels >= 0
    counts = np.bincount(labels[keep] * num_classes + predictions[keep], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def score_classification(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...],
                         scores: np.ndarray | None = None) -> ClassificationReport:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from hard predictions; macro AUROC from ``scores``.

    Macro-F1 averages over classes present in the labels or predictions, so a class absent from a
    small test split does not drag the score to zero for no reason. ``scores`` (N, K) rank samples per
    class (one-vs-rest); the AUROC is averaged over classes that have both positives and negatives.
    """
    if len(labels) == 0:
        raise ValueError("cannot score an empty split")
    matrix = confusion_matrix(labels, predictions, len(class_names))
    true_pos = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    actual = matrix.sum(axis=1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    present = (actual + predicted) > 0
    per_class = {
        name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]), "support": float(actual[k])}
        for k, name in enumerate(class_names)
    }
    return ClassificationReport(
        accuracy=float(true_pos.sum() / matrix.sum()),
        macro_f1=float(f1[present].mean()),
        per_class=per_class,
        confusion=matrix.tolist(),
        class_names=tuple(class_names),
        samples=int(matrix.sum()),
        macro_auroc=_macro_auroc(labels, scores) if scores is not None else float("nan"),
    )


def _macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).reshape(-1)
    keep = labels >= 0
    per_class = [roc_auc((labels[keep] == k).astype(np.int64), scores[keep, k]) for k in range(scores.shape[1])]
    finite = [value for value in per_class if np.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1, computed stably in float64."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) identity, ties counted half; NaN if one class is absent."""
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties so equal scores contribute one half
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    positives = int((labels == 1).sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    hits = (labels[order] == 1).astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / positives)


def sensitivity_at_specificity(labels: np.ndarray, scores: np.ndarray, specificity: float) -> tuple[float, float]:
    """Sensitivity at the lowest threshold that keeps specificity >= ``specificity``; returns (sensitivity, threshold)."""
    negatives, positives = scores[labels == 0], scores[labels == 1]
    if len(negatives) == 0 or len(positives) == 0:
        return float("nan"), float("nan")
    # The threshold is the smallest negative score that at most (1 - specificity) of negatives exceed.
    allowed_false = int(np.floor((1.0 - specificity) * len(negatives) + 1e-9))
    threshold = float(np.sort(negatives)[::-1][allowed_false]) if allowed_false < len(negatives) else -np.inf
    return float((positives > threshold).mean()), threshold


def aggregate_by_group(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                       how: str = "max") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine per-image (or per-slice) scores and labels into one row per group (patient, study).

    A group is positive for a finding when any of its images is; its score is the max (a finding seen
    anywhere counts) or the mean of its images' scores.
    """
    if how not in ("max", "mean"):
        raise ValueError(f"unknown aggregation {how!r}; use 'max' or 'mean'")
    names, inverse = np.unique(groups, return_inverse=True)
    out_scores = np.zeros((len(names), scores.shape[1]), dtype=np.float64)
    out_labels = np.full((len(names), labels.shape[1]), -1, dtype=np.int64)
    for g in range(len(names)):
        members = inverse == g
        out_scores[g] = scores[members].max(axis=0) if how == "max" else scores[members].mean(axis=0)
        out_labels[g] = labels[members].max(axis=0)
    return out_scores, out_labels, names


@dataclass(frozen=True)
class MultiLabelReport:
    """Per-finding ranking quality of one model on one labelled split (images, or groups after aggregation)."""

    per_label: dict[str, dict[str, float]]
    class_names: tuple[str, ...]
    samples: int
    specificity: float
    level: str = "image"
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict, repr=False)
    task = "multilabel"
    primary_metric = "macro_auroc"
    selection_metric = "macro_auroc"

    def _macro(self, metric: str) -> float:
        values = [v[metric] for v in self.per_label.values() if np.isfinite(v[metric])]
        return float(np.mean(values)) if values else float("nan")

    @property
    def macro_auroc(self) -> float:
        return self._macro("auroc")

    @property
    def macro_auprc(self) -> float:
        return self._macro("auprc")

    @property
    def primary(self) -> float:
        return self.macro_auroc

    @property
    def selection(self) -> float:
        return self.macro_auroc

    def headline(self) -> dict[str, float]:
        return {"macro_auroc": self.macro_auroc, "macro_auprc": self.macro_auprc}

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        flat = {f"{prefix}macro_auroc": self.macro_auroc, f"{prefix}macro_auprc": self.macro_auprc}
        for name, scores in self.per_label.items():
            for metric, value in scores.items():
                flat[f"{prefix}{metric}_{name}"] = value
        return {k: v for k, v in flat.items() if np.isfinite(v)}

    def plot(self, title: str, path: Path) -> Path:
        return plot_roc_curves(self, title, path)


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[list[float], list[float]]:
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order] == 1
    tpr = np.r_[0, np.cumsum(hits)] / max(hits.sum(), 1)
    fpr = np.r_[0, np.cumsum(~hits)] / max((~hits).sum(), 1)
    return fpr.tolist(), tpr.tolist()


def score_multilabel(labels: np.ndarray, scores: np.ndarray, class_names: tuple[str, ...], specificity: float = 0.9,
                     level: str = "image") -> MultiLabelReport:
    """Per-label AUROC, AUPRC, prevalence and sensitivity at ``specificity`` from (N, K) scores.

    Scores may be logits or probabilities (the metrics only rank them); entries labelled -1 are skipped.
    """
    if len(labels) == 0:
        raise ValueError("cannot score an empty split")
    per_label, curves = {}, {}
    for k, name in enumerate(class_names):
        known = labels[:, k] >= 0
        y, s = labels[known, k], scores[known, k].astype(np.float64)
        sensitivity, _ = sensitivity_at_specificity(y, s, specificity)
        per_label[name] = {"auroc": roc_auc(y, s), "auprc": average_precision(y, s),
                           f"sensitivity_at_spec{int(round(specificity * 100))}": sensitivity,
                           "prevalence": float((y == 1).mean()) if len(y) else float("nan")}
        if (y == 1).any() and (y == 0).any():
            curves[name] = _roc_points(y, s)
    return MultiLabelReport(per_label=per_label, class_names=tuple(class_names), samples=len(labels),
                            specificity=specificity, level=level, curves=curves)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask)


@dataclass(frozen=True)
class SegmentationReport:
    """Pixel-level overlap per class, plus object-level (connected component) precision and recall."""

    confusion: list[list[int]]
    class_names: tuple[str, ...]
    samples: int
    object_precision: float
    object_recall: float
    task = "segmentation"
    primary_metric = "foreground_iou"
    selection_metric = "foreground_iou"

    def _per_class(self) -> tuple[np.ndarray, np.ndarray]:
        matrix = np.array(self.confusion, dtype=np.float64)
        true_pos = np.diag(matrix)
        union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_pos
        iou = np.divide(true_pos, union, out=np.full_like(true_pos, np.nan), where=union > 0)
        dice = np.divide(2 * true_pos, union + true_pos, out=np.full_like(true_pos, np.nan), where=union > 0)
        return iou, dice

    @property
    def pixel_accuracy(self) -> float:
        matrix = np.array(self.confusion, dtype=np.float64)
        return float(np.trace(matrix) / max(matrix.sum(), 1))

    @property
    def mean_iou(self) -> float:
        return float(np.nanmean(self._per_class()[0]))

    @property
    def foreground_iou(self) -> float:
        """Mean IoU over classes other than class 0 (background); the IoU of the target for a binary mask.

        A split with no foreground in labels or predictions scores 1.0 (nothing to find, nothing found).
        """
        iou = self._per_class()[0][1:] if len(self.class_names) > 1 else self._per_class()[0]
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else 1.0

    @property
    def primary(self) -> float:
        return self.foreground_iou

    @property
    def selection(self) -> float:
        return self.foreground_iou

    def headline(self) -> dict[str, float]:
        return {"foreground_iou": self.foreground_iou, "pixel_accuracy": self.pixel_accuracy}

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        iou, dice = self._per_class()
        flat = {f"{prefix}foreground_iou": self.foreground_iou, f"{prefix}mean_iou": self.mean_iou,
                f"{prefix}pixel_accuracy": self.pixel_accuracy, f"{prefix}object_precision": self.object_precision,
                f"{prefix}object_recall": self.object_recall}
        for k, name in enumerate(self.class_names):
            flat[f"{prefix}iou_{name}"] = float(iou[k])
            flat[f"{prefix}dice_{name}"] = float(dice[k])
        return {k: v for k, v in flat.items() if np.isfinite(v)}

    def plot(self, title: str, path: Path) -> Path:
        return plot_confusion_matrix(self, title, path)

    @property
    def accuracy(self) -> float:  # lets the confusion-matrix plot title a pixel matrix like a sample matrix
        return self.pixel_accuracy

    @property
    def macro_f1(self) -> float:
        return float(np.nanmean(self._per_class()[1]))


def _object_hits(truth: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int, int]:
    """(predicted objects touching a true object, predicted objects, true objects touched, true objects)."""
    pred_labels, n_pred = _components(predicted)
    true_labels, n_true = _components(truth)
    pred_hit = len(np.unique(pred_labels[(pred_labels > 0) & truth])) if n_pred else 0
    true_hit = len(np.unique(true_labels[(true_labels > 0) & predicted])) if n_true else 0
    return pred_hit, n_pred, true_hit, n_true


class SegmentationScorer:
    """Accumulates a segmentation score batch by batch, so no split's masks or outputs are held whole."""

    def __init__(self, class_names: tuple[str, ...]):
        self.class_names = tuple(class_names)
        self.matrix = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
        self.objects = np.zeros(4, dtype=np.int64)
        self.samples = 0

    def add(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        """Add (n, H, W) labels (-1 ignored) and predicted class maps."""
        self.matrix += confusion_matrix(labels, predictions, len(self.class_names))
        for truth, predicted in zip(labels, predictions, strict=True):
            valid = truth >= 0
            self.objects += _object_hits((truth > 0) & valid, (predicted > 0) & valid)
        self.samples += len(labels)

    def report(self) -> SegmentationReport:
        if self.samples == 0:
            raise ValueError("cannot score an empty split")
        counts = self.objects
        precision = counts[0] / counts[1] if counts[1] else 1.0
        recall = counts[2] / counts[3] if counts[3] else 1.0
        return SegmentationReport(confusion=self.matrix.tolist(), class_names=self.class_names, samples=self.samples,
                                  object_precision=float(precision), object_recall=float(recall))


def score_segmentation(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...]) -> SegmentationReport:
    """Scores from (N, H, W) label and predicted class maps; pixels labelled -1 are ignored.

    Object-level scores count connected components of the foreground (any class but 0) per sample: a
    predicted object is correct when it overlaps a true one (precision), a true object is found when a
    prediction overlaps it (recall); with no objects at all both are 1.
    """
    scorer = SegmentationScorer(class_names)
    if len(labels):
        scorer.add(np.asarray(labels), np.asarray(predictions))
    return scorer.report()


def score_outputs(task: str, labels: np.ndarray, outputs: np.ndarray, class_names: tuple[str, ...],
                  groups: np.ndarray | None = None) -> Report:
    """Score model outputs (logits or probabilities) against labels, the way ``task`` asks.

    For multilabel with ``groups``, image scores are first aggregated per group (max), giving the
    patient-level report radiology cares about.
    """
    if task == "classification":
        return score_classification(labels, outputs.argmax(axis=1), class_names, scores=softmax(outputs))
    if task == "multilabel":
        if groups is not None:
            scores, group_labels, _ = aggregate_by_group(outputs, labels, groups)
            return score_multilabel(group_labels, scores, class_names, level="group")
        return score_multilabel(labels, outputs, class_names)
    if task == "segmentation":
        return score_segmentation(labels, outputs.argmax(axis=1), class_names)
    raise ValueError(f"unknown task {task!r}")


def rows_per_batch(images, batch_size: int) -> int:
    """Rows of ``images`` per batch so a batch holds about ``batch_size`` tiles: ``batch_size`` for tiles
    (N, C, H, W), fewer for bags of tiles (N, T, C, H, W), at least one."""
    tiles_per_row = int(np.prod(images.shape[1:-3])) if len(images.shape) > 4 else 1
    return max(1, batch_size // max(tiles_per_row, 1))


def predict_in_batches(predict: Predictor, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``predict`` over ``images`` (an array or a lazy split) in batches and concatenate the outputs.

    ``batch_size`` counts tiles: bags of tiles go a few bags at a time (see :func:`rows_per_batch`).
    """
    batch_size = rows_per_batch(images, batch_size)
    outputs = [predict(np.ascontiguousarray(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs, axis=0)


def any_labelled(labels: np.ndarray, batch_size: int = 256) -> bool:
    """Whether any label (or labelled pixel) is >= 0, reading lazy label arrays batch by batch."""
    return any(bool((np.asarray(labels[i:i + batch_size]) >= 0).any()) for i in range(0, len(labels), batch_size))


def evaluate_predictor(predict: Predictor, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
                       batch_size: int = 64, task: str = "classification", groups: np.ndarray | None = None) -> Report:
    """Score a predictor returning logits or probabilities on a labelled split (see :func:`score_outputs`).

    ``images`` and ``labels`` may be lazy split arrays: they are read ``batch_size`` samples at a time.
    Segmentation outputs ((N, K, H, W): the largest) are scored batch by batch and never kept; the
    (N, K) outputs of the other tasks are kept, since their metrics rank the whole split.
    """
    if task == "segmentation":
        scorer = SegmentationScorer(class_names)
        for start in range(0, len(images), batch_size):
            outputs = predict(np.ascontiguousarray(images[start:start + batch_size]))
            scorer.add(np.asarray(labels[start:start + batch_size]), outputs.argmax(axis=1))
        return scorer.report()
    outputs = predict_in_batches(predict, images, batch_size)
    return score_outputs(task, np.asarray(labels), outputs, class_names, groups)


def plot_confusion_matrix(report: ClassificationReport | SegmentationReport, title: str, path: Path) -> Path:
    """Save a row-normalised confusion matrix with counts (samples, or pixels for segmentation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(report.confusion, dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(report.class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(report.class_names))
    ax.set_xticks(ticks, report.class_names, rotation=30, ha="right")
    ax.set_yticks(ticks, report.class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    headline = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in report.headline().items())
    ax.set_title(f"{title}\n{headline}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc_curves(report: MultiLabelReport, title: str, path: Path) -> Path:
    """One ROC curve per finding with its AUROC, and the chosen specificity marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr) in report.curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {report.per_label[name]['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.axvline(1 - report.specificity, color="grey", linestyle="--", linewidth=1,
               label=f"specificity {report.specificity:.2f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{title}\n{report.level} level, macro AUROC {report.macro_auroc:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

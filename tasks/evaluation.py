"""Metrics shared by every domain: accuracy, macro-F1, per-class scores and confusion matrices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ClassificationReport:
    """Scores of one model on one labelled split."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    class_names: tuple[str, ...]
    samples: int

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """Metric keys identical across domains, e.g. ``test_accuracy``, ``test_f1_water``."""
        flat = {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}
        for name, scores in self.per_class.items():
            for metric, value in scores.items():
                flat[f"{prefix}{metric}_{name}"] = value
        return flat


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def score_classification(labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...]) -> ClassificationReport:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from hard predictions.

    Macro-F1 averages over classes present in the labels or predictions, so a class absent from a
    small test split does not drag the score to zero for no reason.
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
    )


def predict_in_batches(predict: Predictor, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``predict`` over ``images`` in batches and concatenate the outputs."""
    outputs = [predict(np.ascontiguousarray(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs, axis=0)


def evaluate_predictor(predict: Predictor, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
                       batch_size: int = 64) -> ClassificationReport:
    """Score a predictor returning logits or probabilities (N, K) on a labelled split."""
    scores = predict_in_batches(predict, images, batch_size)
    return score_classification(labels, scores.argmax(axis=1), class_names)


def plot_confusion_matrix(report: ClassificationReport, title: str, path: Path) -> Path:
    """Save a row-normalised confusion matrix with counts, for people who would rather look than read."""
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
    ax.set_title(f"{title}\naccuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Score drops of compressed variants on the gate's score, with paired-bootstrap 95% intervals.

A variant's *drop* is the larger of its accuracy drop and its drop in the promotion gate's score
(:data:`tasks.promotion.AUTO_GATE_METRIC`: macro-F1 for classification, macro AUROC for multilabel,
foreground IoU for segmentation), both versus the fp32 reference on the same samples. A variant
that keeps accuracy but loses a minority class (macro-F1 falls) therefore counts as losing.

The interval resamples test samples with replacement, the same resample for the reference and the
variant (paired), and recomputes both scores each time; the 2.5 and 97.5 percentiles of the drop
are the interval. Classification and segmentation scores are functions of a confusion matrix, so
each sample is kept as its own (K, K) confusion counts and a resample is one weighted sum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.evaluation import SELECTION_METRICS, Predictor, confusion_matrix, roc_auc, rows_per_batch


ACCURACY_METRIC = {"classification": "accuracy", "multilabel": "macro_auroc", "segmentation": "pixel_accuracy"}


@dataclass(frozen=True)
class SampleOutcomes:
    """What one model did on each test sample, enough to rescore any resample of the samples.

    ``confusion`` (N, K*K) holds each sample's confusion counts (one count for a tile classifier, its
    labelled pixels for a segmentation model); ``scores`` (N, K) a multilabel model's probabilities.
    """

    task: str
    num_classes: int
    confusion: np.ndarray | None = None
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.confusion) if self.confusion is not None else len(self.scores)


def collect_outcomes(predict: Predictor, images, labels, num_classes: int, task: str,
                     batch_size: int = 64) -> SampleOutcomes:
    """Run ``predict`` over a (lazy) split batch by batch and keep per-sample outcomes (never whole outputs)."""
    rows = rows_per_batch(images, batch_size)
    confusions, scores, kept_labels = [], [], []
    for start in range(0, len(images), rows):
        outputs = predict(np.ascontiguousarray(images[start:start + rows]))
        truth = np.asarray(labels[start:start + rows])
        if task == "multilabel":
            scores.append(np.asarray(outputs, dtype=np.float32))
            kept_labels.append(truth)
            continue
        predicted = outputs.argmax(axis=1)
        for t, p in zip(truth, predicted, strict=True):
            confusions.append(confusion_matrix(np.asarray(t), np.asarray(p), num_classes).reshape(-1))
    if task == "multilabel":
        return SampleOutcomes(task, num_classes, labels=np.concatenate(kept_labels), scores=np.concatenate(scores))
    return SampleOutcomes(task, num_classes, confusion=np.stack(confusions).astype(np.float64))


def scores_from_confusions(confusions: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, gate score) of each (R, K*K) confusion row, as the evaluation reports compute them."""
    k = int(round(np.sqrt(confusions.shape[1])))
    matrix = confusions.reshape(-1, k, k)
    true_pos = np.diagonal(matrix, axis1=1, axis2=2)
    predicted, actual = matrix.sum(axis=1), matrix.sum(axis=2)
    total = matrix.sum(axis=(1, 2))
    accuracy = true_pos.sum(axis=1) / np.maximum(total, 1)
    if task == "segmentation":
        union = predicted + actual - true_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, true_pos / np.where(union > 0, union, 1), np.nan)
        foreground = iou[:, 1:] if k > 1 else iou
        defined = np.isfinite(foreground).any(axis=1)
        with np.errstate(all="ignore"):
            score = np.where(defined, np.nanmean(np.where(np.isfinite(foreground), foreground, np.nan), axis=1), 1.0)
        return accuracy, score
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    present = (actual + predicted) > 0
    macro_f1 = (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return accuracy, macro_f1


def _macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    values = []
    for k in range(labels.shape[1]):
        keep = labels[:, k] >= 0
        column = labels[keep, k]
        if 0 < column.sum() < len(column):
            values.append(roc_auc(column, scores[keep, k]))
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class ScoreDrop:
    """A variant's scores and drops versus the reference; ``drop`` is what goals and the edge choice judge."""

    accuracy: float
    gate_score: float
    gate_metric: str
    accuracy_drop: float
    gate_drop: float
    drop: float
    drop_low: float
    drop_high: float
    samples: int
    replicates: int

    def as_dict(self) -> dict:
        return asdict(self)


def score_drop(reference: SampleOutcomes, candidate: SampleOutcomes, replicates: int = 1000,
               seed: int = 0) -> ScoreDrop:
    """The candidate's drop versus the reference on the same samples, with a paired-bootstrap 95% interval."""
    if len(reference) != len(candidate):
        raise ValueError(f"outcomes of different sample counts: {len(reference)} vs {len(candidate)}")
    task, n = reference.task, len(reference)
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        ref = _macro_auroc(reference.labels, reference.scores)
        cand = _macro_auroc(candidate.labels, candidate.scores)
        drops = []
        for _ in range(replicates):
            index = rng.integers(0, n, n)
            drops.append(_macro_auroc(reference.labels[index], reference.scores[index])
                         - _macro_auroc(candidate.labels[index], candidate.scores[index]))
        drops_arr = np.array(drops)
        acc_ref, acc_cand, gate_ref, gate_cand = ref, cand, ref, cand
    else:
        acc, gate = scores_from_confusions(np.stack([reference.confusion.sum(0), candidate.confusion.sum(0)]), task)
        acc_ref, acc_cand, gate_ref, gate_cand = acc[0], acc[1], gate[0], gate[1]
        drops_list = []
        for start in range(0, replicates, 250):  # (R, N) weights in chunks: memory stays small for big splits
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(250, replicates - start)).astype(np.float64)
            acc_r, gate_r = scores_from_confusions(weights @ reference.confusion, task)
            acc_c, gate_c = scores_from_confusions(weights @ candidate.confusion, task)
            drops_list.append(np.maximum(acc_r - acc_c, gate_r - gate_c))
        drops_arr = np.concatenate(drops_list)
    finite = drops_arr[np.isfinite(drops_arr)]
    low, high = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan))
    accuracy_drop, gate_drop = float(acc_ref - acc_cand), float(gate_ref - gate_cand)
    return ScoreDrop(accuracy=float(acc_cand), gate_score=float(gate_cand), gate_metric=SELECTION_METRICS[task],
                     accuracy_drop=accuracy_drop, gate_drop=gate_drop, drop=max(accuracy_drop, gate_drop),
                     drop_low=float(low), drop_high=float(high), samples=n, replicates=replicates)

"""Scores shared by every domain, checked against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.evaluation import (
    confusion_matrix,
    evaluate_predictor,
    plot_confusion_matrix,
    predict_in_batches,
    score_classification,
)

NAMES = ("a", "b", "c", "d")
# True a a a a b b c c, predicted a a a b b b c a; class d never occurs.
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2])
PREDICTIONS = np.array([0, 0, 0, 1, 1, 1, 2, 0])


def test_confusion_matrix_rows_are_true_classes() -> None:
    expected = [[3, 1, 0, 0],
                [0, 2, 0, 0],
                [1, 0, 1, 0],
                [0, 0, 0, 0]]
    np.testing.assert_array_equal(confusion_matrix(LABELS, PREDICTIONS, 4), expected)


def test_scores_match_hand_computed_values() -> None:
    report = score_classification(LABELS, PREDICTIONS, NAMES)
    assert report.accuracy == pytest.approx(6 / 8)
    # a: TP 3, predicted 4, actual 4; b: TP 2, predicted 3, actual 2; c: TP 1, predicted 1, actual 2.
    expected = {"a": (3 / 4, 3 / 4, 3 / 4, 4), "b": (2 / 3, 1.0, 0.8, 2), "c": (1.0, 1 / 2, 2 / 3, 2),
                "d": (0.0, 0.0, 0.0, 0)}
    for name, (precision, recall, f1, support) in expected.items():
        assert report.per_class[name] == pytest.approx(
            {"precision": precision, "recall": recall, "f1": f1, "support": support}), name
    # Macro-F1 over the classes present (d is absent from labels and predictions).
    assert report.macro_f1 == pytest.approx((0.75 + 0.8 + 2 / 3) / 3)
    assert report.samples == 8 and report.class_names == NAMES
    assert report.confusion == confusion_matrix(LABELS, PREDICTIONS, 4).tolist()


def test_a_class_only_predicted_counts_in_macro_f1() -> None:
    report = score_classification(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), ("a", "b", "c"))
    # a: P 1, R 1/2, F1 2/3; b: F1 1; c: predicted once, never true -> F1 0, and it counts.
    assert report.macro_f1 == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_perfect_predictions_score_one() -> None:
    report = score_classification(LABELS, LABELS, NAMES)
    assert report.accuracy == 1.0 and report.macro_f1 == 1.0


def test_flat_metrics_use_domain_independent_keys() -> None:
    flat = score_classification(LABELS, PREDICTIONS, NAMES).flat_metrics(prefix="test_")
    assert flat["test_accuracy"] == pytest.approx(0.75)
    assert flat["test_f1_b"] == pytest.approx(0.8) and flat["test_recall_c"] == pytest.approx(0.5)
    assert flat["test_support_d"] == 0.0
    assert len(flat) == 2 + 4 * len(NAMES)


def test_scoring_an_empty_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_classification(np.array([], dtype=int), np.array([], dtype=int), NAMES)


def test_predict_in_batches_keeps_order_across_batches() -> None:
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    sizes = []

    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch.reshape(len(batch), 1) * 2

    np.testing.assert_array_equal(predict_in_batches(predict, images, batch_size=4)[:, 0], np.arange(10) * 2)
    assert sizes == [4, 4, 2]


def test_evaluate_predictor_scores_argmax_of_scores() -> None:
    # The "image" carries its predicted class in its first pixel.
    images = PREDICTIONS.astype(np.float32).reshape(-1, 1, 1, 1)

    def one_hot(batch: np.ndarray) -> np.ndarray:
        return np.eye(4, dtype=np.float32)[batch[:, 0, 0, 0].astype(int)]

    report = evaluate_predictor(one_hot, images, LABELS, NAMES, batch_size=3)
    assert report == score_classification(LABELS, PREDICTIONS, NAMES)


def test_plot_confusion_matrix_writes_a_png(tmp_path: Path) -> None:
    report = score_classification(LABELS, PREDICTIONS, NAMES)
    path = plot_confusion_matrix(report, "unit test", tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000

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
    softmax,
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
    scores = softmax(np.eye(4, dtype=np.float32)[PREDICTIONS])  # the outputs are scored as logits
    assert report == score_classification(LABELS, PREDICTIONS, NAMES, scores=scores)
    assert 0.5 < report.macro_auroc <= 1.0 and "macro_auroc" in report.flat_metrics()


def test_plot_confusion_matrix_writes_a_png(tmp_path: Path) -> None:
    report = score_classification(LABELS, PREDICTIONS, NAMES)
    path = plot_confusion_matrix(report, "unit test", tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


# --- multilabel and segmentation --------------------------------------------------------------------

def test_roc_auc_matches_the_pairwise_definition() -> None:
    from tasks.evaluation import roc_auc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise)
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert np.isnan(roc_auc(np.zeros(4, int), np.arange(4.0)))


def test_average_precision_of_a_known_ranking() -> None:
    from tasks.evaluation import average_precision

    # ranking: pos, neg, pos -> precision at the hits 1/1 and 2/3
    assert average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx((1 + 2 / 3) / 2)


def test_sensitivity_at_specificity_keeps_the_specificity() -> None:
    from tasks.evaluation import sensitivity_at_specificity

    labels = np.array([0] * 10 + [1] * 4)
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 0.9, 0.85, 0.3, 0.99])
    sensitivity, threshold = sensitivity_at_specificity(labels, scores, 0.9)
    assert ((scores[labels == 0] <= threshold).mean()) >= 0.9
    # one false positive allowed (the 0.95 negative), so the threshold is 0.8: positives 0.9, 0.85, 0.99 pass
    assert threshold == 0.8 and sensitivity == pytest.approx(0.75)


def test_patient_level_aggregation_takes_the_max_over_a_patients_images() -> None:
    from tasks.evaluation import aggregate_by_group

    scores = np.array([[0.1, 0.9], [0.7, 0.2], [0.3, 0.3]])
    labels = np.array([[0, 1], [1, 0], [0, 0]])
    groups = np.array(["p2", "p2", "p1"])
    out_scores, out_labels, names = aggregate_by_group(scores, labels, groups)
    assert names.tolist() == ["p1", "p2"]
    assert out_scores.tolist() == [[0.3, 0.3], [0.7, 0.9]] and out_labels.tolist() == [[0, 0], [1, 1]]
    mean_scores, _, _ = aggregate_by_group(scores, labels, groups, how="mean")
    assert mean_scores[1].tolist() == pytest.approx([0.4, 0.55])


def test_multilabel_report_skips_unknown_entries_and_names_its_keys() -> None:
    from tasks.evaluation import score_outputs

    labels = np.array([[1, -1], [0, 1], [1, 0], [0, 0]])
    scores = np.array([[0.9, 0.5], [0.1, 0.8], [0.8, 0.1], [0.2, 0.3]])
    report = score_outputs("multilabel", labels, scores, ("nodule", "effusion"))
    assert report.primary == report.macro_auroc == 1.0
    metrics = report.flat_metrics("test_")
    assert {"test_macro_auroc", "test_auroc_nodule", "test_auprc_effusion", "test_sensitivity_at_spec90_nodule"} <= set(metrics)


def test_segmentation_report_ignores_unlabelled_pixels_and_counts_objects() -> None:
    from tasks.evaluation import score_segmentation

    truth = np.zeros((1, 8, 8), dtype=np.int64)
    truth[0, 1:3, 1:3] = 1  # object A (4 px)
    truth[0, 5:7, 5:7] = 1  # object B (4 px), missed below
    truth[0, 7, 0] = -1
    predicted = np.zeros((1, 8, 8), dtype=np.int64)
    predicted[0, 1:3, 1:4] = 1  # covers A plus 2 false pixels
    predicted[0, 0, 6] = 1  # a false object
    predicted[0, 7, 0] = 1  # on an ignored pixel: does not count
    report = score_segmentation(truth, predicted, ("background", "plume"))
    # plume: TP 4, FP 3, FN 4 -> IoU 4/11
    assert report.foreground_iou == pytest.approx(4 / 11)
    assert report.object_precision == pytest.approx(1 / 2) and report.object_recall == pytest.approx(1 / 2)
    assert sum(map(sum, report.confusion)) == 63


def test_reports_plot_for_every_task(tmp_path) -> None:
    from tasks.evaluation import score_outputs

    rng = np.random.default_rng(1)
    multi = score_outputs("multilabel", rng.integers(0, 2, (20, 2)), rng.random((20, 2)), ("a", "b"))
    seg = score_outputs("segmentation", rng.integers(0, 2, (3, 8, 8)), rng.random((3, 2, 8, 8)), ("bg", "fg"))
    for report, name in ((multi, "roc.png"), (seg, "pixels.png")):
        path = report.plot("test", tmp_path / name)
        assert path.stat().st_size > 1000


def test_primary_metrics_table_matches_each_reports_primary() -> None:
    from tasks.evaluation import PRIMARY_METRICS, ClassificationReport, MultiLabelReport, SegmentationReport

    assert {ClassificationReport.primary_metric, MultiLabelReport.primary_metric, SegmentationReport.primary_metric} \
        == set(PRIMARY_METRICS.values())
    for report_type in (ClassificationReport, MultiLabelReport, SegmentationReport):
        assert PRIMARY_METRICS[report_type.task] == report_type.primary_metric

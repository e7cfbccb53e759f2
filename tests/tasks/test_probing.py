"""Probes: protocols on arrays, backbones and baselines on a tiny dataset, the cache, the table and the gate."""

from __future__ import annotations

import numpy as np
import pytest
from tasks_support import tiny_backbone

from tasks.probing import protocols
from tasks.probing.embeddings import ProbeSubject
from tasks.probing.scoring import GATE_PROTOCOL, ProbeSettings, decide_probe_gate, probe_backbones

FAST = ProbeSettings(shots=[1, 5], few_shot_draws=2, label_fractions=[0.1, 1.0], bootstrap=200, threads=1)


def test_knn_votes_for_the_nearest_class_by_cosine():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    # Length does not matter for cosine similarity: a long vector along the first axis is class 0.
    queries = np.array([[10.0, 0.5], [0.2, 3.0]])
    assert protocols.knn_predict(train, labels, queries, k=2, num_classes=2).tolist() == [0, 1]


def test_linear_probe_picks_c_on_validation_and_separates_separable_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.eye(3)[y] * 3 + rng.normal(0, 0.5, (300, 3))
    probe = protocols.linear_probe(x[:200], y[:200], x[200:250], y[200:250], x[250:])
    assert probe.c in protocols.DEFAULT_C_GRID
    assert protocols.accuracy(y[250:], probe.predictions) > 0.9


def test_subsets_are_stratified_seeded_and_keep_every_class():
    labels = np.array([0] * 90 + [1] * 10)
    part = protocols.stratified_subset(labels, 0.01, seed=3)
    assert set(labels[part]) == {0, 1}  # 1% of 10 rounds to 0: one is kept anyway
    assert np.array_equal(part, protocols.stratified_subset(labels, 0.01, seed=3))
    shots = protocols.shots_subset(labels, 5, seed=0)
    assert np.bincount(labels[shots]).tolist() == [5, 5]


def test_bootstrap_interval_brackets_the_score_and_the_paired_difference_sees_a_real_gain():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, labels, 1 - labels)
    poor = np.where(rng.random(400) < 0.6, labels, 1 - labels)
    low, high = protocols.bootstrap_interval(labels, good, protocols.accuracy, 300)
    assert low < protocols.accuracy(labels, good) < high and high - low < 0.1
    point, d_low, _ = protocols.paired_difference(labels, good, poor, protocols.accuracy, 300)
    assert point > 0.2 and d_low > 0
    # The same predictions do not beat themselves: the gate needs the interval above zero.
    assert not decide_probe_gate(labels, poor, poor, "accuracy", 300)["passed"]
    assert decide_probe_gate(labels, good, poor, "accuracy", 300)["passed"]


def _loop_bootstrap(labels, draws, metric, resamples, seed):
    """The straightforward bootstrap: one index draw and one metric call per resample and draw."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        values.append(np.mean([metric(labels[index], d[index]) for d in draws]))
    return np.array(values)


@pytest.mark.parametrize("metric", [protocols.accuracy, protocols.macro_f1])
def test_vectorised_bootstrap_equals_the_per_resample_computation(metric, monkeypatch):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 97)  # odd length; class 3 is rare in some resamples, absent in predictions
    labels[labels == 3] = rng.integers(0, 3, int(np.sum(labels == 3)))
    labels[:3] = 3
    draws = np.where(rng.random((3, 97)) < 0.7, labels, rng.integers(0, 3, (3, 97)))
    expected = _loop_bootstrap(labels, draws, metric, 250, seed=7)
    # Small chunks: the resamples are scored in several blocks and still follow one generator stream.
    monkeypatch.setattr(protocols, "BOOTSTRAP_CHUNK_ELEMENTS", 97 * 40)
    got = np.concatenate([protocols.resampled_scores(metric, labels, draws, index)
                          for index in protocols.resample_indices(len(labels), 250, seed=7)])
    assert np.array_equal(got, expected)  # same numbers, not just close (fewer than 8 classes: same sums)
    assert protocols.bootstrap_interval(labels, draws, metric, 250, seed=7) == \
        tuple(float(v) for v in np.percentile(expected, [2.5, 97.5]))
    other = np.where(rng.random(97) < 0.5, labels, 0)
    point, low, high = protocols.paired_difference(labels, draws[0], other, metric, 250, seed=7)
    paired = _loop_bootstrap(labels, draws[:1], metric, 250, 7) - _loop_bootstrap(labels, other[None], metric, 250, 7)
    assert (low, high) == tuple(float(v) for v in np.percentile(paired, [2.5, 97.5]))
    assert point == metric(labels, draws[0]) - metric(labels, other)


def test_a_metric_without_confusion_counts_is_bootstrapped_call_by_call():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    predictions = np.where(rng.random(60) < 0.8, labels, 1 - labels)

    def recall_of_ones(y, p):
        return float(np.mean(p[y == 1] == 1)) if np.any(y == 1) else 0.0

    expected = np.percentile(_loop_bootstrap(labels, predictions[None], recall_of_ones, 120, 3), [2.5, 97.5])
    assert protocols.bootstrap_interval(labels, predictions, recall_of_ones, 120, 3) == tuple(map(float, expected))


def test_mean_interval_is_seeded_and_brackets_the_mean():
    values = [0.1, 0.3, 0.2, 0.25, 0.15]
    rng = np.random.default_rng(0)
    means = [np.asarray(values)[rng.integers(0, 5, 5)].mean() for _ in range(300)]
    assert protocols.mean_interval(values, 300, 0) == tuple(float(v) for v in np.percentile(means, [2.5, 97.5]))


def test_the_regularisation_path_reaches_the_optimum_a_cold_fit_reaches():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 240)
    x = protocols.standardise((np.eye(3)[y] + rng.normal(0, 0.8, (240, 3))) @ rng.normal(size=(3, 12)))[0]
    grid = [100.0, 0.01, 1.0]
    path = [(c, model.coef_.copy()) for c, model in protocols.fit_logistic_path(x, y, grid)]
    assert [c for c, _ in path] == [0.01, 1.0, 100.0]  # increasing C, each warm-started from the last
    for c, coef in path:
        tight = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x, y).coef_
        assert np.allclose(coef, tight, atol=1e-3), c


def test_linear_probe_breaks_validation_ties_by_grid_order():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = np.eye(2)[y] * 5 + rng.normal(0, 0.1, (200, 2))  # every C separates validation perfectly
    probe = protocols.linear_probe(x[:100], y[:100], x[100:150], y[100:150], x[150:], [10.0, 0.1, 1.0])
    assert probe.c == 10.0 and probe.val_score == 1.0


@pytest.fixture(scope="module")
def probed(dataset_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("probe-cache")
    subjects = [ProbeSubject(label="tiny", backbone=tiny_backbone())]
    return probe_backbones(dataset_dir, subjects, FAST, cache), cache


def test_every_backbone_and_baseline_is_scored_with_every_protocol(probed):
    outcome, _ = probed
    backbones = {r["backbone"] for r in outcome.rows}
    assert backbones == {"tiny", "random-init", "random-conv", "channel-stats"}
    settings = {(r["protocol"], r["setting"]) for r in outcome.rows if r["backbone"] == "channel-stats"}
    assert {("knn", "k=5"), ("knn", "k=20"), ("few-shot", "shots=1"), ("few-shot", "shots=5"),
            ("label-fraction", "labels=10%"), ("label-fraction", "labels=100%")} <= settings
    for row in outcome.rows:
        if row["protocol"] != GATE_PROTOCOL:
            assert 0.0 <= row["ci95_low"] <= row["value"] <= row["ci95_high"] <= 1.0, row
    # The shared dataset's classes are bright in one band each: channel statistics solve it.
    assert outcome.value("channel-stats", "label-fraction", "labels=100%", "accuracy") > 0.9
    assert "tiny" in outcome.gate and set(outcome.gate["tiny"]) >= {"difference", "ci95_low", "passed"}


def test_embeddings_are_cached_by_model_data_and_preprocessing(probed, dataset_dir):
    outcome, cache = probed
    # The subject has random weights drawn from the same seed as the random-init baseline: the same model
    # digest, so the baseline's embeddings come from the subject's cache entry.
    assert outcome.cached == {"tiny": False, "random-init": True, "random-conv": False, "channel-stats": False}
    again = probe_backbones(dataset_dir, [ProbeSubject(label="tiny", backbone=tiny_backbone())], FAST, cache)
    assert all(again.cached.values())
    assert [r["value"] for r in again.rows] == [r["value"] for r in outcome.rows]
    # Other weights (another depth): another model digest, so computed again.
    other = probe_backbones(dataset_dir, [ProbeSubject(label="tiny", backbone=tiny_backbone(depth=2))],
                            FAST.model_copy(update={"include_baselines": False}), cache)
    assert other.cached == {"tiny": False}


def test_the_table_plot_and_metrics_are_written(probed, tmp_path):
    from tasks.probing.report import probe_metrics, read_table, write_outputs

    outcome, _ = probed
    files = write_outputs(outcome, "macro_f1", tmp_path)
    rows = read_table(files["table"])
    assert len(rows) == len(outcome.rows) and rows[0].keys() >= {"backbone", "protocol", "ci95_low", "adapted"}
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    metrics = probe_metrics(outcome)
    assert "gate.tiny.ci95_low" in metrics and "channel-stats.linear.full.accuracy" in metrics


def test_labels_must_be_unique_and_not_a_baseline(dataset_dir):
    from tasks.request_errors import RequestError

    with pytest.raises(RequestError, match="unique"):
        probe_backbones(dataset_dir, [ProbeSubject(label="random-init", backbone=tiny_backbone())], FAST, None)


def test_licence_tags_name_catalog_weights_and_only_when_they_were_loaded():
    from tasks.backbone_catalog import base_licence_tags, licence_tags

    tags = licence_tags("uni")
    assert tags["vitrail.catalog_entry"] == "uni" and tags["vitrail.licence"] == "CC-BY-NC-ND-4.0"
    assert tags["vitrail.licence_commercial_use"] == "false" and tags["vitrail.licence_gated"] == "true"
    assert licence_tags("vit_tiny_patch16_224") == {}
    assert base_licence_tags({"name": "uni", "weights": "file"}) == tags
    assert base_licence_tags({"name": "uni", "weights": "none"}) == {}  # the architecture alone has no licence


def test_other_tasks_are_probed_on_a_tile_target_derived_from_their_labels(dataset):
    import dataclasses

    from tasks.dataset import Split
    from tasks.probing.scoring import tile_targets

    masks = np.zeros((3, 4, 4), dtype=np.int64)
    masks[1, :1] = 1  # a little foreground: the tile's target is that class
    masks[2] = -1  # ignored pixels only: background
    info = dataclasses.replace(dataset.info, task="segmentation", class_names=("background", "plume"))
    segmentation = dataclasses.replace(dataset, info=info, splits={"test": Split(np.zeros((3, 1, 4, 4)), masks,
                                                                                   np.array(["a", "b", "c"]))})
    targets, how = tile_targets(segmentation, "test")
    assert targets.tolist() == [0, 1, 0] and how == "most frequent foreground class of the tile"
    findings = np.array([[0, 0], [1, -1], [-1, 0]])
    info = dataclasses.replace(dataset.info, task="multilabel", class_names=("nodule", "effusion"))
    multilabel = dataclasses.replace(dataset, info=info, splits={"test": Split(np.zeros((3, 1, 4, 4)), findings,
                                                                                 np.array(["a", "b", "c"]))})
    targets, how = tile_targets(multilabel, "test")
    assert targets.tolist() == [0, 1, 0] and how == "any finding"

"""The promotion gate: a pure decision from measured facts, thresholds and the current champion."""

from __future__ import annotations

from dataclasses import replace

import pytest

from domains import get_domain
from tasks.promotion import Candidate, GateThresholds, decide_promotion, registered_model_names

GATE = GateThresholds(metric="macro_f1", min_metric=0.6, max_drop_vs_fp32=0.02, latency_budget_ms=50.0,
                      parity_tolerance=1e-3)
GOOD = Candidate(reference_metric=0.86, edge_metric=0.85, edge_latency_ms=12.0, parity_max_abs_diff=2e-5)


def test_a_passing_candidate_without_champion_becomes_champion() -> None:
    decision = decide_promotion(GOOD, GATE, champion_metric=None)
    assert decision.passed and decision.alias == "champion"
    assert decision.reasons[-1] == "no current champion"
    assert len(decision.reasons) == 5  # four checks, then the champion comparison


@pytest.mark.parametrize("champion", [0.80, 0.85])
def test_a_candidate_at_least_as_good_as_the_champion_replaces_it(champion: float) -> None:
    decision = decide_promotion(GOOD, GATE, champion_metric=champion)
    assert decision.passed and decision.alias == "champion"
    assert "not worse than champion" in decision.reasons[-1]


def test_a_passing_candidate_worse_than_the_champion_is_challenger() -> None:
    decision = decide_promotion(GOOD, GATE, champion_metric=0.90)
    assert decision.passed and decision.alias == "challenger"
    assert decision.reasons[-1] == "worse than champion (0.8500 < 0.9000)"


@pytest.mark.parametrize("change,failed_check", [
    ({"edge_metric": 0.55, "reference_metric": 0.56}, "edge macro_f1 0.5500 < minimum 0.6000"),
    ({"edge_metric": 0.80, "reference_metric": 0.86}, "drop vs fp32 +0.0600 exceeds 0.0200"),
    ({"edge_latency_ms": 75.0}, "edge p50 latency 75.00 ms over budget 50.00 ms"),
    ({"parity_max_abs_diff": 5e-3}, "export parity 5.00e-03 over tolerance 1.0e-03"),
])
@pytest.mark.parametrize("champion", [None, 0.1])
def test_each_failing_check_blocks_promotion_and_is_named(change: dict, failed_check: str,
                                                          champion: float | None) -> None:
    decision = decide_promotion(replace(GOOD, **change), GATE, champion_metric=champion)
    assert not decision.passed and decision.alias is None
    assert failed_check in decision.reasons
    assert len(decision.reasons) == 4  # no champion comparison for a failed candidate
    tags = decision.as_tags()
    assert tags["vitrail.gate"] == "failed" and tags["vitrail.alias"] == "none"
    assert failed_check in tags["vitrail.gate_reasons"]


def test_passing_checks_are_reported_too() -> None:
    reasons = decide_promotion(GOOD, GATE, None).reasons
    assert reasons[:4] == ("edge macro_f1 0.8500 >= minimum 0.6000", "drop vs fp32 +0.0100 within 0.0200",
                           "edge p50 latency 12.00 ms within budget 50.00 ms",
                           "export parity 2.00e-05 within tolerance 1.0e-03")


def test_the_gate_metric_is_named_in_the_reasons() -> None:
    from dataclasses import replace

    decision = decide_promotion(replace(GOOD, metric="macro_auroc"), GATE, None)
    assert decision.reasons[0].startswith("edge macro_auroc ")


def test_auto_gate_metric_is_defined_for_every_task_and_reported_by_its_reports() -> None:
    import typing

    import numpy as np

    from domains import TaskType
    from tasks.evaluation import score_outputs
    from tasks.promotion import AUTO_GATE_METRIC, GateMetric

    from tasks.bags import SLIDE_TASK

    assert set(AUTO_GATE_METRIC) == set(typing.get_args(TaskType)) | {SLIDE_TASK}
    assert set(AUTO_GATE_METRIC.values()) <= set(typing.get_args(GateMetric))
    shapes = {"classification": ((4,), (4, 2)), "multilabel": ((4, 2), (4, 2)), "segmentation": ((4, 3, 3), (4, 2, 3, 3))}
    for task, metric in AUTO_GATE_METRIC.items():
        scored_as = "classification" if task == SLIDE_TASK else task  # slides are scored as classes
        labels_shape, output_shape = shapes[scored_as]
        labels = np.indices(labels_shape).sum(axis=0) % 2  # both values in every column
        report = score_outputs(scored_as, labels, np.random.default_rng(0).random(output_shape), ("a", "b"))
        assert f"test_{metric}" in report.flat_metrics("test_")
        if task != SLIDE_TASK:  # a slide model is selected on macro-F1 while training, gated on slide AUROC
            assert report.selection_metric == metric


def test_decide_promotion_is_pure() -> None:
    first = decide_promotion(GOOD, GATE, 0.9)
    assert decide_promotion(GOOD, GATE, 0.9) == first
    assert GOOD == Candidate(reference_metric=0.86, edge_metric=0.85, edge_latency_ms=12.0, parity_max_abs_diff=2e-5)


def test_decision_tags_of_a_promoted_candidate() -> None:
    tags = decide_promotion(GOOD, GATE, None).as_tags()
    assert tags["vitrail.gate"] == "passed" and tags["vitrail.alias"] == "champion"
    assert tags["vitrail.gate_reasons"].endswith("; no current champion")


def test_limits_are_inclusive() -> None:
    # Binary fractions, so the drop is computed exactly.
    at_limits = Candidate(reference_metric=0.75, edge_metric=0.625, edge_latency_ms=50.0, parity_max_abs_diff=1e-3)
    gate = GATE.model_copy(update={"min_metric": 0.625, "max_drop_vs_fp32": 0.125})
    assert decide_promotion(at_limits, gate, None).passed


def test_a_drop_exactly_at_the_limit_passes() -> None:
    # 45/50 correct for fp32, 44/50 for int8: a drop of exactly one sample in fifty, the allowed 0.02.
    candidate = replace(GOOD, reference_metric=45 / 50, edge_metric=44 / 50)
    decision = decide_promotion(candidate, GATE, None)
    assert decision.passed, decision.reasons


def test_registered_model_names_follow_domain_and_task() -> None:
    satellite = get_domain("satellite")
    assert registered_model_names(satellite) == ("satellite-tile-classification",
                                                 "satellite-tile-classification-edge")
    other = replace(satellite, name="pathology", task_name="slide-grading")
    assert registered_model_names(other) == ("pathology-slide-grading", "pathology-slide-grading-edge")


def test_a_model_of_another_task_gets_its_own_registered_names() -> None:
    from domains import get_domain

    radiology = get_domain("radiology")
    assert registered_model_names(radiology, "multilabel") == registered_model_names(radiology)
    assert registered_model_names(radiology, "segmentation") == ("radiology-segmentation", "radiology-segmentation-edge")


# --- applying decisions to a real registry: twins, half-promotions, readers ---------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A SQLite MLflow registry of its own; versions point at a plain folder (the registry never reads it)."""
    from mlflow_isolation import mlflow_sandbox

    from tasks import tracking

    workdir = tmp_path_factory.mktemp("registry")
    with mlflow_sandbox() as patch:
        patch.chdir(workdir)
        tracking.configure_tracking(workdir)
        yield (workdir / "model").as_uri()


def _promote(source: str, names: tuple[str, str], edge_metric: float, latency_ms: float = 5.0):
    from tasks.promotion import apply_promotion, current_champion_metric

    candidate = replace(GOOD, reference_metric=edge_metric + 0.01, edge_metric=edge_metric, edge_latency_ms=latency_ms)
    decision = decide_promotion(candidate, GATE, current_champion_metric(names[1], "macro_f1"))
    return apply_promotion(decision, candidate, GATE, source, source, names, {"vitrail.unit": "yes"})


def _holder(name: str, alias: str) -> str | None:
    from tasks import tracking

    found = tracking.alias_holder(name, alias)
    return found[0] if found else None


def test_promoted_versions_name_each_other_as_twins(registry) -> None:
    from tasks import tracking
    from tasks.promotion import TWIN_NAME_TAG, TWIN_VERSION_TAG, pinned_model_uri

    names = ("unit-twins", "unit-twins-edge")
    record = _promote(registry, names, 0.9)
    assert record.alias == "champion" and (record.reference_version, record.edge_version) == ("1", "1")
    reference_tags = tracking.alias_holder(names[0], "champion")[1]
    edge_tags = tracking.alias_holder(names[1], "champion")[1]
    assert (reference_tags[TWIN_NAME_TAG], reference_tags[TWIN_VERSION_TAG]) == ("unit-twins-edge", "1")
    assert (edge_tags[TWIN_NAME_TAG], edge_tags[TWIN_VERSION_TAG]) == ("unit-twins", "1")
    # A failed candidate is registered as twins too, but moves no alias.
    failed = _promote(registry, names, 0.95, latency_ms=500.0)
    assert failed.alias is None and failed.edge_version == "2"
    assert tracking.alias_holder(names[1], "champion")[0] == "1"
    assert pinned_model_uri("models:/unit-twins-edge@champion") == "models:/unit-twins-edge/1"
    assert pinned_model_uri("models:/unit-twins@champion") == "models:/unit-twins/1"


@pytest.mark.parametrize("half_side", [0, 1], ids=["reference-moved", "edge-moved"])
def test_a_half_promotion_is_refused_by_readers_and_completed_once(registry, half_side: int) -> None:
    from tasks import tracking
    from tasks.promotion import HalfPromotionError, complete_half_promotions, pinned_model_uri

    names = (f"unit-half-{half_side}", f"unit-half-{half_side}-edge")
    _promote(registry, names, 0.80)  # champion: versions 1 and 1
    _promote(registry, names, 0.70)  # challenger: versions 2 and 2
    _promote(registry, names, 0.90, latency_ms=500.0)  # failed gate: versions 3 and 3, no alias
    # What a crash between the two alias writes leaves: one side's champion moved to version 3.
    tracking.set_alias(names[half_side], "champion", "3")
    moved, stale = names[half_side], names[1 - half_side]
    for name in names:
        with pytest.raises(HalfPromotionError, match=rf"half-applied promotion: {name} version \d holds 'champion'"):
            pinned_model_uri(f"models:/{name}@champion")
    assert pinned_model_uri(f"models:/{names[1]}@challenger") == f"models:/{names[1]}/2"  # the other pair is fine

    # The reference side decides (promotions write it first): a moved reference is completed forward; an
    # edge moved alone (only by hand) is put back to the reference champion's twin.
    repaired = complete_half_promotions(names)
    if half_side == 0:
        assert repaired == [f"{stale}@champion: version 1 -> 3 (twin of {moved} version 3)"]
        champion = "3"
    else:
        assert repaired == [f"{moved}@champion: version 3 -> 1 (twin of {stale} version 1)"]
        champion = "1"
    assert (_holder(names[0], "champion"), _holder(names[1], "champion")) == (champion, champion)
    assert (_holder(names[0], "challenger"), _holder(names[1], "challenger")) == ("2", "2")
    assert pinned_model_uri(f"models:/{names[1]}@champion") == f"models:/{names[1]}/{champion}"
    assert complete_half_promotions(names) == []  # idempotent: nothing left to repair


def test_versions_registered_outside_the_promote_stage_are_left_alone(registry) -> None:
    from tasks import tracking
    from tasks.promotion import complete_half_promotions, pinned_model_uri

    names = ("unit-plain", "unit-plain-edge")
    version = tracking.register_version(registry, names[1], {})
    tracking.set_alias(names[1], "champion", version)
    assert complete_half_promotions(names) == [] and _holder(names[0], "champion") is None
    assert pinned_model_uri("models:/unit-plain-edge@champion") == "models:/unit-plain-edge/1"


@pytest.mark.parametrize("uri", ["runs:/abc/model", "models:/unit-plain-edge/1", "/tmp/model.onnx",
                                 "models:/never-registered@champion"])
def test_other_uris_and_missing_aliases_pass_through_unpinned(registry, uri: str) -> None:
    from tasks.promotion import pinned_model_uri

    assert pinned_model_uri(uri) == uri

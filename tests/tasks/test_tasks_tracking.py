"""MLflow tracking and the model registry, against a temporary SQLite store.

One store serves the module: runs go to an experiment whose artifacts live in the store's folder, and
the working directory is moved there too, so nothing is written into the checkout.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow_isolation import mlflow_sandbox

from domains import get_domain
from tasks import tracking
from tasks.promotion import (
    Candidate,
    GateThresholds,
    apply_promotion,
    current_champion_metric,
    decide_promotion,
    gather_candidate,
    registered_model_names,
)
from tasks.training import predict_logits

DOMAIN = "satellite"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """(workdir, experiment id) of a fresh SQLite tracking store; MLflow's global state is restored after."""
    workdir = tmp_path_factory.mktemp("mlflow")
    with mlflow_sandbox() as patch:
        # Belt and braces: if artifacts ever fell back to ./mlruns, keep them out of the checkout.
        patch.chdir(workdir)
        uri = tracking.configure_tracking(workdir)
        assert uri == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
        yield workdir, tracking.ensure_experiment(DOMAIN, workdir)
        while mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.fixture(scope="module")
def logged_models(store, trained_model, onnx_fp32: Path, model_metadata: dict) -> dict[str, str]:
    """URIs of the trained tiny model logged once as reference (torch) and edge (ONNX) model."""
    _, experiment_id = store
    example = np.zeros((1, 3, 16, 16), dtype=np.float32)
    with mlflow.start_run(experiment_id=experiment_id, run_name="unit-models"):
        reference = tracking.log_reference_model(trained_model, example, model_metadata)
        edge = tracking.log_edge_model(onnx_fp32, {**model_metadata, "variant": "onnx-fp32"}, example)
    return {"reference": reference, "edge": edge}


# --- tracking URI ------------------------------------------------------------------------------------


def test_resolve_tracking_uri_defaults_to_sqlite_in_the_workdir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_resolve_tracking_uri_honours_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(tmp_path) == "http://mlflow.example:5000"


def test_configure_tracking_points_tracking_and_registry_at_the_store(store) -> None:
    workdir, _ = store
    expected = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == expected and mlflow.get_registry_uri() == expected
    assert (workdir / "mlflow.db").is_file()


def test_ensure_experiment_is_idempotent(store) -> None:
    workdir, experiment_id = store
    assert tracking.ensure_experiment(DOMAIN, workdir) == experiment_id
    assert MlflowClient().get_experiment_by_name(DOMAIN).experiment_id == experiment_id


def test_ensure_experiment_keeps_artifacts_in_the_workdir(store) -> None:
    workdir, _ = store
    with mlflow_sandbox():  # no MLFLOW_TRACKING_URI: the local SQLite default applies
        experiment_id = tracking.ensure_experiment("unit-artifact-location", workdir)
        location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (workdir.resolve() / "mlartifacts").as_uri()


def test_configure_tracking_follows_the_workdir(tmp_path: Path) -> None:
    with mlflow_sandbox():
        first = tracking.configure_tracking(tmp_path / "first")
        second = tracking.configure_tracking(tmp_path / "second")
    assert first.endswith("/first/mlflow.db")
    assert second == f"sqlite:///{(tmp_path / 'second').resolve()}/mlflow.db"


# --- stage runs --------------------------------------------------------------------------------------


def test_stage_run_records_tags_params_lineage_and_artifacts(store, dataset, dataset_dir: Path) -> None:
    workdir, experiment_id = store
    params = {"train": {"epochs": 3, "seed": 0}, "lora": {"target_modules": ["qkv", "fc1"]}}
    with tracking.stage_run(DOMAIN, "finetune", workdir, params=params, dataset=dataset.info,
                            dataset_path=dataset_dir, extra_tags={"vitrail.note": "unit"}) as run:
        (run.artifact_dir / "summary.txt").write_text("hello")
        tracking.log_metrics({"best_val_accuracy": 0.75})
    recorded = MlflowClient().get_run(run.run_id)
    assert run.experiment_id == experiment_id and recorded.info.status == "FINISHED"
    tags = recorded.data.tags
    assert tags["vitrail.stage"] == "finetune" and tags["vitrail.domain"] == DOMAIN
    assert tags["vitrail.dataset_digest"] == dataset.info.digest and tags["vitrail.note"] == "unit"
    assert tags["vitrail.git_commit"] and "vitrail.prefect_flow_run_id" in tags
    assert recorded.data.params["train.epochs"] == "3"
    assert recorded.data.params["lora.target_modules"] == '["qkv", "fc1"]'
    assert recorded.data.metrics["best_val_accuracy"] == 0.75
    assert [a.path for a in MlflowClient().list_artifacts(run.run_id)] == ["summary.txt"]
    (lineage,) = recorded.inputs.dataset_inputs
    assert lineage.dataset.digest == dataset.info.digest[:36]
    assert {t.key: t.value for t in lineage.tags}["mlflow.data.context"] == "training"


def test_log_metrics_and_tags_to_a_run_by_id(store) -> None:
    _, experiment_id = store
    with mlflow.start_run(experiment_id=experiment_id) as run:
        pass
    tracking.log_metrics({"val_loss": 0.5}, step=3, run_id=run.info.run_id)
    tracking.set_tags({"vitrail.edge_variant": "onnx-int8"}, run_id=run.info.run_id)
    metrics, tags = tracking.read_run(run.info.run_id)
    assert metrics == {"val_loss": 0.5} and tags["vitrail.edge_variant"] == "onnx-int8"
    (point,) = MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert point.step == 3


# --- logged models -----------------------------------------------------------------------------------


def test_reference_model_round_trips_with_its_metadata(logged_models, trained_model, dataset,
                                                       model_metadata: dict) -> None:
    flavor, metadata = tracking.model_flavor(logged_models["reference"])
    # Logging adds the model's identity and the units it takes (None: this dataset stores physical values).
    assert metadata.pop("model_digest") and metadata.pop("input_scaling") is None
    assert flavor == "pytorch" and metadata == model_metadata
    loaded = tracking.load_reference_model(logged_models["reference"])
    images = dataset.splits["test"].images
    # safetensors weights rebuilt into the same modules: bitwise the logits of the trained model
    np.testing.assert_array_equal(predict_logits(loaded, images), predict_logits(trained_model, images))


def test_edge_model_is_logged_as_onnx(logged_models, model_metadata: dict) -> None:
    flavor, metadata = tracking.model_flavor(logged_models["edge"])
    assert flavor == "onnx" and metadata == {**model_metadata, "variant": "onnx-fp32"}


def test_prediction_loads_both_flavours_with_their_bands_and_classes(logged_models, trained_model, dataset) -> None:
    from tasks.prediction import load_model

    images = dataset.splits["test"].images[:]  # a small split, read whole for the comparison
    expected = predict_logits(trained_model, images)
    for kind, flavor in (("reference", "pytorch"), ("edge", "onnx")):
        model = load_model(logged_models[kind])
        assert model.flavor == flavor and model.domain == "satellite" and model.tile_size == 16
        assert model.channels == dataset.info.channels and model.class_names == dataset.info.class_names
        np.testing.assert_allclose(model.predict_logits(images), expected, atol=1e-4)


# --- registry and promotion --------------------------------------------------------------------------


def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(name, version).tags)


def holder(name: str, alias: str) -> str | None:
    found = tracking.alias_holder(name, alias)
    return found[0] if found else None


def test_alias_holder_of_an_unknown_model_is_none(store) -> None:
    assert tracking.alias_holder("no-such-model", "champion") is None
    assert current_champion_metric("no-such-model-edge", "macro_f1") is None


def test_promotion_sets_aliases_on_both_registered_models(logged_models, dataset) -> None:
    gate = GateThresholds(metric="macro_f1", min_metric=0.6, max_drop_vs_fp32=0.05, latency_budget_ms=50.0)
    names = registered_model_names(get_domain(DOMAIN))
    reference_name, edge_name = names
    lineage = {"vitrail.dataset_digest": dataset.info.digest}

    def promote(edge_metric: float, latency_ms: float = 5.0):
        candidate = Candidate(reference_metric=edge_metric + 0.01, edge_metric=edge_metric,
                              edge_latency_ms=latency_ms, parity_max_abs_diff=1e-5)
        decision = decide_promotion(candidate, gate, current_champion_metric(edge_name, gate.metric))
        return decision, apply_promotion(decision, candidate, gate, logged_models["reference"],
                                         logged_models["edge"], names, lineage)

    # 1. The first passing candidate becomes champion of both models.
    decision, record = promote(0.90)
    assert decision.alias == "champion" and record.alias == "champion"
    assert (record.reference_version, record.edge_version) == ("1", "1")
    assert holder(reference_name, "champion") == "1" and holder(edge_name, "champion") == "1"
    tags = version_tags(edge_name, "1")
    assert tags["vitrail.gate"] == "passed" and tags["vitrail.alias"] == "champion"
    assert tags["vitrail.edge_macro_f1"] == "0.900000" and tags["vitrail.dataset_digest"] == dataset.info.digest
    assert current_champion_metric(edge_name, "macro_f1") == pytest.approx(0.90)

    # 2. A worse passing candidate is challenger; the champion stays.
    decision, record = promote(0.80)
    assert record.alias == "challenger" and record.edge_version == "2"
    assert holder(edge_name, "champion") == "1" and holder(edge_name, "challenger") == "2"
    assert holder(reference_name, "champion") == "1" and holder(reference_name, "challenger") == "2"

    # 3. A failing candidate is registered, tagged failed, and gets no alias.
    decision, record = promote(0.85, latency_ms=500.0)
    assert not decision.passed and record.alias is None and record.edge_version == "3"
    assert version_tags(edge_name, "3")["vitrail.gate"] == "failed"
    assert "over budget" in version_tags(reference_name, "3")["vitrail.gate_reasons"]
    assert holder(edge_name, "champion") == "1" and holder(edge_name, "challenger") == "2"
    assert not MlflowClient().get_model_version(edge_name, "3").aliases

    # 4. A better candidate takes the champion alias over.
    decision, record = promote(0.95)
    assert record.alias == "champion"
    assert holder(edge_name, "champion") == "4" and holder(reference_name, "champion") == "4"
    assert current_champion_metric(edge_name, "macro_f1") == pytest.approx(0.95)


def test_register_version_and_tag_version(logged_models) -> None:
    version = tracking.register_version(logged_models["edge"], "unit-tagging", {"vitrail.gate": "passed"})
    tracking.tag_version("unit-tagging", version, {"vitrail.reviewed": "yes"})
    tracking.set_alias("unit-tagging", "champion", version)
    assert version == "1"
    assert tracking.alias_holder("unit-tagging", "champion") == (
        "1", {"vitrail.gate": "passed", "vitrail.reviewed": "yes"})


# --- gathering a candidate from its runs -------------------------------------------------------------


@pytest.fixture(scope="module")
def compress_and_validate_runs(store, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    _, experiment_id = store
    report = {"variants": [{"name": "onnx-fp32", "latency_ms_p50": 9.0}, {"name": "onnx-int8", "latency_ms_p50": 3.5}],
              "parity": {"onnx-fp32": {"max_abs_diff": 2e-5}}}
    scratch = tmp_path_factory.mktemp("report") / "compress_report.json"
    scratch.write_text(json.dumps(report))
    with mlflow.start_run(experiment_id=experiment_id, run_name="compress") as compress:
        tracking.set_tags({"vitrail.edge_variant": "onnx-int8"})
        tracking.log_artifact(scratch)
    with mlflow.start_run(experiment_id=experiment_id, run_name="validate") as validate:
        tracking.log_metrics({"torch-fp32.test_macro_f1": 0.9, "onnx-int8.test_macro_f1": 0.875,
                              "torch-fp32.test_accuracy": 0.92})
    return compress.info.run_id, validate.info.run_id


def test_gather_candidate_reads_the_compress_and_validate_runs(compress_and_validate_runs) -> None:
    compress_id, validate_id = compress_and_validate_runs
    candidate, edge = gather_candidate(compress_id, validate_id, "macro_f1")
    assert edge == "onnx-int8"
    assert candidate == Candidate(reference_metric=0.9, edge_metric=0.875, edge_latency_ms=3.5,
                                  parity_max_abs_diff=2e-5)


def test_gather_candidate_names_missing_metrics(compress_and_validate_runs) -> None:
    compress_id, validate_id = compress_and_validate_runs
    with pytest.raises(ValueError, match=r"lacks metrics \['onnx-int8.test_accuracy'\]"):
        gather_candidate(compress_id, validate_id, "accuracy")


def test_gather_candidate_refuses_a_run_that_is_not_a_compress_run(compress_and_validate_runs) -> None:
    compress_id, validate_id = compress_and_validate_runs
    with pytest.raises(ValueError, match="is not a compress run"):
        gather_candidate(validate_id, validate_id, "macro_f1")


def test_a_champion_that_does_not_exist_yet_is_a_clear_error(logged_models) -> None:
    from tasks.prediction import load_model

    tracking.register_version(logged_models["edge"], "never-promoted-edge", {})
    with pytest.raises(ValueError, match="no model version holds this alias yet"):
        load_model("models:/never-promoted-edge@champion")

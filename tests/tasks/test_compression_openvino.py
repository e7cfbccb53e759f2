"""OpenVINO as an edge runtime (IR conversion with parity, NNCF int8, metadata, predictors) and the
gate-score drops with paired-bootstrap intervals that every compression goal is judged on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.compression.scoring import SampleOutcomes, collect_outcomes, score_drop, scores_from_confusions
from tasks.evaluation import score_classification, score_segmentation

openvino_runtime = pytest.importorskip("tasks.openvino_runtime")


@pytest.fixture(scope="module")
def openvino_files(tmp_path_factory: pytest.TempPathFactory, onnx_fp32: Path, dataset, model_metadata) -> dict:
    out = tmp_path_factory.mktemp("openvino")
    return {"fp32": openvino_runtime.convert_onnx(onnx_fp32, out / "openvino-fp32.xml", model_metadata),
            "int8": openvino_runtime.quantize_nncf(onnx_fp32, dataset.splits["train"].images, out / "openvino-int8.xml",
                                                   model_metadata, samples=16)}


def test_openvino_fp32_reproduces_the_onnx_export(openvino_files, onnx_fp32: Path, dataset) -> None:
    from tasks.onnx_runtime import open_predictor, runtime_of

    images = dataset.splits["test"].images
    assert runtime_of(openvino_files["fp32"]) == "openvino" and runtime_of(onnx_fp32) == "onnxruntime"
    onnx_logits = open_predictor(onnx_fp32)(images)
    openvino_logits = open_predictor(openvino_files["fp32"])(images)
    assert openvino_logits.shape == onnx_logits.shape
    np.testing.assert_allclose(openvino_logits, onnx_logits, atol=1e-4)
    # Batch 1 and a full batch run on the same compiled model (dynamic batch axis kept).
    np.testing.assert_allclose(open_predictor(openvino_files["fp32"])(images[:1]), onnx_logits[:1], atol=1e-4)


def test_openvino_files_carry_vitrail_metadata_and_their_precision(openvino_files, model_metadata) -> None:
    from tasks.onnx_runtime import read_any_metadata

    for kind, path in openvino_files.items():
        assert read_any_metadata(path) == model_metadata
        assert openvino_runtime.inference_precision(path) == kind
        assert openvino_runtime.bin_file(path).is_file()
    # No half-written IR (temporary folders) is left beside the results.
    assert sorted(p.suffix for p in openvino_files["fp32"].parent.iterdir()) == [".bin", ".bin", ".xml", ".xml"]


def test_nncf_int8_is_smaller_and_agrees_with_fp32(openvino_files, onnx_fp32: Path, dataset) -> None:
    from tasks.onnx_runtime import open_predictor

    images = dataset.splits["test"].images
    fp32 = open_predictor(onnx_fp32)(images)
    int8 = open_predictor(openvino_files["int8"])(images)
    size = {k: p.stat().st_size + openvino_runtime.bin_file(p).stat().st_size for k, p in openvino_files.items()}
    assert size["int8"] < 0.6 * size["fp32"]
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    assert 0 < np.abs(int8 - fp32).max() < 0.5 * np.abs(fp32).max()


def test_foreign_ir_without_metadata_is_an_error_naming_it(tmp_path: Path, onnx_fp32: Path) -> None:
    import openvino as ov

    path = tmp_path / "foreign.xml"
    ov.save_model(ov.convert_model(str(onnx_fp32)), str(path))
    with pytest.raises(ValueError, match="foreign.xml.*no Vitrail metadata"):
        openvino_runtime.read_metadata(path)


def test_profiles_name_their_runtimes_and_refuse_others() -> None:
    from tasks.compression.profiles import budget_violations, get_profile

    cpu, jetson = get_profile("cpu-2core"), get_profile("jetson-orin-nano")
    assert "openvino" in cpu.runtimes and "onnxruntime" in cpu.runtimes
    assert "openvino" not in jetson.runtimes
    assert budget_violations(cpu, "int8", 1.0, None, 1000, "openvino") == []
    assert any("runtime openvino" in p for p in budget_violations(jetson, "int8", 1.0, None, 1000, "openvino"))
    assert cpu.as_dict()["runtimes"] == list(cpu.runtimes)


# --- drops on the gate's score, with intervals --------------------------------------------------------


def _outcomes(labels: np.ndarray, predicted: np.ndarray, k: int) -> SampleOutcomes:
    logits = np.eye(k, dtype=np.float32)[predicted]
    return collect_outcomes(lambda x: logits[x[:, 0, 0, 0].astype(int)], np.arange(len(labels), dtype=np.float32)
                            .reshape(-1, 1, 1, 1), labels, k, "classification", batch_size=7)


def test_confusion_scores_match_the_evaluation_reports() -> None:
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    report = score_classification(labels, predicted, ("a", "b", "c"))
    outcomes = _outcomes(labels, predicted, 3)
    accuracy, macro_f1 = scores_from_confusions(outcomes.confusion.sum(0, keepdims=True), "classification")
    assert accuracy[0] == pytest.approx(report.accuracy) and macro_f1[0] == pytest.approx(report.macro_f1)
    masks, maps = rng.integers(-1, 3, (6, 8, 8)), rng.integers(0, 3, (6, 8, 8))
    seg = score_segmentation(masks, maps, ("bg", "x", "y"))
    logits = np.eye(3, dtype=np.float32)[maps].transpose(0, 3, 1, 2)
    seg_outcomes = collect_outcomes(lambda x: logits[x[:, 0, 0, 0].astype(int)],
                                    np.arange(6, dtype=np.float32).reshape(-1, 1, 1, 1), masks, 3, "segmentation")
    pixel_accuracy, foreground = scores_from_confusions(seg_outcomes.confusion.sum(0, keepdims=True), "segmentation")
    assert pixel_accuracy[0] == pytest.approx(seg.pixel_accuracy) and foreground[0] == pytest.approx(seg.foreground_iou)


def test_drop_is_the_larger_of_accuracy_and_gate_score_drops_with_an_interval() -> None:
    # 300 samples, a rare class (30 samples): the candidate gets 10 of them wrong. Accuracy falls
    # 3.3 points, macro-F1 much more: the drop judged is the macro-F1 one.
    labels = np.array([0] * 150 + [1] * 120 + [2] * 30)
    candidate = labels.copy()
    candidate[-10:] = 0
    reference, worse = _outcomes(labels, labels, 3), _outcomes(labels, candidate, 3)
    drop = score_drop(reference, worse, replicates=400, seed=1)
    assert drop.accuracy_drop == pytest.approx(10 / 300)
    assert drop.gate_drop > drop.accuracy_drop and drop.drop == drop.gate_drop and drop.gate_metric == "macro_f1"
    assert 0 < drop.drop_low < drop.drop < drop.drop_high
    same = score_drop(reference, reference, replicates=50)
    assert same.drop == 0 and same.drop_low == 0 and same.drop_high == 0
    with pytest.raises(ValueError, match="different sample counts"):
        score_drop(reference, _outcomes(labels[:10], labels[:10], 3))


def test_edge_choice_picks_runtime_and_variant_together() -> None:
    from tasks.compression.measure import VariantMeasurement
    from tasks.compression.profiles import get_profile
    from tasks.compression.recipe import select_edge_variant

    labels = np.array([0, 1] * 5)
    images = np.zeros((10, 1, 2, 2), dtype=np.float32)
    right = np.eye(2, dtype=np.float32)[labels]

    def row(name: str, p50: float, runtime: str) -> VariantMeasurement:
        return VariantMeasurement(name=name, format="onnx", accuracy=0, macro_f1=0, latency_ms_p50=p50,
                                  latency_ms_p95=p50, throughput=1, size_bytes=1, precision="int8", runtime=runtime)

    measured = [row("onnx-fp32", 6.0, "onnxruntime"), row("onnx-int8", 4.0, "onnxruntime"),
                row("openvino-int8", 2.0, "openvino")]
    predictors = {name: (lambda x: right) for name in ("onnx-fp32", "onnx-int8", "openvino-int8")}
    reasons: dict = {}
    assert select_edge_variant(measured, predictors, lambda x: right, images, labels, ("a", "b"), 0.01,
                               get_profile("cpu-2core"), reasons) == "openvino-int8"
    # A device without OpenVINO gets the fastest variant of a runtime it has, and says why.
    reasons = {}
    assert select_edge_variant(measured, predictors, lambda x: right, images, labels, ("a", "b"), 0.01,
                               get_profile("jetson-orin-nano"), reasons) == "onnx-int8"
    assert any("runtime openvino" in r for r in reasons["openvino-int8"])


def test_openvino_edge_model_registers_with_its_runtime_and_predicts_offline(tmp_path: Path, openvino_files,
                                                                              trained_model, dataset,
                                                                              model_metadata) -> None:
    import mlflow
    from mlflow_isolation import mlflow_sandbox

    from tasks import tracking
    from tasks.prediction import load_model
    from tasks.training import predict_logits

    with mlflow_sandbox() as patch:
        patch.chdir(tmp_path)
        tracking.configure_tracking(tmp_path)
        experiment = tracking.ensure_experiment("satellite", tmp_path)
        with mlflow.start_run(experiment_id=experiment):
            uri = tracking.log_edge_model(openvino_files["fp32"], {**model_metadata, "variant": "openvino-fp32"},
                                          np.zeros((1, 3, 16, 16), dtype=np.float32))
        flavor, metadata = tracking.model_flavor(uri)
        assert flavor == "openvino" and metadata["runtime"] == "openvino" and metadata["variant"] == "openvino-fp32"
        model = load_model(uri)
        images = dataset.splits["test"].images[:]
        assert model.flavor == "openvino" and model.class_names == dataset.info.class_names
        np.testing.assert_allclose(model.predict_logits(images), predict_logits(trained_model, images), atol=1e-4)

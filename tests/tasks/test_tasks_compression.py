"""Edge compression: ONNX export and parity, embedded metadata, int8 quantization, the compress stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tasks_support import make_samples, new_model

from tasks.atomic_files import is_partial
from tasks.compression.export import ParityError, check_parity, compare_logits
from tasks.compression.quantize import (
    CalibrationError,
    QuantizationParams,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from tasks.compression.recipe import BASELINE, CompressParams, compress_model
from tasks.onnx_runtime import INPUT_NAME, OUTPUT_NAME, open_session, read_metadata, session_predictor, write_metadata
from tasks.training import predict_logits

REPORT_KEYS = {"accuracy", "latency_ms_p50", "latency_ms_p95", "throughput", "size_bytes", "speedup_vs_fp32", "runtime",
               "drop", "drop_low", "drop_high"}


def openvino_names() -> list[str]:
    """The reference model's OpenVINO variants the cpu-2core profile builds on this CPU."""
    from tasks import openvino_runtime

    return ["openvino-fp32", "openvino-int8"] + (["openvino-bf16"] if openvino_runtime.supports_bf16() else [])


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    return session_predictor(open_session(path, threads=2))(images)


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory: pytest.TempPathFactory, onnx_fp32: Path, dataset) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("int8")
    static = quantize_int8_static(onnx_fp32, dataset.splits["train"].images, out / "model-int8.onnx",
                                  QuantizationParams(calibration_samples=32))
    dynamic = quantize_int8_dynamic(onnx_fp32, out / "model-int8-dynamic.onnx")
    return {"static": static, "dynamic": dynamic}


# --- export and parity -------------------------------------------------------------------------------


def test_export_reproduces_the_torch_model(onnx_fp32: Path, trained_model, dataset) -> None:
    images = dataset.splits["test"].images
    report = check_parity(trained_model, onnx_fp32, images, tolerance=1e-4)
    assert report.passed and report.max_abs_diff < 1e-4
    assert report.agreement == 1.0 and report.samples == len(images)
    assert report.as_dict()["passed"] is True


def test_export_has_named_io_and_a_dynamic_batch(onnx_fp32: Path, trained_model, dataset) -> None:
    session = open_session(onnx_fp32)
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    images = dataset.splits["test"].images
    for batch in (1, 5, len(images)):
        logits = onnx_logits(onnx_fp32, images[:batch])
        assert logits.shape == (batch, 3)
        np.testing.assert_allclose(logits, predict_logits(trained_model, images[:batch]), atol=1e-4)


def test_parity_fails_against_a_different_model(onnx_fp32: Path, dataset) -> None:
    other = new_model(dataset, seed=123).eval()
    report = check_parity(other, onnx_fp32, dataset.splits["test"].images, tolerance=1e-3)
    assert not report.passed and report.max_abs_diff > 1e-3
    assert report.as_dict()["passed"] is False


def test_compare_logits_statistics() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.5], [0.0, 0.9]])
    report = compare_logits(reference, candidate, tolerance=0.2)
    assert report.max_abs_diff == pytest.approx(0.5) and report.mean_abs_diff == pytest.approx(0.15)
    assert report.agreement == 1.0 and not report.passed
    assert compare_logits(reference, reference[:, ::-1], 1.0).agreement == 0.0


# --- metadata ----------------------------------------------------------------------------------------


def test_metadata_round_trips_through_the_onnx_file(onnx_fp32: Path, model_metadata: dict) -> None:
    assert read_metadata(onnx_fp32) == model_metadata


def test_write_metadata_replaces_the_vitrail_entry_and_keeps_others(tmp_path: Path, onnx_fp32: Path) -> None:
    path = tmp_path / "copy.onnx"
    model = onnx.load(str(onnx_fp32))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "author": "unit test"})
    onnx.save(model, str(path))
    write_metadata(path, {"tile_size": 32})
    assert read_metadata(path) == {"tile_size": 32}
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["author"] == "unit test" and json.loads(props["vitrail"]) == {"tile_size": 32}


def plain_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_read_metadata_of_a_foreign_onnx_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = plain_onnx(tmp_path / "foreign.onnx")
    with pytest.raises(ValueError, match="no Vitrail metadata") as caught:
        read_metadata(path)
    assert str(path) in str(caught.value)


# --- quantization ------------------------------------------------------------------------------------


@pytest.mark.parametrize("calibration", [np.empty((0, 3, 16, 16), np.float32), None])
def test_static_quantization_without_calibration_tiles_is_an_error(tmp_path: Path, onnx_fp32: Path,
                                                                   calibration) -> None:
    with pytest.raises(CalibrationError, match="no calibration tiles"):
        quantize_int8_static(onnx_fp32, calibration, tmp_path / "int8.onnx", QuantizationParams())
    assert not (tmp_path / "int8.onnx").exists()


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_int8_models_are_smaller_and_agree_with_fp32(int8_files: dict[str, Path], onnx_fp32: Path, dataset,
                                                     model_metadata: dict, kind: str) -> None:
    path = int8_files[kind]
    assert path.stat().st_size < 0.5 * onnx_fp32.stat().st_size
    images = np.concatenate([dataset.splits["test"].images, dataset.splits["val"].images])
    reference = onnx_logits(onnx_fp32, images)
    quantized = onnx_logits(path, images)
    assert (reference.argmax(1) == quantized.argmax(1)).mean() >= 0.9
    assert np.abs(reference - quantized).max() < 0.5 * np.abs(reference).max()
    assert read_metadata(path) == model_metadata  # the metadata survives quantization
    assert not [p.name for p in path.parent.iterdir() if is_partial(p)]  # intermediates are cleaned up


def test_static_quantization_quantizes_matmuls(int8_files: dict[str, Path]) -> None:
    ops = {node.op_type for node in onnx.load(str(int8_files["static"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "Softmax" in ops  # kept in float, as the module promises


# --- the compress stage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compress_report(tmp_path_factory: pytest.TempPathFactory, trained_model, dataset_dir: Path,
                    model_metadata: dict):
    params = CompressParams(latency_repeats=5, throughput_batch=4, threads=2,
                            quantization=QuantizationParams(calibration_samples=16))
    return compress_model(trained_model, dataset_dir, model_metadata, params, tmp_path_factory.mktemp("compress"))


@pytest.mark.slow
def test_compress_model_measures_every_variant(compress_report, dataset) -> None:
    names = [v.name for v in compress_report.variants]
    assert names == [BASELINE, "onnx-fp32", "onnx-int8", "onnx-int8-dynamic", *openvino_names()]
    assert {compress_report.variant(n).runtime for n in openvino_names()} == {"openvino"}
    assert compress_report.variant("onnx-int8").runtime == "onnxruntime"
    # Drops are max(accuracy drop, gate-score drop) with a bootstrap interval around them.
    for variant in compress_report.variants:
        assert variant.drop_low <= variant.drop + 1e-9 <= variant.drop_high + 2e-9
    assert compress_report.variant("openvino-fp32").drop == pytest.approx(0.0, abs=1e-9)
    for variant in compress_report.variants:
        row = variant.as_dict()
        assert REPORT_KEYS <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["size_bytes"] > 0
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p95"] and row["throughput"] > 0
    baseline = compress_report.variant(BASELINE)
    assert baseline.speedup_vs_fp32 == 1.0 and baseline.parity_max_abs_diff is None
    assert compress_report.variant("onnx-fp32").accuracy == baseline.accuracy
    assert compress_report.variant("onnx-int8").size_bytes < compress_report.variant("onnx-fp32").size_bytes
    for name in ("onnx-fp32", "onnx-int8", "onnx-int8-dynamic", *openvino_names()):
        assert compress_report.variant(name).parity_max_abs_diff == compress_report.parity[name].max_abs_diff
        assert compress_report.files[name].is_file()
    assert compress_report.parity["onnx-fp32"].passed
    assert compress_report.test_samples == len(dataset.splits["test"])


@pytest.mark.slow
def test_compress_report_is_json_serialisable(compress_report, tmp_path: Path) -> None:
    payload = json.loads(json.dumps(compress_report.to_json()))
    assert payload["baseline"] == BASELINE and payload["edge_variant"] in ("onnx-fp32", "onnx-int8", "onnx-int8-dynamic",
                                                                         *openvino_names())
    assert payload["edge_runtime"] == compress_report.variant(payload["edge_variant"]).runtime
    assert [v["name"] for v in payload["variants"]] == [v.name for v in compress_report.variants]
    assert payload["edge_accuracy_drop"] == pytest.approx(
        compress_report.variant(BASELINE).accuracy - compress_report.variant("onnx-int8").accuracy)
    assert payload["int8_vs_fp32_latency_ratio"] > 0
    assert set(payload["parity"]) == {"onnx-fp32", "onnx-int8", "onnx-int8-dynamic", *openvino_names()}
    written = compress_report.write(tmp_path / "compress_report.json")
    assert json.loads(written.read_text()) == payload


@pytest.mark.slow
def test_compress_model_rejects_an_export_outside_the_parity_tolerance(tmp_path: Path, dataset_dir: Path, dataset,
                                                                       onnx_fp32: Path, model_metadata: dict,
                                                                       monkeypatch) -> None:
    import shutil

    from tasks.compression import export as exporting

    # Stand in for a broken exporter: the "export" of this model is the ONNX file of another model.
    def wrong_export(model, example, path, metadata):
        return Path(shutil.copyfile(onnx_fp32, path))

    monkeypatch.setattr(exporting, "export_onnx", wrong_export)
    with pytest.raises(ParityError, match="differs from the torch model"):
        compress_model(new_model(dataset, seed=321).eval(), dataset_dir, model_metadata,
                       CompressParams(latency_repeats=5), tmp_path)
    # An export outside the tolerance is never published under the variant's name, nor left half-written.
    assert not (tmp_path / "model-fp32.onnx").exists() and not (tmp_path / "model-int8.onnx").exists()
    assert not [p.name for p in tmp_path.iterdir() if is_partial(p)]


# --- validation of the variants ----------------------------------------------------------------------


def test_validate_variants_scores_every_variant_on_the_test_split(tmp_path: Path, dataset_dir: Path, dataset,
                                                                  trained_model, onnx_fp32: Path,
                                                                  int8_files: dict[str, Path]) -> None:
    from tasks.validation import REFERENCE, validate_variants

    result = validate_variants(dataset_dir, trained_model, {"onnx-fp32": onnx_fp32, "onnx-int8": int8_files["static"]},
                               tmp_path / "plots")
    assert set(result.reports) == {REFERENCE, "onnx-fp32", "onnx-int8"}
    test = dataset.splits["test"]
    expected = (predict_logits(trained_model, test.images).argmax(1) == test.labels).mean()
    assert result.reports[REFERENCE].accuracy == pytest.approx(expected)
    assert result.reports["onnx-fp32"] == result.reports[REFERENCE]
    assert all(report.samples == len(test) for report in result.reports.values())
    assert all(path.is_file() and path.read_bytes()[:4] == b"\x89PNG" for path in result.plots.values())
    flat = result.flat_metrics()
    assert flat["onnx-int8.test_macro_f1"] == result.reports["onnx-int8"].macro_f1
    assert flat["torch-fp32.test_f1_water"] == result.reports[REFERENCE].per_class["water"]["f1"]


def test_validate_variants_needs_a_labelled_test_split(tmp_path: Path, trained_model) -> None:
    from tasks.dataset import SplitParams, write_dataset
    from tasks.validation import validate_variants

    unlabelled = make_samples(n_groups=2)
    unlabelled.labels[:] = -1
    write_dataset(unlabelled, "satellite", "classification", tmp_path / "unlabelled", SplitParams())
    with pytest.raises(ValueError, match="no labelled test split"):
        validate_variants(tmp_path / "unlabelled", trained_model, {}, tmp_path / "plots")


def test_auto_edge_choice_is_the_fastest_variant_within_the_accuracy_budget() -> None:
    import numpy as np

    from tasks.compression.measure import VariantMeasurement
    from tasks.compression.recipe import select_edge_variant

    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    images = np.zeros((10, 1, 2, 2), dtype=np.float32)
    right = np.eye(2, dtype=np.float32)[labels]
    one_wrong = right.copy()
    one_wrong[0] = one_wrong[0][::-1]

    def row(name: str, p50: float) -> VariantMeasurement:
        return VariantMeasurement(name=name, format="onnx", accuracy=0, macro_f1=0, latency_ms_p50=p50,
                                  latency_ms_p95=p50, throughput=1, size_bytes=1)

    measured = [row("onnx-fp32", 6.0), row("onnx-int8", 4.0), row("onnx-int8-dynamic", 5.0)]
    predictors = {"onnx-fp32": lambda x: right, "onnx-int8": lambda x: one_wrong, "onnx-int8-dynamic": lambda x: right}
    reference = lambda x: right  # noqa: E731
    # int8 static is fastest but one wrong tile in ten costs 0.101 macro-F1 (the score the gate uses):
    # outside a 1-point budget, inside an 11-point one.
    assert select_edge_variant(measured, predictors, reference, images, labels, ("a", "b"), 0.01) == "onnx-int8-dynamic"
    assert select_edge_variant(measured, predictors, reference, images, labels, ("a", "b"), 0.10) == "onnx-int8-dynamic"
    assert select_edge_variant(measured, predictors, reference, images, labels, ("a", "b"), 0.11) == "onnx-int8"
    # When every quantized variant is out of budget the parity-checked fp32 export is the fallback.
    predictors["onnx-int8-dynamic"] = lambda x: one_wrong
    assert select_edge_variant(measured, predictors, reference, images, labels, ("a", "b"), 0.0) == "onnx-fp32"


# --- the compress stage with a recipe ----------------------------------------------------------------


@pytest.mark.slow
def test_compress_model_runs_the_recipe_and_measures_every_step(tmp_path: Path, trained_model, dataset_dir: Path,
                                                                model_metadata: dict) -> None:
    from tasks.compression.prune import PruneParams
    from tasks.compression.tokens import TokenReductionParams

    params = CompressParams(latency_repeats=5, throughput_batch=4, edge_variant="recipe", fp16=True,
                            quantization=QuantizationParams(calibration_samples=16),
                            pruning=PruneParams(enabled=True, ratio=0.5, recovery_epochs=1),
                            token_reduction=TokenReductionParams(method="tome", merge_r=4, min_tokens=4))
    report = compress_model(trained_model, dataset_dir, model_metadata, params, tmp_path)
    names = [v.name for v in report.variants]
    assert names == [BASELINE, "onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "onnx-fp16", *openvino_names(),
                     "pruned50", "pruned50-tome-r4", "pruned50-tome-r4-int8", "pruned50-tome-r4-openvino-int8"]
    # 'recipe' takes the recipe's last step on the faster of the profile's runtimes.
    last = ("pruned50-tome-r4-int8", "pruned50-tome-r4-openvino-int8")
    assert report.edge_variant == min(last, key=lambda n: report.variant(n).latency_ms_p50)
    assert params.recipe_label() == "export+int8+prune+tome+int8"
    for name in names[1:]:
        assert report.parity[name].samples > 0 and report.files[name].is_file()
    assert report.variant("pruned50-tome-r4-openvino-int8").runtime == "openvino"
    row = report.variant("pruned50")
    assert row.params < report.variant(BASELINE).params and row.macs < report.variant(BASELINE).macs
    assert report.variant("onnx-fp16").precision == "fp16"
    payload = json.loads(json.dumps(report.to_json()))
    assert payload["profile"]["name"] == "cpu-2core" and payload["profile"]["measured"] is True
    assert [r["stage"] for r in payload["recipe"]][-1] == "quantize"
    assert report.plot is not None and report.plot.read_bytes()[:4] == b"\x89PNG"


def test_compress_model_rejects_an_unknown_edge_variant_name(tmp_path: Path, trained_model, dataset_dir: Path,
                                                             model_metadata: dict) -> None:
    params = CompressParams(latency_repeats=5, throughput_batch=2, edge_variant="recipe",
                            quantization=QuantizationParams(calibration_samples=8))
    with pytest.raises(ValueError, match="needs at least one enabled recipe step"):
        compress_model(trained_model, dataset_dir, model_metadata, params, tmp_path)


# --- crash safety: kill -9 in the middle of a compress run, then rerun --------------------------------

KILLED_COMPRESSOR = """
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {support!r})
from tasks_support import new_model
from tasks.compression.quantize import QuantizationParams
from tasks.compression.recipe import CompressParams, compress_model
from tasks.dataset import load_dataset

real_replace = os.replace


def stalled_rename(source, target):
    # Stall just before the static int8 file is renamed into place: the parent's kill -9 lands here.
    if Path(target).name == "model-int8.onnx":
        time.sleep(120)
    real_replace(source, target)


os.replace = stalled_rename
dataset_dir, weights, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
model = new_model(load_dataset(dataset_dir))
model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
params = CompressParams(latency_repeats=5, throughput_batch=4, threads=2,
                        quantization=QuantizationParams(calibration_samples=16))
compress_model(model.eval(), dataset_dir, json.loads(sys.argv[4]), params, out)
"""


@pytest.mark.slow
def test_kill_9_mid_compress_then_rerun_completes_without_using_partial_files(
        tmp_path: Path, trained_model, dataset_dir: Path, model_metadata: dict, compress_report) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from tasks.atomic_files import is_partial

    weights = tmp_path / "reference.pt"
    torch.save(trained_model.state_dict(), weights)
    out = tmp_path / "compress"
    script = tmp_path / "compressor.py"
    script.write_text(KILLED_COMPRESSOR.format(support=str(Path(__file__).parent)))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(Path(__file__).parent)]), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(dataset_dir), str(weights), str(out),
                              json.dumps(model_metadata)], env=env, cwd=repo, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)

    def partials() -> list[Path]:
        return [p for p in out.iterdir() if is_partial(p)] if out.is_dir() else []

    deadline = time.monotonic() + 300
    while not any(p.name.startswith(".model-int8.onnx") for p in partials()):
        assert child.poll() is None, f"compress child exited early: {child.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "compress child did not reach the kill point in time"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    assert (out / "model-fp32.onnx").is_file() and not (out / "model-int8.onnx").exists()
    assert partials()  # the killed run's temporary int8 file is still there, under a name nothing reads
    onnx_logits(out / "model-fp32.onnx", np.zeros((1, 3, 16, 16), np.float32))  # finished files are whole

    params = CompressParams(latency_repeats=5, throughput_batch=4, threads=2,
                            quantization=QuantizationParams(calibration_samples=16))
    rerun = compress_model(trained_model, dataset_dir, model_metadata, params, out)
    assert not partials()
    assert set(rerun.files) == {"onnx-fp32", "onnx-int8", "onnx-int8-dynamic", *openvino_names()}
    for name, path in rerun.files.items():
        if path.suffix == ".xml":  # OpenVINO IRs are built after the kill point
            continue
        # Byte-identical to an uninterrupted run elsewhere: nothing of the killed run leaked into the rerun.
        assert path.read_bytes() == compress_report.files[name].read_bytes(), name

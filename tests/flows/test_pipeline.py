"""End-to-end: the real pipeline flow on every domain's tiny real-format example, with a tiny ViT and a temporary MLflow store."""

import json

import numpy as np
import pytest
import rasterio

from domains import domain_names, get_domain

TINY = dict(
    tiling={"tile_size": 8, "stride": 8, "block_size": 16},
    split={"val_fraction": 0.2, "test_fraction": 0.25, "seed": 0},
    backbone={"name": "vit_tiny_patch16_224", "patch_size": 4, "depth": 1},
    lora={"rank": 4, "alpha": 8},
    train={"epochs": 2, "batch_size": 16},
    compression={"latency_repeats": 5, "throughput_batch": 4, "quantization": {"calibration_samples": 8}},
    gate={"min_metric": 0.0, "max_drop_vs_fp32": 1.0, "latency_budget_ms": 10000},
)


@pytest.mark.slow
def test_pipeline_registers_champion_and_writes_georeferenced_prediction(tmp_path, local_mlflow):
    from mlflow import MlflowClient

    from flows.pipeline import PipelineParams, pipeline
    from tasks.tracking import configure_tracking

    example = get_domain("satellite").write_example(tmp_path / "example")
    workdir = tmp_path / "work"
    params = PipelineParams(source=str(example["scene_dir"]), labels=str(example["labels"]), workdir=str(workdir), **TINY)
    first = pipeline(params)

    # Promotion: first passing candidate becomes champion of both registered models.
    assert first.promote.passed and first.promote.alias == "champion"
    configure_tracking(workdir)
    client = MlflowClient()
    edge = client.get_model_version_by_alias("satellite-tile-classification-edge", "champion")
    ref = client.get_model_version_by_alias("satellite-tile-classification", "champion")
    assert edge.tags["vitrail.gate"] == "passed" and str(ref.version) == "1"

    # Every stage run carries lineage tags; finetune records the dataset as an input.
    finetune_run = client.get_run(first.finetune.run_id)
    assert finetune_run.data.tags["vitrail.dataset_digest"] == first.ingest.digest
    assert finetune_run.data.tags["vitrail.prefect_flow_run_id"] not in ("", "none")
    assert finetune_run.data.tags["vitrail.git_commit"]
    assert [d.dataset.digest for d in finetune_run.inputs.dataset_inputs] == [first.ingest.digest[:36]]
    history = client.get_metric_history(first.finetune.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]

    # The compress report lists every variant with the public keys, also as a file in the workdir.
    report = json.loads((workdir / "compress_report.json").read_text())
    names = {v["name"] for v in report["variants"]}
    assert {"torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-dynamic"} <= names
    for variant in report["variants"]:
        assert {"accuracy", "latency_ms_p50", "latency_ms_p95", "throughput", "size_bytes", "speedup_vs_fp32"} <= set(variant)
    assert report["parity"]["onnx-fp32"]["passed"] is True
    int8 = next(v for v in report["variants"] if v["name"] == "onnx-int8")
    fp32 = next(v for v in report["variants"] if v["name"] == "onnx-fp32")
    assert int8["size_bytes"] < fp32["size_bytes"]

    # The prediction map has the scene's 10 m grid: same CRS, transform and shape.
    [output] = first.predict.outputs
    reference_band = next(example["scene_dir"].glob("*B02*.tif"))
    with rasterio.open(output) as pred, rasterio.open(reference_band) as band:
        assert pred.crs == band.crs
        assert pred.transform == band.transform
        assert (pred.height, pred.width) == (band.height, band.width)
        classes = pred.read(1)
    assert set(np.unique(classes)) <= {0, 1, 2, 255}

    # A second candidate is compared with the champion: it keeps or takes the title, never both lost.
    second = pipeline(params)
    assert second.promote.alias in ("champion", "challenger")
    holders = {alias: str(client.get_model_version_by_alias("satellite-tile-classification-edge", alias).version)
               for alias in ([second.promote.alias] + (["champion"] if second.promote.alias == "challenger" else []))}
    assert holders[second.promote.alias] == "2"


@pytest.mark.slow
def test_failing_gate_registers_without_alias(tmp_path, local_mlflow, monkeypatch):
    import tempfile

    from mlflow import MlflowClient

    from flows.pipeline import PipelineParams, pipeline
    from tasks.tracking import configure_tracking

    example = get_domain("satellite").write_example(tmp_path / "example")
    workdir = tmp_path / "work"
    scratch = tmp_path / "tmp"  # the temporary folders the stages use while they run
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    strict = {**TINY, "gate": {"min_metric": 0.0, "max_drop_vs_fp32": 1.0, "latency_budget_ms": 1e-6}}
    receipt = pipeline(PipelineParams(source=str(example["scene_dir"]), labels=str(example["labels"]),
                                      workdir=str(workdir), **strict))
    # validate downloaded the compress run's variants beside its artifacts; nothing is left once it ends
    assert not [p.name for p in scratch.iterdir() if p.name.endswith("-onnx") or p.name.startswith("vitrail-variants-")]
    assert not receipt.promote.passed and receipt.promote.alias is None
    assert any("over budget" in reason for reason in receipt.promote.reasons)
    configure_tracking(workdir)
    version = MlflowClient().get_model_version("satellite-tile-classification-edge", "1")
    assert version.aliases == [] and version.tags["vitrail.gate"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in domain_names() if n != "satellite"])  # satellite: test_pipeline.py
def test_pipeline_runs_end_to_end_on_the_domains_example(name, tmp_path, local_mlflow):
    from flows.pipeline import PipelineParams, pipeline
    from tasks.evaluation import PRIMARY_METRICS
    from tasks.promotion import AUTO_GATE_METRIC

    spec = get_domain(name)
    # AUROC needs both outcomes of every finding in the test split, which the 4-patient radiology example
    # cannot give; its synthetic demo studies (80 patients, about a second to write) can.
    example = (spec.prepare_demo if spec.task == "multilabel" else spec.write_example)(tmp_path / "example")
    receipt = pipeline(PipelineParams(domain=name, source=str(example["source"]), labels=str(example["labels"]),
                                      workdir=str(tmp_path / "work"), **TINY))
    task = spec.task
    assert receipt.promote.passed and receipt.promote.alias == "champion", receipt.promote.reasons
    assert f"torch-fp32.test_{AUTO_GATE_METRIC[task]}" in receipt.validation.metrics
    assert f"onnx-fp32.test_{PRIMARY_METRICS[task]}" in receipt.validation.metrics
    assert receipt.predict.outputs and not receipt.predict.failed
    assert all(output.endswith(spec.prediction_suffix) for output in receipt.predict.outputs)

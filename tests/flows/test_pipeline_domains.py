"""End-to-end: the same pipeline flow on every domain's tiny real-format example, whatever its task."""

import pytest

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

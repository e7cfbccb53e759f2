"""The command line: every verb has --help, and bad input ends with a clear one-line error."""

import subprocess
import sys

import pytest

from flows.cli import build_parser, main

VERBS = ["demo", "domains", "ingest", "finetune", "compress", "validate", "promote", "predict", "pipeline"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vitrail " + verb in capsys.readouterr().out


def test_console_script_help_is_fast_and_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in VERBS:
        assert verb in out


def test_domains_lists_the_registry(capsys):
    assert main(["domains"]) == 0
    assert "satellite" in capsys.readouterr().out


def test_ingest_missing_source_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-scene"
    code = main(["ingest", "--source", str(missing), "--out", str(tmp_path / "ds")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "error" in err


def test_override_must_be_key_value():
    from flows.cli import _apply_overrides

    assert _apply_overrides({}, ["train.epochs=3", "lora.target_modules=[\"qkv\",\"fc1\"]"]) == {
        "train": {"epochs": 3}, "lora": {"target_modules": ["qkv", "fc1"]}}
    with pytest.raises(SystemExit):
        _apply_overrides({}, ["train.epochs"])


def test_demo_summary_names_the_tasks_scores_and_shortens_long_prediction_lists(tmp_path):
    import json
    from types import SimpleNamespace

    import numpy as np

    from domains import Channel, SampleSet
    from flows.cli import _demo_summary
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(0)
    samples = SampleSet(images=rng.random((12, 1, 4, 4), dtype=np.float32),
                        labels=rng.integers(0, 2, (12, 2)).astype(np.int8),
                        groups=np.array([f"p{i // 2}" for i in range(12)]), locations=np.zeros((12, 2), int),
                        source="synthetic", channels=(Channel("image"),), class_names=("a", "b"), task="multilabel")
    write_dataset(samples, "radiology", "multilabel", tmp_path / "ds", SplitParams())
    row = {"name": "onnx-fp32", "accuracy": 0.91, "latency_ms_p50": 5.0, "throughput": 100.0, "size_bytes": 2e6,
           "speedup_vs_fp32": 2.0}
    report = tmp_path / "compress_report.json"
    report.write_text(json.dumps({"variants": [row], "threads": 2, "int8_vs_fp32_latency_ratio": 0.5,
                                  "edge_variant": "onnx-fp32"}))
    outputs = [str(tmp_path / "predictions" / f"study-{i}.json") for i in range(5)]
    receipt = SimpleNamespace(
        ingest=SimpleNamespace(dataset=str(tmp_path / "ds"), digest="0" * 64),
        compress=SimpleNamespace(report=str(report)),
        promote=SimpleNamespace(alias="champion", edge_model="radiology-findings-edge/1",
                                reference_model="radiology-findings/1"),
        predict=SimpleNamespace(outputs=outputs), validation=SimpleNamespace(task="multilabel", metrics={}))
    text = _demo_summary(receipt, tmp_path)
    assert "macro_auroc 0.910" in text and "within the macro_auroc budget" in text
    assert "5 files in" in text and "study-4.json" not in text
    # A slide model's rows are slides: accuracy and AUROC over slides, throughput in bags.
    receipt.validation = SimpleNamespace(task="slide-classification", metrics={"onnx-fp32.test_macro_auroc": 0.875})
    text = _demo_summary(receipt, tmp_path)
    assert "slide accuracy 0.910" in text and "bags/s" in text and "slide AUROC 0.875" in text
    assert "within the macro_auroc budget" in text

"""The compression benchmark end to end on the tests' tiny model: every runtime, drops with intervals, goals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")


@pytest.mark.slow
def test_benchmark_measures_every_runtime_and_judges_goals_on_the_gate_score(tmp_path: Path, trained_model, dataset,
                                                                             model_metadata: dict) -> None:
    from tasks.benchmarks.compression import PEER, format_table, measure_all

    options = {"repeats": "10", "throughput_batch": "4", "distill_epochs": "1", "recovery_epochs": "0",
               "student_depth": "1", "min_samples": "10"}
    result = measure_all(trained_model, model_metadata, dataset, tmp_path, options)
    rows = {v["name"]: v for v in result["variants"]}
    assert {"torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-dynamic", "openvino-fp32", PEER} <= set(rows)
    assert {v["runtime"] for v in rows.values()} >= {"torch", "onnxruntime", "openvino"}
    # The recipe reaches both runtimes; every hop of it is a row.
    recipe = [v for v in rows.values() if "distill" in v.get("steps", [])]
    assert {v["runtime"] for v in recipe} == {"onnxruntime", "openvino"}
    for row in rows.values():
        low, high = row["drop_interval"]
        assert row["drop"] == pytest.approx(max(row["accuracy_drop"], row["gate_drop"]))
        assert low <= row["drop"] + 1e-9 and row["drop"] <= high + 1e-9 or not np.isfinite(low)
        assert row["throughput"] > 0 and row["latency_ms_p50"] > 0 and row["size_bytes"] > 0
    assert rows["torch-fp32"]["drop"] == 0 and rows["openvino-fp32"]["drop"] == pytest.approx(0, abs=1e-9)
    assert rows[PEER]["memory_bytes"] is not None and rows[PEER]["parity_max_abs_diff"] is not None
    # The edge choice picked a (runtime, variant) pair; the goals name the peer ratio and intervals.
    assert result["edge"]["variant"] in rows
    goals = result["goals"]
    assert set(goals) == {"int8", "recipe", "peer"}
    assert goals["peer"]["ratio"] == pytest.approx(rows[PEER]["latency_ms_p50"]
                                                   / rows[result["edge"]["variant"]]["latency_ms_p50"])
    assert goals["int8"]["variant"] in ("onnx-int8", "onnx-int8-dynamic", PEER)
    assert result["test_samples"] == len(dataset.splits["test"])  # synthetic groups: the dataset's own split
    assert "no single tiled source" in result["held_out"]["note"]
    table = format_table(json.loads(json.dumps(result)))
    assert "goal peer" in table and "not measured" in table and PEER in table

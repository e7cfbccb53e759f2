"""The on-board benchmark on a small (256 x 256 x 285) capture with a hand-built ONNX model (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _tiny_edge_model(path):
    """A 1x1 convolution ONNX model: plume logit rises with the methane channel (last of 4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tasks.onnx_runtime import write_metadata

    weight = np.zeros((2, 4, 1, 1), dtype=np.float32)
    weight[1, 3] = 1.0 / 500.0
    bias = np.array([0.0, -2.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, 16, 16])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    write_metadata(path, {"domain": "hyperspectral", "tile_size": 16, "class_names": ["background", "plume"],
                          "channels": [{"name": "red", "wavelength_nm": 640.0}, {"name": "green", "wavelength_nm": 550.0},
                                       {"name": "blue", "wavelength_nm": 460.0}, {"name": "ch4_mag1c"}]})
    return path


def test_benchmark_runs_side_by_side_on_a_small_capture(tmp_path):
    from tasks.benchmarks import onboard

    model = _tiny_edge_model(tmp_path / "edge.onnx")
    result = onboard.run_benchmark(tmp_path, {"size": "small", "model_file": str(model), "threads": "2",
                                              "rounds": "1"})
    assert result["capture_shape"] == {"lines": 256, "samples": 256, "bands": 285}
    for key in ("capture_seconds", "peak_rss_mb", "reference_seconds", "speedup_vs_reference"):
        assert result[key] > 0
    assert 0.5 < result["enhancement_correlation"] <= 1.0
    assert result["mask_iou_vs_reference"] is None or 0.0 <= result["mask_iou_vs_reference"] <= 1.0
    assert result["plume_pixels"] > 0 and result["mask_iou_vs_truth"] > 0.2
    json.dumps(result)  # the CLI writes it as JSON
    table = onboard.format_table(result)
    assert "capture seconds" in table and "enhancement correlation" in table
    # The cascade: the enhancement product screened the tiles, the model saw only candidates.
    assert 0 < result["vit_tiles"] < result["tiles"] and result["vit_tile_share"] == pytest.approx(
        result["vit_tiles"] / result["tiles"], abs=1e-4)
    assert set(result["stage_seconds"]) == {"read_and_products", "screening", "vit", "tile_assembly", "write"}
    assert result["model_runtime"] == "onnxruntime"
    assert set(result["goals"]) == {"mask_iou_vs_truth", "speedup_vs_reference", "peak_rss_below_reference"}
    assert "reached the ViT" in table and "goal speedup_vs_reference" in table
    # A second run reuses the cached capture instead of generating it again.
    cached = onboard.ensure_capture(tmp_path / "bench", "small", 0)
    assert cached["source"].stat().st_mtime == (tmp_path / "bench" / "onboard-capture-small-seed0" / "capture.hdr").stat().st_mtime


def test_benchmark_without_a_model_tells_the_user_to_run_the_demo(tmp_path):
    from tasks.benchmarks import onboard

    with pytest.raises(FileNotFoundError, match="vitrail demo --domain hyperspectral"):
        onboard.run_benchmark(tmp_path, {"size": "tiny"})

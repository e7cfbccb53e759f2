"""bench peft: one row per method, trained by the one loop, with counts, scores and export parity."""

from __future__ import annotations

from pathlib import Path

from tasks.benchmarks.peft import format_table, run_benchmark


def test_two_methods_for_one_epoch_give_two_complete_rows(tmp_path: Path) -> None:
    options = {"methods": "adaptformer,vpt-deep", "epochs": "1", "samples": "96", "tile": "16", "depth": "1",
               "batch_size": "16", "prompt_tokens": "2", "threads": "1",
               "isolate": "0"}  # in this process: the children's start-up would double the test's time
    result = run_benchmark(tmp_path, options)
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"adaptformer", "vpt-deep"}, result["rows"]
    assert not rows["adaptformer"]["mergeable"] and not rows["vpt-deep"]["mergeable"]
    for row in rows.values():
        assert "error" not in row, row
        assert 0 < row["trainable_params"] < row["total_params"]
        assert 0 < row["trainable_share"] < 1
        assert 0.0 <= row["val_score"] <= 1.0 and 0.0 <= row["test_score"] <= 1.0
        assert row["seconds_per_epoch"] > 0 and row["peak_rss_mb"] > 0
        assert row["onnx_parity_max_abs"] <= 1e-4
    # Both train the same head and patch embedding; VPT-deep adds 2 prompts x 192 on its one block,
    # AdaptFormer a 64-wide bottleneck beside the block's MLP (2 x 192 x 64 + 64 + 192).
    assert rows["adaptformer"]["trainable_params"] - rows["vpt-deep"]["trainable_params"] == 2 * 192 * 64 + 64 + 192 - 2 * 192
    table = format_table(result)
    assert "adaptformer" in table and "vpt-deep" in table and "ONNX" in table

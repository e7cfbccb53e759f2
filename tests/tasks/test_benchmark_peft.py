"""bench peft: one row per method, trained by the one loop, with counts, scores and export parity."""

from __future__ import annotations

from pathlib import Path

from tasks.benchmarks.peft import format_table, run_benchmark


def test_two_methods_for_one_epoch_give_two_complete_rows(tmp_path: Path) -> None:
    options = {"methods": "bitfit,vpt-deep", "epochs": "1", "samples": "96", "tile": "16", "depth": "1",
               "batch_size": "16", "prompt_tokens": "2", "threads": "1",
               "isolate": "0"}  # in this process: the children's start-up would double the test's time
    result = run_benchmark(tmp_path, options)
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"bitfit", "vpt-deep"}, result["rows"]
    assert rows["bitfit"]["mergeable"] and not rows["vpt-deep"]["mergeable"]
    for row in rows.values():
        assert "error" not in row, row
        assert 0 < row["trainable_params"] < row["total_params"]
        assert 0 < row["trainable_share"] < 1
        assert 0.0 <= row["val_score"] <= 1.0 and 0.0 <= row["test_score"] <= 1.0
        assert row["seconds_per_epoch"] > 0 and row["peak_rss_mb"] > 0
        assert row["onnx_parity_max_abs"] <= 1e-4
    # VPT-deep with 2 prompts on one 192-wide block trains 384 values more than the 4-class head (and
    # patch embedding); BitFit adds every bias.
    assert rows["vpt-deep"]["trainable_params"] != rows["bitfit"]["trainable_params"]
    table = format_table(result)
    assert "bitfit" in table and "vpt-deep" in table and "ONNX" in table

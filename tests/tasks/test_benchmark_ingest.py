"""The ingest benchmark's mosaic scenes are real, aligned Sentinel-2 band folders, and one size runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.satellite.scene import inspect_scene
from tasks.benchmarks import ingest


def test_mosaic_scene_tiles_the_demo_crop_on_one_grid(tmp_path: Path) -> None:
    import rasterio

    from domains.satellite.demo import demo_scene_dir

    scene = ingest.write_mosaic_scene(1440, tmp_path / "mosaic")
    layout = inspect_scene(scene["source"], None, None, None)
    assert layout.shape == (1440, 1440) and len(layout.bands) == 13
    by_name = {b.name: b for b in layout.bands}
    assert by_name["B05"].shape == (720, 720) and by_name["B01"].shape == (240, 240)
    with rasterio.open(next(demo_scene_dir().glob("*_B04.tif"))) as demo:
        crop, demo_transform = demo.read(1), demo.transform
    with rasterio.open(by_name["B04"].path) as mosaic:
        assert mosaic.transform == demo_transform
        band = mosaic.read(1)
    # Every quarter of the mosaic is the demo crop itself.
    for top in (0, 720):
        for left in (0, 720):
            np.testing.assert_array_equal(band[top : top + 720, left : left + 720], crop)
    assert ingest.source_native_bytes(scene["source"]) == 2 * (4 * 1440**2 + 6 * 720**2 + 3 * 240**2)
    # A second call reuses the finished scene.
    assert ingest.write_mosaic_scene(1440, tmp_path / "mosaic") == scene


@pytest.mark.slow
def test_benchmark_runs_one_size(tmp_path: Path) -> None:
    result = ingest.run_benchmark(tmp_path, {"sizes": "1440", "modes": "decode,reader,ingest", "rounds": "1"})
    row = result["rows"][0]
    assert row["ingest"]["cpu_seconds"] > 0 and len(row["ingest"]["rounds_seconds"]) == 1
    assert row["size"] == 1440 and row["ingest"]["samples"] == row["reader"]["samples"] > 0
    assert row["peak_rss_mb"] > 0 and row["dataset_to_source_native"] > 0
    assert 0 < row["raw_decode_megapixels_per_second"]
    assert not (tmp_path / "bench" / "ingest-datasets" / "mosaic-1440").exists()
    table = ingest.format_table(result)
    assert "1440^2 px  ingest" in table and result["cpu"] in table


def test_each_mode_reports_its_median_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    # Stand-in children (the real ones run in subprocesses, covered by the slow test): seconds by call order.
    seconds = iter([3.0, 1.0, 2.0])

    def fake_child(mode: str, spec: dict) -> dict:
        calls.append(mode)
        return {"seconds": next(seconds), "cpu_seconds": 1.0, "peak_rss_mb": 10.0 * len(calls)}

    monkeypatch.setattr(ingest, "_run_child", fake_child)
    result = ingest.run_benchmark(tmp_path, {"sizes": "720", "modes": "decode", "rounds": "3",
                                             "warmup": "0"})
    row = result["rows"][0]["decode"]
    assert calls == ["decode"] * 3
    assert row["seconds"] == 2.0 and row["rounds_seconds"] == [3.0, 1.0, 2.0] and row["peak_rss_mb"] == 30.0
    with pytest.raises(ValueError, match="rounds 0"):
        ingest.run_benchmark(tmp_path, {"sizes": "720", "modes": "decode", "rounds": "0"})

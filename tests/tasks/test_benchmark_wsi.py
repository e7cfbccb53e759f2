"""The wsi benchmark's slide is a real 40x-like pyramid, and a small run measures both readers on the same tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domains.histopathology.slide import open_slide
from tasks.benchmarks import wsi


def test_bench_slide_is_a_jpeg_pyramid_at_a_quarter_micron(tmp_path: Path) -> None:
    import tifffile

    info = wsi.write_bench_slide(1500, tmp_path / "slide.tif", sample=tmp_path / "absent.svs")
    assert info["content"] == "synthetic tissue texture" and info["levels"] == [1, 4, 16]
    with tifffile.TiffFile(info["path"]) as tif:
        assert all(page.compression == 7 and page.is_tiled for page in tif.pages)  # 7: JPEG
    with open_slide(info["path"]) as slide:
        g = slide.geometry
        assert (g.width, g.height) == (1500, 1500) and g.mpp_x == pytest.approx(0.25)
        assert [lv[:2] for lv in g.levels] == [(1500, 1500), (375, 375), (94, 94)]
        assert g.format.startswith("openslide:generic-tiff")
        # Levels agree like a scanner's: the 1 um/px level is the 0.25 um/px level block-averaged.
        fine = slide.read_region(0, 0, 256, 0.25)
        coarse = slide._read_level(1, 0, 0, 64, 64)
        from PIL import Image

        assert np.abs(np.asarray(Image.fromarray(fine).reduce(4)).astype(int) - coarse).mean() < 6
    # A finished slide is reused, not rewritten.
    assert wsi.write_bench_slide(1500, tmp_path / "slide.tif", sample=tmp_path / "absent.svs") == info


@pytest.mark.slow
def test_small_benchmark_measures_both_readers_on_the_same_tiles(tmp_path: Path) -> None:
    result = wsi.run_benchmark(tmp_path, {"size": "3000"})
    json.dumps(result)
    assert (tmp_path / "bench" / "wsi-slides").is_dir()
    mask, tiles, naive = result["mask"], result["tiles"], result["naive"]
    assert 0 < mask["tissue_tiles"] <= mask["grid_tiles"] and mask["seconds"] > 0
    assert tiles["tiles"] == naive["tiles"] == mask["tissue_tiles"]
    assert tiles["peak_rss_mb"] > 0 and naive["tiles_per_second"] > 0
    assert result["same_pixels"]["max_abs_diff"] <= 2
    assert result["speedup_vs_naive"] == pytest.approx(tiles["tiles_per_second"] / naive["tiles_per_second"])
    table = wsi.format_table(result)
    assert "iter_tiles" in table and "naive read" in table and result["cpu"] in table

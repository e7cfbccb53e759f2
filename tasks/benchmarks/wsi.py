"""Whole-slide benchmark: tissue-mask time, tile extraction speed and peak memory, against a naive OpenSlide read.

``vitrail bench wsi --workdir DIR [--set KEY=VALUE ...]`` writes a 40x-like slide (0.25 um/px, JPEG tiles of
256 px, pyramid levels at downsample 1, 4 and 16 as a scanner stores them) under ``DIR/bench/wsi-slides``
(kept for later runs), its content tiled from the CC0 CMU-1-Small-Region slide bundled with the demo (``domains/histopathology/demo_data``) when
present (a synthetic tissue texture otherwise), and measures, each in a fresh subprocess so that its peak
resident memory (VmHWM) is its own:

* ``mask``: thumbnail at ``thumb_mpp`` from the low-resolution level plus the tissue mask, and the grid of
  tiles holding at least ``min_tissue`` tissue (saved for the next two measurements);
* ``tiles``: every tissue tile, ``tile_size`` px at ``mpp`` um/px, through ``Slide.iter_tiles`` (region reads,
  a few threads), batches discarded;
* ``naive``: the same tiles the way a naive loop does it: one ``OpenSlide.read_region`` per tile at level 0
  (``tile_size * mpp / slide_mpp`` px square), converted to RGB and shrunk to ``tile_size`` (same BOX filter).

Tiles per second count the reading loop only (opening the slide is reported apart, as ``open_seconds``);
tiles per CPU second (user + system time of all the child's threads) stay meaningful on a shared machine.
A few tiles from both paths are compared pixel by pixel, so the speed-up is for the same output.
Options: ``size`` (level-0 side, default 20000), ``tile_size`` (224), ``mpp`` (0.5), ``slide_mpp`` (0.25),
``thumb_mpp`` (8), ``min_tissue`` (0.5), ``batch`` (64), ``workers`` (reader threads; default the reader's),
``modes`` (``mask,tiles,naive``), ``naive_limit`` (measure the naive read on at most this many tiles; 0: all),
``sample`` (the slide whose pixels are tiled; default the CC0 sample bundled with the demo).
The CPU count reported is the process's affinity mask, so ``taskset -c 0,1 vitrail bench wsi ...`` measures
two cores on a larger machine.
Goals (issue 11): at least 250 tiles/s on 2 cores, peak RSS at most 1 GiB, at least 2x the naive read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from domains.histopathology.slide import usable_cpus
from tasks.benchmarks._process_metrics import cpu_seconds, peak_rss_mb
from tasks.reproducibility import cpu_model

GOALS = {"tiles_per_second_min": 250.0, "peak_rss_mb_max": 1024.0, "speedup_vs_naive_min": 2.0}
MODES = ("mask", "tiles", "naive")
LEVEL_FACTORS = (1, 4, 16)
TILE = 256
JPEG_QUALITY = 80
SAMPLE = Path(__file__).resolve().parents[2] / "domains" / "histopathology" / "demo_data" / "CMU-1-Small-Region.svs"


def _texture(sample: Path | None):
    """The repeating content (uint8 RGB, sides multiples of 16): the real sample's pixels, or a synthetic one."""
    import numpy as np

    if sample is not None and sample.exists():
        import openslide

        with openslide.OpenSlide(str(sample)) as slide:
            width, height = slide.dimensions
            rgb = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
        return rgb[: height // 16 * 16, : width // 16 * 16], "CMU-1-Small-Region.svs (tiled)"
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 2048
    # Tissue islands (low-frequency noise above a level) with nuclei-sized speckle, on glass.
    coarse = rng.random((side // 128, side // 128))
    islands = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC))
    tissue = islands > 110
    speckle = rng.random((side, side)) < 0.25
    rgb = np.where(speckle[..., None], np.array([150, 90, 170]), np.array([225, 140, 185]))
    rgb = np.where(tissue[..., None], rgb, np.array([242, 242, 242]))
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, "synthetic tissue texture"


def write_bench_slide(size: int, path: Path, slide_mpp: float = 0.25, sample: Path | None = SAMPLE) -> dict:
    """Write a ``size`` x ``size`` pyramidal JPEG-tiled TIFF at ``slide_mpp`` (levels 1/4/16), tile by tile.

    Each level is the repeating content block-averaged by the level's factor, so levels agree like a
    scanner's. Memory stays at the content plus one tile row whatever ``size``. Reused when complete.
    """
    import numpy as np
    import tifffile
    from PIL import Image

    done = path.with_suffix(".json")
    if done.exists() and path.exists():
        return json.loads(done.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    texture, content = _texture(sample)

    def tiles(factor: int, side: int):
        block = texture if factor == 1 else np.asarray(Image.fromarray(texture).reduce(factor))
        height, width = block.shape[:2]
        for top in range(0, side, TILE):
            rows = block[np.arange(top, top + TILE) % height]
            for left in range(0, side, TILE):
                yield rows[:, np.arange(left, left + TILE) % width]

    start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, factor in enumerate(LEVEL_FACTORS):
            side = -(-size // factor)
            per_cm = 1e4 / (slide_mpp * factor)
            tif.write(tiles(factor, side), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                      photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", subfiletype=0 if index == 0 else 1,
                      metadata=None, maxworkers=os.cpu_count())
    info = {"path": str(path), "size": size, "slide_mpp": slide_mpp, "levels": list(LEVEL_FACTORS),
            "tile": TILE, "jpeg_quality": JPEG_QUALITY, "content": content, "bytes": path.stat().st_size,
            "write_seconds": time.perf_counter() - start}
    done.write_text(json.dumps(info))
    return info


def _child_mask(spec: dict) -> dict:
    import numpy as np

    from domains.histopathology.slide import open_slide, tile_grid
    from domains.histopathology.tissue import tissue_fraction, tissue_mask

    start = time.perf_counter()
    with open_slide(spec["slide"]) as slide:
        thumb = slide.thumbnail(spec["thumb_mpp"])
        thumb_seconds = time.perf_counter() - start
        mask = tissue_mask(thumb, spec["thumb_mpp"])
        seconds = time.perf_counter() - start
        g = slide.geometry
        grid = tile_grid(g, spec["tile_size"], spec["mpp"])
        fraction = tissue_fraction(mask, grid, spec["tile_size"] * spec["mpp"] / g.mpp_x, g.mpp_x)
    origins = grid[fraction >= spec["min_tissue"]]
    np.save(spec["origins"], origins)
    return {"seconds": seconds, "thumbnail_seconds": thumb_seconds, "thumbnail_shape": list(thumb.shape),
            "tissue_fraction": mask.tissue_fraction, "grid_tiles": int(len(grid)), "tissue_tiles": int(len(origins))}


def _child_tiles(spec: dict) -> dict:
    import numpy as np

    from domains.histopathology.slide import open_slide

    origins = np.load(spec["origins"])
    workers = int(spec["workers"]) if spec.get("workers") else None
    count = 0
    checksum = 0
    opened = time.perf_counter()
    with open_slide(spec["slide"], workers=workers) as slide:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for tiles, _ in slide.iter_tiles(origins, spec["tile_size"], spec["mpp"], batch=spec["batch"]):
            count += len(tiles)
            checksum += int(tiles[:, 0, 0, 0].sum())  # touch the output
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
    return {"seconds": seconds, "open_seconds": start - opened, "tiles": count, "tiles_per_second": count / seconds,
            "cpu_seconds": cpu, "tiles_per_cpu_second": count / max(cpu, 1e-9), "checksum": checksum}


def _naive_tile(raw, x: int, y: int, span: int, size: int):
    import numpy as np
    from PIL import Image

    region = raw.read_region((int(x), int(y)), 0, (span, span)).convert("RGB")
    return np.asarray(region.resize((size, size), Image.Resampling.BOX))


def _child_naive(spec: dict) -> dict:
    import numpy as np
    import openslide

    origins = np.load(spec["origins"])
    if spec.get("naive_limit"):
        origins = origins[: int(spec["naive_limit"])]
    span = int(round(spec["tile_size"] * spec["mpp"] / spec["slide_mpp"]))
    opened = time.perf_counter()
    with openslide.OpenSlide(spec["slide"]) as raw:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for x, y in origins:
            _naive_tile(raw, x, y, span, spec["tile_size"])
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_start
    return {"seconds": seconds, "open_seconds": start - opened, "tiles": int(len(origins)),
            "tiles_per_second": len(origins) / seconds, "cpu_seconds": cpu,
            "tiles_per_cpu_second": len(origins) / max(cpu, 1e-9)}


def _compare_paths(spec: dict, count: int = 16) -> dict:
    """Largest pixel difference between the two paths' tiles, on ``count`` tissue tiles spread over the slide."""
    import numpy as np
    import openslide

    from domains.histopathology.slide import open_slide

    origins = np.load(spec["origins"])
    span = int(round(spec["tile_size"] * spec["mpp"] / spec["slide_mpp"]))
    # Tiles reaching past the slide's edge differ by design: white here, black from RGBA -> RGB there.
    with openslide.OpenSlide(spec["slide"]) as raw:
        width, height = raw.dimensions
    origins = origins[(origins[:, 0] + span <= width) & (origins[:, 1] + span <= height)]
    if len(origins) == 0:
        return {"tiles": 0, "max_abs_diff": None}
    pick = origins[np.linspace(0, len(origins) - 1, min(count, len(origins))).astype(int)]
    worst = 0
    with open_slide(spec["slide"]) as slide, openslide.OpenSlide(spec["slide"]) as raw:
        for x, y in pick:
            ours = slide.read_region(int(x), int(y), spec["tile_size"], spec["mpp"])
            naive = _naive_tile(raw, x, y, span, spec["tile_size"])
            worst = max(worst, int(np.abs(ours.astype(int) - naive).max()))
    return {"tiles": int(len(pick)), "max_abs_diff": worst}


def _run_child(mode: str, spec: dict) -> dict:
    command = [sys.executable, "-m", "tasks.benchmarks.wsi", mode, json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"wsi benchmark child '{mode}' failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Write (or reuse) the benchmark slide and measure the mask, the tile reader and the naive read."""
    size = int(options.get("size", 20000))
    slide_mpp = float(options.get("slide_mpp", 0.25))
    modes = [m for m in options.get("modes", ",".join(MODES)).split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    bench = Path(workdir) / "bench"
    sample = Path(options["sample"]) if options.get("sample") else SAMPLE
    slide = write_bench_slide(size, bench / "wsi-slides" / f"pyramid-{size}-{slide_mpp:g}.tif", slide_mpp, sample)
    spec = {"slide": slide["path"], "slide_mpp": slide_mpp, "tile_size": int(options.get("tile_size", 224)),
            "mpp": float(options.get("mpp", 0.5)), "thumb_mpp": float(options.get("thumb_mpp", 8.0)),
            "min_tissue": float(options.get("min_tissue", 0.5)), "batch": int(options.get("batch", 64)),
            "workers": options.get("workers", ""), "naive_limit": int(options.get("naive_limit", 0)),
            "origins": str(bench / "wsi-slides" / f"tissue-tiles-{size}.npy")}
    result: dict = {"cpu": cpu_model(), "cpu_count": usable_cpus(), "slide": slide,
                    "options": {k: v for k, v in spec.items() if k not in ("slide", "origins")} | {"size": size},
                    "goals": GOALS}
    # The tile list comes from the mask run; tiles/naive need it even when mask is not measured.
    result["mask"] = _run_child("mask", spec)
    for mode in modes:
        if mode != "mask":
            result[mode] = _run_child(mode, spec)
    if "tiles" in result and "naive" in result:
        result["speedup_vs_naive"] = result["tiles"]["tiles_per_second"] / result["naive"]["tiles_per_second"]
        result["same_pixels"] = _compare_paths(spec)
    if "tiles" in result:
        result["goals_met"] = {
            "tiles_per_second": result["tiles"]["tiles_per_second"] >= GOALS["tiles_per_second_min"],
            "peak_rss": result["tiles"]["peak_rss_mb"] <= GOALS["peak_rss_mb_max"],
        }
        if "speedup_vs_naive" in result:
            result["goals_met"]["speedup_vs_naive"] = result["speedup_vs_naive"] >= GOALS["speedup_vs_naive_min"]
    return result


def format_table(result: dict) -> str:
    """The measurements as a plain-text table, with the goals and the CPU."""
    slide = result["slide"]
    lines = [f"CPU: {result['cpu']} ({result['cpu_count']} cores)",
             f"slide: {slide['size']}^2 px at {slide['slide_mpp']} um/px, levels {slide['levels']}, JPEG q{slide['jpeg_quality']} "
             f"{slide['tile']} px tiles, {slide['bytes'] / 2**20:.0f} MiB, content: {slide['content']}",
             f"options: {result['options']}", ""]
    header = f"{'measurement':>12} {'seconds':>8} {'tiles':>7} {'tiles/s':>8} {'CPU s':>7} {'tiles/CPU s':>11} {'peak RSS MB':>12}"
    lines += [header, "-" * len(header)]
    mask = result.get("mask")
    if mask:
        lines.append(f"{'tissue mask':>12} {mask['seconds']:>8.2f} {mask['tissue_tiles']:>7} {'':>8} {'':>7} {'':>11} "
                     f"{mask['peak_rss_mb']:>12.0f}")
    for mode, label in (("tiles", "iter_tiles"), ("naive", "naive read")):
        if mode in result:
            m = result[mode]
            lines.append(f"{label:>12} {m['seconds']:>8.2f} {m['tiles']:>7} {m['tiles_per_second']:>8.1f} "
                         f"{m['cpu_seconds']:>7.2f} {m['tiles_per_cpu_second']:>11.1f} {m['peak_rss_mb']:>12.0f}")
    if mask:
        lines.append(f"tissue fraction {mask['tissue_fraction']:.2f}; thumbnail {mask['thumbnail_shape']} in "
                     f"{mask['thumbnail_seconds']:.2f} s; {mask['tissue_tiles']} of {mask['grid_tiles']} grid tiles kept")
    if "speedup_vs_naive" in result:
        same = result["same_pixels"]
        lines.append(f"iter_tiles / naive: {result['speedup_vs_naive']:.2f}x (largest pixel difference on "
                     f"{same['tiles']} tiles: {same['max_abs_diff']})")
    lines.append(f"goals: >= {GOALS['tiles_per_second_min']:.0f} tiles/s, peak RSS <= {GOALS['peak_rss_mb_max']:.0f} MB, "
                 f">= {GOALS['speedup_vs_naive_min']:.0f}x the naive read; met: {result.get('goals_met', {})}")
    return "\n".join(lines)


def _child_main(mode: str, payload: str) -> None:
    spec = json.loads(payload)
    result = {"mask": _child_mask, "tiles": _child_tiles, "naive": _child_naive}[mode](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])

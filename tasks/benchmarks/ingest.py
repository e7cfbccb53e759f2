"""Ingest benchmark: peak memory and speed of satellite ingest on scenes of growing size, side by side.

``vitrail bench ingest --workdir DIR [--set KEY=VALUE ...]`` builds Sentinel-2 scenes as mosaics of the
bundled 720 x 720 demo crop (13 band GeoTIFFs at their native 10/20/60 m resolution, one consistent
transform, a tiled label raster beside them) and, for each size, runs three measurements, each in a fresh
subprocess so that its peak resident memory (the kernel's VmHWM) is its own:

* ``decode``: a plain rasterio read of the same band files, window by window, on one thread, nothing
  else (no resampling of the 20 m and 60 m bands): the physical limit of any single-threaded ingest of
  these files on this machine. Windows are whole block rows of each file (GDAL decodes every block a window
  touches, and keeps none between reads: a window ending inside a block row would decode it twice). The reader reads a strip's files on two threads and the writer compresses
  on two more, so on a machine with more cores than two the comparison flatters the ingest somewhat;
* ``reader``: the satellite domain's streaming reader as ingest runs it (20 m and 60 m bands handed as their
  coarse patches, not upsampled), iterating its batches and discarding them;
* ``ingest``: the real ``build_dataset`` (reader + dataset writer) into ``DIR/bench/ingest-datasets``.

Megapixels are those of the 10 m working grid (H x W), the same for all three, so the speeds compare.
Each child imports its libraries and runs once on a small scene before its clock starts (process start-up
is no ingest work), and reports wall seconds and CPU seconds (all threads). The modes run interleaved for
``rounds`` rounds and each reports its median round: load from elsewhere on the machine falls on all three
alike.
Options: ``sizes`` (comma-separated scene sides, default ``1440,2880,5760,11520``; multiples of 720),
``tile_size`` (224), ``stride`` (tile_size), ``block_size`` (2 x tile_size), ``batch_samples`` (64),
``modes`` (``decode,reader,ingest``), ``rounds`` (3), ``warmup`` (1: each child first runs its mode,
untimed, on a 1440^2 scene; 0 skips that), ``keep`` (0: delete each dataset once measured; 1 keeps them).
Goals (issue 10): ingest peak RSS at most 1.5 GB at full Sentinel-2 size and within 1.3x between
2880^2 and the largest scene; ingest at least half the raw decode speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tasks.benchmarks._process_metrics import cpu_seconds, load_average, peak_rss_mb
from tasks.reproducibility import cpu_model

DEMO_SIDE = 720
# Scene side of each child's untimed warm-up run (big enough to fill every split of a dataset).
WARMUP_SIDE = 1440
DEFAULT_SIZES = "1440,2880,5760,11520"
GOALS = {"peak_rss_mb_max": 1536.0, "rss_ratio_max": 1.3, "decode_fraction_min": 0.5}
MODES = ("decode", "reader", "ingest")
# Rows read per window by the plain decode, about a reader strip: rounded up to whole block rows of each file.
DECODE_ROWS = 448


def write_mosaic_scene(size: int, folder: Path) -> dict[str, Path]:
    """Write a ``size`` x ``size`` (10 m pixels) Sentinel-2 scene tiling the demo crop, with its labels.

    Each band keeps its native resolution and the demo's file naming; the mosaic starts at the demo's
    origin. Files are tiled (512 px blocks), deflate-compressed GeoTIFFs written one row of copies at a
    time, so writing a full-size scene needs little memory. Returns ``{"source", "labels"}``.
    """
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from domains.satellite.demo import demo_scene_dir, prepare_demo

    if size % DEMO_SIDE:
        raise ValueError(f"scene size {size} must be a multiple of the demo crop's {DEMO_SIDE} px")
    repeats = size // DEMO_SIDE
    scene_dir = folder / "scene"
    done = folder / ".complete"
    if done.exists():
        return {"source": scene_dir, "labels": folder / "labels.tif"}
    shutil.rmtree(folder, ignore_errors=True)
    scene_dir.mkdir(parents=True)
    demo_labels = prepare_demo(folder / "demo")["labels"]
    inputs = [(p, scene_dir / p.name) for p in sorted(demo_scene_dir().glob("*.tif"))]
    inputs.append((demo_labels, folder / "labels.tif"))
    for source, target in inputs:
        with rasterio.open(source) as src:
            crop = src.read(1)
            profile = dict(src.profile)
        height, width = crop.shape
        t = profile["transform"]
        profile.update(driver="GTiff", width=width * repeats, height=height * repeats, tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", predictor=2)
        profile.pop("photometric", None)
        # Same origin and pixel size: the mosaic's bands stay aligned whatever their resolution.
        profile["transform"] = t
        row_of_copies = np.tile(crop, (1, repeats))
        with rasterio.open(target, "w", **profile) as out:
            for copy in range(repeats):
                out.write(row_of_copies, 1, window=Window(0, copy * height, width * repeats, height))
    shutil.rmtree(folder / "demo", ignore_errors=True)
    done.touch()
    return {"source": scene_dir, "labels": folder / "labels.tif"}


def source_native_bytes(scene_dir: Path) -> int:
    """Uncompressed size of the band files in their own dtype and resolution (what the scene stores)."""
    import numpy as np
    import rasterio

    total = 0
    for path in sorted(scene_dir.glob("*.tif")):
        with rasterio.open(path) as ds:
            total += ds.width * ds.height * ds.count * np.dtype(ds.dtypes[0]).itemsize
    return total


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _child_decode(spec: dict) -> dict:
    """Read every band in windows of whole block rows (about a reader strip each) and discard the pixels."""
    import rasterio
    from rasterio.windows import Window

    from domains.satellite.strips import GDAL_CACHE_MB

    scene_dir = Path(spec["source"])
    start, cpu = time.perf_counter(), cpu_seconds()
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        datasets = [rasterio.open(p) for p in sorted(scene_dir.glob("*.tif"))]
        for ds in datasets:
            block_rows = ds.block_shapes[0][0]
            step = block_rows * -(-DECODE_ROWS // block_rows)
            for first in range(0, ds.height, step):
                ds.read(1, window=Window(0, first, ds.width, min(step, ds.height - first)))
        for ds in datasets:
            ds.close()
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu}


def _request(spec: dict):
    from domains.spec import IngestRequest

    # Coarse bands as patches, as ingest reads them (build_dataset asks for that itself).
    return IngestRequest(source=Path(spec["source"]), labels=Path(spec["labels"]), tile_size=spec["tile_size"],
                         stride=spec["stride"], block_size=spec["block_size"], batch_samples=spec["batch_samples"],
                         coarse_as_patches=True)


def _child_reader(spec: dict) -> dict:
    """Iterate the streaming reader's batches and discard them."""
    from domains.satellite.tiling import read_samples

    request = _request(spec)
    start, cpu = time.perf_counter(), cpu_seconds()
    samples = batches = 0
    for batch in read_samples(request):
        samples += len(batch.images)
        batches += 1
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu, "samples": samples,
            "batches": batches}


def _child_ingest(spec: dict) -> dict:
    """The real ingest: ``build_dataset`` with the satellite reader into a fresh folder."""
    from domains import get_domain
    from tasks.dataset import SplitParams, build_dataset

    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    request = _request(spec)
    get_domain("satellite")  # domain discovery imports every domain once per process: not ingest work
    start, cpu = time.perf_counter(), cpu_seconds()
    info = build_dataset("satellite", request, out, SplitParams())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "samples": sum(info.split_counts.values()),
            "stored_dtype": info.stored_dtype, "dataset_bytes": _folder_bytes(out)}


def _run_child(mode: str, spec: dict) -> dict:
    command = [sys.executable, "-m", "tasks.benchmarks.ingest", mode, json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ingest benchmark child '{mode}' failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Write the mosaic scenes (once, kept under ``DIR/bench/ingest-scenes``) and measure every size."""
    sizes = [int(s) for s in options.get("sizes", DEFAULT_SIZES).split(",") if s.strip()]
    tile_size = int(options.get("tile_size", 224))
    stride = int(options.get("stride", tile_size))
    block_size = int(options.get("block_size", 2 * tile_size))
    batch_samples = int(options.get("batch_samples", 64))
    modes = [m for m in options.get("modes", ",".join(MODES)).split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    keep = options.get("keep", "0") == "1"
    rounds = int(options.get("rounds", 3))
    if rounds < 1:
        raise ValueError(f"rounds {rounds} must be at least 1")
    bench = Path(workdir) / "bench"
    warmup = None
    if options.get("warmup", "1") == "1":
        small = write_mosaic_scene(WARMUP_SIDE, bench / "ingest-scenes" / f"mosaic-{WARMUP_SIDE}")
        warmup = {"source": str(small["source"]), "labels": str(small["labels"])}
    rows = []
    for size in sizes:
        scene = write_mosaic_scene(size, bench / "ingest-scenes" / f"mosaic-{size}")
        spec = {"source": str(scene["source"]), "labels": str(scene["labels"]), "tile_size": tile_size,
                "stride": stride, "block_size": block_size, "batch_samples": batch_samples,
                "out": str(bench / "ingest-datasets" / f"mosaic-{size}"), "warmup": warmup}
        megapixels = size * size / 1e6
        native = source_native_bytes(scene["source"])
        row: dict = {"size": size, "megapixels": megapixels, "source_native_bytes": native}
        # Rounds interleave the modes, so a burst of load from elsewhere on the machine falls on all of them
        # alike; each mode reports its median round, and the largest peak RSS of its rounds.
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(rounds):
            for mode in modes:
                runs[mode].append(_run_child(mode, spec))
        for mode, results in runs.items():
            median = sorted(results, key=lambda r: r["seconds"])[(len(results) - 1) // 2]
            row[mode] = median | {"megapixels_per_second": megapixels / median["seconds"],
                                  "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                                  "rounds_seconds": [round(r["seconds"], 3) for r in results]}
        if "ingest" in row:
            ingest = row["ingest"]
            row.update(peak_rss_mb=ingest["peak_rss_mb"], seconds=ingest["seconds"],
                       megapixels_per_second=ingest["megapixels_per_second"],
                       dataset_bytes=ingest["dataset_bytes"],
                       dataset_to_source_native=ingest["dataset_bytes"] / native)
            if not keep:
                shutil.rmtree(spec["out"], ignore_errors=True)
        if "decode" in row:
            row["raw_decode_megapixels_per_second"] = row["decode"]["megapixels_per_second"]
            if "ingest" in row:
                row["fraction_of_raw_decode"] = row["megapixels_per_second"] / row["raw_decode_megapixels_per_second"]
        rows.append(row)
    return {
        "cpu": cpu_model(),
        "options": {"sizes": sizes, "tile_size": tile_size, "stride": stride, "block_size": block_size,
                    "batch_samples": batch_samples, "modes": modes, "rounds": rounds},
        "load_average": load_average(),
        "rows": rows,
        "rss_ratio_largest_to_2880": _rss_ratio(rows, "ingest"),
        "reader_rss_ratio_largest_to_2880": _rss_ratio(rows, "reader"),
        "goals": GOALS,
    }


def _rss_ratio(rows: list[dict], mode: str) -> float | None:
    by_size = {r["size"]: r[mode]["peak_rss_mb"] for r in rows if mode in r}
    if 2880 not in by_size or len(by_size) < 2:
        return None
    return by_size[max(by_size)] / by_size[2880]


def format_table(result: dict) -> str:
    """The measurements as a plain-text table, with the goals and the CPU."""
    lines = [f"CPU: {result['cpu']}", f"options: {result['options']}",
             f"load average (1, 5, 15 min) at the end: {result.get('load_average')}", ""]
    header = (f"{'scene':>11} {'mode':>7} {'peak RSS MB':>12} {'seconds':>8} {'CPU s':>7} {'Mpx/s':>8} "
              f"{'vs decode':>9} {'dataset/source':>14}")
    lines.append(header)
    lines.append("-" * len(header))
    for row in result["rows"]:
        decode = row.get("decode", {}).get("megapixels_per_second")
        for mode in MODES:
            if mode not in row:
                continue
            m = row[mode]
            share = f"{m['megapixels_per_second'] / decode:.2f}" if decode else "-"
            ratio = f"{row['dataset_to_source_native']:.2f}" if mode == "ingest" else ""
            cpu = f"{m['cpu_seconds']:.1f}" if "cpu_seconds" in m else "-"
            lines.append(f"{row['size']:>5}^2 px {mode:>7} {m['peak_rss_mb']:>12.0f} {m['seconds']:>8.2f} {cpu:>7} "
                         f"{m['megapixels_per_second']:>8.1f} {share:>9} {ratio:>14}")
    # The goal is the ingest's (what a user runs); the reader alone is shown for reference: its few hundred MB
    # hold full-width strips, so they grow with the scene's width (at most a Sentinel-2 tile's) and its ratio
    # moves more for the same MB.
    for key, label, note in (("rss_ratio_largest_to_2880", "ingest", f"goal <= {GOALS['rss_ratio_max']}"),
                             ("reader_rss_ratio_largest_to_2880", "reader", "for reference")):
        if result.get(key) is not None:
            lines.append(f"{label} peak RSS, largest / 2880^2: {result[key]:.2f} ({note})")
    lines.append(f"goals: ingest peak RSS <= {GOALS['peak_rss_mb_max']:.0f} MB at full size; ingest >= "
                 f"{GOALS['decode_fraction_min']:.0%} of raw decode speed")
    return "\n".join(lines)


def _child_main(mode: str, payload: str) -> None:
    spec = json.loads(payload)
    measure = {"decode": _child_decode, "reader": _child_reader, "ingest": _child_ingest}[mode]
    if spec.get("warmup"):
        # One untimed run on a small scene first, the same for every mode: imports, GDAL driver set-up and
        # other once-per-process work stay out of the timings (a worker ingesting many scenes pays them once).
        warm_out = spec["out"] + "-warmup"
        measure(spec | spec["warmup"] | {"out": warm_out})
        shutil.rmtree(warm_out, ignore_errors=True)
    result = measure(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])

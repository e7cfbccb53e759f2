"""Training data-path benchmark: the lazy DataLoader path against the same steps fed from memory.

``vitrail bench train --workdir DIR [--set KEY=VALUE ...]`` writes a synthetic Sentinel-2-like dataset
with the real writer (:func:`tasks.dataset.write_dataset`; ``samples`` tiles of ``bands`` uint16 bands
at ``tile`` px with per-band scaling) under ``DIR/bench/train-data``, then trains the same model for
the same ``steps`` optimisation steps of ``batch_size`` samples in two ways:

- ``dataloader``: what :func:`tasks.training.fit` does: a per-sample ``SplitSamples`` dataset read
  lazily from the shards, the seeded ``EpochBatches`` plan and a ``DataLoader`` (``workers`` worker
  processes, one run per value listed);
- ``in-memory``: the whole split decoded into memory first, then the same batches built from it: the
  plan's keys, each sample under its own view, collated as the loader collates (``SplitSamples`` over
  in-memory arrays), so both paths feed the model identical tensors and only the pixels' source differs.

Each run is a child process of its own, so ``peak_rss_mb`` (``ru_maxrss``) is that path's alone;
``rss_before_data_mb`` is the child's RSS after imports and model building, before any data is read.
Speed is the batch size over the median step time (data wait included); runs alternate over
``rounds`` rounds and the median of those is kept, so machine noise hits both paths alike. ``ratio`` is dataloader samples/s over in-memory samples/s (goal: at least 0.9).
Options: samples (2048), bands (13), tile (32), batch_size (32), steps (30), rounds (3), workers
("0,2"), threads (2), depth (2: ViT blocks of vit_tiny), seed (0).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

GOAL_RATIO = 0.9
DEFAULTS = {"samples": "2048", "bands": "13", "tile": "32", "batch_size": "32", "steps": "30", "rounds": "3",
            "workers": "0,2", "threads": "2", "depth": "2", "seed": "0"}
REPO = Path(__file__).resolve().parents[2]


def write_bench_dataset(out_dir: Path, samples: int, bands: int, tile: int, seed: int) -> Path:
    """A classification dataset of uint16 tiles with reflectance scaling, written by the real writer."""
    import numpy as np

    from domains import Channel, SampleSet
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(seed)
    classes = ("water", "vegetation", "bare", "built")
    labels = rng.integers(0, len(classes), samples)
    # Digital numbers as Sentinel-2 L2A stores them (reflectance x 10000), class k brighter in band k.
    images = rng.normal(1500, 300, size=(samples, bands, tile, tile))
    images[np.arange(samples), labels % bands] += 2500
    images = images.clip(0, 10000).astype(np.uint16)
    channels = tuple(Channel(f"B{i + 1:02d}", 443.0 + 50 * i, 10.0) for i in range(bands))
    per_group = 16
    groups = np.array([f"blk-{i // per_group}" for i in range(samples)])
    locations = np.stack([np.arange(samples) // 64 * tile, np.arange(samples) % 64 * tile], axis=1).astype(np.int64)
    sample_set = SampleSet(images=images, labels=labels.astype(np.int64), groups=groups, locations=locations,
                           source="bench-scene", channels=channels, class_names=classes,
                           scaling=tuple((1e-4, 0.0) for _ in range(bands)))
    write_dataset(sample_set, "satellite", "classification", out_dir, SplitParams(val_fraction=0.1, test_fraction=0.1))
    return out_dir


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def batch_stream(path: str, train, task: str, plan, params) -> Iterator[tuple]:
    """Endless batches of split ``train`` for ``plan`` (an EpochBatches), epoch after epoch, by one data path.

    ``dataloader``: the training loop's own DataLoader over the lazy split. ``in-memory``: the whole split
    decoded into memory first, then the very batches the loader gives (the same keys, each sample under
    its own view, collated alike): only where the pixels come from differs.
    """
    import numpy as np
    from torch.utils.data import default_collate

    from tasks.dataset import Split
    from tasks.training import SplitSamples, _loader

    epoch = 0
    if path == "dataloader":
        loader = _loader(SplitSamples(train, task), params, pin_memory=False, batch_sampler=plan)
        while True:
            epoch += 1
            plan.set_epoch(epoch)
            yield from loader
    in_memory = SplitSamples(Split(images=np.asarray(train.images[:], dtype=np.float32),
                                   labels=np.asarray(train.labels[:]), groups=train.groups), task)
    while True:
        epoch += 1
        plan.set_epoch(epoch)
        for part in plan:
            yield default_collate(in_memory.__getitems__(part))


def measure_path(dataset_dir: Path, path: str, workers: int, options: dict[str, str]) -> dict:
    """Train ``steps`` steps through one data path in this process; samples/s and memory."""
    import torch

    from tasks.model_inputs import load_dataset_for
    from tasks.models import BackboneParams, build_backbone, network_channels, normalizing_model
    from tasks.reproducibility import pin_determinism
    from tasks.training import EpochBatches, TrainParams, _loss

    seed, steps, batch_size = int(options["seed"]), int(options["steps"]), int(options["batch_size"])
    pin_determinism(seed, int(options["threads"]))
    dataset = load_dataset_for(dataset_dir)  # the stored (raw) units every Vitrail model takes
    info, train = dataset.info, dataset.splits["train"]
    backbone = BackboneParams(name="vit_tiny_patch16_224", patch_size=4, depth=int(options["depth"]))
    model = normalizing_model(build_backbone(backbone, network_channels(info), info.num_classes, info.tile_size,
                                             task=info.task), info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = TrainParams(batch_size=batch_size, num_workers=workers, seed=seed, threads=int(options["threads"]))
    plan = EpochBatches(len(train), batch_size, 1, 0, 1, seed, flips=True,
                        chunked_order=getattr(train.images, "chunk_shuffled_order", None))
    before_data = _current_rss_mb()

    stream = batch_stream(path, train, info.task, plan, params)
    model.train()

    def step() -> None:
        images, labels = next(stream)
        loss = _loss(params, info.task, model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: first allocations, worker start-up, the in-memory copy
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        step()  # the wait for the batch is inside: a slow data path shows here
        durations.append(time.perf_counter() - started)
    return {"path": path, "workers": workers, "steps": steps, "seconds": sum(durations),
            # The median step, not the total: a burst of load from other processes skews a few steps, not it.
            "samples_per_second": batch_size / statistics.median(durations),
            "mean_samples_per_second": steps * batch_size / sum(durations), "peak_rss_mb": _rss_mb(),
            "rss_before_data_mb": before_data}


def _run_child(dataset_dir: Path, path: str, workers: int, options: dict[str, str]) -> dict:
    code = ("import json, sys; from pathlib import Path; from tasks.benchmarks.train import measure_path; "
            "print(json.dumps(measure_path(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(dataset_dir), path, str(workers), json.dumps(options)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"train benchmark child ({path}, {workers} workers) failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Write the dataset, run both paths in alternating child processes, return the comparison."""
    from tasks.reproducibility import cpu_model

    options = {**DEFAULTS, **options}
    data_dir = Path(workdir) / "bench" / "train-data"
    started = time.perf_counter()
    write_bench_dataset(data_dir, int(options["samples"]), int(options["bands"]), int(options["tile"]),
                        int(options["seed"]))
    write_seconds = time.perf_counter() - started
    worker_counts = [int(w) for w in options["workers"].split(",")]
    variants = [("in-memory", 0)] + [("dataloader", w) for w in worker_counts]
    runs: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
    for _ in range(int(options["rounds"])):
        for path, workers in variants:
            runs[(path, workers)].append(_run_child(data_dir, path, workers, options))
    summary = []
    for (path, workers), measured in runs.items():
        summary.append({"path": path, "workers": workers,
                        "samples_per_second": statistics.median(r["samples_per_second"] for r in measured),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in measured),
                        "rss_before_data_mb": statistics.median(r["rss_before_data_mb"] for r in measured),
                        "rounds": [round(r["samples_per_second"], 1) for r in measured]})
    memory = summary[0]["samples_per_second"]
    for row in summary:
        row["ratio_vs_in_memory"] = row["samples_per_second"] / memory
    best = max(summary[1:], key=lambda r: r["ratio_vs_in_memory"])
    from tasks.dataset import read_dataset_info

    info = read_dataset_info(data_dir)
    return {"cpu": cpu_model(), "threads": int(options["threads"]), "options": options,
            "dataset": {"path": str(data_dir), "train_samples": info.split_counts.get("train"),
                        "write_seconds": round(write_seconds, 2),
                        "bytes": sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())},
            "paths": summary,
            "goal": {"ratio_min": GOAL_RATIO, "best_dataloader_workers": best["workers"],
                     "ratio": best["ratio_vs_in_memory"], "met": best["ratio_vs_in_memory"] >= GOAL_RATIO},
            "peak_rss_method": "each path in its own child process: resource.getrusage(RUSAGE_SELF).ru_maxrss "
                               "(interpreter, libraries and model included; rss_before_data_mb is the same child "
                               "before it reads data)"}


def format_table(result: dict) -> str:
    """Both paths as a text table, then the goal."""
    o, d = result["options"], result["dataset"]
    head = f"{'path':<12} {'workers':>7} {'samples/s':>10} {'x memory':>9} {'peak RSS MB':>12} {'RSS before data':>16}"
    lines = [f"train benchmark on {result['cpu']}, {result['threads']} threads: {o['steps']} steps of {o['batch_size']} "
             f"x {o['bands']} bands x {o['tile']} px, vit_tiny depth {o['depth']}; {d['train_samples']} train tiles "
             f"({d['bytes'] / 2**20:.1f} MiB on disk); median of {o['rounds']} alternating rounds", head, "-" * len(head)]
    for row in result["paths"]:
        lines.append(f"{row['path']:<12} {row['workers']:>7} {row['samples_per_second']:>10.1f} "
                     f"{row['ratio_vs_in_memory']:>9.2f} {row['peak_rss_mb']:>12.0f} {row['rss_before_data_mb']:>16.0f}")
    goal = result["goal"]
    lines.append("")
    lines.append(f"goal: dataloader >= {goal['ratio_min']}x in-memory: {goal['ratio']:.2f}x with "
                 f"{goal['best_dataloader_workers']} workers: {'met' if goal['met'] else 'missed'}")
    lines.append(f"peak RSS: {result['peak_rss_method']}")
    return "\n".join(lines)

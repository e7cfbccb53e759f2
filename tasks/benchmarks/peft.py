"""PEFT benchmark: every adapter method trained the same way on the same data, side by side.

``vitrail bench peft --workdir DIR [--set KEY=VALUE ...]`` trains one model per method through the one
training loop (:func:`tasks.training.fit`) on the same dataset, backbone, seed and epoch budget, and writes
``DIR/bench/peft.json`` with a list ``rows``, one per method: ``method``, ``family``, ``trainable_params``
(counted on the model, checked against the method's formula), ``trainable_share`` (of the adapted model's
parameters), ``mergeable``, the validation score of the best epoch and the test score of that model,
``seconds_per_epoch`` (median; validation included), ``peak_rss_mb`` and ``onnx_parity_max_abs`` (the ONNX
export against the unmerged torch model on test tiles; mergeable methods are merged first, so their graph
has no adapter operations). ``full`` (every weight trains) and ``linear-probe`` (the head only) are the
reference rows.

Each method runs in a child process of its own, so its peak RSS (VmHWM) is its alone, and starts from the
same seed. The dataset is ``dataset`` (a written Vitrail dataset: use a task with headroom, where the
linear probe is far from perfect) or, by default, a synthetic one written with the real writer under
``DIR/bench/peft-data-n<samples>-t<tile>-s<seed>``: oriented stripes of random frequency and phase under
noise, four orientations as classes, so a frozen random backbone does not solve it and methods can differ.

Options: methods (every registered method, references first), dataset (path; default synthetic),
samples (768), tile (32), epochs (3), batch_size (32), learning_rate (2e-3), threads (2), seed (0),
backbone (vit_tiny_patch16_224), weights (none|hub|file), weights_file, patch_size (4), depth (2);
adapter knobs targets (qkv; comma-separated; the peft families only), rank (8), prompt_tokens (10), bottleneck
(empty: each method's default),
adapter_scale (0.1), train_patch_embed (1); isolate (1: each method in a child process; 0: all in this
process, faster to start, but then peak RSS is the running maximum over the methods so far).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULTS = {"methods": "", "dataset": "", "samples": "768", "tile": "32", "epochs": "3", "batch_size": "32",
            "learning_rate": "2e-3", "threads": "2", "seed": "0", "backbone": "vit_tiny_patch16_224",
            "weights": "none", "weights_file": "", "patch_size": "4", "depth": "2", "targets": "qkv", "rank": "8",
            "prompt_tokens": "10", "bottleneck": "", "adapter_scale": "0.1", "train_patch_embed": "1", "isolate": "1"}
REFERENCE_METHODS = ("full", "linear-probe")
PARITY_TILES = 32
REPO = Path(__file__).resolve().parents[2]


def registered_methods() -> dict:
    """Every registered adapter method (importing the adapters package registers its families)."""
    import tasks.adapters  # noqa: F401
    import tasks.adapters.custom  # noqa: F401
    from tasks.adapters.registry import METHODS

    return METHODS


def method_names(options: dict[str, str]) -> list[str]:
    """The methods to run: ``methods`` as given, else every registered one with the reference rows first."""
    known = registered_methods()
    if options.get("methods"):
        names = [n.strip() for n in options["methods"].split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            from tasks.request_errors import RequestError

            raise RequestError(f"bench peft: unknown adapter method(s) {', '.join(unknown)}; registered: "
                               f"{', '.join(sorted(known))}")
        return names
    return [n for n in REFERENCE_METHODS if n in known] + sorted(n for n in known if n not in REFERENCE_METHODS)


def write_stripes_dataset(out_dir: Path, samples: int, tile: int, seed: int) -> Path:
    """Oriented stripes (0, 45, 90, 135 degrees) of random frequency, phase and contrast under noise."""
    import numpy as np

    from domains import Channel, SampleSet
    from tasks.dataset import SplitParams, write_dataset

    rng = np.random.default_rng(seed)
    classes = ("stripes-0", "stripes-45", "stripes-90", "stripes-135")
    labels = rng.integers(0, len(classes), samples)
    angles = labels * (np.pi / 4) + rng.normal(0.0, 0.12, samples)  # a little orientation jitter
    frequency = rng.uniform(0.12, 0.3, samples)  # cycles per pixel
    phase = rng.uniform(0, 2 * np.pi, samples)
    contrast = rng.uniform(0.04, 0.15, samples)
    rows, cols = np.mgrid[0:tile, 0:tile].astype(np.float32)
    along = (np.cos(angles)[:, None, None] * cols + np.sin(angles)[:, None, None] * rows)
    pattern = contrast[:, None, None] * np.sin(2 * np.pi * frequency[:, None, None] * along + phase[:, None, None])
    gains = rng.uniform(0.8, 1.2, (samples, 3, 1, 1))  # bands differ in brightness, not in the class signal
    images = 0.3 * gains + pattern[:, None] + rng.normal(0.0, 0.08, (samples, 3, tile, tile))
    channels = (Channel("B04", 664.6, 10.0), Channel("B03", 559.8, 10.0), Channel("B02", 492.7, 10.0))
    per_group = 8
    groups = np.array([f"blk-{i // per_group}" for i in range(samples)])
    locations = np.stack([np.arange(samples) // 64 * tile, np.arange(samples) % 64 * tile], axis=1).astype(np.int64)
    sample_set = SampleSet(images=images.astype(np.float32), labels=labels.astype(np.int64), groups=groups,
                           locations=locations, source="bench-stripes", channels=channels, class_names=classes)
    write_dataset(sample_set, "satellite", "classification", out_dir,
                  SplitParams(val_fraction=0.15, test_fraction=0.2, seed=seed))
    return out_dir


def adapter_params(method: str, options: dict[str, str]):
    """The shared adapter block for ``method`` with the benchmark's knobs."""
    from tasks.adapters import TARGETED_METHODS, AdapterParams

    knobs = dict(method=method, rank=int(options["rank"]), prompt_tokens=int(options["prompt_tokens"]),
                 bottleneck=int(options["bottleneck"]) if options["bottleneck"] else None,
                 adapter_scale=float(options["adapter_scale"]),
                 train_patch_embed=options["train_patch_embed"] not in ("0", "false", "False", "no"))
    if method in TARGETED_METHODS:  # the other methods take no targets (and refuse a list)
        knobs["targets"] = [t.strip() for t in options["targets"].split(",") if t.strip()]
    return AdapterParams(**knobs)


def measure_method(dataset_dir: Path, method: str, options: dict[str, str], out_dir: Path) -> dict:
    """Train, score and export one method in this process; its row of the table."""
    import numpy as np

    from tasks.benchmarks._process_metrics import peak_rss_mb
    from tasks.compression.export import check_parity, export_onnx
    from tasks.evaluation import evaluate_predictor
    from tasks.model_inputs import load_dataset_for
    from tasks.models import BackboneParams, build_backbone, network_channels, normalizing_model
    from tasks.reproducibility import pin_determinism
    from tasks.training import TrainParams, fit, predict_logits

    from tasks.adapters import attach_adapter, get_method, merge_adapter

    entry = get_method(method)
    seed, threads, epochs = int(options["seed"]), int(options["threads"]), int(options["epochs"])
    pin_determinism(seed, threads)  # every method starts from the same backbone weights and batch order
    dataset = load_dataset_for(dataset_dir)  # the stored (raw) units every Vitrail model takes
    info = dataset.info
    backbone = BackboneParams(name=options["backbone"], weights=options["weights"],
                              weights_file=options["weights_file"] or None, patch_size=int(options["patch_size"]),
                              depth=int(options["depth"]) if options["depth"] else None)
    net = build_backbone(backbone, network_channels(info), info.num_classes, info.tile_size, task=info.task)
    params = adapter_params(method, options)
    expected = entry.expected_trainable(net, params)
    adapted = attach_adapter(net, params)  # the path fine-tuning takes
    model = normalizing_model(adapted, info)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable != expected:
        raise RuntimeError(f"{method}: {trainable} trainable parameters, but its formula says {expected}")

    stamps = [time.perf_counter()]
    train = TrainParams(epochs=epochs, batch_size=int(options["batch_size"]),
                        learning_rate=float(options["learning_rate"]), warmup_epochs=0.0, seed=seed,
                        threads=threads, resume=False)
    result = fit(model, dataset, train, out_dir / "checkpoints", f"bench-peft|{method}",
                 on_epoch=lambda epoch, total_epochs, metrics: stamps.append(time.perf_counter()))
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    best = result.best_metrics

    test = dataset.splits["test"]
    unmerged = copy.deepcopy(result.model).eval()
    report = evaluate_predictor(lambda x: predict_logits(unmerged, x), test.images, test.labels, info.class_names,
                                task=info.task)
    merged = normalizing_model(merge_adapter(result.model.net), info).eval()
    tiles = np.asarray(test.images[:PARITY_TILES], dtype=np.float32)
    path = export_onnx(merged, tiles, out_dir / f"{method}.onnx", {"adapter": method})
    parity = check_parity(unmerged, path, tiles, tolerance=1e-4, threads=threads)
    primary = f"val_{report.primary_metric}"
    return {"method": method, "family": entry.family, "mergeable": entry.mergeable,
            "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
            "val_metric": report.primary_metric, "val_score": best.get(primary),
            "val_selection": best.get(f"val_{report.selection_metric}"), "best_epoch": result.best_epoch,
            "test_metric": report.primary_metric, "test_score": report.primary,
            "test_selection": report.selection, "seconds_per_epoch": statistics.median(durations),
            "peak_rss_mb": peak_rss_mb(), "onnx_parity_max_abs": parity.max_abs_diff,
            "onnx_parity_passed": parity.passed}


def _run_child(dataset_dir: Path, method: str, options: dict[str, str], out_dir: Path) -> dict:
    code = ("import json, sys; from pathlib import Path; from tasks.benchmarks.peft import measure_method; "
            "print(json.dumps(measure_method(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), "
            "Path(sys.argv[4]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(dataset_dir), method, json.dumps(options), str(out_dir)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=7200)
    if done.returncode != 0:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Write (or take) the dataset, run every method in its own child process, return the rows."""
    from tasks.dataset import read_dataset_info
    from tasks.reproducibility import cpu_model

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        from tasks.request_errors import RequestError

        raise RequestError(f"bench peft: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **options}
    names = method_names(options)
    bench_dir = Path(workdir) / "bench"
    if options["dataset"]:
        data_dir = Path(options["dataset"])
    else:
        # Named by what it holds: a folder written with other options is never taken for this run's.
        data_dir = bench_dir / f"peft-data-n{options['samples']}-t{options['tile']}-s{options['seed']}"
        if not (data_dir / "dataset.json").exists():
            write_stripes_dataset(data_dir, int(options["samples"]), int(options["tile"]), int(options["seed"]))
    info = read_dataset_info(data_dir)
    if options["isolate"] in ("0", "false", "False", "no"):
        rows = [measure_method(data_dir, name, options, bench_dir / "peft-runs" / name) for name in names]
    else:
        rows = [_run_child(data_dir, name, options, bench_dir / "peft-runs" / name) for name in names]
    return {"cpu": cpu_model(), "threads": int(options["threads"]), "options": options,
            "dataset": {"path": str(data_dir), "task": info.task, "classes": list(info.class_names),
                        "tile_size": info.tile_size, "splits": dict(info.split_counts)},
            "rows": rows,
            "notes": {"trainable_share": "trainable parameters / all parameters of the adapted model",
                      "seconds_per_epoch": "median wall time of an epoch, validation included",
                      "peak_rss_mb": ("each method in its own child process: VmHWM (interpreter, libraries, "
                                      "model, data and ONNX export included)" if options["isolate"] not in
                                      ("0", "false", "False", "no") else "all methods in one process: VmHWM "
                                      "so far (a running maximum, not per method)"),
                      "onnx_parity_max_abs": f"max |logit difference| of the exported file (merged first when "
                                             f"mergeable) and the unmerged torch model on {PARITY_TILES} test tiles"}}


def format_table(result: dict) -> str:
    """One line per method, then what the columns mean."""
    o, d = result["options"], result["dataset"]
    head = (f"{'method':<13} {'trainable':>10} {'share':>8} {'merge':>5} {'val':>6} {'test':>6} "
            f"{'s/epoch':>8} {'RSS MB':>7} {'ONNX |diff|':>11}")
    metric = next((r["test_metric"] for r in result["rows"] if "test_metric" in r), "score")
    lines = [f"peft benchmark on {result['cpu']}, {result['threads']} threads: {o['backbone']} (weights {o['weights']}, "
             f"depth {o['depth'] or 'all'}) on {d['path']} ({d['task']}, {d['splits']}); {o['epochs']} epochs, "
             f"batch {o['batch_size']}, lr {o['learning_rate']}, seed {o['seed']}; scores: {metric}",
             head, "-" * len(head)]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['method']:<13} failed: {row['error']}")
            continue
        lines.append(f"{row['method']:<13} {row['trainable_params']:>10,} {row['trainable_share']:>8.2%} "
                     f"{'yes' if row['mergeable'] else 'no':>5} {row['val_score']:>6.3f} {row['test_score']:>6.3f} "
                     f"{row['seconds_per_epoch']:>8.2f} {row['peak_rss_mb']:>7.0f} {row['onnx_parity_max_abs']:>11.2e}")
    lines.append("")
    lines.extend(f"{key}: {text}" for key, text in result["notes"].items())
    return "\n".join(lines)

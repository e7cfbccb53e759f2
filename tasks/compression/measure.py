"""Side-by-side measurement of model variants: latency, throughput, size and accuracy."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from tasks.atomic_files import atomic_path
from tasks.evaluation import evaluate_predictor, rows_per_batch


def primary_metric(report) -> float:
    """The score variants are compared and selected by: the task's headline metric (accuracy for
    classification, macro AUROC for multilabel, foreground IoU for segmentation)."""
    return float(report.primary)


def count_macs(model, example: np.ndarray) -> int:
    """Multiply-accumulates of one forward pass on ``example[:1]``, attention matmuls included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.from_numpy(np.ascontiguousarray(example[:1], dtype=np.float32)))
    return int(counter.get_total_flops() // 2)


def resident_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, latency, accuracy) points no other point beats on both (faster and at least as accurate)."""
    front = []
    for name, latency, accuracy in points:
        dominated = any((other_latency <= latency and other_accuracy >= accuracy)
                        and (other_latency < latency or other_accuracy > accuracy)
                        for _, other_latency, other_accuracy in points)
        if not dominated:
            front.append(name)
    return front


def plot_pareto(rows: list[dict], title: str, path) -> object:
    """Accuracy versus batch-1 p50 latency of every variant, the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A score can be undefined (NaN): e.g. AUROC on a test split where a finding never occurs.
    points = [(r["name"], r["latency_ms_p50"], r["accuracy"]) for r in rows if np.isfinite(r["accuracy"])]
    if len(points) < len(rows):
        title = f"{title}\n({len(rows) - len(points)} variants without a defined score are not shown)"
    front = set(pareto_front(points))
    # Names only where a reader looks (the front, the fp32 reference, a peer): thirty labels on a few
    # milliseconds overprint one another; every variant is in the report's table.
    labelled = front | {points[0][0]} if points else front
    labelled |= {name for name, _, _ in points if name.startswith("peer")}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for index, (name, latency, accuracy) in enumerate(sorted(points, key=lambda p: p[1])):
        ax.scatter(latency, accuracy, color="tab:red" if name in front else "tab:gray", zorder=3)
        if name in labelled:
            ax.annotate(name, (latency, accuracy), fontsize=7, xytext=(4, 3 + 9 * (index % 2)),
                        textcoords="offset points")
    line = sorted((lat, acc) for name, lat, acc in points if name in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", lw=1, zorder=2, label="Pareto front")
    if points:
        ax.set_xscale("log")
    ax.set_xlabel("latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)
    return path


@dataclass(frozen=True)
class VariantMeasurement:
    """One row of the compression report (keys are the report's public schema)."""

    name: str
    format: str
    accuracy: float
    macro_f1: float
    latency_ms_p50: float
    latency_ms_p95: float
    throughput: float
    size_bytes: int
    speedup_vs_fp32: float = 1.0
    parity_max_abs_diff: float | None = None
    parity_agreement: float | None = None
    params: int | None = None
    macs: int | None = None
    memory_bytes: int | None = None
    precision: str = "fp32"
    tiles_per_sample: int = 1
    """Tiles in one sample: 1 for tile models; a slide model's samples are bags of this many tiles."""
    runtime: str = "torch"
    """What ran it: ``torch`` (the fp32 baseline), ``onnxruntime`` or ``openvino``."""
    drop: float | None = None
    """Larger of the accuracy drop and the gate-score drop versus the fp32 baseline (see
    :mod:`tasks.compression.scoring`), with its paired-bootstrap 95% interval below."""
    drop_low: float | None = None
    drop_high: float | None = None

    @property
    def latency_ms_per_tile(self) -> float:
        """p50 latency per tile: what target-profile and gate latency budgets are stated in."""
        return self.latency_ms_p50 / max(self.tiles_per_sample, 1)

    def as_dict(self) -> dict:
        return asdict(self)


def time_latency(predict: Callable[[np.ndarray], np.ndarray], sample: np.ndarray, repeats: int,
                 warmup: int) -> tuple[float, float]:
    """(p50, p95) milliseconds of single calls on ``sample``."""
    for _ in range(warmup):
        predict(sample)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(sample)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def time_throughput(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int) -> float:
    """Images per second at the batch size of ``batch``."""
    predict(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        predict(batch)
    return float(repeats * len(batch) / (time.perf_counter() - start))


def measure_variant(name: str, fmt: str, predict: Callable[[np.ndarray], np.ndarray], size_bytes: int,
                    test_images: np.ndarray, test_labels: np.ndarray, class_names: tuple[str, ...],
                    latency_repeats: int, throughput_batch: int, task: str = "classification") -> VariantMeasurement:
    """Test-split score, then latency at batch 1 and throughput at ``throughput_batch``.

    ``accuracy`` holds the task's headline metric (see :func:`primary_metric`) and ``macro_f1`` its
    model-selection score (macro-F1, macro AUROC or foreground IoU), so one table serves every task.
    """
    report = evaluate_predictor(predict, test_images, test_labels, class_names, task=task)
    accuracy = primary_metric(report)
    p50, p95 = time_latency(predict, test_images[:1], repeats=latency_repeats, warmup=max(3, latency_repeats // 10))
    # Repeat the split's first samples to fill the batch (reads at most one batch of a lazy split); a batch
    # of bags holds about as many tiles as a batch of tiles.
    throughput_batch = rows_per_batch(test_images, throughput_batch)
    batch = np.resize(test_images[:throughput_batch], (throughput_batch, *test_images.shape[1:])).astype(np.float32)
    throughput = time_throughput(predict, batch, repeats=max(2, latency_repeats // 20))
    tiles = int(np.prod(test_images.shape[1:-3])) if len(test_images.shape) > 4 else 1
    return VariantMeasurement(name=name, format=fmt, accuracy=accuracy, macro_f1=report.selection,
                              latency_ms_p50=p50, latency_ms_p95=p95, throughput=throughput, size_bytes=size_bytes,
                              tiles_per_sample=tiles)

"""Side-by-side measurement of model variants: latency, throughput, size and accuracy."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from tasks.evaluation import evaluate_predictor


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
                    latency_repeats: int, throughput_batch: int) -> VariantMeasurement:
    """Accuracy on the test split, then latency at batch 1 and throughput at ``throughput_batch``."""
    report = evaluate_predictor(predict, test_images, test_labels, class_names)
    p50, p95 = time_latency(predict, test_images[:1], repeats=latency_repeats, warmup=max(3, latency_repeats // 10))
    batch = np.resize(test_images, (throughput_batch, *test_images.shape[1:])).astype(np.float32)
    throughput = time_throughput(predict, batch, repeats=max(2, latency_repeats // 20))
    return VariantMeasurement(name=name, format=fmt, accuracy=report.accuracy, macro_f1=report.macro_f1,
                              latency_ms_p50=p50, latency_ms_p95=p95, throughput=throughput, size_bytes=size_bytes)

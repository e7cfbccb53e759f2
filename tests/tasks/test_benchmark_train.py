"""bench train: both data paths feed the model the very same batches, so the speed ratio compares data paths only."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.benchmarks.train import batch_stream, write_bench_dataset
from tasks.dataset import load_dataset
from tasks.training import EpochBatches, TrainParams


def test_in_memory_and_dataloader_batches_are_identical(tmp_path: Path) -> None:
    write_bench_dataset(tmp_path / "data", samples=160, bands=3, tile=8, seed=0)
    train = load_dataset(tmp_path / "data").splits["train"]
    params = TrainParams(batch_size=16, num_workers=0, seed=0, threads=1)

    def first_batches(path: str, count: int) -> list:
        plan = EpochBatches(len(train), 16, 1, 0, 1, 0, flips=True, chunked_order=train.images.chunk_shuffled_order)
        stream = batch_stream(path, train, "classification", plan, params)
        return [next(stream) for _ in range(count)]

    steps = len(train) // 16 + 3  # into the second epoch
    for (a_images, a_labels), (b_images, b_labels) in zip(first_batches("dataloader", steps),
                                                          first_batches("in-memory", steps), strict=True):
        torch.testing.assert_close(a_images, b_images, rtol=0, atol=0)
        assert torch.equal(a_labels, b_labels)

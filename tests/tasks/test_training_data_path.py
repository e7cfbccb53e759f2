"""A DataLoader's batch read at once (SplitSamples.__getitems__) equals the samples read one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import make_samples, make_segmentation_samples

from tasks.dataset import SplitParams, load_dataset, write_dataset
from tasks.training import EpochBatches, SplitSamples


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_a_batch_read_at_once_is_the_samples_read_one_by_one(tmp_path: Path, task: str) -> None:
    samples = make_samples() if task == "classification" else make_segmentation_samples()
    write_dataset(samples, "satellite", task, tmp_path / "data", SplitParams())
    train = load_dataset(tmp_path / "data").splits["train"]
    teacher = np.random.default_rng(0).normal(size=(8, len(train), 3)).astype(np.float32)
    for logits in (None, teacher if task == "classification" else None):
        dataset = SplitSamples(train, task, logits)
        keys = [(5, 0), (0, 3), (len(train) - 1, 6), (2, 7), (5, 1)]  # every kind of view, a repeat
        for one, together in zip((dataset[k] for k in keys), dataset.__getitems__(keys), strict=True):
            for a, b in zip(one, together, strict=True):
                assert a.dtype == b.dtype
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(dataset.__getitems__([3, 4])) == 2  # plain indices are view 0


def test_a_batch_across_two_chunk_windows_decodes_each_chunk_once(tmp_path: Path, monkeypatch) -> None:
    from tasks import dataset_store

    monkeypatch.setattr(dataset_store, "CHUNK_TARGET_BYTES", 16 * 16 * 3 * 4 * 8)  # 8 samples a chunk
    write_dataset(make_samples(n_groups=16), "satellite", "classification", tmp_path / "data", SplitParams())
    train = load_dataset(tmp_path / "data").splits["train"]
    decoded: list[int] = []
    real_decode = dataset_store.ChunkSource._decode
    monkeypatch.setattr(dataset_store.ChunkSource, "_decode",
                        lambda self, index: decoded.append(index) or real_decode(self, index))
    plan = EpochBatches(len(train), 5, 1, 0, 1, seed=0, flips=True, chunked_order=train.images.chunk_shuffled_order)
    dataset = SplitSamples(train, "classification")
    for keys in plan:  # batches of 5 straddle the windows of 4 chunks that the order shuffles within
        dataset.__getitems__(keys)
    touched = set((train.images.members // train.images.source.chunk_samples).tolist())
    assert len(touched) > 4 and sorted(decoded) == sorted(touched)  # each chunk the split touches, once

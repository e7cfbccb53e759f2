"""Devices, precision, accumulation, processes and the lazy data path of the one training loop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import FAST_TRAIN, new_model

from tasks.request_errors import RequestError
from tasks.training import (EpochBatches, SplitSamples, TrainParams, balanced_sample_weights, fit, select_device,
                            state_digest)


def params(**overrides) -> TrainParams:
    return TrainParams(**{**FAST_TRAIN, **overrides})


# --- distributed data parallel -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_processes_end_equal_and_score_like_one(tmp_path: Path, dataset) -> None:
    """The issue's test: 2-process DDP on CPU, identical weights on both ranks, validation within 1 point."""
    settings = params(epochs=3)
    single = fit(new_model(dataset), dataset, settings, tmp_path / "one", "tiny-vit")
    double = fit(new_model(dataset), dataset, settings.model_copy(update={"processes": 2}), tmp_path / "two",
                 "tiny-vit")
    assert len(double.rank_digests) == 2 and double.rank_digests[0] == double.rank_digests[1]
    assert state_digest(double.model) == double.rank_digests[0]  # the caller got rank 0's weights
    assert single.rank_digests == [state_digest(single.model)]
    assert len(double.history) == 3
    assert abs(double.best_metrics["val_macro_f1"] - single.best_metrics["val_macro_f1"]) <= 0.01
    # Only rank 0 wrote checkpoints, one per epoch.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt"]


# --- gradient accumulation -----------------------------------------------------------------------------


def mlp(dataset, seed: int = 0) -> torch.nn.Module:
    """A small MLP: every weight gets an informative gradient. (In a ViT the attention key bias has a
    gradient of exactly zero in exact arithmetic, and AdamW's first step turns its rounding noise into
    +-lr updates, so a ViT cannot show accumulation equal to a full batch.)"""
    torch.manual_seed(seed)
    channels, size = len(dataset.info.channels), dataset.info.tile_size
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, dataset.info.num_classes))


def test_two_half_batches_accumulated_equal_one_full_batch(tmp_path: Path, dataset) -> None:
    settings = params(epochs=1, batch_size=16)
    full = fit(mlp(dataset), dataset, settings, tmp_path / "full", "mlp")
    halves = fit(mlp(dataset), dataset, settings.model_copy(update={"grad_accumulation": 2}), tmp_path / "halves", "mlp")
    untrained = mlp(dataset).state_dict()
    for (name, a), b in zip(full.model.state_dict().items(), halves.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        assert not torch.equal(a, untrained[name])  # trained weights are compared, not two untouched copies
    assert full.history[0]["train_loss"] == pytest.approx(halves.history[0]["train_loss"], rel=1e-5)


def test_a_batch_smaller_than_its_parts_is_refused(tmp_path: Path, dataset) -> None:
    with pytest.raises(RequestError, match="batch_size 2 cannot be split over 1 processes x 4 accumulation steps"):
        fit(new_model(dataset), dataset, params(batch_size=2, grad_accumulation=4), tmp_path, "tiny-vit")


def test_epoch_plan_splits_each_step_over_processes_and_micro_batches() -> None:
    plans = [list(EpochBatches(10, 4, 2, rank, 2, seed=3, flips=True)) for rank in (0, 1)]
    assert [len(part) for part in plans[0]] == [1, 1, 1, 1, 1, 1]  # 3 steps x 2 micro-batches of one
    keys = [key for step in range(3) for rank in (0, 1) for key in plans[rank][2 * step:2 * step + 2]]
    indices = [index for part in keys for index, _ in part]
    assert sorted(indices[:10]) == list(range(10))  # every sample once, the short last step padded by repetition
    again = EpochBatches(10, 4, 2, 0, 2, seed=3, flips=True)
    assert list(again) == plans[0]
    again.set_epoch(2)
    assert list(again) != plans[0]


# --- the lazy data path ---------------------------------------------------------------------------------


def test_split_samples_reads_one_transformed_sample_with_its_teacher_view(dataset) -> None:
    from tasks.training import _dihedral

    train = dataset.splits["train"]
    teacher = np.arange(8 * len(train) * 3, dtype=np.float32).reshape(8, len(train), 3)
    image, label, logits = SplitSamples(train, "classification", teacher)[(4, 6)]
    expected = _dihedral(torch.from_numpy(np.asarray(train.images[4:5], dtype=np.float32)), 6)[0]
    assert torch.equal(image, expected) and int(label) == int(np.asarray(train.labels[4:5])[0])
    assert torch.equal(logits, torch.from_numpy(teacher[6, 4]))


def test_worker_processes_do_not_change_the_numbers(tmp_path: Path, dataset) -> None:
    settings = params(epochs=1)
    inline = fit(new_model(dataset), dataset, settings, tmp_path / "inline", "tiny-vit")
    workers = fit(new_model(dataset), dataset, settings.model_copy(update={"num_workers": 2}), tmp_path / "workers",
                  "tiny-vit")
    assert state_digest(inline.model) == state_digest(workers.model)
    assert inline.history[0]["val_loss"] == workers.history[0]["val_loss"]


# --- devices and precision -------------------------------------------------------------------------------


def test_auto_picks_cuda_then_mps_then_cpu() -> None:
    mps = torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert select_device("auto") == expected
    assert select_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, dataset) -> None:
    with pytest.raises(RequestError, match="device 'cuda' was requested but this machine has no usable CUDA GPU"):
        select_device("cuda")
    with pytest.raises(RequestError, match="no usable CUDA GPU"):
        fit(new_model(dataset), dataset, params(device="cuda"), tmp_path, "tiny-vit")
    assert not list(tmp_path.iterdir())  # refused before any checkpoint


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 autocast is allowed on CUDA")
def test_float16_autocast_on_cpu_is_refused_not_silently_swapped(tmp_path: Path, dataset) -> None:
    with pytest.raises(RequestError, match="precision '16-mixed' needs a CUDA GPU"):
        fit(new_model(dataset), dataset, params(precision="16-mixed"), tmp_path, "tiny-vit")


def test_bf16_autocast_trains_on_cpu(tmp_path: Path, dataset) -> None:
    result = fit(new_model(dataset), dataset, params(epochs=2, precision="bf16-mixed"), tmp_path, "tiny-vit")
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not cast weights


# --- class-balanced sampling -----------------------------------------------------------------------------


def test_balanced_sampler_draws_classes_about_equally() -> None:
    labels = np.array([0] * 180 + [1] * 18 + [2] * 2)
    weights = balanced_sample_weights(labels, "classification")
    drawn = Counter()
    sampler = EpochBatches(len(labels), 50, 1, 0, 1, seed=0, flips=False, weights=weights)
    for epoch in range(1, 21):
        sampler.set_epoch(epoch)
        drawn.update(int(labels[index]) for part in sampler for index, _ in part)
    shares = np.array([drawn[k] for k in range(3)]) / sum(drawn.values())
    assert np.allclose(shares, 1 / 3, atol=0.03), shares
    plain = EpochBatches(len(labels), 50, 1, 0, 1, seed=0, flips=False)
    assert Counter(int(labels[i]) for part in plain for i, _ in part)[2] == 2  # without weights: each sample once


def test_multilabel_weights_follow_the_rarest_finding_and_segmentation_is_refused() -> None:
    labels = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.int8)
    weights = balanced_sample_weights(labels, "multilabel")
    assert weights.tolist() == [0.25, 0.25, 0.25, 1.0, 1.0]  # finding 1 has one positive; one sample has none
    with pytest.raises(RequestError, match="balance_classes is not offered for segmentation"):
        balanced_sample_weights(np.zeros((2, 4, 4)), "segmentation")


def test_balanced_training_runs_end_to_end(tmp_path: Path, dataset) -> None:
    result = fit(new_model(dataset), dataset, params(epochs=2, balance_classes=True), tmp_path, "tiny-vit")
    assert len(result.history) == 2 and result.best_metrics["val_accuracy"] >= 0.6

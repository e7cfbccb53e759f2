"""The training loop: learning, checkpoints every epoch, resuming, and the loss objectives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_support import FAST_TRAIN, new_model

from tasks.training import TrainParams, _task_loss, fit, predict_logits


def params(**overrides) -> TrainParams:
    return TrainParams(**{**FAST_TRAIN, **overrides})


def test_fit_learns_a_separable_dataset(trained, dataset) -> None:
    val = dataset.splits["val"]
    untrained = (predict_logits(new_model(dataset), val.images).argmax(1) == val.labels).mean()
    assert untrained < 0.8
    assert len(trained.history) == FAST_TRAIN["epochs"]
    assert trained.best_metrics["val_accuracy"] >= 0.9
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    accuracy = (predict_logits(trained.model, val.images).argmax(1) == val.labels).mean()
    assert accuracy == pytest.approx(trained.best_metrics["val_accuracy"])  # the best weights are restored
    assert not trained.model.training


def test_history_has_the_documented_metrics(trained) -> None:
    keys = {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "learning_rate", "epoch_seconds"}
    for metrics in trained.history:
        assert set(metrics) == keys and all(np.isfinite(v) for v in metrics.values())
    assert trained.best_metrics == trained.history[trained.best_epoch - 1]
    assert trained.best_metrics["val_macro_f1"] == max(h["val_macro_f1"] for h in trained.history)


def test_fit_writes_one_checkpoint_per_epoch(trained) -> None:
    assert [p.name for p in trained.checkpoints] == [f"epoch-{e:03d}.pt" for e in range(1, FAST_TRAIN["epochs"] + 1)]
    assert all(p.is_file() for p in trained.checkpoints)
    state = torch.load(trained.checkpoints[-1], map_location="cpu", weights_only=True)  # plain tensors and values
    assert state["epoch"] == FAST_TRAIN["epochs"] and len(state["history"]) == FAST_TRAIN["epochs"]
    assert {"model", "optimizer", "scheduler", "generator", "fingerprint"} <= set(state)


def test_on_epoch_is_called_after_every_epoch(tmp_path: Path, dataset) -> None:
    calls = []
    fit(new_model(dataset), dataset, params(epochs=2), tmp_path, "tiny-vit",
        on_epoch=lambda epoch, total, metrics: calls.append((epoch, total, metrics["val_accuracy"])))
    assert [(e, t) for e, t, _ in calls] == [(1, 2), (2, 2)]


def test_fit_resumes_from_a_matching_checkpoint(tmp_path: Path, dataset) -> None:
    first = fit(new_model(dataset), dataset, params(epochs=2), tmp_path, "tiny-vit")
    assert first.resumed_from_epoch == 0 and len(first.history) == 2
    again = fit(new_model(dataset, seed=5), dataset, params(epochs=3), tmp_path, "tiny-vit")
    assert again.resumed_from_epoch == 2
    assert len(again.history) == 3 and again.history[:2] == first.history
    assert [p.name for p in again.checkpoints] == ["epoch-003.pt"]


def test_resumed_training_matches_uninterrupted_training(tmp_path: Path, dataset) -> None:
    settings = params(epochs=3)
    straight = fit(new_model(dataset), dataset, settings, tmp_path / "straight", "tiny-vit")

    class Crash(Exception):
        pass

    def crash_after_epoch_2(epoch: int, total: int, metrics: dict) -> None:
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        fit(new_model(dataset), dataset, settings, tmp_path / "crashed", "tiny-vit", on_epoch=crash_after_epoch_2)
    resumed = fit(new_model(dataset, seed=9), dataset, settings, tmp_path / "crashed", "tiny-vit")
    assert resumed.resumed_from_epoch == 2
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in straight.history],
                                                                     rel=1e-5)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("change", [{"learning_rate": 1e-3}, {"seed": 1}, {"objective": "focal"}])
def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path, dataset, change: dict) -> None:
    fit(new_model(dataset), dataset, params(epochs=1), tmp_path, "tiny-vit")
    other = fit(new_model(dataset), dataset, params(epochs=1, **change), tmp_path, "tiny-vit")
    assert other.resumed_from_epoch == 0 and len(other.history) == 1


def test_a_checkpoint_of_another_model_or_dataset_is_not_resumed(tmp_path: Path, dataset) -> None:
    fit(new_model(dataset), dataset, params(epochs=1), tmp_path, "tiny-vit")
    other_model = fit(new_model(dataset), dataset, params(epochs=2), tmp_path, "tiny-vit-lora-r4")
    assert other_model.resumed_from_epoch == 0 and len(other_model.history) == 2


def test_resume_false_starts_over(tmp_path: Path, dataset) -> None:
    fit(new_model(dataset), dataset, params(epochs=1), tmp_path, "tiny-vit")
    again = fit(new_model(dataset), dataset, params(epochs=1, resume=False), tmp_path, "tiny-vit")
    assert again.resumed_from_epoch == 0


def test_focal_objective_trains(tmp_path: Path, dataset) -> None:
    result = fit(new_model(dataset), dataset, params(epochs=3, objective="focal", flip_augment=False), tmp_path,
                 "tiny-vit")
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert result.best_metrics["val_accuracy"] >= 0.8


def test_focal_loss_down_weights_easy_examples() -> None:
    labels = torch.tensor([0, 1])
    confident = torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])
    unsure = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    ce = _task_loss("classification", "cross-entropy", confident, labels, 0.0)
    focal = _task_loss("classification", "focal", confident, labels, 0.0)
    p = torch.softmax(confident, 1)[0, 0]
    torch.testing.assert_close(focal, -((1 - p) ** 2) * torch.log(p))
    assert focal < ce / 100  # an easy example barely counts
    assert _task_loss("classification", "focal", unsure, labels, 0.0) / _task_loss("classification", "cross-entropy", unsure, labels, 0.0) > 0.2


def test_fit_needs_a_training_split(tmp_path: Path, dataset) -> None:
    from dataclasses import replace

    no_train = replace(dataset, splits={k: v for k, v in dataset.splits.items() if k != "train"})
    with pytest.raises(ValueError, match="no labelled training split"):
        fit(new_model(dataset), no_train, params(epochs=1), tmp_path, "tiny-vit")


def test_distillation_term_vanishes_when_the_student_is_the_teacher() -> None:
    from tasks.training import _distillation_term

    logits = torch.randn(6, 3)
    assert float(_distillation_term("classification", logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(6, 3)
    assert float(_distillation_term("classification", other, logits, 2.0)) > 0.01
    pixels = torch.randn(2, 3, 4, 4)
    assert float(_distillation_term("segmentation", pixels, pixels, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_cached_teacher_logits_cover_every_augmented_view(trained_model, dataset) -> None:
    from tasks.training import _dihedral, cache_teacher_logits

    images = dataset.splits["train"].images[:5]
    cache = cache_teacher_logits(trained_model, images, flips=True)
    assert cache.shape == (8, 5, len(dataset.info.class_names))
    view = _dihedral(torch.from_numpy(images), 6)
    with torch.inference_mode():
        assert np.allclose(cache[6], trained_model(view).numpy(), atol=1e-5)
    assert cache_teacher_logits(trained_model, images, flips=False).shape == (1, 5, len(dataset.info.class_names))


def test_distillation_trains_a_student_from_cached_teacher_logits(tmp_path: Path, trained_model, dataset) -> None:
    from tasks.training import cache_teacher_logits

    teacher_logits = cache_teacher_logits(trained_model, dataset.splits["train"].images, flips=True)
    result = fit(new_model(dataset, seed=3), dataset, params(objective="distillation", distill_weight=1.0), tmp_path,
                 "student", teacher_logits=teacher_logits)
    val = dataset.splits["val"]
    agreement = (predict_logits(result.model, val.images).argmax(1) == predict_logits(trained_model, val.images).argmax(1))
    assert agreement.mean() >= 0.8


def test_distillation_without_matching_teacher_logits_is_refused(tmp_path: Path, dataset) -> None:
    with pytest.raises(ValueError, match="cached teacher logits of shape"):
        fit(new_model(dataset), dataset, params(objective="distillation"), tmp_path, "student")
    wrong = np.zeros((1, len(dataset.splits["train"]), 3), dtype=np.float32)  # flips on needs 8 views
    with pytest.raises(ValueError, match="cached teacher logits"):
        fit(new_model(dataset), dataset, params(objective="distillation"), tmp_path, "student", teacher_logits=wrong)

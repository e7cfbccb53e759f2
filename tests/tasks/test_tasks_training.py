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
    assert {"model", "optimizer", "scheduler", "torch_rng", "fingerprint"} <= set(state)


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


# --- crash safety: a real kill -9 in the middle of writing a checkpoint ------------------------------

KILLED_TRAINER = """
import io, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {support!r})
from tasks_support import FAST_TRAIN, new_model
from tasks.dataset import load_dataset
from tasks.training import TrainParams, fit

real_save = torch.save


def slow_disk_save(obj, path, *args, **kwargs):
    # A slow disk: epoch 3's checkpoint stops half-way, so the parent's kill -9 lands mid-write.
    if ".epoch-003.pt" not in str(path):
        return real_save(obj, path, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(120)
        handle.write(data[len(data) // 2:])


torch.save = slow_disk_save
dataset = load_dataset(Path(sys.argv[1]))
fit(new_model(dataset), dataset, TrainParams(**{{**FAST_TRAIN, "epochs": 4}}), Path(sys.argv[2]), "tiny-vit")
"""


def wait_for(condition, process, timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"child exited early ({process.returncode}): {process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "child did not reach the kill point in time"
        time.sleep(0.05)


def start_child(script: Path, *args: str):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(Path(__file__).parent)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_hard(process) -> None:
    import os
    import signal

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_mid_checkpoint_then_rerun_resumes_and_ends_bitwise_equal(tmp_path: Path, dataset_dir: Path,
                                                                         dataset) -> None:
    from tasks.atomic_files import is_partial

    checkpoints = tmp_path / "checkpoints"
    script = tmp_path / "trainer.py"
    script.write_text(KILLED_TRAINER.format(support=str(Path(__file__).parent)))
    child = start_child(script, str(dataset_dir), str(checkpoints))

    def half_written() -> list[Path]:
        found = [p for p in checkpoints.iterdir() if is_partial(p)] if checkpoints.is_dir() else []
        return [p for p in found if p.stat().st_size > 0]

    wait_for(lambda: bool(half_written()) and (checkpoints / "epoch-002.pt").is_file(), child)
    kill_hard(child)

    [partial] = half_written()
    names = sorted(p.name for p in checkpoints.iterdir() if not is_partial(p))
    assert names == ["epoch-001.pt", "epoch-002.pt"]  # epoch 3 never became visible under its name
    with pytest.raises(Exception):  # what the killed writer left is not a loadable checkpoint
        torch.load(partial, map_location="cpu", weights_only=True)

    settings = params(epochs=4)
    resumed = fit(new_model(dataset, seed=9), dataset, settings, checkpoints, "tiny-vit")
    assert resumed.resumed_from_epoch == 2
    assert not partial.exists() and not [p for p in checkpoints.iterdir() if is_partial(p)]
    straight = fit(new_model(dataset), dataset, settings, tmp_path / "straight", "tiny-vit")
    scores = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in resumed.history]
    assert scores == [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # bitwise: the reproducibility contract holds across the crash


# --- resource guard --------------------------------------------------------------------------------------


def big_tile_model(tile: int) -> torch.nn.Module:
    from tasks_support import CHANNELS, tiny_backbone

    from tasks.models import build_backbone

    return build_backbone(tiny_backbone(), CHANNELS, 3, tile)


def test_an_absurd_training_request_is_refused_up_front_with_the_numbers() -> None:
    from tasks.training import TrainingMemoryError, check_training_memory

    model = big_tile_model(1024)  # 4 px patches: 65,537 tokens, so one sample's attention is about 50 GB
    with pytest.raises(TrainingMemoryError) as refused:
        check_training_memory(model, batch_size=64, sample_shape=(3, 1024, 1024), task="classification")
    message = str(refused.value)
    assert "batch 64 x 3 channels x 1024x1024 px" in message and "65537 tokens x 192 dims x 1 blocks" in message
    assert "GiB is available" in message and "lower batch_size" in message


def test_a_small_request_passes_the_guard_and_scales_with_the_batch(dataset) -> None:
    from tasks.training import available_memory, check_training_memory, estimate_training_memory

    model = new_model(dataset)
    estimate = check_training_memory(model, batch_size=16, sample_shape=(3, 16, 16))
    assert 0 < estimate.total < available_memory()
    assert estimate.tokens == 17 and estimate.depth == 1
    double = estimate_training_memory(model, batch_size=32, sample_shape=(3, 16, 16))
    assert double.activations == 2 * estimate.activations
    assert double.weights_and_optimizer == estimate.weights_and_optimizer


def test_fit_refuses_before_any_step_or_checkpoint(tmp_path: Path, dataset) -> None:
    from tasks.training import TrainingMemoryError

    with pytest.raises(TrainingMemoryError, match="needs about"):
        fit(big_tile_model(1024), dataset, params(epochs=1), tmp_path, "big")
    assert not list(tmp_path.iterdir())

"""The one training loop: parameterised by task type and objective, never by domain.

It checkpoints every epoch and resumes from the newest checkpoint whose fingerprint matches the
run's settings, so an interrupted fine-tune picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn import functional as F

from tasks.dataset import Dataset
from tasks.evaluation import score_classification

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, dict[str, float]], None]


class TrainParams(BaseModel):
    """How long and how hard to train."""

    epochs: int = Field(8, ge=1, le=500, description="Passes over the training split")
    batch_size: int = Field(32, ge=1, le=4096, description="Samples per optimisation step")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (AdamW, cosine decay)")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay")
    warmup_epochs: float = Field(0.5, ge=0, le=50, description="Linear warm-up length in epochs")
    objective: Literal["cross-entropy", "focal"] = Field(
        "cross-entropy", description="Loss: cross-entropy, or focal loss for heavily imbalanced classes")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Label smoothing for cross-entropy")
    flip_augment: bool = Field(True, description="Random horizontal/vertical flips and 90-degree rotations "
                                                 "(valid for overhead imagery)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation, shuffling and augmentation")
    resume: bool = Field(True, description="Resume from the newest matching checkpoint in the work folder")


@dataclass
class FitResult:
    """What training produced: the model with its best validation weights, and the history."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    resumed_from_epoch: int = 0
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def best_metrics(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


def _loss(objective: str, logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    if objective == "focal":
        # Focal loss (Lin et al. 2017) with gamma=2: down-weights easy, majority-class samples.
        log_prob = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        return (-(1 - log_prob.exp()) ** 2 * log_prob).mean()
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if torch.rand(1, generator=generator).item() < 0.5:
        batch = batch.flip(-1)
    if torch.rand(1, generator=generator).item() < 0.5:
        batch = batch.flip(-2)
    turns = int(torch.randint(0, 4, (1,), generator=generator).item())
    return torch.rot90(batch, turns, dims=(-2, -1)) if turns else batch


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of ``model`` on ``images`` (N, C, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    outputs = [model(torch.from_numpy(images[i:i + batch_size])).float().numpy()
               for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return np.concatenate(outputs, axis=0)


def _fingerprint(params: TrainParams, dataset_digest: str, model_key: str) -> str:
    payload = params.model_dump(exclude={"resume", "epochs"})
    payload.update(dataset=dataset_digest, model=model_key)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _newest_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    for path in sorted(checkpoint_dir.glob("epoch-*.pt"), reverse=True):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            return path
        log.warning("%s: checkpoint belongs to other settings; not resuming from it", path)
    return None


def fit(model: nn.Module, dataset: Dataset, params: TrainParams, checkpoint_dir: Path, model_key: str,
        on_epoch: EpochCallback | None = None) -> FitResult:
    """Train ``model`` on the dataset's train split, validate each epoch, keep the best weights.

    Args:
        model: a module mapping (N, C, H, W) physical-unit images to logits; only parameters with
            ``requires_grad`` are optimised (adapters, head).
        dataset: a loaded dataset with ``train`` and ``val`` splits.
        params: training knobs.
        checkpoint_dir: where ``epoch-NNN.pt`` files are written every epoch.
        model_key: describes the architecture/adapter, so checkpoints of another model are not resumed.
        on_epoch: called as ``on_epoch(epoch, total_epochs, metrics)`` after every epoch.
    """
    if "train" not in dataset.splits:
        raise ValueError(f"{dataset.path}: dataset has no labelled training split")
    train = dataset.splits["train"]
    val = dataset.splits.get("val", train)
    class_names = dataset.info.class_names
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(train) / params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    warmup_steps = int(params.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    fingerprint = _fingerprint(params, dataset.info.digest, model_key)
    history: list[dict[str, float]] = []
    best_score, best_epoch, best_state, start_epoch = -1.0, 0, None, 0
    checkpoints: list[Path] = []

    resume_path = _newest_checkpoint(checkpoint_dir, fingerprint) if params.resume else None
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, best_score, best_epoch, best_state = state["history"], state["best_score"], state["best_epoch"], state["best_state"]
        start_epoch = state["epoch"]
        log.info("resuming from %s (epoch %d of %d)", resume_path.name, start_epoch, params.epochs)

    labels_all = torch.from_numpy(train.labels)
    images_all = torch.from_numpy(train.images)
    for epoch in range(start_epoch + 1, params.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train), generator=generator)
        running_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * params.batch_size:(step + 1) * params.batch_size]
            batch, labels = images_all[index], labels_all[index]
            if params.flip_augment:
                batch = _augment(batch, generator)
            loss = _loss(params.objective, model(batch), labels, params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += float(loss.detach()) * len(index)
            seen += len(index)
        val_logits = predict_logits(model, val.images)
        val_report = score_classification(val.labels, val_logits.argmax(1), class_names)
        val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val.labels)))
        metrics = {
            "train_loss": running_loss / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_report.accuracy,
            "val_macro_f1": val_report.macro_f1,
            "learning_rate": scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        if val_report.macro_f1 > best_score:
            best_score, best_epoch = val_report.macro_f1, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        path = checkpoint_dir / f"epoch-{epoch:03d}.pt"
        torch.save({"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(), "history": history, "best_score": best_score,
                    "best_epoch": best_epoch, "best_state": best_state}, path)
        checkpoints.append(path)
        if on_epoch is not None:
            on_epoch(epoch, params.epochs, metrics)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(model=model, history=history, best_epoch=best_epoch, resumed_from_epoch=start_epoch,
                     checkpoints=checkpoints)

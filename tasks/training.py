"""The one training loop: parameterised by task type and objective, never by domain.

Task types (see ``domains.TaskType``): classification (one class per sample), multilabel (independent
0/1 findings) and segmentation (a class per pixel). Objectives: cross-entropy (binary cross-entropy
for multilabel), focal, and distillation from a teacher's logits. The loop checkpoints every epoch and
resumes from the newest checkpoint whose fingerprint matches the run's settings, so an interrupted
fine-tune picks up where it stopped. Checkpoints are written under a temporary name and renamed into
place, so a run killed mid-write leaves the previous epoch's checkpoint, never a truncated one.

Reproducibility: :func:`fit` pins the seed, deterministic kernels and the thread count
(:mod:`tasks.reproducibility`); callers that build a model first pin them before building it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn import functional as F

from tasks.atomic_files import atomic_path, remove_partials
from tasks.dataset import Dataset
from tasks.evaluation import score_outputs
from tasks.reproducibility import DEFAULT_THREADS, pin_determinism
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, dict[str, float]], None]


class TrainParams(BaseModel):
    """How long and how hard to train."""

    epochs: int = Field(8, ge=1, le=500, description="Passes over the training split")
    batch_size: int = Field(32, ge=1, le=4096, description="Samples per optimisation step")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (AdamW, cosine decay)")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay")
    warmup_epochs: float = Field(0.5, ge=0, le=50, description="Linear warm-up length in epochs")
    objective: Literal["cross-entropy", "focal", "distillation"] = Field(
        "cross-entropy", description="Loss: cross-entropy, focal loss for heavily imbalanced classes, or "
                                     "distillation from a teacher model's logits (compress stage)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Label smoothing for cross-entropy")
    distill_temperature: float = Field(2.0, gt=0, le=20, description="Softmax temperature of the distillation term")
    distill_weight: float = Field(0.7, ge=0, le=1, description="Share of the distillation term in the loss "
                                                               "(the rest is the task loss on true labels)")
    flip_augment: bool = Field(True, description="Random flips and 90-degree rotations (valid for overhead imagery "
                                                 "and slides; turned off by domains where left and right differ)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation, shuffling and augmentation")
    threads: int = Field(DEFAULT_THREADS, ge=1, le=256,
                         description="CPU threads for training. Part of the reproducibility contract: the same "
                                     "seed, data, threads and library versions give bitwise-identical weights; "
                                     "another thread count rounds sums differently")
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


def _task_loss(task: str, objective: str, logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Loss against true labels; entries labelled -1 (unlabelled findings, ignored pixels) do not count."""
    if task == "multilabel":
        known = labels >= 0
        targets = labels.clamp(min=0).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if objective == "focal":
            # Focal loss (Lin et al. 2017), gamma=2, per finding: easy negatives stop dominating.
            p_true = torch.where(targets > 0, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
            loss = (1 - p_true) ** 2 * loss
        return (loss * known).sum() / known.sum().clamp(min=1)
    # classification (N, K) vs (N,), segmentation (N, K, H, W) vs (N, H, W): class dimension is 1
    if objective == "focal":
        log_prob = F.log_softmax(logits, dim=1)
        known = labels >= 0
        picked = log_prob.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        loss = -(1 - picked.exp()) ** 2 * picked
        return (loss * known).sum() / known.sum().clamp(min=1)
    return F.cross_entropy(logits, labels.long(), label_smoothing=smoothing, ignore_index=-1)


def _distillation_term(task: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015) soft-target loss, scaled by T^2 so its gradients keep their size as T changes."""
    if task == "multilabel":
        soft = torch.sigmoid(teacher / temperature)
        return F.binary_cross_entropy_with_logits(student / temperature, soft) * temperature ** 2
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    per_item = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)  # KL(teacher || student)
    return per_item.mean() * temperature ** 2


def _loss(params: TrainParams, task: str, logits: torch.Tensor, labels: torch.Tensor,
          teacher: torch.Tensor | None = None) -> torch.Tensor:
    if params.objective == "distillation":
        if teacher is None:
            raise ValueError("objective 'distillation' needs teacher logits (see cache_teacher_logits)")
        hard = _task_loss(task, "cross-entropy", logits, labels, params.label_smoothing)
        soft = _distillation_term(task, logits, teacher, params.distill_temperature)
        return (1 - params.distill_weight) * hard + params.distill_weight * soft
    return _task_loss(task, params.objective, logits, labels, params.label_smoothing)


# The 8 symmetries of the square (4 rotations, each optionally mirrored) used as augmentation; a
# transform's index also keys the teacher-logit cache, so distillation sees the teacher's view of
# exactly the pixels the student sees.
DIHEDRAL_TRANSFORMS = 8


def _dihedral(batch: torch.Tensor, index: int) -> torch.Tensor:
    if index >= 4:
        batch = batch.flip(-1)
    turns = index % 4
    return torch.rot90(batch, turns, dims=(-2, -1)) if turns else batch


@torch.inference_mode()
def cache_teacher_logits(teacher: nn.Module, images: np.ndarray, flips: bool = True, batch_size: int = 128) -> np.ndarray:
    """Teacher logits computed once for every augmented view (TinyViT-style cached distillation).

    Returns (8, N, ...) for the 8 flip/rotation views the training loop draws from, or (1, N, ...)
    when training without flips; distillation then costs about as much as plain training.
    """
    teacher = teacher.eval()
    views = range(DIHEDRAL_TRANSFORMS if flips else 1)
    tensor = torch.from_numpy(images)
    return np.stack([
        np.concatenate([teacher(_dihedral(tensor[i:i + batch_size], view)).float().numpy()
                        for i in range(0, len(images), batch_size)])
        for view in views])


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Logits of ``model`` on ``images`` (N, C, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    outputs = [model(torch.from_numpy(images[i:i + batch_size])).float().numpy()
               for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return np.concatenate(outputs, axis=0)


class TrainingMemoryError(RequestError):
    """A training request whose estimated memory exceeds what the machine has available."""


FLOAT_BYTES = 4
# Margin over the saved-activation count for backward's temporaries and allocator slack. Measured on
# vit_tiny (12 blocks, 13 bands, batch 32, one AdamW step): the estimate is 1.4x the peak RSS growth at
# 32 px tiles and 1.5x at 64 px, so the guard errs on the side of refusing.
ACTIVATION_PEAK_FACTOR = 1.25
# Share of the currently available memory a training run may plan to use.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs, and the shape that decides it."""

    activations: int
    weights_and_optimizer: int
    batch_size: int
    channels: int
    tile_size: tuple[int, int]
    tokens: int | None
    width: int | None
    depth: int | None

    @property
    def total(self) -> int:
        return self.activations + self.weights_and_optimizer

    def describe(self) -> str:
        shape = (f"batch {self.batch_size} x {self.channels} channels x {self.tile_size[0]}x{self.tile_size[1]} px")
        if self.tokens is not None:
            shape += f" ({self.tokens} tokens x {self.width} dims x {self.depth} blocks)"
        return (f"{shape}: activations about {self.activations / 2**30:.2f} GiB, weights, gradients and optimizer "
                f"state {self.weights_and_optimizer / 2**30:.2f} GiB")


def _vit_activation_floats(model: nn.Module) -> tuple[int, int, int, int] | None:
    """(floats saved per sample, tokens, width, depth) of the timm ViT inside ``model``, or None."""
    from timm.models.vision_transformer import VisionTransformer

    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is None:
        return None
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    width, depth = vit.embed_dim, len(vit.blocks)
    per_block = 0
    for block in vit.blocks:
        heads = getattr(block.attn, "num_heads", 1)
        hidden = getattr(getattr(block.mlp, "fc1", None), "out_features", 4 * width)
        # Saved for backward per token: two LayerNorms (in/out), qkv (3D), attention output and
        # projection, two residual sums (about 10 x width), fc1 output and GELU output (2 x hidden);
        # plus the attention probabilities, heads x tokens^2 (the explicit softmax path keeps them).
        per_block += tokens * (10 * width + 2 * hidden) + heads * tokens * tokens
    return per_block, tokens, width, depth


def estimate_training_memory(model: nn.Module, batch_size: int, sample_shape: tuple[int, ...]) -> MemoryEstimate:
    """Memory one optimisation step of ``model`` on ``batch_size`` samples of ``sample_shape`` (C, H, W) needs.

    Activations are estimated from the ViT's dimensions (tokens from the tile and patch size, width,
    depth, heads, MLP width), so a request is judged before anything is allocated; a model without a
    timm ViT inside is charged for its input and output only.
    """
    channels, height, width_px = (int(v) for v in sample_shape[-3:])
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Weights, plus gradient and AdamW's two moments for every trained weight.
    static = FLOAT_BYTES * (parameters + 3 * trainable)
    per_sample = channels * height * width_px * 2  # the input and its augmented view
    vit = _vit_activation_floats(model)
    tokens = dims = depth = None
    if vit is not None:
        floats, tokens, dims, depth = vit
        per_sample += floats
    activations = int(ACTIVATION_PEAK_FACTOR * FLOAT_BYTES * batch_size * per_sample)
    return MemoryEstimate(activations=activations, weights_and_optimizer=static, batch_size=batch_size,
                          channels=channels, tile_size=(height, width_px), tokens=tokens, width=dims, depth=depth)


def available_memory() -> int:
    """Bytes the machine can give this process now without swapping (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_training_memory(model: nn.Module, batch_size: int, sample_shape: tuple[int, ...], task: str = "",
                          available: int | None = None) -> MemoryEstimate:
    """Refuse, before anything is allocated, a training step that cannot fit in memory.

    Raises:
        TrainingMemoryError: the estimate exceeds ``MEMORY_HEADROOM`` of the available memory; the
            message gives the numbers and what to lower.
    """
    estimate = estimate_training_memory(model, batch_size, sample_shape)
    free = available_memory() if available is None else available
    budget = int(free * MEMORY_HEADROOM)
    if estimate.total > budget:
        raise TrainingMemoryError(
            f"training {task or 'this model'} needs about {estimate.total / 2**30:.2f} GiB per step "
            f"({estimate.describe()}), but only {free / 2**30:.2f} GiB is available "
            f"({MEMORY_HEADROOM:.0%} of it may be planned); lower batch_size, the tile size or the model size")
    log.debug("training memory estimate %.2f GiB of %.2f GiB available", estimate.total / 2**30, free / 2**30)
    return estimate


def _fingerprint(params: TrainParams, dataset_digest: str, model_key: str) -> str:
    # Threads change float rounding, not what is trained: a run may resume on another thread count.
    payload = params.model_dump(exclude={"resume", "epochs", "threads"})
    payload.update(dataset=dataset_digest, model=model_key)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint read with ``weights_only=True``: tensors and plain Python values only.

    Unpickling anything else could run code planted in the file. Such a file, or an unreadable one,
    stops the run with an error naming it, instead of being skipped (which would silently retrain).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's first sentence names what was refused; the rest advises allowlisting it, which is not ours to offer
        detail = str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(". ")[0]
        raise RequestError(f"{path}: refused to load this checkpoint: it holds more than tensors and plain values "
                         f"({detail or 'unsupported content'}) and unpickling it could run arbitrary code; delete "
                         "or move the file to resume from an earlier checkpoint or train from the start") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise RequestError(f"{path}: not a readable training checkpoint ({' '.join(str(error).split())[:200]}); "
                         "delete or move the file to resume from an earlier checkpoint") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise RequestError(f"{path}: not a Vitrail training checkpoint (no settings fingerprint); delete or move it")
    return state


def _newest_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    for path in sorted(checkpoint_dir.glob("epoch-*.pt"), reverse=True):
        state = read_checkpoint(path)
        if state.get("fingerprint") == fingerprint:
            return path
        log.warning("%s: checkpoint belongs to other settings; not resuming from it", path)
    return None


def fit(model: nn.Module, dataset: Dataset, params: TrainParams, checkpoint_dir: Path, model_key: str,
        on_epoch: EpochCallback | None = None, teacher_logits: np.ndarray | None = None) -> FitResult:
    """Train ``model`` on the dataset's train split, validate each epoch, keep the best weights.

    The dataset's task decides the loss and the validation score that picks the best epoch (macro-F1
    for classification, macro AUROC for multilabel, foreground IoU for segmentation).

    Args:
        model: a module mapping (N, C, H, W) physical-unit images to logits ((N, K), or (N, K, H, W)
            for segmentation); only parameters with ``requires_grad`` are optimised (adapters, head).
        dataset: a loaded dataset with ``train`` and ``val`` splits.
        params: training knobs.
        checkpoint_dir: where ``epoch-NNN.pt`` files are written every epoch.
        model_key: describes the architecture/adapter, so checkpoints of another model are not resumed.
        on_epoch: called as ``on_epoch(epoch, total_epochs, metrics)`` after every epoch.
        teacher_logits: for ``objective="distillation"``, the output of :func:`cache_teacher_logits`
            on the train split's images (with ``flips`` matching ``params.flip_augment``).
    """
    if "train" not in dataset.splits:
        raise RequestError(f"{dataset.path}: dataset has no labelled training split")
    train = dataset.splits["train"]
    val = dataset.splits.get("val", train)
    class_names = dataset.info.class_names
    task = dataset.info.task
    if params.objective == "distillation":
        expected_views = DIHEDRAL_TRANSFORMS if params.flip_augment else 1
        if teacher_logits is None or teacher_logits.shape[:2] != (expected_views, len(train)):
            got = None if teacher_logits is None else teacher_logits.shape
            raise ValueError(f"distillation needs cached teacher logits of shape ({expected_views}, {len(train)}, ...) "
                             f"for the train split, got {got}")
    check_training_memory(model, params.batch_size, train.images.shape[1:], task)
    pin_determinism(params.seed, params.threads)
    generator = torch.Generator().manual_seed(params.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    remove_partials(checkpoint_dir)  # a killed run's unfinished checkpoint write

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
        state = read_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        if "torch_rng" in state:  # dropout and other layers draw from torch's global generator
            torch.set_rng_state(state["torch_rng"])
        history, best_score, best_epoch, best_state = state["history"], state["best_score"], state["best_epoch"], state["best_state"]
        start_epoch = state["epoch"]
        log.info("resuming from %s (epoch %d of %d)", resume_path.name, start_epoch, params.epochs)

    labels_all = torch.from_numpy(train.labels)
    images_all = torch.from_numpy(train.images)
    teacher_all = torch.from_numpy(teacher_logits) if params.objective == "distillation" else None
    for epoch in range(start_epoch + 1, params.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train), generator=generator)
        running_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * params.batch_size:(step + 1) * params.batch_size]
            batch, labels = images_all[index], labels_all[index]
            view = int(torch.randint(0, DIHEDRAL_TRANSFORMS, (1,), generator=generator).item()) if params.flip_augment else 0
            batch = _dihedral(batch, view)
            if task == "segmentation":
                labels = _dihedral(labels, view)
            teacher = teacher_all[view][index] if teacher_all is not None else None
            loss = _loss(params, task, model(batch), labels, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += float(loss.detach()) * len(index)
            seen += len(index)
        val_logits = predict_logits(model, val.images)
        val_report = score_outputs(task, val.labels, val_logits, class_names)
        val_loss = float(_task_loss(task, "cross-entropy", torch.from_numpy(val_logits), torch.from_numpy(val.labels), 0.0))
        metrics = {
            "train_loss": running_loss / max(seen, 1),
            "val_loss": val_loss,
            **{f"val_{name}": value for name, value in val_report.headline().items()},
            "learning_rate": scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        score = val_report.selection if math.isfinite(val_report.selection) else -1.0
        if score > best_score or best_state is None:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        path = checkpoint_dir / f"epoch-{epoch:03d}.pt"
        with atomic_path(path) as partial:
            torch.save({"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                        "history": history, "best_score": best_score, "best_epoch": best_epoch,
                        "best_state": best_state}, partial)
        checkpoints.append(path)
        if on_epoch is not None:
            on_epoch(epoch, params.epochs, metrics)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(model=model, history=history, best_epoch=best_epoch, resumed_from_epoch=start_epoch,
                     checkpoints=checkpoints)

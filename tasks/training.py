"""The one training loop: parameterised by task type and objective, never by domain.

Task types (see ``domains.TaskType``): classification (one class per sample), multilabel (independent
0/1 findings) and segmentation (a class per pixel). Objectives: cross-entropy (binary cross-entropy
for multilabel), focal, distillation from a teacher's logits, and ``model-loss``: a self-supervised
model (a masked autoencoder, :mod:`tasks.pretraining`) maps a batch of images to its own scalar loss,
labels are not read, and the best epoch is the one with the lowest validation loss. The loop checkpoints every epoch and
resumes from the newest checkpoint whose fingerprint matches the run's settings, so an interrupted
fine-tune picks up where it stopped. Checkpoints are written under a temporary name and renamed into
place, so a run killed mid-write leaves the previous epoch's checkpoint, never a truncated one.

Data is read lazily: a torch ``Dataset`` reads one sample of a split at a time and a ``DataLoader``
(optional worker processes) batches them, so no split is ever held in memory whole. Every random draw
of the data path (the epoch's order, class-balanced draws, each sample's flip/rotation) is made in the
main process from a generator seeded by (seed, epoch): the numbers do not depend on the worker count,
and a resumed run draws what the uninterrupted one drew.

Devices, mixed precision and multi-process (DDP) training come from Lightning Fabric. Fabric rather
than HF Accelerate because it leaves this loop as it is (we keep our own steps, checkpoints and
resume logic instead of handing them to a trainer), names devices, precision and strategy as explicit
objects that map one-to-one onto :class:`TrainParams`, launches DDP by spawning processes from a
function (so a library call or a test can train on several processes without a launcher script), and
runs gloo DDP on CPU, which the two-process test uses. ``lightning-fabric`` alone is installed, not
the whole Lightning trainer.

Reproducibility: :func:`fit` pins the seed, deterministic kernels and the thread count
(:mod:`tasks.reproducibility`); callers that build a model first pin them before building it. The
bitwise guarantee holds on CPU in one process; several processes or a GPU round sums differently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import pickle
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn import functional as F

from tasks.storage import StorageFolder, is_url, open_location
from tasks.dataset import Dataset, Split
from tasks.evaluation import rows_per_batch, score_outputs
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
    objective: Literal["cross-entropy", "focal", "distillation", "model-loss"] = Field(
        "cross-entropy", description="Loss: cross-entropy, focal loss for heavily imbalanced classes, "
                                     "distillation from a teacher model's logits (compress stage), or the loss the "
                                     "model computes itself from unlabelled images (self-supervised pretraining, "
                                     "e.g. a masked autoencoder's reconstruction loss)")
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
    balance_classes: bool = Field(False, description="Draw training samples so rare classes are seen as often as "
                                                     "common ones (with replacement; classification by inverse class "
                                                     "frequency, multilabel by the sample's rarest finding; not "
                                                     "offered for segmentation)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: auto picks a CUDA GPU, then Apple's MPS, then the CPU")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="Arithmetic: 32-bit floats (reproducible), or bfloat16/float16 autocast (faster on "
                          "recent GPUs and CPUs with bf16 support; float16 needs a CUDA GPU)")
    grad_accumulation: int = Field(1, ge=1, le=256, description="Split each optimisation step into this many "
                                                                "micro-batches to save memory; the step still "
                                                                "sees batch_size samples")
    num_workers: int = Field(0, ge=0, le=64, description="Worker processes reading samples in the background "
                                                         "(0 reads in the training process); results do not "
                                                         "depend on it")
    processes: int = Field(1, ge=1, le=64, description="Training processes (distributed data parallel); 1 trains "
                                                       "in this process. On CPU they share the machine's cores, "
                                                       "on CUDA each takes one GPU")


@dataclass
class FitResult:
    """What training produced: the model with its best validation weights, and the history."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    resumed_from_epoch: int = 0
    checkpoints: list[Path | str] = field(default_factory=list)
    """Checkpoints this run wrote: local paths, or URLs when the checkpoint folder is on object storage."""
    rank_digests: list[str] = field(default_factory=list)
    """SHA-256 of the final parameters on every training process (one entry when not distributed)."""

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


def _read_batch(images: Sequence, start: int, size: int) -> torch.Tensor:
    """Rows ``start:start+size`` of an array or lazy array, as a float32 tensor of their own."""
    return torch.from_numpy(np.array(images[start:start + size], dtype=np.float32, copy=True))


@torch.inference_mode()
def cache_teacher_logits(teacher: nn.Module, images: Sequence, flips: bool = True, batch_size: int = 128) -> np.ndarray:
    """Teacher logits computed once for every augmented view (TinyViT-style cached distillation).

    Returns (8, N, ...) for the 8 flip/rotation views the training loop draws from, or (1, N, ...)
    when training without flips; distillation then costs about as much as plain training.
    """
    teacher = teacher.eval()
    batch_size = rows_per_batch(images, batch_size)
    views = range(DIHEDRAL_TRANSFORMS if flips else 1)
    return np.stack([
        np.concatenate([teacher(_dihedral(_read_batch(images, i, batch_size), view)).float().numpy()
                        for i in range(0, len(images), batch_size)])
        for view in views])


@torch.inference_mode()
def predict_logits(model: nn.Module, images: Sequence, batch_size: int = 128) -> np.ndarray:
    """Logits of ``model`` on ``images`` (N, C, H, W; an array or a lazy split array read in batches), in eval mode."""
    was_training = model.training
    model.eval()
    batch_size = rows_per_batch(images, batch_size)
    outputs = [model(_read_batch(images, i, batch_size)).float().numpy()
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
    """Memory one optimisation step of ``model`` on ``batch_size`` samples of ``sample_shape`` needs.

    A sample is a tile (C, H, W) or a bag of tiles (T, C, H, W), which costs T tiles.

    Activations are estimated from the ViT's dimensions (tokens from the tile and patch size, width,
    depth, heads, MLP width), so a request is judged before anything is allocated; a model without a
    timm ViT inside is charged for its input and output only.
    """
    channels, height, width_px = (int(v) for v in sample_shape[-3:])
    batch_size *= int(np.prod(sample_shape[:-3], dtype=np.int64))  # tiles per bag for bag samples
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
    # Threads, processes, accumulation and the device change float rounding, not what is trained, and
    # workers change nothing: a run may resume with other values of these.
    payload = params.model_dump(exclude={"resume", "epochs", "threads", "num_workers", "device", "processes",
                                         "grad_accumulation"})
    payload.update(dataset=dataset_digest, model=model_key)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_checkpoint(path: Path | str) -> dict:
    """A training checkpoint (a local path or a URL) read with ``weights_only=True``: tensors and plain values only.

    Unpickling anything else could run code planted in the file. Such a file, or an unreadable one,
    stops the run with an error naming it, instead of being skipped (which would silently retrain).
    """
    try:
        if is_url(path):  # streamed from the object store (torch reads a seekable file object)
            with open_location(path) as handle:
                state = torch.load(handle, map_location="cpu", weights_only=True)
        else:
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


def _newest_checkpoint(checkpoint_dir: StorageFolder, fingerprint: str) -> Path | str | None:
    for name in reversed(checkpoint_dir.glob("epoch-*.pt")):
        path = checkpoint_dir.reference(name)
        state = read_checkpoint(path)
        if state.get("fingerprint") == fingerprint:
            return path
        log.warning("%s: checkpoint belongs to other settings; not resuming from it", path)
    return None




# --- the data path --------------------------------------------------------------------------------------


class SplitSamples(torch.utils.data.Dataset):
    """One split's samples, read one at a time: the key ``(index, view)`` gives the sample under one of
    the 8 flips/rotations, with its label (transformed alike for segmentation) and, when distilling,
    the teacher's cached logits for that very view."""

    def __init__(self, split: Split, task: str, teacher_logits: np.ndarray | None = None):
        self.split = split
        self.task = task
        self.teacher_logits = teacher_logits

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, view = key if isinstance(key, tuple) else (key, 0)
        # A copy of its own: the split may be a read-only memory map, and collation stacks it anyway.
        image = torch.from_numpy(np.array(self.split.images[index], dtype=np.float32, copy=True))
        label = torch.as_tensor(np.array(self.split.labels[index], copy=True))
        if view:
            image = _dihedral(image, view)
            if self.task == "segmentation":
                label = _dihedral(label, view)
        if self.teacher_logits is None:
            return image, label
        return image, label, torch.from_numpy(np.array(self.teacher_logits[view, index], copy=True))

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, ...]]:
        """The samples of one batch (what a DataLoader asks for), the same as ``[self[k] for k in keys]``.

        The batch's images are read at once (a lazy split decodes and scales each chunk they share once,
        in one vectorised pass) instead of sample by sample; only the views are applied per sample.
        """
        keys = [key if isinstance(key, tuple) else (key, 0) for key in keys]
        indices = np.array([index for index, _ in keys], dtype=np.int64)
        images = torch.from_numpy(np.array(self.split.images[indices], dtype=np.float32, copy=True))
        labels = torch.as_tensor(np.array(self.split.labels[indices], copy=True))
        samples = []
        for position, (index, view) in enumerate(keys):
            image, label = images[position], labels[position]
            if view:
                image = _dihedral(image, view)
                if self.task == "segmentation":
                    label = _dihedral(label, view)
            if self.teacher_logits is None:
                samples.append((image, label))
            else:
                samples.append((image, label, torch.from_numpy(np.array(self.teacher_logits[view, index], copy=True))))
        return samples


BALANCEABLE_TASKS = ("classification", "multilabel")


def balanced_sample_weights(labels: np.ndarray, task: str) -> np.ndarray:
    """Per-sample drawing weights that give every class (or finding) about the same share of draws.

    Classification: inverse class frequency. Multilabel: the inverse frequency of the sample's rarest
    positive finding, samples without any finding counting as one more group. Segmentation is refused:
    a tile holds several classes, so balancing tiles does not balance pixels (use the focal objective).

    Raises:
        RequestError: the task is segmentation.
    """
    labels = np.asarray(labels)
    if task == "classification":
        counts = np.bincount(labels.clip(min=0), minlength=int(labels.max()) + 1)
        return (1.0 / counts[labels.clip(min=0)]).astype(np.float64)
    if task == "multilabel":
        positive = labels > 0
        finding_counts = positive.sum(axis=0)
        none_count = max(int((~positive.any(axis=1)).sum()), 1)
        inverse = np.where(positive, 1.0 / np.maximum(finding_counts, 1)[None, :], 0.0)
        return np.where(positive.any(axis=1), inverse.max(axis=1), 1.0 / none_count)
    raise RequestError(f"balance_classes is not offered for {task} (a tile holds several classes, so balancing "
                       "tiles does not balance pixels); turn it off or use the focal objective")


class EpochBatches(torch.utils.data.Sampler):
    """The micro-batches of ``(index, view)`` keys one process trains on in one epoch.

    Each optimisation step takes ``batch_size`` keys of the epoch's order and splits them into
    ``processes x accumulation`` near-equal parts; this process gets its ``accumulation`` parts. The order
    (a permutation, the chunk-friendly order of a lazy split's ``chunk_shuffled_order``, or weighted
    draws with replacement) and the views come from generators seeded by (seed, epoch), so every process
    and every resumed run sees the same plan.
    """

    def __init__(self, size: int, batch_size: int, accumulation: int, rank: int, processes: int, seed: int,
                 flips: bool, weights: np.ndarray | None = None,
                 chunked_order: Callable[[np.random.Generator], np.ndarray] | None = None):
        self.size, self.batch_size, self.accumulation = size, batch_size, accumulation
        self.rank, self.processes, self.seed, self.flips = rank, processes, seed, flips
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.chunked_order = chunked_order
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __len__(self) -> int:
        return self.steps * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        if self.weights is None and self.chunked_order is not None:
            # A chunked store decodes a whole chunk per read: shuffle chunks, and samples within a few of them.
            order = torch.from_numpy(self.chunked_order(np.random.default_rng([self.seed, self.epoch])))
        elif self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            drawn = torch.utils.data.WeightedRandomSampler(self.weights, self.size, replacement=True,
                                                           generator=generator)
            order = torch.tensor(list(drawn), dtype=torch.int64)
        views = (torch.randint(0, DIHEDRAL_TRANSFORMS, (self.size,), generator=generator) if self.flips
                 else torch.zeros(self.size, dtype=torch.int64))
        parts_per_step = self.processes * self.accumulation
        mine = slice(self.rank * self.accumulation, (self.rank + 1) * self.accumulation)
        for step in range(self.steps):
            window = slice(step * self.batch_size, (step + 1) * self.batch_size)
            keys = list(zip(order[window].tolist(), views[window].tolist()))
            if len(keys) < parts_per_step:
                # A short last step: repeat keys so every process runs the same number of backward passes.
                keys = [keys[i % len(keys)] for i in range(parts_per_step)]
            for chunk in np.array_split(np.arange(len(keys)), parts_per_step)[mine]:
                yield [keys[i] for i in chunk]


def _seed_worker(worker_id: int, seed: int) -> None:
    """Worker processes draw nothing the numbers depend on; seed them anyway and keep them to one thread
    each, so readers do not compete with the training threads for cores."""
    random.seed(seed + worker_id)
    np.random.seed((seed + worker_id) % 2**32)
    torch.set_num_threads(1)
    _drop_inherited_prefect_exit_hooks()


def _drop_inherited_prefect_exit_hooks() -> None:
    """Forget the at-exit drains of Prefect's queue services that a forked worker inherits from a flow run.

    Prefect (3.8) resets its services in a forked child but leaves their ``threading`` at-exit drain
    registered; at the worker's exit that drain fails an assertion, the worker exits with code 1 and the
    DataLoader fails the task ("worker exited unexpectedly"). A worker has no events or logs of its own to
    flush, so the drains have nothing to do there.
    """
    from prefect._internal.concurrency.services import _QueueServiceBase

    hooks = getattr(threading, "_threading_atexits", None)
    if hooks is None:
        return
    # Each hook is a functools.partial around the service's bound ``_at_exit``.
    hooks[:] = [hook for hook in hooks
                if not isinstance(getattr(getattr(hook, "func", hook), "__self__", None), _QueueServiceBase)]


def _loader(samples: SplitSamples, params: TrainParams, pin_memory: bool,
            batch_sampler: EpochBatches | None = None, batch_size: int | None = None) -> torch.utils.data.DataLoader:
    workers = params.num_workers
    options: dict[str, Any] = dict(num_workers=workers, pin_memory=pin_memory,
                                   generator=torch.Generator().manual_seed(params.seed))
    if workers > 0:
        options.update(persistent_workers=True, worker_init_fn=functools.partial(_seed_worker, seed=params.seed))
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(samples, batch_sampler=batch_sampler, **options)
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False, **options)


# --- devices and processes ------------------------------------------------------------------------------


FABRIC_PRECISION = {"32": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


def select_device(requested: str) -> str:
    """The device to train on: ``auto`` picks CUDA, then MPS, then the CPU; an explicit choice is checked.

    Raises:
        RequestError: the requested device is not usable on this machine.
    """
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise RequestError("device 'cuda' was requested but this machine has no usable CUDA GPU "
                           f"(torch {torch.__version__} sees none); choose device 'auto' or 'cpu'")
    if requested == "mps" and not mps:
        raise RequestError("device 'mps' was requested but Apple's Metal backend is not available here; "
                           "choose device 'auto' or 'cpu'")
    return requested


def build_fabric(params: TrainParams):
    """A Lightning Fabric for the requested device, precision and number of processes.

    Raises:
        RequestError: a combination this machine cannot run (float16 autocast without CUDA, more
            processes than GPUs, DDP on MPS).
    """
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    device = select_device(params.device)
    if params.precision == "16-mixed" and device != "cuda":
        # Fabric would silently switch to bf16; say so instead, the user asked for float16.
        raise RequestError(f"precision '16-mixed' needs a CUDA GPU (training on {device}); use 'bf16-mixed' or '32'")
    if params.processes > 1 and device == "mps":
        raise RequestError("several training processes are not supported on MPS; set processes to 1")
    if device == "cuda" and params.processes > torch.cuda.device_count():
        raise RequestError(f"processes={params.processes} needs as many GPUs, but {torch.cuda.device_count()} "
                           "are visible; lower processes")
    if params.processes == 1:
        strategy: Any = "auto"
    else:
        # spawn, not fork: safe with CUDA and with the threads a Prefect worker runs; gloo is the CPU backend.
        strategy = DDPStrategy(start_method="spawn", process_group_backend="nccl" if device == "cuda" else "gloo")
    return Fabric(accelerator=device, devices=params.processes, strategy=strategy,
                  precision=FABRIC_PRECISION[params.precision])


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, by name: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the loop -------------------------------------------------------------------------------------------


def fit(model: nn.Module, dataset: Dataset, params: TrainParams, checkpoint_dir: Path | str, model_key: str,
        on_epoch: EpochCallback | None = None, teacher_logits: np.ndarray | None = None) -> FitResult:
    """Train ``model`` on the dataset's train split, validate each epoch, keep the best weights.

    The dataset's task decides the loss and the validation score that picks the best epoch (macro-F1
    for classification, macro AUROC for multilabel, foreground IoU for segmentation). With
    ``params.processes > 1`` the work runs in that many spawned DDP processes; only the first writes
    checkpoints and calls ``on_epoch`` (which must then be picklable), and ``model`` receives the
    trained weights, checked equal on every process.

    Args:
        model: a module mapping (N, C, H, W) images in its input units (the dataset's stored units for a model
            built by :func:`tasks.models.normalizing_model`) to logits ((N, K), or (N, K, H, W)
            for segmentation); only parameters with ``requires_grad`` are optimised (adapters, head).
            With ``params.objective == "model-loss"`` it maps images to its own scalar loss instead; the
            validation score is then minus the mean validation loss, computed under a fixed seed (see
            :func:`_mean_model_loss`).
        dataset: a loaded dataset with ``train`` and ``val`` splits.
        params: training knobs.
        checkpoint_dir: where ``epoch-NNN.pt`` files are written every epoch: a local folder or an
            fsspec URL (``s3://bucket/prefix``), from which a later run on any machine resumes.
        model_key: describes the architecture/adapter, so checkpoints of another model are not resumed.
        on_epoch: called as ``on_epoch(epoch, total_epochs, metrics)`` after every epoch.
        teacher_logits: for ``objective="distillation"``, the output of :func:`cache_teacher_logits`
            on the train split's images (with ``flips`` matching ``params.flip_augment``).

    Raises:
        RequestError: no training split, a device or precision this machine lacks, a batch that
            cannot be split over the processes and accumulation steps, or a step that cannot fit in memory.
    """
    if "train" not in dataset.splits:
        raise RequestError(f"{dataset.path}: dataset has no labelled training split")
    train = dataset.splits["train"]
    if params.objective == "distillation":
        expected_views = DIHEDRAL_TRANSFORMS if params.flip_augment else 1
        if teacher_logits is None or teacher_logits.shape[:2] != (expected_views, len(train)):
            got = None if teacher_logits is None else teacher_logits.shape
            raise ValueError(f"distillation needs cached teacher logits of shape ({expected_views}, {len(train)}, ...) "
                             f"for the train split, got {got}")
    parts = params.processes * params.grad_accumulation
    if params.batch_size < parts:
        raise RequestError(f"batch_size {params.batch_size} cannot be split over {params.processes} processes x "
                           f"{params.grad_accumulation} accumulation steps; raise batch_size or lower those")
    if params.objective == "model-loss" and params.balance_classes:
        raise RequestError("balance_classes draws by label; the model-loss objective reads no labels, turn it off")
    if params.balance_classes and dataset.info.task not in BALANCEABLE_TASKS:
        balanced_sample_weights(np.zeros(0), dataset.info.task)  # refuses with the reason, before any work
    # The guard judges one micro-batch: that is what a forward/backward pass holds at once.
    check_training_memory(model, math.ceil(params.batch_size / parts), tuple(train.images.shape[1:]), dataset.info.task)
    fabric = build_fabric(params)
    if fabric.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    checkpoint_folder = StorageFolder(checkpoint_dir)
    checkpoint_folder.makedirs()
    job = _TrainingJob(dataset, params, checkpoint_folder, model_key, on_epoch, teacher_logits)
    outcome = fabric.launch(_train_process, model, job)
    if len(set(outcome["rank_digests"])) != 1:
        raise RuntimeError(f"training processes ended with different weights: {outcome['rank_digests']}")
    model.to("cpu")
    if params.processes > 1:  # trained in other processes; in this one the model trained in place
        model.load_state_dict(read_checkpoint(outcome["weights_from"])["best_state"])
    model.eval()
    return FitResult(model=model, history=outcome["history"], best_epoch=outcome["best_epoch"],
                     resumed_from_epoch=outcome["start_epoch"], checkpoints=outcome["checkpoints"],
                     rank_digests=outcome["rank_digests"])


def _gather_digests(fabric, model: nn.Module) -> list[str]:
    """Every process's weight digest, in rank order (the SHA-256 travels as four int64 words)."""
    own = torch.from_numpy(np.frombuffer(bytes.fromhex(state_digest(model)), dtype=np.int64).copy())
    gathered = fabric.all_gather(fabric.to_device(own)).cpu()
    rows = gathered.reshape(-1, own.numel())
    return [row.numpy().tobytes().hex() for row in rows]


class _TrainingJob:
    """Everything a training process needs besides the model.

    A plain class on purpose: Fabric's launcher rebuilds dataclasses and containers it is handed (to
    copy the modules inside), which frozen dataclasses such as :class:`Dataset` refuse.
    """

    def __init__(self, dataset: Dataset, params: TrainParams, checkpoint_dir: StorageFolder, model_key: str,
                 on_epoch: EpochCallback | None, teacher_logits: np.ndarray | None):
        self.dataset, self.params, self.checkpoint_dir = dataset, params, checkpoint_dir
        self.model_key, self.on_epoch, self.teacher_logits = model_key, on_epoch, teacher_logits


def _train_process(fabric, model: nn.Module, job: _TrainingJob) -> dict:
    """The loop itself, run once per process; returns (from rank 0) what :func:`fit` needs."""
    dataset, params, checkpoint_dir = job.dataset, job.params, job.checkpoint_dir
    model_key, on_epoch, teacher_logits = job.model_key, job.on_epoch, job.teacher_logits
    train = dataset.splits["train"]
    val = dataset.splits.get("val", train)
    class_names = dataset.info.class_names
    task = dataset.info.task
    pin_determinism(params.seed, params.threads)
    if fabric.is_global_zero:
        checkpoint_dir.remove_partials()  # a killed run's unfinished checkpoint write
    fabric.barrier()

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
    checkpoints: list[Path | str] = []

    resume_path = _newest_checkpoint(checkpoint_dir, fingerprint) if params.resume else None
    if resume_path is not None:
        state = read_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "torch_rng" in state:  # dropout and other layers draw from torch's global generator
            torch.set_rng_state(state["torch_rng"])
        history, best_score, best_epoch, best_state = state["history"], state["best_score"], state["best_epoch"], state["best_state"]
        start_epoch = state["epoch"]
        log.info("resuming from %s (epoch %d of %d)", resume_path, start_epoch, params.epochs)

    weights = balanced_sample_weights(np.asarray(train.labels[:]), task) if params.balance_classes else None
    batches = EpochBatches(len(train), params.batch_size, params.grad_accumulation, fabric.global_rank,
                           fabric.world_size, params.seed, params.flip_augment, weights,
                           chunked_order=getattr(train.images, "chunk_shuffled_order", None))
    pin_memory = fabric.device.type == "cuda"
    distilling = params.objective == "distillation"
    self_supervised = params.objective == "model-loss"
    # Labels are not read by a self-supervised model: no task, so flips never transform them.
    sample_task = "none" if self_supervised else task
    train_loader = _loader(SplitSamples(train, sample_task, teacher_logits if distilling else None), params,
                           pin_memory, batch_sampler=batches)
    micro_size = math.ceil(params.batch_size / (fabric.world_size * params.grad_accumulation))
    val_loader = _loader(SplitSamples(val, sample_task), params, pin_memory,
                         batch_size=max(micro_size, rows_per_batch(val.images, 64)))
    fabric_model, fabric_optimizer = fabric.setup(model, optimizer)

    for epoch in range(start_epoch + 1, params.epochs + 1):
        started = time.perf_counter()
        fabric_model.train()
        batches.set_epoch(epoch)
        running_loss, seen = 0.0, 0
        micro_batches = iter(train_loader)
        for _ in range(steps_per_epoch):
            parts = [fabric.to_device(next(micro_batches)) for _ in range(params.grad_accumulation)]
            step_samples = sum(len(part[1]) for part in parts)
            fabric_optimizer.zero_grad(set_to_none=True)
            for k, part in enumerate(parts):
                images, labels = part[0], part[1]
                teacher = part[2] if distilling else None
                # Gradients are all-reduced once per step, on the last micro-batch.
                with fabric.no_backward_sync(fabric_model, enabled=k < len(parts) - 1):
                    if self_supervised:
                        loss = fabric_model(images)
                    else:
                        loss = _loss(params, task, fabric_model(images), labels, teacher)
                    # Weighted by its share of the step, the sum of micro-batch gradients is the step's mean.
                    fabric.backward(loss * (len(labels) / step_samples))
                running_loss += float(loss.detach()) * len(labels)
                seen += len(labels)
            fabric_optimizer.step()
            scheduler.step()
        if self_supervised:
            val_loss = _mean_model_loss(fabric, fabric_model, val_loader, params.seed)
            val_scores: dict[str, float] = {}
            score = -val_loss if math.isfinite(val_loss) else -math.inf
        else:
            val_logits, val_labels = _predict_split(fabric, fabric_model, val_loader)
            val_report = score_outputs(task, val_labels, val_logits, class_names)
            val_loss = float(_task_loss(task, "cross-entropy", torch.from_numpy(val_logits),
                                        torch.from_numpy(val_labels), 0.0))
            val_scores = {f"val_{name}": value for name, value in val_report.headline().items()}
            score = val_report.selection if math.isfinite(val_report.selection) else -1.0
        metrics = {
            "train_loss": running_loss / max(seen, 1),
            "val_loss": val_loss,
            **val_scores,
            "learning_rate": scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        if score > best_score or best_state is None:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        name = f"epoch-{epoch:03d}.pt"
        if fabric.is_global_zero:
            # Published whole: renamed into place locally, uploaded to its final key on an object store.
            with checkpoint_dir.writing(name) as partial:
                torch.save({"fingerprint": fingerprint, "epoch": epoch,
                            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "sampler_seed": params.seed, "torch_rng": torch.get_rng_state(),
                            "history": history, "best_score": best_score, "best_epoch": best_epoch,
                            "best_state": best_state}, partial)
            if on_epoch is not None:
                on_epoch(epoch, params.epochs, metrics)
        checkpoints.append(checkpoint_dir.reference(name))
        fabric.barrier()

    if best_state is not None:
        model.load_state_dict(best_state)
    # Weights do not travel back through the launcher's pipe (a spawned rank blocks writing megabytes
    # into it while the parent waits for the ranks to end): the caller reads the best weights from the
    # newest checkpoint, which holds them.
    outcome = {"weights_from": checkpoints[-1] if checkpoints else resume_path, "history": history,
               "best_epoch": best_epoch, "start_epoch": start_epoch, "checkpoints": checkpoints,
               "rank_digests": _gather_digests(fabric, model)}
    _leave_process_group(fabric)
    return outcome


def _leave_process_group(fabric) -> None:
    """Close the DDP group on every rank together before the spawned processes exit.

    Left open, a rank that exits first tears down gloo's threads while a peer's transport still uses
    them, and the process aborts ("terminate called without an active exception").
    """
    if fabric.world_size > 1 and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()


@torch.inference_mode()
def _mean_model_loss(fabric, model: nn.Module, loader: torch.utils.data.DataLoader, seed: int) -> float:
    """Mean per-sample loss a self-supervised model gives a whole split, in eval mode.

    The model's random draws (a masked autoencoder's masks) come from torch's generator reseeded with
    ``seed`` inside a fork of its state: every epoch is scored on the same masks, so epochs compare
    fairly, and the training stream of random numbers (saved in checkpoints for resuming) is untouched.
    """
    model.eval()
    devices = [fabric.device] if fabric.device.type == "cuda" else []
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for images, _ in loader:
            total += float(model(fabric.to_device(images))) * len(images)
            count += len(images)
    model.train()
    return total / max(count, 1)


@torch.inference_mode()
def _predict_split(fabric, model: nn.Module, loader: torch.utils.data.DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a whole split, read batch by batch (every process scores the whole split, so
    all of them pick the same best epoch)."""
    model.eval()
    logits, labels = [], []
    for images, batch_labels in loader:
        logits.append(model(fabric.to_device(images)).float().cpu().numpy())
        labels.append(batch_labels.numpy())
    model.train()
    return np.concatenate(logits), np.concatenate(labels)

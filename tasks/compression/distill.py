"""Knowledge distillation: train a smaller timm ViT student on the reference model's (teacher's) logits.

Training is the one training loop's ``distillation`` objective (temperature-scaled KL to the teacher
plus cross-entropy to the labels, Hinton et al. 2015); the teacher's logits are computed once for
every augmented view and cached (TinyViT, Wu et al. 2022), so a distillation epoch costs about a
plain epoch. The student is built with :mod:`tasks.models` (fewer blocks, optionally another timm
width) and wrapped with the teacher's own normalisation. When the widths match it starts from evenly
spaced teacher blocks (DistilBERT's layer-selection initialisation): on small datasets that beats
random initialisation by a wide margin.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, Field
from torch import nn

log = logging.getLogger(__name__)


class DistillParams(BaseModel):
    """Distil the fine-tuned model into a smaller student ViT."""

    enabled: bool = Field(False, description="Train a smaller student on the fine-tuned model's logits")
    student_backbone: str = Field("vit_tiny_patch16_224", min_length=1, max_length=120,
                                  description="timm model name of the student (a narrower ViT also works)")
    student_depth: int = Field(6, ge=1, le=48, description="Transformer blocks of the student")
    init_from_teacher: bool = Field(True, description="Start from evenly spaced teacher blocks when widths match")
    epochs: int = Field(6, ge=1, le=500, description="Distillation epochs")
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate")
    temperature: float = Field(2.0, gt=0, le=20, description="Softmax temperature of the distillation term")
    weight: float = Field(0.7, ge=0, le=1, description="Share of the distillation term in the loss (rest: labels)")


def _inner_vit(model: nn.Module):
    from timm.models.vision_transformer import VisionTransformer

    found = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if found is None:
        raise ValueError(f"{type(model).__name__}: distillation needs a timm VisionTransformer teacher")
    return found


def teacher_block_choice(teacher_depth: int, student_depth: int) -> list[int]:
    """Evenly spaced teacher blocks for a shallower student, always including the last one."""
    if student_depth >= teacher_depth:
        return list(range(teacher_depth))[:student_depth]
    step = teacher_depth / student_depth
    return [min(teacher_depth - 1, round((i + 1) * step) - 1) for i in range(student_depth)]


def build_student(teacher: nn.Module, params: DistillParams, dataset) -> nn.Module:
    """A student ViT for the dataset's bands and classes, normalising inputs like the teacher."""
    from tasks.models import (BackboneParams, NormalizedClassifier, build_backbone, input_scaling_of, network_channels,
                              normalizing_model, windows_of)

    info = dataset.info
    vit = _inner_vit(teacher)
    patch = int(vit.patch_embed.patch_size[0])
    backbone = BackboneParams(name=params.student_backbone, patch_size=patch, depth=params.student_depth)
    from tasks.bags import bag_params_of

    bags = bag_params_of(teacher)  # a slide teacher gets a slide student, trained on the same bags
    net = build_backbone(backbone, network_channels(info), info.num_classes, info.tile_size, task=info.task, bags=bags)
    if params.init_from_teacher:
        _copy_teacher_blocks(vit, net.encoder if bags is not None else net, params.student_depth)
    mean = getattr(teacher, "mean", None)
    std = getattr(teacher, "std", None)
    normalisation = getattr(teacher, "input_normalisation", None)  # the student sees what the teacher saw
    if mean is not None and std is not None:  # the teacher's units and statistics: the student takes the same raw input
        return NormalizedClassifier(net, tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()),
                                    input_normalisation=normalisation, input_scaling=input_scaling_of(teacher),
                                    windows=windows_of(teacher))
    return normalizing_model(net, info, input_normalisation=normalisation)


def _copy_teacher_blocks(teacher_vit: nn.Module, student: nn.Module, depth: int) -> None:
    source, target = teacher_vit.state_dict(), student.state_dict()
    chosen = teacher_block_choice(len(teacher_vit.blocks), depth)
    mapped = {}
    for key, value in target.items():
        origin = key
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            origin = f"blocks.{chosen[int(index)]}.{rest}"
        if origin in source and source[origin].shape == value.shape:
            mapped[key] = source[origin]
    if len(mapped) < len(target):
        log.info("student starts from random weights for %d of %d tensors (shapes differ from the teacher)",
                 len(target) - len(mapped), len(target))
    student.load_state_dict({**target, **mapped})


def distill(teacher: nn.Module, params: DistillParams, context, name: str) -> tuple[nn.Module, dict]:
    """Build and train the student; return it (eval mode) and a record of the run."""
    from tasks.reproducibility import pin_determinism
    from tasks.training import TrainParams, fit

    # Seeded before the student is built: its fresh layers (and any the teacher cannot fill) draw from
    # torch's global generator.
    pin_determinism(context.seed, context.threads)
    student = build_student(teacher, params, context.dataset)
    train = TrainParams(epochs=params.epochs, learning_rate=params.learning_rate, objective="distillation",
                        distill_temperature=params.temperature, distill_weight=params.weight,
                        flip_augment=context.flips, resume=False, seed=context.seed, threads=context.threads)
    result = fit(student, context.dataset, train, context.out_dir / "checkpoints" / name,
                 f"student-{params.student_backbone}-d{params.student_depth}", teacher_logits=context.teacher_logits())
    model = result.model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    best = result.best_metrics
    return model, {"student_backbone": params.student_backbone, "student_depth": params.student_depth,
                   "init_from_teacher": params.init_from_teacher, "epochs": params.epochs,
                   "temperature": params.temperature, "weight": params.weight, "best_epoch": result.best_epoch,
                   **{k: v for k, v in best.items() if k.startswith("val_")}}


class DistillStudent:
    """The distill technique: the variant's model becomes the teacher of a smaller student."""

    stage = "distill"

    def __init__(self, params: DistillParams):
        self.params = params

    def apply(self, variant, context):
        from tasks.compression.technique import REFERENCE_ROOT

        name = f"student-d{self.params.student_depth}"
        if variant.name != REFERENCE_ROOT:
            name = f"{variant.name}-{name}"
        if context.teacher is None:
            context.teacher = variant.model
        model, record = distill(variant.model, self.params, context, name)
        return variant.then("distill", name, record, model=model)

"""Structured pruning of timm ViTs: whole attention heads and MLP hidden channels, then a recovery fine-tune.

The residual width (embed_dim) is kept, so patch embedding, norms, position embedding and head are
untouched and every block stays a plain timm block: only ``qkv``/``proj`` lose the rows/columns of
the removed heads and ``fc1``/``fc2`` those of the removed hidden channels. Torch-Pruning's
functional pruners do the tensor surgery; we pick the indices ourselves (L2 magnitude, as
Torch-Pruning's ``MagnitudeImportance``) because which qkv rows form one head is a property of
timm's reshape that a traced dependency graph cannot see. Heads are removed whole (never shrunk):
timm's fused attention derives its 1/sqrt(head_dim) scale from the shapes, so shrinking head_dim would
silently change the function. ``num_heads``/``attn_dim`` are updated to match.

A pruned model is judged only after recovery (Torch-Pruning's and LLM-Pruner's practice): the
recovery fine-tune runs through the one training loop, distilling from the unpruned reference.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from pydantic import BaseModel, Field
from torch import nn


class PruneParams(BaseModel):
    """Structured pruning of heads and MLP channels, with a short recovery fine-tune."""

    enabled: bool = Field(False, description="Prune attention heads and MLP channels")
    ratio: float = Field(0.3, ge=0.0, le=0.9, description="Share of MLP channels (and, rounded, of heads) removed per block")
    recovery_epochs: int = Field(3, ge=0, le=200, description="Fine-tune epochs after pruning (0: none)")
    recovery_learning_rate: float = Field(5e-4, gt=0, le=1.0, description="Peak learning rate of the recovery fine-tune")
    recovery_distill: bool = Field(True, description="Recover by distilling from the unpruned model (else labels only)")


def heads_to_remove(num_heads: int, ratio: float) -> int:
    """Heads removed at ``ratio``: nearest count, halves rounding down, at least one head kept."""
    return max(0, min(num_heads - 1, math.ceil(ratio * num_heads - 0.5)))


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    from timm.layers import Attention, Mlp

    pairs = []
    for module in model.modules():
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if isinstance(attn, Attention) and isinstance(mlp, Mlp):
            pairs.append((attn, mlp))
    if not pairs:
        raise ValueError(f"{type(model).__name__}: no timm ViT blocks (Attention + Mlp) to prune")
    return pairs


def _prune_heads(attn: nn.Module, remove: int) -> None:
    import torch_pruning as tp

    if remove == 0:
        return
    if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
        raise ValueError("head pruning supports timm Attention without scale_norm or gating")
    heads, dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv.weight.detach().reshape(3, heads, dim, -1)
    proj = attn.proj.weight.detach().reshape(attn.proj.out_features, heads, dim)
    score = qkv.pow(2).sum(dim=(0, 2, 3)) + proj.pow(2).sum(dim=(0, 2))
    dropped = score.argsort()[:remove].tolist()
    proj_idx = [h * dim + d for h in dropped for d in range(dim)]
    qkv_idx = [part * heads * dim + i for part in range(3) for i in proj_idx]
    tp.prune_linear_out_channels(attn.qkv, qkv_idx)
    tp.prune_linear_in_channels(attn.proj, proj_idx)
    attn.num_heads = heads - remove
    attn.attn_dim = attn.num_heads * dim


def _prune_mlp(mlp: nn.Module, ratio: float) -> None:
    import torch_pruning as tp

    hidden = mlp.fc1.out_features
    remove = min(hidden - 1, round(ratio * hidden))
    if remove == 0:
        return
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError("MLP pruning supports timm Mlp without an inner norm")
    score = mlp.fc1.weight.detach().norm(dim=1) * mlp.fc2.weight.detach().norm(dim=0)
    dropped = score.argsort()[:remove].tolist()
    tp.prune_linear_out_channels(mlp.fc1, dropped)
    tp.prune_linear_in_channels(mlp.fc2, dropped)


def prune_vit(model: nn.Module, ratio: float) -> nn.Module:
    """A structurally pruned copy of ``model`` (the original is untouched); ratio 0 returns an exact copy."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    model = copy.deepcopy(model).eval()
    for attn, mlp in _attention_modules(model):
        _prune_heads(attn, heads_to_remove(attn.num_heads, ratio))
        _prune_mlp(mlp, ratio)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def recover(model: nn.Module, context, epochs: int, learning_rate: float, distill: bool, model_key: str,
            checkpoint_dir: Path) -> tuple[nn.Module, dict]:
    """Fine-tune every weight of ``model`` through the one training loop; return it and a small record."""
    from tasks.training import TrainParams, fit

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    objective = "distillation" if distill and context.teacher is not None else "cross-entropy"
    params = TrainParams(epochs=epochs, learning_rate=learning_rate, warmup_epochs=0.0, objective=objective,
                         flip_augment=context.flips, resume=False, seed=context.seed, threads=context.threads)
    teacher_logits = context.teacher_logits() if objective == "distillation" else None
    result = fit(model, context.dataset, params, checkpoint_dir, model_key, teacher_logits=teacher_logits)
    best = result.best_metrics
    return result.model.eval(), {"objective": objective, "epochs": epochs, "best_epoch": result.best_epoch,
                                 **{k: v for k, v in best.items() if k.startswith("val_")}}


class PruneStructured:
    """The prune technique: remove heads and MLP channels, then recover."""

    stage = "prune"

    def __init__(self, params: PruneParams):
        self.params = params

    def apply(self, variant, context):
        from tasks.compression.technique import REFERENCE_ROOT

        before = count_parameters(variant.model)
        pruned = prune_vit(variant.model, self.params.ratio)
        suffix = f"pruned{round(self.params.ratio * 100)}"
        name = suffix if variant.name == REFERENCE_ROOT else f"{variant.name}-{suffix}"
        record = {"ratio": self.params.ratio, "params_before": before, "params_after": count_parameters(pruned),
                  "heads_after": [attn.num_heads for attn, _ in _attention_modules(pruned)]}
        if self.params.recovery_epochs > 0:
            pruned, record["recovery"] = recover(pruned, context, self.params.recovery_epochs,
                                                 self.params.recovery_learning_rate, self.params.recovery_distill,
                                                 f"{name}-recovery", context.out_dir / "checkpoints" / name)
        for parameter in pruned.parameters():
            parameter.requires_grad_(False)
        return variant.then("prune", name, record, model=pruned)


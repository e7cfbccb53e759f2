"""Token reduction at inference: ToMe token merging and EViT attentive-token keeping on timm ViTs.

Both techniques need the attention weights (EViT ranks tokens by the class token's attention) or
the keys (ToMe matches tokens by key similarity), and ToMe adds a size bias inside the softmax.
timm's fused attention (``F.scaled_dot_product_attention``) hides all of that, so blocks that reduce
tokens run our own attention forward that computes the softmax explicitly. Blocks before the first
reduction run timm's own forward, so ``merge_r=0`` / ``keep_ratio=1`` is the baseline, bit for bit.

References: Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023) -- bipartite soft
matching and proportional attention; Liang et al., "Not All Patches Are What You Need" (EViT, ICLR
2022) -- keep the top-k tokens by class-token attention and fuse the rest into one token.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn


class TokenReductionParams(BaseModel):
    """Inference-time token reduction (no retraining needed)."""

    method: Literal["none", "tome", "evit"] = Field(
        "none", description="none; tome: merge similar tokens in every block; evit: keep the most attended tokens")
    merge_r: int = Field(8, ge=0, le=1024, description="ToMe: tokens merged per block (capped so min_tokens remain)")
    min_tokens: int = Field(8, ge=1, le=4096, description="ToMe: patch tokens that always remain after merging")
    keep_ratio: float = Field(0.7, gt=0.0, le=1.0,
                              description="EViT: share of tokens kept at each reduction block (at 1/4, 1/2, 3/4 depth)")


@dataclass(frozen=True)
class TokenPlan:
    """What a reduction does block by block: tokens removed in each block and tokens left after it."""

    method: str
    removed: tuple[int, ...]
    tokens_after: tuple[int, ...]
    tokens_in: int

    def as_dict(self) -> dict:
        return {"method": self.method, "removed_per_block": list(self.removed),
                "tokens_after_block": list(self.tokens_after), "tokens_in": self.tokens_in}


def plan_token_reduction(params: TokenReductionParams, patch_tokens: int, depth: int) -> TokenPlan:
    """The static per-block schedule (token counts never depend on the input, so ONNX shapes stay fixed).

    ToMe: block i merges ``min(r, ceil(T/2) - 1, T - 1 - min_tokens)`` tokens, T being the tokens
    entering it (class token included): bipartite matching can merge at most the non-class half, and
    ``min_tokens`` patch tokens always survive. EViT: at 1/4, 1/2 and 3/4 of the depth it keeps
    ``ceil(keep_ratio * n)`` of the n non-class tokens and fuses the rest into one.
    """
    tokens = patch_tokens + 1
    removed, after = [], []
    evit_blocks = {depth // 4, depth // 2, (3 * depth) // 4}
    for block in range(depth):
        cut = 0
        if params.method == "tome":
            cut = max(0, min(params.merge_r, math.ceil(tokens / 2) - 1, tokens - 1 - params.min_tokens))
        elif params.method == "evit" and block in evit_blocks:
            keep = math.ceil(params.keep_ratio * (tokens - 1))
            fused = tokens - 1 - keep
            cut = fused - 1 if fused >= 2 else 0
        tokens -= cut
        removed.append(cut)
        after.append(tokens)
    return TokenPlan(params.method, tuple(removed), tuple(after), patch_tokens + 1)


def attention_with_weights(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention`` computed explicitly: (output, mean key per token, class-token attention to the rest).

    ``size`` (B, T, 1) adds log(size) to the scores: ToMe's proportional attention, so a token standing
    for s merged patches weighs as much as those s patches did.
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        scores = scores + size.log().reshape(batch, 1, 1, tokens)
    probs = scores.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1), probs[:, :, 0, 1:].mean(dim=1)


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def merge_bipartite(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, r: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens: alternate tokens into sets A and B, join each of A's r best-matched tokens
    (cosine similarity of keys) into its match in B, averaging features weighted by token size.

    The class token (index 0, in A) never merges and stays first.
    """
    metric = keys / keys.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    is_class = torch.arange(scores.shape[1], device=x.device).reshape(1, -1, 1) == 0
    scores = scores.masked_fill(is_class, float("-inf"))
    best, match = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    kept = kept.sort(dim=-1).values  # the class token (A index 0) back in front
    target = match.gather(1, merged)

    def combine(t: torch.Tensor) -> torch.Tensor:
        a, b = t[:, ::2], t[:, 1::2]
        b = b.scatter_add(1, target.unsqueeze(-1).expand(-1, -1, t.shape[-1]), _take(a, merged))
        return torch.cat([_take(a, kept), b], dim=1)

    total = combine(x * size)
    size = combine(size)
    return total / size, size


def keep_attentive(x: torch.Tensor, cls_attention: torch.Tensor, size: torch.Tensor, cut: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the non-class tokens the class token attends to most; fuse the other ``cut + 1`` into one
    token, averaged with their attention as weights (EViT)."""
    patches = x[:, 1:]
    order = cls_attention.argsort(dim=-1, descending=True)
    keep = patches.shape[1] - cut - 1
    top, rest = order[:, :keep], order[:, keep:]
    weight = cls_attention.gather(1, rest).unsqueeze(-1)
    fused = (_take(patches, rest) * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)
    x = torch.cat([x[:, :1], _take(patches, top), fused], dim=1)
    patch_size = size[:, 1:]
    size = torch.cat([size[:, :1], _take(patch_size, top), _take(patch_size, rest).sum(dim=1, keepdim=True)], dim=1)
    return x, size


class TokenReducedViT(nn.Module):
    """A timm ``VisionTransformer`` whose blocks merge (ToMe) or fuse (EViT) tokens as they go."""

    def __init__(self, vit: nn.Module, plan: TokenPlan):
        super().__init__()
        self.vit = vit
        self.plan = plan
        self.proportional = plan.method == "tome"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        size = None
        for block, cut in zip(vit.blocks, self.plan.removed):
            if cut == 0 and (size is None or not self.proportional):
                x = block(x)  # nothing reduced yet (or no size bias): timm's own, fused forward
                continue
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)
            out, keys, cls_attention = attention_with_weights(block.attn, block.norm1(x),
                                                              size if self.proportional else None)
            x = x + block.drop_path1(block.ls1(out))
            if cut:
                if self.proportional:
                    x, size = merge_bipartite(x, keys, size, cut)
                else:
                    x, size = keep_attentive(x, cls_attention, size, cut)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        x = vit.norm(x)
        if vit.global_pool == "avg" and size is not None:
            patches, weights = x[:, 1:], size[:, 1:]
            pooled = (patches * weights).sum(dim=1) / weights.sum(dim=1)
        elif vit.global_pool == "avg":
            pooled = x[:, 1:].mean(dim=1)
        else:
            pooled = x[:, 0]
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))


def _find_vit(model: nn.Module) -> tuple[nn.Module | None, str, nn.Module]:
    from timm.models.vision_transformer import VisionTransformer

    for name, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            if not name:
                return None, "", module
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise ValueError(f"{type(model).__name__}: token reduction needs a timm VisionTransformer inside the model")


def _check_supported(vit: nn.Module) -> None:
    from timm.layers import Attention

    if vit.num_prefix_tokens != 1 or vit.cls_token is None:
        raise ValueError("token reduction needs exactly one class token (and no register tokens)")
    if vit.attn_pool is not None or vit.global_pool not in ("token", "avg"):
        raise ValueError(f"token reduction supports 'token' and 'avg' pooling, not {vit.global_pool!r}")
    for i, block in enumerate(vit.blocks):
        if type(block.attn) is not Attention:
            raise ValueError(f"block {i}: token reduction supports timm's plain Attention, not {type(block.attn).__name__}")


def reduce_tokens(model: nn.Module, params: TokenReductionParams) -> tuple[nn.Module, TokenPlan]:
    """A copy of ``model`` whose ViT reduces tokens per ``params``; the original is left untouched."""
    from tasks.models import SegmentationViT

    if any(isinstance(m, SegmentationViT) for m in model.modules()):
        raise ValueError("token reduction merges the patch tokens a per-pixel segmentation head needs; "
                         "use distillation, pruning or quantization for segmentation models")
    # A module that token reduction would bypass says why (e.g. visual prompts, tasks/adapters/custom.py).
    refusal = next((m.refuses_token_reduction for m in model.modules()
                    if getattr(m, "refuses_token_reduction", None)), None)
    if refusal:
        raise ValueError(refusal)
    model = copy.deepcopy(model).eval()
    parent, attr, vit = _find_vit(model)
    _check_supported(vit)
    plan = plan_token_reduction(params, vit.patch_embed.num_patches, len(vit.blocks))
    wrapped = TokenReducedViT(vit, plan)
    if parent is None:
        return wrapped, plan
    setattr(parent, attr, wrapped)
    return model, plan


def token_variant_suffix(params: TokenReductionParams) -> str:
    """Name fragment of a token-reduced variant: ``tome-r8``, ``evit-k70``."""
    if params.method == "tome":
        return f"tome-r{params.merge_r}"
    if params.method == "evit":
        return f"evit-k{round(params.keep_ratio * 100)}"
    return ""

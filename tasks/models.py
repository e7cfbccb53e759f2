"""Backbones: timm ViTs with any number of input bands, LoRA adapters via peft, and the deployable wrapper."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from domains import Channel

log = logging.getLogger(__name__)

# Centre wavelengths (nm) of the red, green and blue channels RGB ImageNet weights were trained on.
RGB_WAVELENGTHS_NM = (640.0, 550.0, 465.0)
RGB_MATCH_TOLERANCE_NM = 40.0


class BackboneParams(BaseModel):
    """Which foundation model to start from and how to load its weights."""

    name: str = Field("vit_tiny_patch16_224", min_length=1, max_length=120,
                      description="timm model name, e.g. vit_tiny_patch16_224 or vit_small_patch16_224")
    weights: Literal["none", "hub", "file"] = Field(
        "none", description="Start from random weights, from the timm/Hugging Face hub, or from a local checkpoint file")
    weights_file: str | None = Field(None, max_length=1000,
                                     description="Checkpoint file (.pth/.safetensors) when weights is 'file'")
    patch_size: int = Field(4, ge=2, le=32, description="Patch side in pixels; pretrained patch kernels are resampled")
    depth: int | None = Field(None, ge=1, le=48,
                              description="Keep only the first N transformer blocks (smaller, faster); empty keeps all")


class LoraParams(BaseModel):
    """Low-rank adapter settings (peft LoRA)."""

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, le=1024, description="LoRA scaling alpha (effective scale alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch")
    target_modules: list[str] = Field(["qkv"], min_length=1, max_length=16,
                                      description="Module-name suffixes LoRA attaches to (qkv, fc1, fc2, attn.proj)")
    train_patch_embed: bool = Field(True, description="Also train the patch embedding (advisable when the band "
                                                      "count differs from the pretrained model's)")


def adapt_patch_embedding(rgb_weight: torch.Tensor, channels: tuple[Channel, ...]) -> torch.Tensor:
    """Build patch-embedding weights for ``channels`` from weights trained on RGB.

    Bands whose centre wavelength is within 40 nm of a pretrained R/G/B channel inherit that channel's
    kernel; every other band gets the mean RGB kernel. The result is scaled by 3 / C so the embedding
    of a grey input keeps the magnitude the pretrained blocks expect (the same reasoning as timm's
    ``adapt_input_conv``, but matching bands by wavelength instead of repeating R, G, B cyclically).
    """
    if rgb_weight.shape[1] != 3:
        raise ValueError(f"expected RGB patch-embedding weights, got {rgb_weight.shape[1]} input channels")
    mean_kernel = rgb_weight.mean(dim=1)
    kernels = []
    for channel in channels:
        kernel = mean_kernel
        if channel.wavelength_nm is not None:
            gaps = [abs(channel.wavelength_nm - w) for w in RGB_WAVELENGTHS_NM]
            nearest = int(np.argmin(gaps))
            if gaps[nearest] <= RGB_MATCH_TOLERANCE_NM:
                kernel = rgb_weight[:, nearest]
        kernels.append(kernel)
    return torch.stack(kernels, dim=1) * (3.0 / len(channels))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class SegmentationViT(nn.Module):
    """A ViT encoder with a light per-token decoder: class logits per patch, upsampled to every pixel.

    The patch tokens of the last block are projected to K classes by a 1x1 convolution on the token
    grid and bilinearly upsampled to the input size (the linear-decoder baseline of Segmenter, Strudel
    et al. 2021): cheap enough for the edge, exportable to ONNX, and LoRA attaches to the encoder as
    for classification. The decoder is called ``head`` so adapters treat it like a classifier head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Conv2d(encoder.embed_dim, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens:]
        rows, cols = self.encoder.patch_embed.grid_size
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)
        return nn.functional.interpolate(self.head(grid), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_backbone(params: BackboneParams, channels: tuple[Channel, ...], num_classes: int, img_size: int,
                   task: str = "classification") -> nn.Module:
    """Create a timm ViT for ``channels`` input bands and ``num_classes`` outputs.

    Classification and multilabel models end in a linear head of ``num_classes`` logits; segmentation
    models are a :class:`SegmentationViT` giving (N, K, H, W) logits. Weights come from nowhere
    (random), the hub, or a local checkpoint. A checkpoint with 3 input channels is treated as RGB and
    its patch embedding is adapted by wavelength; a checkpoint with the right channel count loads as
    is. The head is always new.
    """
    encoder = _build_timm_vit(params, channels, 0 if task == "segmentation" else num_classes, img_size)
    return SegmentationViT(encoder, num_classes) if task == "segmentation" else encoder


def _build_timm_vit(params: BackboneParams, channels: tuple[Channel, ...], num_classes: int, img_size: int) -> nn.Module:
    import timm

    shape = dict(img_size=img_size, patch_size=params.patch_size, in_chans=len(channels), num_classes=num_classes)
    if params.depth is not None:
        shape["depth"] = params.depth
    model = timm.create_model(params.name, pretrained=False, **shape)
    if params.weights == "none":
        return model
    if params.weights == "file":
        if not params.weights_file:
            raise ValueError("weights='file' needs weights_file")
        source = _load_state_dict(Path(params.weights_file))
    else:
        # timm resolves the hub weights and adapts position embeddings and patch size on load.
        hub = timm.create_model(params.name, pretrained=True, num_classes=0,
                                **{k: v for k, v in shape.items() if k not in ("in_chans", "num_classes")})
        source = hub.state_dict()
    _load_foundation_weights(model, source, channels, str(params.weights_file or params.name))
    return model


def _load_foundation_weights(model: nn.Module, source: dict[str, torch.Tensor], channels: tuple[Channel, ...],
                             origin: str) -> None:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    target = model.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith("head.")}
    key = "patch_embed.proj.weight"
    if key in state:
        weight = state[key]
        if weight.shape[-2:] != target[key].shape[-2:]:
            weight = resample_patch_embed(weight, list(target[key].shape[-2:]))
        if weight.shape[1] != len(channels):
            weight = adapt_patch_embedding(weight, channels)
        state[key] = weight
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
    state = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    missing, _ = model.load_state_dict(state, strict=False)
    unexpected_missing = [k for k in missing if not k.startswith("head.")]
    if unexpected_missing:
        log.warning("%s: %d backbone tensors were not in the checkpoint (e.g. %s)", origin,
                    len(unexpected_missing), unexpected_missing[0])


def attach_lora(model: nn.Module, params: LoraParams) -> nn.Module:
    """Freeze ``model`` and wrap it with LoRA adapters; the head (and optionally patch embedding) train fully."""
    from peft import LoraConfig, get_peft_model

    trainable = ["head"] + (["patch_embed.proj"] if params.train_patch_embed else [])
    # peft matches list entries as module-path suffixes, so "attn.proj" picks blocks.N.attn.proj and not
    # the patch-embedding "proj" (a bare "proj" would match both).
    config = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                        target_modules=list(params.target_modules), modules_to_save=trainable)
    return get_peft_model(model, config)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base layers and return the plain timm model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


class NormalizedClassifier(nn.Module):
    """A network that takes physical units (reflectance, HU...) and normalises them itself.

    Shipping normalisation inside the model keeps the edge artifact self-contained: ONNX consumers
    feed raw scaled pixels and cannot get the statistics wrong.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total

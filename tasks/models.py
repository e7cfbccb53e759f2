"""Backbones: timm ViTs with any number of input bands, LoRA adapters via peft, and the deployable wrapper."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from domains import Channel, TaskType, WindowChannel
from tasks.adapters import AdapterParams, LoraParams, adapter_of, attach_adapter, get_method, rebuild_adapted
from tasks.adapters import merge_adapter as merge_adapter  # noqa: F401  (re-exported: callers import it from here)
from tasks.bags import BagParams
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

# Centre wavelengths (nm) of the red, green and blue channels RGB ImageNet weights were trained on.
RGB_WAVELENGTHS_NM = (640.0, 550.0, 465.0)
RGB_MATCH_TOLERANCE_NM = 40.0


class BackboneParams(BaseModel):
    """Which foundation model to start from and how to load its weights."""

    name: str = Field("vit_tiny_patch16_224", min_length=1, max_length=120,
                      description="timm model name (e.g. vit_tiny_patch16_224), or a catalog backbone such as uni, "
                                  "virchow2 or h-optimus-0 (`vitrail backbones` lists them; they keep their own "
                                  "patch size)")
    weights: Literal["none", "hub", "file"] = Field(
        "none", description="Start from random weights, from the timm/Hugging Face hub, or from a local checkpoint file")
    weights_file: str | None = Field(None, max_length=1000,
                                     description="Checkpoint file (.pth/.safetensors) when weights is 'file'")
    patch_size: int = Field(4, ge=2, le=32, description="Patch side in pixels; pretrained patch kernels are resampled")
    depth: int | None = Field(None, ge=1, le=48,
                              description="Keep only the first N transformer blocks (smaller, faster); empty keeps all")
    accept_licence: bool = Field(False, description="Accept the licence of gated or non-commercial catalog weights "
                                                    "(UNI, Virchow2, Phikon...); they do not load without it")
    adapt_bands: bool = Field(False, description="Let a catalog checkpoint take bands other than its own: kernels of "
                                                 "shared bands are copied by name, new bands initialised as "
                                                 "documented, and the model is flagged adapted")


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


class GatedAttentionPool(nn.Module):
    """Gated attention pooling over a bag of tile features (Ilse et al. 2018, "gated ABMIL").

    Each tile's weight is ``w . (tanh(V h) * sigmoid(U h))``, softmaxed over the bag: the tanh branch says
    how much a tile matters, the sigmoid gate lets the network switch that off for tiles whose features
    sit in tanh's flat region. Returns the weighted mean feature and the weights.
    """

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.value = nn.Linear(features, hidden)
        self.gate = nn.Linear(features, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(torch.tanh(self.value(features)) * torch.sigmoid(self.gate(features))).squeeze(-1)
        weights = torch.softmax(scores, dim=-1)  # (B, T)
        return (weights.unsqueeze(-1) * features).sum(dim=1), weights


class AttentionMIL(nn.Module):
    """A slide classifier: the tile encoder (a timm ViT, LoRA-adapted) on every tile of a bag, gated
    attention pooling, and a linear head. Input (B, T, C, H, W) bags, output (B, K) logits.

    ``bag_params`` (the :class:`tasks.bags.BagParams` it was trained with) travels with the model, so the
    stages after training open the dataset as the same bags.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, attention_dim: int, bag_params=None):
        super().__init__()
        self.encoder = encoder
        self.pool = GatedAttentionPool(encoder.num_features, attention_dim)
        self.head = nn.Linear(encoder.num_features, num_classes)
        self.bag_params = bag_params

    def forward(self, bags: torch.Tensor, return_attention: bool = False):
        batch, tiles = bags.shape[0], bags.shape[1]
        features = self.encoder(bags.flatten(0, 1)).reshape(batch, tiles, -1)
        pooled, weights = self.pool(features)
        logits = self.head(pooled)
        return (logits, weights) if return_attention else logits


class BagOutputs(nn.Module):
    """A normalising slide model that also returns the attention weights: (logits (B, K), attention (B, T)).

    What is exported to ONNX for slide models, so predictions can show which tiles decided a slide.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, bags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        return model.net((bags - model.mean) / model.std, return_attention=True)


def build_backbone(params: BackboneParams, channels: tuple[Channel, ...], num_classes: int, img_size: int,
                   task: str = "classification", bags=None) -> nn.Module:
    """Create a timm ViT for ``channels`` input bands and ``num_classes`` outputs.

    Classification and multilabel models end in a linear head of ``num_classes`` logits; segmentation
    models are a :class:`SegmentationViT` giving (N, K, H, W) logits. Weights come from nowhere
    (random), the hub, or a local checkpoint. A checkpoint with 3 input channels is treated as RGB and
    its patch embedding is adapted by wavelength; a checkpoint with the right channel count loads as
    is. The head is always new. With ``bags`` (enabled :class:`tasks.bags.BagParams`) the model is an
    :class:`AttentionMIL` slide classifier over bags of tiles.
    """
    if bags is not None and bags.enabled:
        if task != "classification":
            raise RequestError(f"slide-level (bag) learning classifies slides; it does not apply to {task}")
        encoder = _build_timm_vit(params, channels, 0, img_size)
        return AttentionMIL(encoder, num_classes, bags.attention_dim, bags)
    encoder = _build_timm_vit(params, channels, 0 if task == "segmentation" else num_classes, img_size)
    return SegmentationViT(encoder, num_classes) if task == "segmentation" else encoder


def _build_timm_vit(params: BackboneParams, channels: tuple[Channel, ...], num_classes: int, img_size: int) -> nn.Module:
    import timm

    from tasks.backbone_catalog import build_catalog_backbone, find_entry

    if find_entry(params.name) is not None:  # a named foundation model: its own architecture, patch size and weights
        return build_catalog_backbone(params.name, channels=channels, num_classes=num_classes, img_size=img_size,
                                      depth=params.depth, weights=params.weights, weights_file=params.weights_file,
                                      adapt_bands=params.adapt_bands, accept_licence=params.accept_licence)
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
    """Freeze ``model`` and add LoRA adapters (the legacy block; :func:`tasks.adapters.attach_adapter` is the
    general form); the head (and optionally the patch embedding) train fully."""
    return attach_adapter(model, params.to_adapter())


class WindowLayer(nn.Module):
    """Display windows as the model's first layer: stored channels (N, C, H, W) to windowed (N, K, H, W).

    Channel k is ``clip((x[:, source_k] - low_k) / width_k, 0, 1)`` (CT: a window of HU, see
    :class:`domains.WindowChannel`). ``low`` and ``width`` are buffers in the units the model takes (the
    window's HU folded with the input scaling), so they are in the state dict and the model digest, and the
    ONNX export is a Gather, a Sub, a Div and a Clip. ``windows`` keeps the physical description (names,
    HU) that ``architecture.json`` records.
    """

    def __init__(self, windows: tuple[WindowChannel, ...], input_scaling: tuple[tuple[float, float], ...] | None = None):
        super().__init__()
        if not windows:
            raise ValueError("a window layer needs at least one window")
        self.windows = tuple(windows)
        lows, widths = [], []
        for window in self.windows:
            scale, offset = input_scaling[window.source] if input_scaling is not None else (1.0, 0.0)
            if not float(scale) > 0:
                raise ValueError(f"window {window.name!r}: its source channel's scale {scale} must be positive")
            lows.append((window.low - float(offset)) / float(scale))
            widths.append((window.high - window.low) / float(scale))
        self.register_buffer("source", torch.tensor([w.source for w in self.windows], dtype=torch.int64))
        self.register_buffer("low", torch.tensor(lows, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("width", torch.tensor(widths, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x.index_select(1, self.source) - self.low) / self.width, 0.0, 1.0)


class NormalizedClassifier(nn.Module):
    """A network that takes raw pixels (the stored units of its training dataset) and normalises them itself.

    Raw means what the dataset stores: Sentinel-2 digital numbers (uint16), 8-bit RGB tiles, integer
    radiance counts; ``input_scaling`` records their map to physical units (per channel ``(scale, offset)``,
    physical = raw * scale + offset; None when the dataset stores physical values, as radiology's MR and
    radiograph views). A CT model takes HU and starts with its windows (:class:`WindowLayer`; ``mean`` and
    ``std`` are then of the windowed channels). The per-channel standardisation of physical values, ``(raw * s + o - mean) / std``, is folded
    into the buffers (:func:`fold_scaling`): ``mean`` and ``std`` are in raw units, so the graph is one
    subtract and one divide whatever the sensor. Shipping this inside the model keeps every artifact made
    from it (the registered model, its ONNX and OpenVINO exports) self-contained: a consumer feeds the
    numbers the source stores and cannot apply the wrong normalisation, or apply one twice.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 input_normalisation: dict | None = None,
                 input_scaling: tuple[tuple[float, float], ...] | None = None,
                 windows: tuple[WindowChannel, ...] | None = None):
        super().__init__()
        self.net = net
        # A domain normalisation fitted on the training tiles (stain normalisation), applied before the
        # model by every stage (tasks.model_inputs); kept here so it travels with the weights.
        self.input_normalisation = input_normalisation
        # The units the model takes (see the class docstring): readers convert their source to these.
        self.input_scaling = (tuple((float(s), float(o)) for s, o in input_scaling)
                              if input_scaling is not None else None)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # CT: the model takes HU and windows them itself (mean/std are then of the windowed channels).
        self.window = WindowLayer(windows, self.input_scaling) if windows else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is not None:
            x = self.window(x)
        return self.net((x - self.mean) / self.std)


def fold_scaling(mean: tuple[float, ...], std: tuple[float, ...],
                 scaling: tuple[tuple[float, float], ...] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Physical-unit statistics as raw-unit ones: ``(raw*s + o - m) / sd == (raw - (m - o)/s) / (sd/s)``.

    With a positive scale the two standardisations are the same number; a negative scale (none of the
    readers writes one) flips its channel's sign, which a model trained on raw inputs learns as it is.
    None (values stored physical) leaves the statistics as they are.
    """
    if scaling is None:
        return tuple(float(m) for m in mean), tuple(float(v) for v in std)
    if len(scaling) != len(mean) or len(std) != len(mean):
        raise ValueError(f"scaling has {len(scaling)} channels for {len(mean)} means and {len(std)} stds")
    if any(float(s) == 0.0 for s, _ in scaling):
        raise ValueError(f"a channel's scale is 0 in {scaling}: its raw values carry no information")
    folded_mean = tuple((float(m) - float(o)) / float(s) for m, (s, o) in zip(mean, scaling))
    folded_std = tuple(float(v) / abs(float(s)) for v, (s, _) in zip(std, scaling))
    return folded_mean, folded_std


def normalizing_model(net: nn.Module, info, input_normalisation: dict | None = None) -> NormalizedClassifier:
    """``net`` wrapped to take the raw (stored) units of the dataset ``info`` describes.

    ``info`` is a :class:`tasks.dataset.DatasetInfo`: its training-split statistics (physical units) are
    folded with its stored scaling into the model's buffers and the scaling is recorded as the model's
    ``input_scaling``. Every stage that builds a model for a dataset builds it here, so the units the model
    takes and the units the dataset hands out (:func:`tasks.model_inputs.load_dataset_for`) are one convention.
    """
    windows = getattr(info, "windows", None)
    if windows:  # the window layer takes the stored units; the statistics are of its (physical) output
        return NormalizedClassifier(net, info.channel_mean, info.channel_std, input_normalisation=input_normalisation,
                                    input_scaling=info.scaling, windows=windows)
    mean, std = fold_scaling(info.channel_mean, info.channel_std, info.scaling)
    return NormalizedClassifier(net, mean, std, input_normalisation=input_normalisation, input_scaling=info.scaling)


def network_channels(info) -> tuple[Channel, ...]:
    """The channels the network of a model for dataset ``info`` takes: its windows when the dataset records
    them (the window layer makes them), else the stored channels."""
    windows = getattr(info, "windows", None)
    return tuple(Channel(name=w.name) for w in windows) if windows else tuple(info.channels)


def windows_of(model: nn.Module) -> tuple[WindowChannel, ...] | None:
    """The windows a model starts with (its :class:`WindowLayer`), or None."""
    for module in model.modules():
        if isinstance(module, NormalizedClassifier):
            return module.window.windows if module.window is not None else None
    return None


def input_scaling_of(model: nn.Module) -> tuple[tuple[float, float], ...] | None:
    """The raw units a model takes (its ``input_scaling``); None for a model of physical units."""
    for module in model.modules():
        if isinstance(module, NormalizedClassifier):
            return module.input_scaling
    return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --- the reference model as plain files: weights (safetensors) plus the architecture that holds them ------

REFERENCE_WEIGHTS_FILE = "model.safetensors"
REFERENCE_ARCHITECTURE_FILE = "architecture.json"


class ReferenceModelError(RequestError):
    """A reference model's files that Vitrail refuses to load; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ReferenceArchitecture(BaseModel):
    """Everything needed to rebuild a reference model's modules before its weights are loaded.

    Stored as ``architecture.json`` beside ``model.safetensors``: the model is rebuilt by this
    project's own code (:func:`build_reference_model`) and only tensors are read from the file, so
    loading a model never runs code that came with it, unlike unpickling a saved ``nn.Module``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = Field(1, description="Version of this file's layout")
    backbone: str = Field(min_length=1, max_length=120, pattern=r"^[A-Za-z0-9_.-]+$",
                          description="timm model name the encoder is built from")
    task: TaskType = Field(description="classification and multilabel end in a linear head; segmentation in a "
                                       "per-token decoder")
    img_size: int = Field(ge=1, le=8192, description="Side of the square input tile in pixels")
    patch_size: int = Field(ge=2, le=32, description="Patch side in pixels (the bounds of BackboneParams)")
    depth: int = Field(ge=1, le=48, description="Number of transformer blocks (the bounds of BackboneParams)")
    channels: tuple[Channel, ...] = Field(min_length=1, max_length=1024, description="Input bands, in order")
    num_classes: int = Field(ge=1, le=100_000, description="Logits per sample (or per pixel for segmentation)")
    windows: tuple[WindowChannel, ...] | None = Field(
        None, max_length=1024, description="Display windows the model starts with (CT: channel k is clip((HU[source] - "
                                           "low) / (high - low), 0, 1)); the network then takes one channel per "
                                           "window; None: no window layer")
    mean: tuple[float, ...] = Field(description="Per-channel mean the model subtracts from its input (raw units)")
    std: tuple[float, ...] = Field(description="Per-channel standard deviation the model divides its input by "
                                               "(raw units)")
    input_scaling: tuple[tuple[float, float], ...] | None = Field(
        None, description="The units the model takes: per channel (scale, offset) with physical = raw * scale + "
                          "offset (the stored units of its training dataset); None when it takes physical values")
    bags: BagParams | None = Field(None, description="For a slide-level model (attention MIL over bags of tiles): "
                                                     "the bag settings it was trained with; None for tile models")
    input_normalisation: dict | None = Field(None, description="The domain input normalisation fitted on the "
                                                               "training tiles (method and reference), applied "
                                                               "before the model; None when there is none")
    adapter: AdapterParams | None = Field(None, description="For a model adapted by a method that does not merge "
                                                            "into plain weights (prompts, AdaptFormer, DVPT): the "
                                                            "adapter settings whose structure holds its weights; "
                                                            "None for plain weights")

    @model_validator(mode="after")
    def _statistics_match_channels(self) -> "ReferenceArchitecture":
        network = len(self.windows) if self.windows else len(self.channels)
        if not len(self.mean) == len(self.std) == network:
            raise ValueError(f"mean ({len(self.mean)}) and std ({len(self.std)}) need one value per channel "
                             f"({network})")
        if self.windows and any(w.source >= len(self.channels) for w in self.windows):
            raise ValueError(f"a window's source is not one of the {len(self.channels)} input channels")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("mean must be finite and std finite and positive")
        if self.input_scaling is not None:
            if len(self.input_scaling) != len(self.channels):
                raise ValueError(f"input_scaling ({len(self.input_scaling)}) needs one (scale, offset) per channel "
                                 f"({len(self.channels)})")
            if not all(math.isfinite(s) and s != 0 and math.isfinite(o) for s, o in self.input_scaling):
                raise ValueError("input_scaling needs finite, non-zero scales and finite offsets")
        return self


def reference_architecture(model: nn.Module, channels: tuple[Channel, ...], task: str) -> ReferenceArchitecture:
    """Describe a merged :class:`NormalizedClassifier` (timm ViT or :class:`SegmentationViT` inside).

    Shapes are read from the modules themselves, the band names from ``channels`` (a model only knows
    how many bands it takes). Raises ``ValueError`` for a model this description cannot rebuild, such
    as one whose LoRA adapters are not merged yet.
    """
    if not isinstance(model, NormalizedClassifier):
        raise ValueError(f"a reference model is a NormalizedClassifier, got {type(model).__name__}")
    adapter = adapter_of(model.net)  # set only on a non-mergeable method's adapted network, after merging
    if adapter is not None and get_method(adapter.method).mergeable:
        raise ValueError(f"cannot describe a model whose {adapter.method} adapter is not merged: merge adapters first")
    net = _task_network(model.net) if adapter is not None else model.net
    encoder = net.encoder if isinstance(net, (SegmentationViT, AttentionMIL)) else net
    if hasattr(net, "peft_config") or hasattr(encoder, "peft_config"):
        raise ValueError("cannot describe a model whose peft adapters are not merged: merge adapters first")
    if not all(hasattr(encoder, a) for a in ("patch_embed", "blocks", "pretrained_cfg")):
        raise ValueError(f"cannot describe {type(encoder).__name__}: expected a timm ViT")
    num_classes = (net.head.out_channels if isinstance(net, SegmentationViT)
                   else net.head.out_features if isinstance(net, AttentionMIL) else encoder.num_classes)
    bags = None
    if isinstance(net, AttentionMIL):
        bags = (net.bag_params or BagParams(enabled=True)).model_copy(
            update={"enabled": True, "attention_dim": net.pool.value.out_features})
    img_size, patch_size = encoder.patch_embed.img_size, encoder.patch_embed.patch_size
    if img_size[0] != img_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"only square tiles and patches are described, got {img_size} and {patch_size}")
    architecture = ReferenceArchitecture(
        backbone=encoder.pretrained_cfg["architecture"], task=task, img_size=img_size[0],
        patch_size=patch_size[0], depth=len(encoder.blocks), channels=tuple(channels), num_classes=num_classes,
        mean=tuple(model.mean.flatten().tolist()), std=tuple(model.std.flatten().tolist()), bags=bags,
        input_normalisation=getattr(model, "input_normalisation", None),
        input_scaling=getattr(model, "input_scaling", None), adapter=adapter,
        windows=model.window.windows if model.window is not None else None)
    _check_rebuilds(model, architecture)
    return architecture


def _task_network(adapted: nn.Module) -> nn.Module:
    """The task network (timm ViT, SegmentationViT or AttentionMIL) inside an adapted network: the network itself
    when the method changed it in place, else the outermost such module it wraps."""
    for module in adapted.modules():
        if isinstance(module, (SegmentationViT, AttentionMIL)) or all(
                hasattr(module, a) for a in ("patch_embed", "blocks", "pretrained_cfg")):
            return module
    raise ValueError(f"cannot find the ViT inside {type(adapted).__name__}")


def _check_rebuilds(model: nn.Module, architecture: ReferenceArchitecture) -> None:
    """Fail at logging time, not at loading time, when the description does not rebuild ``model``."""
    differences = _shape_differences(_described_shapes(architecture), _state_shapes(model.state_dict()))
    if differences:
        raise ValueError(f"{architecture.backbone}: the architecture description does not rebuild this model "
                         f"({differences})")


def _state_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _described_shapes(architecture: ReferenceArchitecture) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the described model, built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return _state_shapes(build_reference_model(architecture).state_dict())


def _shape_differences(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str:
    """'' when both hold the same tensor names and shapes, else a short account of what differs."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = [f"{k} {found[k]} instead of {expected[k]}" for k in sorted(set(expected) & set(found))
                if expected[k] != found[k]]
    parts = [f"{label} {len(items)} tensors, e.g. {items[0]}"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("another shape for", reshaped))
             if items]
    return "; ".join(parts)


def build_reference_model(architecture: ReferenceArchitecture) -> NormalizedClassifier:
    """Build the reference model's modules (random weights, eval mode) exactly as fine-tuning built them."""
    import timm

    from tasks.backbone_catalog import find_entry

    if not timm.is_model(architecture.backbone) and find_entry(architecture.backbone) is None:
        raise ValueError(f"{architecture.backbone!r} is not a timm model name known to this installation")
    backbone = BackboneParams(name=architecture.backbone, weights="none", patch_size=architecture.patch_size,
                              depth=architecture.depth)
    net = build_backbone(backbone, network_channels(architecture), architecture.num_classes, architecture.img_size,
                         task=architecture.task, bags=architecture.bags)
    if architecture.adapter is not None:  # a non-mergeable method: its structure, so the saved weights load
        net = rebuild_adapted(net, architecture.adapter)
    return NormalizedClassifier(net, architecture.mean, architecture.std,
                                input_normalisation=architecture.input_normalisation,
                                input_scaling=architecture.input_scaling, windows=architecture.windows).eval()


def save_reference_model(model: nn.Module, architecture: ReferenceArchitecture, folder: Path) -> tuple[Path, Path]:
    """Write ``model.safetensors`` and ``architecture.json`` into ``folder``; return their paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, description = folder / REFERENCE_WEIGHTS_FILE, folder / REFERENCE_ARCHITECTURE_FILE
    # Every tensor of the state dict under its own name: loading compares the names one to one.
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"format": "pt"})
    description.write_text(architecture.model_dump_json(indent=2) + "\n")
    return weights, description


def model_digest(model: nn.Module, architecture: ReferenceArchitecture) -> str:
    """SHA-256 of everything that decides a reference model's outputs for a given raw input.

    Every tensor of the state dict (weights and the preprocessing buffers ``mean`` and ``std``) by name,
    dtype, shape and bytes, then the architecture description (channels, ``input_scaling``, the input
    normalisation, ...) as canonical JSON. Changing a preprocessing constant (a mean, a std, a scale or
    an offset) changes the digest, so two models with one digest take the same raw pixels to the same
    logits. Recorded with the registered model (``model_digest`` in its metadata, tag
    ``vitrail.model_digest``) and in its ONNX export's metadata.
    """
    digest = hashlib.sha256(b"vitrail-model-digest/1\n")
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    described = architecture.model_dump(mode="json")
    if described.get("windows") is None:  # a model without windows keeps the digest it had before they existed
        described.pop("windows", None)
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()


def read_reference_architecture(path: Path) -> ReferenceArchitecture:
    """Parse and validate ``architecture.json``; raise :class:`ReferenceModelError` naming what is wrong."""
    if not path.is_file():
        raise ReferenceModelError(path, "architecture description not found")
    try:
        return ReferenceArchitecture.model_validate_json(path.read_bytes())
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors()[:5])
        raise ReferenceModelError(path, f"not a valid architecture description ({problems})") from None


def load_reference_files(weights: Path, description: Path) -> NormalizedClassifier:
    """Rebuild a reference model from its description and load its weights, every tensor checked.

    Only tensors are read (safetensors has no code path); a file of another format, such as a pickle,
    is refused. Tensor names and shapes are compared with the described model's before anything is
    allocated, so a description cannot make Vitrail build a model larger than the weights file.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    architecture = read_reference_architecture(description)
    if not weights.is_file():
        raise ReferenceModelError(weights, "weights file not found")
    refused = ("not a safetensors file ({}); Vitrail reads model weights only from safetensors and never "
               "unpickles them")
    try:
        with safe_open(str(weights), framework="pt") as handle:  # the header only
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except SafetensorError as error:
        raise ReferenceModelError(weights, refused.format(error)) from None
    try:
        expected = _described_shapes(architecture)
    except ValueError as error:
        raise ReferenceModelError(description, str(error)) from None
    differences = _shape_differences(expected, stored)
    if differences:
        raise ReferenceModelError(weights, f"weights do not match {description.name} ({differences})")
    model = build_reference_model(architecture)
    try:
        state = load_file(str(weights))
    except SafetensorError as error:
        raise ReferenceModelError(weights, refused.format(error)) from None
    model.load_state_dict(state, strict=True)
    return model.eval()

"""In-domain self-supervised pretraining: a masked autoencoder (MAE) on a timm ViT, trained by the one loop.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", written here from the paper (the
official code's licence is non-commercial): the encoder sees only a random (1 - mask ratio) share of each
tile's patches; a small, narrow decoder gets the encoded visible tokens plus a shared mask token at every
hidden position and predicts the pixels of every patch; the loss is the mean squared error on the
*masked* patches only, against targets normalised per patch (the paper's "normalised pixels", which it
found gives better representations). The encoder is what is kept: it is exported as a plain timm
``VisionTransformer`` state dict (``num_classes=0``) in safetensors, which the fine-tune stage loads with
``BackboneParams(weights="file", weights_file=...)``.

Training is :func:`tasks.training.fit` with ``objective="model-loss"``: the :class:`MaskedAutoencoder`
returns its own loss, so seeding, checkpoints, resume, devices and DDP are the loop's. Masks are drawn
from torch's global generator, which the loop seeds and saves in every checkpoint, so a resumed run
draws the masks the uninterrupted one drew.

Which tiles: every split of the dataset except the ones reserved for evaluation. The test split's
groups (blocks, patients, slides) are never seen; the validation split is held out too and scores the
reconstruction each epoch (the loop keeps the epoch with the lowest validation loss). Both exclusions
are recorded by digest in the encoder's description, so a later probe can check it evaluates on groups
the encoder never saw.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field
from torch import nn

from domains import Channel, get_domain
from tasks.atomic_files import atomic_path
from tasks.dataset import Dataset, Split, load_dataset
from tasks.dataset_store import LazySamples
from tasks.model_inputs import require_unwindowed
from tasks.models import BackboneParams, build_backbone
from tasks.reproducibility import pin_determinism
from tasks.request_errors import RequestError
from tasks.storage import StorageFolder
from tasks.training import EpochCallback, FitResult, TrainParams, fit, read_checkpoint

log = logging.getLogger(__name__)

DESCRIPTION_FORMAT = "vitrail-mae-encoder/1"
ENCODER_FILE = "encoder.safetensors"
DESCRIPTION_FILE = "encoder.json"
# MAE's default (He et al. 2022, Table 1a). Radiographs carry their signal in few, subtle regions and
# much redundant anatomy; the chest-radiograph MAE study (Xiao et al. 2023, "Delving into Masked
# Autoencoders for Multi-Label Thorax Disease Classification") found 0.9 best there.
DEFAULT_MASK_RATIO = 0.75
DOMAIN_MASK_RATIOS = {"radiology": 0.9}
# Splits whose groups pretraining never trains on: test is reserved for the final evaluation, val scores
# the reconstruction (and later the probes' regularisation sweep).
EVALUATION_SPLITS = ("test",)
SELECTION_SPLIT = "val"
# Centre wavelengths (nm) the preview's red, green and blue are drawn from when bands have wavelengths.
PREVIEW_WAVELENGTHS_NM = (640.0, 550.0, 465.0)


class MaeParams(BaseModel):
    """Masked-autoencoder settings (the encoder is the backbone; these shape masking and the decoder)."""

    mask_ratio: float | None = Field(None, ge=0.05, le=0.95,
                                     description="Share of each tile's patches hidden from the encoder; empty "
                                                 "takes the domain's (0.75, 0.9 for radiographs)")
    decoder_dim: int = Field(128, ge=16, le=1024, description="Width of the decoder's tokens (narrow: the "
                                                              "decoder is thrown away after pretraining)")
    decoder_depth: int = Field(2, ge=1, le=12, description="Transformer blocks in the decoder")
    decoder_heads: int = Field(4, ge=1, le=16, description="Attention heads per decoder block (divides decoder_dim)")
    norm_pix_loss: bool = Field(True, description="Reconstruct each patch normalised by its own mean and "
                                                  "variance (MAE's better-representation variant)")
    preview_bands: list[str] = Field(default_factory=list, max_length=3,
                                     description="Three band names drawn as red, green, blue in the per-epoch "
                                                 "reconstruction images; empty picks the bands nearest 640/550/465 "
                                                 "nm, else the first three")
    preview_samples: int = Field(4, ge=1, le=16, description="Validation tiles shown in each reconstruction image")
    max_tiles: int | None = Field(None, ge=16, le=100_000_000,
                                  description="Pretrain on at most this many tiles (a seeded random draw, the same "
                                              "every run); empty uses every tile outside the test and validation "
                                              "splits")


def default_mask_ratio(domain: str) -> float:
    """The domain's mask ratio: its spec's ``mae_mask_ratio`` when it declares one, else the table above."""
    declared = getattr(get_domain(domain), "mae_mask_ratio", None)
    return float(declared) if declared is not None else DOMAIN_MASK_RATIOS.get(domain, DEFAULT_MASK_RATIO)


# --- the model ------------------------------------------------------------------------------------------


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random patch masks: ``(keep, mask, restore)``.

    ``keep`` (B, K) are the kept patch indices with K = round(N * (1 - ratio)) (at least 1), ``mask`` (B, N)
    is 1 where a patch is hidden, ``restore`` (B, N) puts a (kept + hidden) token sequence back into
    patch order. Each sample gets its own draw (argsort of uniform noise, as in the paper).
    """
    kept = max(1, round(num_patches * (1.0 - mask_ratio)))  # round: 100 * (1 - 0.9) is 9.999...
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :kept] = 0
    return shuffle[:, :kept], torch.gather(mask, 1, restore), restore


def sincos_position_grid(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (1, rows * cols, dim): half the width for each axis."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        angles = axis[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float().unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder with an MAE decoder; ``forward(images)`` returns the reconstruction loss.

    ``images`` are physical units (reflectance, HU, ...); the encoder's preprocessing (per-band mean/std)
    is applied here, so pretraining sees what the fine-tuned model's :class:`tasks.models.NormalizedClassifier`
    will feed it.
    """

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float], mask_ratio: float,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block, VisionTransformer

        if not isinstance(encoder, VisionTransformer):
            raise RequestError(f"MAE pretraining needs a timm VisionTransformer encoder, got {type(encoder).__name__}")
        if encoder.pos_embed is None or getattr(encoder, "dynamic_img_size", False):
            raise RequestError("MAE pretraining needs a ViT with fixed absolute position embeddings")
        patch = encoder.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise RequestError(f"MAE pretraining needs square patches, got {patch}")
        if decoder_dim % decoder_heads:
            raise RequestError(f"decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.patch = int(patch[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.channels = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        num_patches = self.grid[0] * self.grid[1]
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, not learned (as in the paper): one less thing to fit on a small unlabelled set.
        self.register_buffer("decoder_pos", sincos_position_grid(decoder_dim, *self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * self.channels)
        self.num_patches = num_patches
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # pixels <-> patches: (B, C, H, W) <-> (B, N, p * p * C), patches in row-major grid order
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        b, c = images.shape[:2]
        (rows, cols), p = self.grid, self.patch
        return images.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        (rows, cols), p, c = self.grid, self.patch, self.channels
        return patches.reshape(b, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, rows * p, cols * p)

    def encode(self, normalised: torch.Tensor, generator: torch.Generator | None = None):
        """Encode the visible patches; returns (tokens with prefix tokens first, mask, restore)."""
        enc = self.encoder
        x = enc.patch_embed(normalised)  # (B, N, D)
        prefix_count = enc.num_prefix_tokens
        pos = enc.pos_embed
        patch_pos = pos if enc.no_embed_class else pos[:, prefix_count:]
        x = x + patch_pos
        keep, mask, restore = random_masking(x.shape[0], x.shape[1], self.mask_ratio, x.device, generator)
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        prefix = []
        if enc.cls_token is not None:
            prefix.append(enc.cls_token.expand(x.shape[0], -1, -1))
        if getattr(enc, "reg_token", None) is not None:
            prefix.append(enc.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if not enc.no_embed_class:
                prefix_tokens = prefix_tokens + pos[:, :prefix_count]
            x = torch.cat([prefix_tokens, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x), mask, restore

    def decode(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels (B, N, p * p * C) from the encoded visible tokens."""
        prefix_count = self.encoder.num_prefix_tokens
        x = self.decoder_embed(tokens)
        prefix, visible = x[:, :prefix_count], x[:, prefix_count:]
        hidden = self.mask_token.expand(x.shape[0], self.num_patches - visible.shape[1], -1)
        patches = torch.cat([visible, hidden], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = torch.cat([prefix, patches + self.decoder_pos], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix_count:]

    def _targets(self, normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target = self.patchify(normalised)
        if not self.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        centre = target.mean(dim=-1, keepdim=True)
        scale = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (target - centre) / scale, centre, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.mean) / self.std
        tokens, mask, restore = self.encode(normalised)
        prediction = self.decode(tokens, restore)
        target = self._targets(normalised)[0]
        per_patch = ((prediction - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(original, masked, reconstruction) in normalised units; hidden patches are zero in ``masked``
        and predicted in ``reconstruction`` (visible ones pasted from the original, as in the paper's figures)."""
        normalised = (images - self.mean) / self.std
        tokens, mask, restore = self.encode(normalised, generator)
        prediction = self.decode(tokens, restore)
        _, centre, scale = self._targets(normalised)
        predicted = self.unpatchify(prediction * scale + centre)
        hidden = self.unpatchify(mask.unsqueeze(-1).expand(-1, -1, self.patch * self.patch * self.channels))
        return normalised, normalised * (1 - hidden), normalised * (1 - hidden) + predicted * hidden


# --- the unlabelled tiles ---------------------------------------------------------------------------------


def groups_digest(groups: Sequence[str]) -> str:
    """SHA-256 of a set of group ids (sorted, one per line): what a probe compares to prove disjointness."""
    return hashlib.sha256("\n".join(sorted({str(g) for g in groups})).encode()).hexdigest()


def _joined(splits: list[Split], keep: np.ndarray | None = None) -> Split:
    """One split of several (only the positions ``keep`` when given), still lazy when they read the same
    stored array (the usual case)."""
    images = [s.images for s in splits]
    groups = np.concatenate([s.groups for s in splits])
    ids = [s.sample_ids for s in splits]
    sample_ids = None if any(i is None for i in ids) else np.concatenate(ids)
    keep = np.arange(len(groups)) if keep is None else keep
    if all(isinstance(i, LazySamples) for i in images) and len({id(i.source) for i in images}) == 1:
        first = images[0]
        joined = copy.copy(first)
        joined.members = np.concatenate([i.members for i in images])[keep]
        joined.shape = (len(joined.members), *first.shape[1:])
    else:
        joined = np.concatenate([np.asarray(i) for i in images])[keep]
    return Split(images=joined, labels=np.full(len(keep), -1, dtype=np.int64),  # labels are never read
                 groups=groups[keep], sample_ids=None if sample_ids is None else sample_ids[keep])


def pretraining_view(dataset: Dataset, max_tiles: int | None = None, seed: int = 0) -> tuple[Dataset, dict]:
    """The dataset as pretraining sees it, and the record of what it leaves out.

    ``train`` joins every split except test and val (labelled training tiles and unlabelled ones);
    ``val`` (when the dataset has one) scores the reconstruction. The record names the excluded splits
    with their sample counts and group digests. With ``max_tiles`` a seeded draw of that many tiles (kept
    in stored order, so chunks are still read together) is used.

    Raises:
        RequestError: nothing is left to train on, or an excluded group also appears among the training tiles.
    """
    held_out = {name: dataset.splits[name] for name in (*EVALUATION_SPLITS, SELECTION_SPLIT) if name in dataset.splits}
    used = [split for name, split in dataset.splits.items() if name not in held_out]
    if not used or sum(len(s) for s in used) == 0:
        raise RequestError(f"{dataset.path}: no tiles outside the test and validation splits to pretrain on")
    available = sum(len(s) for s in used)
    keep = None
    if max_tiles is not None and available > max_tiles:
        keep = np.sort(np.random.default_rng(seed).choice(available, size=max_tiles, replace=False))
    train = _joined(used, keep)
    seen = set(map(str, train.groups))
    for name, split in held_out.items():
        leaked = seen & set(map(str, split.groups))
        if leaked:
            raise RequestError(f"{dataset.path}: {len(leaked)} {name} group(s) also hold training tiles "
                               f"(e.g. {sorted(leaked)[0]}); the dataset's split leaks, re-ingest it")
    record = {name: {"samples": len(split), "groups": len(set(map(str, split.groups))),
                     "groups_digest": groups_digest(split.groups),
                     "role": "evaluation (never seen)" if name in EVALUATION_SPLITS else
                             "reconstruction validation (never trained on)"}
              for name, split in held_out.items()}
    splits = {"train": train}
    if SELECTION_SPLIT in held_out:
        splits["val"] = held_out[SELECTION_SPLIT]
    return dataclasses.replace(dataset, splits=splits), record


# --- reconstruction images --------------------------------------------------------------------------------


def preview_band_indices(channels: Sequence[Channel], names: Sequence[str] = ()) -> tuple[int, int, int]:
    """Indices of the bands drawn as red, green, blue: by name when given, else nearest 640/550/465 nm,
    else the first three (one band is drawn grey).

    Raises:
        RequestError: a named band the data does not have, or not exactly three names.
    """
    by_name = {c.name: i for i, c in enumerate(channels)}
    if names:
        if len(names) != 3:
            raise RequestError(f"preview_bands needs three band names (red, green, blue), got {list(names)}")
        missing = [n for n in names if n not in by_name]
        if missing:
            raise RequestError(f"preview band(s) {missing} are not among the data's bands {list(by_name)}")
        return tuple(by_name[n] for n in names)  # type: ignore[return-value]
    if len(channels) >= 3 and all(c.wavelength_nm is not None for c in channels):
        return tuple(int(np.argmin([abs(c.wavelength_nm - w) for c in channels]))  # type: ignore[return-value]
                     for w in PREVIEW_WAVELENGTHS_NM)
    return (0, 1, 2) if len(channels) >= 3 else (0, 0, 0)


def reconstruction_grid(original: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray,
                        bands: tuple[int, int, int], min_side: int = 96) -> np.ndarray:
    """An RGB uint8 image: one row per sample, columns original | masked | reconstruction.

    Each band is stretched between the 2nd and 98th percentile of the originals, the same stretch for
    all three columns, so brightness differences are the model's. Small tiles are enlarged (nearest).
    """
    pick = list(bands)
    reference = original[:, pick]
    low = np.percentile(reference, 2, axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    high = np.percentile(reference, 98, axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    span = np.maximum(high - low, 1e-6)
    factor = max(1, math.ceil(min_side / original.shape[-1]))
    gap = 2
    columns = []
    for panel in (original, masked, reconstruction):
        scaled = np.clip((panel[:, pick] - low) / span, 0, 1)
        scaled = scaled.repeat(factor, axis=2).repeat(factor, axis=3)
        columns.append(scaled)
    n, _, h, w = columns[0].shape
    grid = np.ones((n * (h + gap) - gap, 3 * (w + gap) - gap, 3), dtype=np.float32)
    for row in range(n):
        for col, panel in enumerate(columns):
            top, left = row * (h + gap), col * (w + gap)
            grid[top:top + h, left:left + w] = panel[row].transpose(1, 2, 0)
    return (grid * 255).round().astype(np.uint8)


def write_png(image: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        matplotlib.image.imsave(partial, image, format="png")
    return path


class ReconstructionImages:
    """Epoch callback: renders the epoch's checkpoint on fixed validation tiles and masks, then calls ``then``.

    It reads the weights from the checkpoint the loop has just written (not from the live model), so it
    works the same when training runs in other processes; its masks come from its own seeded generator,
    so drawing them never changes the training run's random numbers.
    """

    def __init__(self, template: MaskedAutoencoder, checkpoint_dir: Path | str, images: np.ndarray,
                 bands: tuple[int, int, int], out_dir: Path, seed: int, then: EpochCallback | None = None):
        self.template = copy.deepcopy(template).cpu().eval()
        self.checkpoint_dir = str(checkpoint_dir)
        self.images = np.asarray(images, dtype=np.float32)
        self.bands, self.out_dir, self.seed, self.then = bands, Path(out_dir), seed, then
        self.written: list[Path] = []

    def __call__(self, epoch: int, total: int, metrics: dict[str, float]) -> None:
        state = read_checkpoint(StorageFolder(self.checkpoint_dir).reference(f"epoch-{epoch:03d}.pt"))
        self.template.load_state_dict(state["model"])
        panels = self.template.reconstruct(torch.from_numpy(self.images), torch.Generator().manual_seed(self.seed))
        grid = reconstruction_grid(*(p.numpy() for p in panels), self.bands)
        self.written.append(write_png(grid, self.out_dir / f"reconstruction-epoch-{epoch:03d}.png"))
        if self.then is not None:
            self.then(epoch, total, metrics)


# --- pretraining and export -------------------------------------------------------------------------------


@dataclass
class PretrainOutcome:
    """The trained encoder's files and how it was made."""

    encoder_file: Path
    description_file: Path
    description: dict
    fit: FitResult
    reconstruction_images: list[Path]


def encoder_architecture(encoder: nn.Module, backbone: BackboneParams) -> dict:
    """What rebuilds the encoder: a timm name and the keyword arguments its state dict fits."""
    from tasks.backbone_catalog import find_entry

    cfg = getattr(encoder, "pretrained_cfg", {}) or {}
    catalog = cfg.get("timm_architecture") is not None
    entry = find_entry(backbone.name) if catalog else None
    return {
        "library": "timm",
        "class": "VisionTransformer",
        "timm_name": cfg.get("timm_architecture") if catalog else backbone.name,
        "catalog_entry": backbone.name if catalog else None,
        # timm keyword arguments beyond the name that the state dict needs (LayerScale, registers, SwiGLU)
        "timm_kwargs": {k: v for k, v in (entry.kwargs.items() if entry else ())
                        if k not in ("img_size", "in_chans", "num_classes")},
        "img_size": int(encoder.patch_embed.img_size[0]),
        "patch_size": int(encoder.patch_embed.patch_size[0]),
        "in_chans": int(encoder.patch_embed.proj.in_channels),
        "embed_dim": int(encoder.embed_dim),
        "depth": len(encoder.blocks),
        "num_heads": int(encoder.blocks[0].attn.num_heads),
        "num_prefix_tokens": int(encoder.num_prefix_tokens),
        "num_classes": 0,
        "global_pool": str(encoder.global_pool),
    }


def export_encoder(encoder: nn.Module, description: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``encoder.safetensors`` (the timm state dict, no head) and ``encoder.json``; returns both paths.

    The description gains the weights' SHA-256; the safetensors header carries the description too, so
    the file alone says what it is.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    weights = out_dir / ENCODER_FILE
    with atomic_path(weights) as partial:
        save_file(state, str(partial), metadata={"vitrail": json.dumps(description, sort_keys=True)})
    description = {**description, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    text = out_dir / DESCRIPTION_FILE
    with atomic_path(text) as partial:
        Path(partial).write_text(json.dumps(description, indent=2, sort_keys=True))
    return weights, text


def read_encoder_description(path: Path | str) -> dict:
    """An exported encoder's description (``encoder.json``), checked to be one.

    Raises:
        RequestError: not readable JSON, or not a Vitrail MAE encoder description.
    """
    try:
        description = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RequestError(f"{path}: not a readable encoder description ({error})") from None
    if not isinstance(description, dict) or description.get("format") != DESCRIPTION_FORMAT:
        raise RequestError(f"{path}: not a Vitrail encoder description (format {DESCRIPTION_FORMAT} expected)")
    return description


def finetune_backbone_params(description_path: Path | str) -> BackboneParams:
    """The fine-tune stage's backbone settings that load an exported encoder: its timm name, patch size,
    depth, and ``weights="file"`` pointing at the safetensors beside the description."""
    description = read_encoder_description(description_path)
    arch = description["architecture"]
    if arch.get("timm_kwargs"):
        # BackboneParams builds a timm name with its default architecture; these encoders need more.
        raise RequestError(f"{description_path}: this encoder was continued from catalog entry "
                           f"{arch['catalog_entry']}, whose architecture needs timm arguments "
                           f"{sorted(arch['timm_kwargs'])} that a fine-tune by timm name cannot set yet")
    return BackboneParams(name=arch["timm_name"], weights="file", patch_size=arch["patch_size"], depth=arch["depth"],
                          weights_file=str(Path(description_path).with_name(ENCODER_FILE)))


def pretrain_encoder(dataset_path: Path | str, backbone: BackboneParams, mae: MaeParams, train: TrainParams,
                     checkpoint_dir: Path | str, out_dir: Path,
                     on_epoch: EpochCallback | None = None) -> PretrainOutcome:
    """Pretrain ``backbone`` as a masked autoencoder on the dataset's unlabelled tiles; export the encoder.

    ``backbone`` may start from random weights, the hub, a file or a catalog entry (continued
    pretraining). The run is seeded (``train.seed``) and resumes from the newest matching checkpoint in
    ``checkpoint_dir``. Reconstruction images of every epoch go to ``out_dir/reconstructions``; the
    encoder and its description to ``out_dir``.
    """
    pin_determinism(train.seed, train.threads)  # before building: timm's initialisers draw from torch's generator
    dataset = load_dataset(dataset_path)
    info = dataset.info
    require_unwindowed(info, "MAE pretraining")
    view, excluded = pretraining_view(dataset, mae.max_tiles, train.seed)
    if train.flip_augment and not get_domain(info.domain).train_flips:
        log.info("%s: flips and rotations are not valid augmentations for this domain; pretraining without them",
                 info.domain)
        train = train.model_copy(update={"flip_augment": False})
    train = train.model_copy(update={"objective": "model-loss", "balance_classes": False})
    mean, std = info.channel_mean, info.channel_std
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise RequestError(f"{dataset_path}: the dataset's per-band statistics are unusable (mean {mean}, std {std})")
    mask_ratio = mae.mask_ratio if mae.mask_ratio is not None else default_mask_ratio(info.domain)
    encoder = build_backbone(backbone, info.channels, 0, info.tile_size)
    model = MaskedAutoencoder(encoder, mean, std, mask_ratio, mae.decoder_dim, mae.decoder_depth,
                              mae.decoder_heads, mae.norm_pix_loss)
    shown = view.splits.get("val", view.splits["train"])
    count = min(mae.preview_samples, len(shown))
    preview = np.asarray(shown.images[np.linspace(0, len(shown) - 1, count).round().astype(np.int64)])
    bands = preview_band_indices(info.channels, mae.preview_bands)
    images = ReconstructionImages(model, checkpoint_dir, preview, bands, out_dir / "reconstructions", train.seed,
                                  on_epoch)
    model_key = (f"mae|{backbone.model_dump_json()}|{mae.model_dump_json(exclude={'preview_bands', 'preview_samples'})}"
                 f"|ratio={mask_ratio}")
    result = fit(model, view, train, checkpoint_dir, model_key, images)
    trained_samples = len(view.splits["train"])
    best = result.best_metrics
    description = {
        "format": DESCRIPTION_FORMAT,
        "method": "masked autoencoder (He et al. 2022)",
        "domain": info.domain,
        "architecture": encoder_architecture(model.encoder, backbone),
        "started_from": backbone.model_dump(mode="json"),
        "bands": [dataclasses.asdict(c) for c in info.channels],
        "preprocessing": {"input": "physical units as the dataset stores them", "mean": list(mean), "std": list(std),
                          "statistics_from": "the dataset's training split"},
        "mask_ratio": mask_ratio,
        "decoder": {"dim": mae.decoder_dim, "depth": mae.decoder_depth, "heads": mae.decoder_heads},
        "norm_pix_loss": mae.norm_pix_loss,
        "dataset_digest": info.digest,
        "pretraining_samples": trained_samples,
        "tiles_available": sum(len(s) for n, s in dataset.splits.items() if n not in excluded),
        "excluded_splits": excluded,
        "epochs": train.epochs,
        "best_epoch": result.best_epoch,
        # Every epoch reads every pretraining tile once (a short last step repeats a few to fill the step).
        "samples_seen": trained_samples * len(result.history),
        "val_reconstruction_loss": best["val_loss"],
        "train_reconstruction_loss": best["train_loss"],
        "seed": train.seed,
    }
    weights, text = export_encoder(model.encoder, description, out_dir)
    return PretrainOutcome(encoder_file=weights, description_file=text, description=read_encoder_description(text),
                           fit=result, reconstruction_images=sorted((out_dir / "reconstructions").glob("*.png")))


pretrain_encoder_task = task(pretrain_encoder, name="pretrain-encoder", cache_policy=NONE)


def record_pretraining(outcome: PretrainOutcome, domain: str) -> tuple[str, str, str]:
    """Log the encoder, its description and reconstruction images to the active run, and register the
    encoder as a new version of ``foundation-<domain>`` holding the alias ``candidate``.

    ``champion`` is not set here: that is the probe gate's decision (a later stage), made by scoring the
    candidate against the baselines. Returns ``(registered name, version, alias)``.
    """
    from tasks import tracking
    from tasks.backbone_catalog import licence_tags

    description = outcome.description
    tracking.log_metrics({"best_epoch": outcome.fit.best_epoch,
                          "best_val_reconstruction_loss": description["val_reconstruction_loss"],
                          "samples_seen": description["samples_seen"],
                          "pretraining_samples": description["pretraining_samples"]})
    tracking.log_artifact(outcome.encoder_file, "encoder")
    tracking.log_artifact(outcome.description_file, "encoder")
    for image in outcome.reconstruction_images:
        tracking.log_artifact(image, "reconstructions")
    name = foundation_model_name(domain)
    excluded = description["excluded_splits"]
    tags = {"vitrail.stage": "pretrain", "vitrail.method": "mae", "vitrail.domain": domain,
            "vitrail.dataset_digest": description["dataset_digest"],
            "vitrail.backbone": description["architecture"]["timm_name"],
            "vitrail.mask_ratio": str(description["mask_ratio"]),
            "vitrail.samples_seen": str(description["samples_seen"]),
            "vitrail.weights_sha256": description["weights_sha256"],
            "vitrail.probe_gate": "pending",
            # Continued pretraining from catalog weights inherits their licence (empty for random or timm starts).
            **(licence_tags(description["started_from"]["name"])
               if description["started_from"].get("weights") != "none" else {}),
            **{f"vitrail.excluded_{split}_groups_digest": record["groups_digest"]
               for split, record in excluded.items()}}
    version = tracking.register_artifact_folder("encoder", name, tags)
    tracking.set_alias(name, CANDIDATE_ALIAS, version)
    return name, version, CANDIDATE_ALIAS


CANDIDATE_ALIAS = "candidate"


def foundation_model_name(domain: str) -> str:
    """Registered name of a domain's self-pretrained encoders."""
    return f"foundation-{domain}"


record_pretraining_task = task(record_pretraining, name="record-pretraining", cache_policy=NONE)

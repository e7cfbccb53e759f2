"""Named foundation backbones: how to build each, what input it expects, and how its weights load offline.

Each :class:`CatalogEntry` records what a user of the published checkpoint needs and what is easy to get
wrong: the builder (a timm ViT with the keyword arguments that match the checkpoint's tensors -- LayerScale,
SwiGLU, register tokens... -- or, for models that are not plain ViTs, the torchgeo/terratorch call users
load them with), the ordered input bands (names, centre wavelengths, ground resolution), the preprocessing
from raw values (uint8, DN, reflectance x 10000) with mean/std and resize, the embedding and its pooling,
the key layout of the file (timm, or Hugging Face transformers), the tensors the file may hold that the
model has no slot for, where the weights come from (hub id and revision, file name, sha256 where
published) and the licence (gated? commercial use?). Provenance only: Vitrail never downloads.

Weights are looked for, in order, at an explicit file, at ``$VITRAIL_WEIGHTS_DIR/<entry>/<file>``, and in
the local Hugging Face cache (read only, no network). Loading refuses, each with a typed error naming the
file and the problem: weights whose licence was not accepted (:class:`LicenceNotAcceptedError`), a file
whose sha256 differs from the published one (:class:`ChecksumMismatchError`), tensors whose names or
shapes do not match (:class:`CheckpointMismatchError`), and data bands that differ from the entry's
(:class:`BandMismatchError`) unless band adaptation by name is asked for
(:func:`adapt_patch_embedding_by_name`), which then flags the model ``adapted``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from domains import Channel
from tasks.request_errors import RequestError

WEIGHTS_DIR_ENV = "VITRAIL_WEIGHTS_DIR"
# Comma-separated catalog names whose licence the operator accepts (the BackboneParams flag is the other way).
ACCEPT_LICENCES_ENV = "VITRAIL_ACCEPT_LICENCES"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0's own statistics, from its config.json on the hub (bioptimus/H-optimus-0).
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Bands are matched by wavelength within this distance when their names differ (Sentinel-2's B05 at 704 nm is
# 39 nm from red at 665 nm and must not inherit red's kernel; B02 at 493 nm is the blue of an RGB camera).
BAND_MATCH_TOLERANCE_NM = 30.0

Layout = Literal["timm", "hf-vit", "hf-dinov2"]
Pooling = Literal["cls", "cls+mean", "mean"]
Builder = Literal["timm", "terratorch", "torchgeo", "hypersigma"]
Domain = Literal["histopathology", "satellite", "radiology", "hyperspectral"]

# RGB cameras (scanners, photographs): centre wavelengths as in tasks.models.RGB_WAVELENGTHS_NM.
RGB_BANDS = (Channel("red", 640.0), Channel("green", 550.0), Channel("blue", 465.0))
# Sentinel-2 L1C, all 13 bands in product order (B8A between B08 and B09), Sentinel-2A centre wavelengths and
# native resolutions as in domains/satellite/sensors.py; SSL4EO-S12 and SoftCon take them in this order.
SENTINEL2_L1C_BANDS = (
    Channel("B01", 442.7, 60.0), Channel("B02", 492.7, 10.0), Channel("B03", 559.8, 10.0), Channel("B04", 664.6, 10.0),
    Channel("B05", 704.1, 20.0), Channel("B06", 740.5, 20.0), Channel("B07", 782.8, 20.0), Channel("B08", 832.8, 10.0),
    Channel("B8A", 864.7, 20.0), Channel("B09", 945.1, 60.0), Channel("B10", 1373.5, 60.0),
    Channel("B11", 1613.7, 20.0), Channel("B12", 2202.4, 20.0))
# NASA HLS (Landsat-8/9 OLI and Sentinel-2 harmonised to 30 m) as Prithvi-EO-2.0 takes them (terratorch's
# BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2; S2 B02, B03, B04, B8A, B11, B12 / L8 B2-B7).
HLS_PRITHVI_BANDS = (
    Channel("blue", 490.0, 30.0), Channel("green", 560.0, 30.0), Channel("red", 665.0, 30.0),
    Channel("nir_narrow", 865.0, 30.0), Channel("swir_1", 1610.0, 30.0), Channel("swir_2", 2190.0, 30.0))
# SSL4EO-S12 band statistics in DN (torchgeo.models.resnet _mean_s2/_std_s2), used by SoftCon's transforms.
SSL4EO_S2_MEAN = (1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2, 1537.4)
SSL4EO_S2_STD = (791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 47.5, 1340.0, 1142.9)
# Prithvi-EO-2.0 pretraining statistics in HLS DN (reflectance x 10000), from the model's config.json.
PRITHVI_V2_MEAN = (1087.0, 1342.0, 1433.0, 2734.0, 1958.0, 1363.0)
PRITHVI_V2_STD = (2248.0, 2179.0, 2178.0, 1850.0, 1242.0, 1049.0)


class CatalogError(RequestError):
    """A catalog backbone that cannot be built or loaded as asked; the message says what to change."""


class WeightsNotFoundError(CatalogError):
    """No weights file for a catalog entry was found locally; the message says what file to put where."""


class LicenceNotAcceptedError(CatalogError):
    """Gated or non-commercial weights asked for without an explicit acceptance of their licence."""


class ChecksumMismatchError(CatalogError):
    """A weights file whose sha256 is not the one the publisher gives for it."""


class BandMismatchError(CatalogError):
    """Data bands that differ from the bands a checkpoint was trained on, with no adaptation asked for."""


class UnsupportedBuilderError(CatalogError):
    """An entry that is not a plain timm ViT: it is built by another package and Vitrail does not fake it."""


class CheckpointMismatchError(CatalogError):
    """A checkpoint whose tensor names or shapes do not fit the entry's architecture."""

    def __init__(self, origin: str, entry: str, missing: list[str], unexpected: list[str], reshaped: list[str]):
        self.origin, self.entry = origin, entry
        self.missing, self.unexpected, self.reshaped = missing, unexpected, reshaped
        parts = [f"{label} {len(items)} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})"
                 for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                      ("tensors of another shape", reshaped)) if items]
        super().__init__(f"{origin}: not a {entry} checkpoint: {'; '.join(parts)}")


@dataclass(frozen=True)
class CatalogEntry:
    """One published backbone: how to build it, what it expects, where its weights come from."""

    name: str  # catalog key, as given to BackboneParams.name
    title: str  # display name
    domains: tuple[Domain, ...]  # the imaging domains it was trained for (or suits: RGB models)
    architecture: str  # timm model name the kwargs apply to (builder 'timm'); the closest timm family otherwise
    kwargs: Mapping[str, Any]  # timm kwargs matching the checkpoint; callables named by dotted path
    input_size: int  # side of the square tile the position embeddings were trained for, in pixels
    patch_size: int
    # The ordered input bands the checkpoint's patch embedding was trained on; () for a model that takes any
    # bands given their wavelengths (DOFA).
    bands: tuple[Channel, ...]
    raw_input: str  # what the raw pixels are (uint8 RGB, Sentinel-2 L1C DN...)
    scale: float | None  # raw * scale gives the units mean/std are in; None where the model card leaves it open
    mean: tuple[float, ...]  # per band, in scaled units
    std: tuple[float, ...]
    resize: str  # how tiles are brought to the input size in the reference pipeline
    embed_dim: int  # width of a token
    pooling: Pooling  # how the published embedding is read from the tokens
    published_params_m: float | None  # parameter count the authors publish, in millions (None: not published)
    hub_id: str  # provenance only: Vitrail does not download
    weights_file: str  # the file's name on the hub; locally under $VITRAIL_WEIGHTS_DIR/<name>/
    licence: str
    gated: bool  # the hub asks users to accept terms before download
    commercial_use: bool
    source: str  # where the facts above come from
    layout: Layout = "timm"
    builder: Builder = "timm"
    builder_call: str = ""  # how users build a non-timm entry (its own package)
    not_timm_because: str = ""  # what in the architecture a timm ViT cannot hold
    revision: str | None = None  # hub revision when pinned (torchgeo pins one per weight)
    sha256: str | None = None  # the file's sha256: full digest, or the 8+ hex prefix torchgeo puts in file names
    dynamic_size: bool = True  # position embeddings may be resampled to another tile size
    # A single grey plane may be fed as the same plane in R, G and B: only where the model card does so.
    grey_as_rgb: bool = False
    hu_window: tuple[float, float] | None = None  # (level, width) in HU for CT-trained entries; none here yet
    # Tensors the file holds that the timm model has no slot for (fnmatch patterns, after key mapping).
    ignored_keys: tuple[str, ...] = ()
    # Model tensors the published file may lack (fnmatch); they keep their initialisation.
    optional_keys: tuple[str, ...] = ()
    notes: str = ""

    @property
    def embedding_dim(self) -> int:
        """Length of the published embedding (cls+mean doubles the token width)."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

    @property
    def needs_acceptance(self) -> bool:
        """Gated or non-commercial weights load only after their licence is explicitly accepted."""
        return self.gated or not self.commercial_use

    @property
    def in_chans(self) -> int:
        return len(self.bands) or 3

    def local_path(self, weights_dir: Path | str) -> Path:
        return Path(weights_dir) / self.name / self.weights_file

    def timm_kwargs(self) -> dict[str, Any]:
        """The kwargs with the layers they name resolved (imports torch and timm)."""
        return {key: _resolve(value) for key, value in self.kwargs.items()}


def _resolve(value: Any) -> Any:
    """Turn the symbolic layer names kept in entries (so importing the catalog stays light) into objects."""
    if not isinstance(value, str) or not value.startswith(("timm.", "torch.", "layernorm:")):
        return value
    if value.startswith("layernorm:"):
        # A LayerNorm with the checkpoint's epsilon (transformers ViT uses 1e-12, timm 1e-6).
        from functools import partial

        from torch import nn

        return partial(nn.LayerNorm, eps=float(value.split(":", 1)[1]))
    import importlib

    module, _, attr = value.rpartition(".")
    return getattr(importlib.import_module(module), attr)


_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
# What every pathology RGB entry shares: uint8 scanner tiles scaled to [0, 1].
_RGB = {"bands": RGB_BANDS, "raw_input": "uint8 RGB", "scale": 1 / 255}
_PATHOLOGY = {"domains": ("histopathology",), **_RGB, "resize": "tiles at the model's input size (0.5 um/px)"}
_SSL4EO = {
    "domains": ("satellite",), "architecture": "vit_small_patch16_224", "kwargs": {}, "input_size": 224,
    "patch_size": 16, "bands": SENTINEL2_L1C_BANDS, "raw_input": "Sentinel-2 L1C DN (TOA reflectance x 10000)",
    "scale": 1e-4, "mean": (0.0,) * 13, "std": (1.0,) * 13, "resize": "resize 256, centre crop 224",
    "embed_dim": 384, "pooling": "cls", "published_params_m": 22.0, "licence": "CC-BY-4.0", "gated": False,
    "commercial_use": True, "ignored_keys": ("head.*",),
}

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        name="uni", title="UNI (ViT-L/16)", architecture="vit_large_patch16_224",
        kwargs={"init_values": 1e-5}, input_size=224, patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embed_dim=1024, pooling="cls", published_params_m=303.0, hub_id="MahmoodLab/UNI",
        weights_file="pytorch_model.bin", licence="CC-BY-NC-ND-4.0", gated=True, commercial_use=False,
        source="https://huggingface.co/MahmoodLab/UNI (timm.create_model('hf-hub:MahmoodLab/uni', "
               "init_values=1e-5, dynamic_img_size=True)); Chen et al., Nat Med 2024",
        notes="init_values is needed for the LayerScale tensors blocks.N.ls1/ls2.gamma", **_PATHOLOGY),
    CatalogEntry(
        name="uni2-h", title="UNI2-h (ViT-H/14, 8 registers)", architecture="vit_giant_patch14_224",
        kwargs={"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **_SWIGLU},
        input_size=224, patch_size=14, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1536, pooling="cls",
        published_params_m=681.0, hub_id="MahmoodLab/UNI2-h", weights_file="pytorch_model.bin",
        licence="CC-BY-NC-ND-4.0", gated=True, commercial_use=False,
        source="https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs of the model card)", **_PATHOLOGY),
    CatalogEntry(
        name="virchow2", title="Virchow2 (ViT-H/14, 4 registers)", architecture="vit_huge_patch14_224",
        kwargs={"init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, **_SWIGLU},
        input_size=224, patch_size=14, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1280,
        pooling="cls+mean", published_params_m=632.0, hub_id="paige-ai/Virchow2",
        weights_file="model.safetensors", licence="CC-BY-NC-ND-4.0", gated=True, commercial_use=False,
        source="https://huggingface.co/paige-ai/Virchow2 (config.json model_args; mlp_layer=SwiGLUPacked, "
               "act_layer=SiLU); Zimmermann et al., arXiv:2408.00738 (632M parameters)",
        notes="published embedding: class token concatenated with the mean of the patch tokens "
              "(register tokens excluded), 2560 values; a fine-tuning head reads the class token", **_PATHOLOGY),
    CatalogEntry(
        name="h-optimus-0", title="H-optimus-0 (ViT-g/14, 4 registers)",
        architecture="vit_giant_patch14_reg4_dinov2", kwargs={"img_size": 224, "init_values": 1e-5},
        input_size=224, patch_size=14, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, embed_dim=1536, pooling="cls",
        published_params_m=1130.0, hub_id="bioptimus/H-optimus-0", weights_file="pytorch_model.bin",
        licence="Apache-2.0", gated=True, commercial_use=True, dynamic_size=False,
        source="https://huggingface.co/bioptimus/H-optimus-0 (config.json: fixed 224 input, own mean/std; "
               "timm.create_model(..., init_values=1e-5, dynamic_img_size=False)); 1.1B parameters",
        notes="fixed input size: tiles must be 224 px (at 0.5 um/px per the model card)", **_PATHOLOGY),
    CatalogEntry(
        name="phikon", title="Phikon (ViT-B/16, iBOT)", architecture="vit_base_patch16_224",
        kwargs={"norm_layer": "layernorm:1e-12"}, input_size=224, patch_size=16, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, embed_dim=768, pooling="cls", published_params_m=86.0, hub_id="owkin/phikon",
        weights_file="pytorch_model.bin", layout="hf-vit", licence="Owkin non-commercial",
        gated=False, commercial_use=False, ignored_keys=("pooler.dense.*",),
        source="https://huggingface.co/owkin/phikon (transformers ViTModel; embedding last_hidden_state[:, 0]); "
               "Filiot et al., medRxiv 2023.07.21.23292757",
        notes="stored in transformers ViTModel layout: query/key/value are fused into timm's qkv; the "
              "unused pooler is dropped; LayerNorm epsilon 1e-12 as transformers' ViT", **_PATHOLOGY),
    CatalogEntry(
        name="phikon-v2", title="Phikon-v2 (ViT-L/16, DINOv2)", architecture="vit_large_patch16_224",
        kwargs={"init_values": 1e-5}, input_size=224, patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embed_dim=1024, pooling="cls", published_params_m=307.0, hub_id="owkin/phikon-v2",
        weights_file="model.safetensors", layout="hf-dinov2", licence="Owkin non-commercial",
        gated=False, commercial_use=False, ignored_keys=("embeddings.mask_token",),
        source="https://huggingface.co/owkin/phikon-v2 (transformers Dinov2Model, no registers); "
               "Filiot et al., arXiv:2409.09173",
        notes="stored in transformers Dinov2Model layout: query/key/value fused into qkv, layer_scale "
              "lambdas into ls.gamma; the masked-modelling token is dropped", **_PATHOLOGY),
    CatalogEntry(
        name="prov-gigapath", title="Prov-GigaPath tile encoder (ViT-g/16)",
        architecture="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                "init_values": 1e-5, "mlp_ratio": 5.33334},
        input_size=224, patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1536, pooling="cls",
        published_params_m=1134.0, hub_id="prov-gigapath/prov-gigapath", weights_file="pytorch_model.bin",
        licence="Apache-2.0", gated=True, commercial_use=True,
        source="https://huggingface.co/prov-gigapath/prov-gigapath (config.json model_args; timm's "
               "vit_giant_patch14_dinov2 supplies SwiGLUPacked and SiLU); Xu et al., Nature 2024",
        notes="the tile encoder only; the slide encoder (LongNet) is not a ViT and is not in this catalog",
        **_PATHOLOGY),
    # --- satellite ---------------------------------------------------------------------------------------
    CatalogEntry(
        name="ssl4eo-s12-vit-s16-moco", title="SSL4EO-S12 MoCo-v3 ViT-S/16 (Sentinel-2 L1C, 13 bands)",
        hub_id="torchgeo/vit_small_patch16_224_sentinel2_all_moco",
        revision="1cb683f6c14739634cdfaaceb076529adf898c74",
        weights_file="vit_small_patch16_224_sentinel2_all_moco-67c9032d.pth",
        sha256="67c9032df0449ae37f93c51696bcae0c6dc3485103deb44b4669e9897b90409c",
        source="torchgeo.models.ViTSmall16_Weights.SENTINEL2_ALL_MOCO (timm vit_small_patch16_224, in_chans 13; "
               "transforms: resize 256, centre crop 224, divide by 10000; sha256 from the hub's LFS pointer); "
               "Wang et al., arXiv:2211.07044 (ViT-S/16, 22M)",
        notes="torchgeo loads it with missing keys limited to the head and no unexpected key", **_SSL4EO),
    CatalogEntry(
        name="ssl4eo-s12-vit-s16-dino", title="SSL4EO-S12 DINO ViT-S/16 (Sentinel-2 L1C, 13 bands)",
        hub_id="torchgeo/vit_small_patch16_224_sentinel2_all_dino",
        revision="5b41dd418a79de47ac9f5be3e035405a83818a62",
        weights_file="vit_small_patch16_224_sentinel2_all_dino-36bcc127.pth", sha256="36bcc127",
        source="torchgeo.models.ViTSmall16_Weights.SENTINEL2_ALL_DINO (as the MoCo entry; the file name carries "
               "the sha256 prefix torchgeo checks); Wang et al., arXiv:2211.07044",
        **_SSL4EO),
    CatalogEntry(
        name="softcon-vit-s14", title="SoftCon ViT-S/14 (DINOv2-style, Sentinel-2 L1C, 13 bands)",
        domains=("satellite",), architecture="vit_small_patch14_dinov2", kwargs={}, input_size=224,
        patch_size=14, bands=SENTINEL2_L1C_BANDS, raw_input="Sentinel-2 L1C DN (TOA reflectance x 10000)",
        scale=1.0, mean=SSL4EO_S2_MEAN, std=SSL4EO_S2_STD, resize="resize 256, centre crop 224",
        embed_dim=384, pooling="cls", published_params_m=22.0, hub_id="wangyi111/softcon",
        revision="bae909781911f8ec034b4b959992fae17b973c0c", weights_file="B13_vits14_softcon_enc.pth",
        licence="not recorded (check the hub card)", gated=False, commercial_use=False,
        ignored_keys=("head.*",), optional_keys=("norm.weight", "norm.bias"),
        source="torchgeo.models.ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON (timm vit_small_patch14_dinov2, "
               "in_chans 13, img_size 224; transforms: resize 256, centre crop 224, per-band SSL4EO-S12 mean/std "
               "in DN); Wang et al., arXiv:2405.20462",
        notes="torchgeo accepts the file without the final norm (then it stays the identity LayerNorm); "
              "licence not recorded here, so the entry asks for explicit acceptance"),
    CatalogEntry(
        name="prithvi-eo-2.0-300m", title="Prithvi-EO-2.0-300M (ViT-L/16, 3D patch embedding, HLS 6 bands)",
        domains=("satellite",), architecture="vit_large_patch16_224", kwargs={}, input_size=224, patch_size=16,
        bands=HLS_PRITHVI_BANDS, raw_input="HLS surface reflectance x 10000 (DN)", scale=1.0,
        mean=PRITHVI_V2_MEAN, std=PRITHVI_V2_STD, resize="224 px chips at 30 m, 1-4 time steps",
        embed_dim=1024, pooling="mean", published_params_m=300.0,
        hub_id="ibm-nasa-geospatial/Prithvi-EO-2.0-300M", weights_file="Prithvi_EO_V2_300M.pt",
        licence="Apache-2.0", gated=False, commercial_use=True, builder="terratorch",
        builder_call="terratorch BACKBONE_REGISTRY.build('prithvi_eo_v2_300', pretrained=True, bands=[...])",
        source="https://huggingface.co/ibm-nasa-geospatial/Prithvi-EO-2.0-300M (model card and config.json "
               "mean/std); Szwarcman et al., arXiv:2412.02732",
        not_timm_because="a temporal ViT: 3D patch embedding (Conv3d, tubelet x 16 x 16) and 3D sin-cos position "
                         "embeddings over (time, row, col)",
        notes="recorded for provenance and refused at build; terratorch's decoders read the patch tokens"),
    CatalogEntry(
        name="dofa-vit-b16", title="DOFA ViT-B/16 (wavelength-conditioned patch embedding)",
        domains=("satellite", "hyperspectral"), architecture="vit_base_patch16_224", kwargs={}, input_size=224,
        patch_size=16, bands=(), raw_input="any sensor, given each band's centre wavelength (in um)", scale=None,
        mean=(), std=(), resize="centre crop 224 (torchgeo's transforms; normalisation is per data set)",
        embed_dim=768, pooling="mean", published_params_m=None, hub_id="torchgeo/dofa",
        revision="b8db318b64a90b9e085ec04ba8851233c5893666", weights_file="dofa_base_patch16_224-a0275954.pth",
        sha256="a0275954", licence="CC-BY-4.0", gated=False, commercial_use=True, builder="torchgeo",
        builder_call="torchgeo.models.dofa_base_patch16_224(DOFABase16_Weights.DOFA_MAE); "
                     "model(x, wavelengths=[...])",
        source="torchgeo.models.DOFABase16_Weights.DOFA_MAE (pretrained on SatlasPretrain, Five-Billion-Pixels, "
               "HySpecNet-11k); Xiong et al., arXiv:2403.15356",
        not_timm_because="a hypernetwork generates the patch-embedding kernels from the band wavelengths at "
                         "every forward pass",
        notes="recorded for provenance and refused at build; it takes any bands given their wavelengths"),
    # --- RGB generalists ---------------------------------------------------------------------------------
    CatalogEntry(
        name="dinov2-vit-s14", title="DINOv2 ViT-S/14 (LVD-142M)", domains=("histopathology", "satellite"),
        architecture="vit_small_patch14_dinov2", kwargs={}, input_size=518, patch_size=14, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, resize="any multiple of 14 px; position embeddings trained at 518 px",
        embed_dim=384, pooling="cls", published_params_m=22.1, hub_id="timm/vit_small_patch14_dinov2.lvd142m",
        weights_file="model.safetensors", licence="Apache-2.0", gated=False, commercial_use=True,
        source="https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m (22.1M parameters, 518 px); "
               "Oquab et al., arXiv:2304.07193", **_RGB),
    CatalogEntry(
        name="dinov2-vit-b14", title="DINOv2 ViT-B/14 (LVD-142M)", domains=("histopathology", "satellite"),
        architecture="vit_base_patch14_dinov2", kwargs={}, input_size=518, patch_size=14, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, resize="any multiple of 14 px; position embeddings trained at 518 px",
        embed_dim=768, pooling="cls", published_params_m=86.6, hub_id="timm/vit_base_patch14_dinov2.lvd142m",
        weights_file="model.safetensors", licence="Apache-2.0", gated=False, commercial_use=True,
        source="https://huggingface.co/timm/vit_base_patch14_dinov2.lvd142m (86.6M parameters, 518 px); "
               "Oquab et al., arXiv:2304.07193", **_RGB),
    # --- radiology ---------------------------------------------------------------------------------------
    CatalogEntry(
        name="rad-dino", title="RAD-DINO (ViT-B/14, chest X-ray, DINOv2)", domains=("radiology",),
        architecture="vit_base_patch14_dinov2", kwargs={}, input_size=518, patch_size=14, bands=RGB_BANDS,
        raw_input="8-bit chest radiograph (DICOM windowed to uint8), grey plane in R, G and B", scale=1 / 255,
        mean=(0.5307,) * 3, std=(0.2583,) * 3, resize="shortest edge 518, centre crop 518",
        embed_dim=768, pooling="cls", published_params_m=86.6, hub_id="microsoft/rad-dino",
        weights_file="model.safetensors", layout="hf-dinov2", licence="MIT, card: research use only",
        gated=False, commercial_use=False, grey_as_rgb=True,
        ignored_keys=("embeddings.mask_token",),
        source="https://huggingface.co/microsoft/rad-dino (transformers Dinov2Model fine-tuned from "
               "dinov2-base; the card's processor converts the radiograph to RGB; mean/std from its "
               "preprocessor_config.json); Perez-Garcia et al., Nat Mach Intell 2025",
        notes="licence MIT since the hub's 'Use MIT license' change (earlier revisions: MSRLA); the card says "
              "research use only, not for clinical practice, so Vitrail asks for explicit acceptance; "
              "the card feeds a grey radiograph as the same plane in R, G and B (do_convert_rgb), so a single "
              "grey channel is accepted and flagged adapted; its mean/std (0.5307/0.2583) were taken from the "
              "processor config as remembered, not re-read when this entry was written: check them"),
    # --- hyperspectral -----------------------------------------------------------------------------------
    CatalogEntry(
        name="hypersigma-spat-vit-b", title="HyperSIGMA spatial ViT-B (sparse sampling attention)",
        domains=("hyperspectral",), architecture="vit_base_patch16_224", kwargs={}, input_size=64,
        patch_size=8, bands=(), raw_input="hyperspectral cube, bands reduced as in the HyperSIGMA repository",
        scale=None, mean=(), std=(), resize="per task, see the repository", embed_dim=768, pooling="mean",
        published_params_m=None, hub_id="WHU-Sigma/HyperSIGMA", weights_file="spat-vit-base-ultra-checkpoint-1599.pth",
        licence="Apache-2.0", gated=False, commercial_use=True, builder="hypersigma",
        builder_call="the model code of https://github.com/WHU-Sigma/HyperSIGMA (no package on PyPI)",
        source="https://huggingface.co/WHU-Sigma/HyperSIGMA; Wang et al., HyperSIGMA, TPAMI 2025",
        not_timm_because="sparse sampling attention and a spectral enhancement module",
        notes="no published hyperspectral foundation model found is a plain timm ViT: HyperSIGMA uses sparse "
              "sampling attention and a spectral enhancement module, SpectralEarth puts a spectral adapter before the "
              "ViT, and the file pickles an argparse.Namespace that weights_only loading refuses; recorded for "
              "provenance, refused at build; DOFA (hyperspectral pretraining included) is the other option; "
              "input 64 px / patch 8 are as remembered from its configs, not checked"),
)}


def find_entry(name: str) -> CatalogEntry | None:
    """The catalog entry called ``name`` (case-insensitive), or None for a plain timm name."""
    return CATALOG.get(name.lower())


def get_entry(name: str) -> CatalogEntry:
    entry = find_entry(name)
    if entry is None:
        raise CatalogError(f"{name!r} is not in the backbone catalog (known: {', '.join(CATALOG)})")
    return entry


# --- key layouts: transformers checkpoints renamed to timm's tensors and back ---------------------------

_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Per-block names (after "encoder.layer.N.") and their timm names (after "blocks.N.").
_HF_BLOCK = {
    "hf-vit": {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"},
    "hf-dinov2": {"norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2",
                  "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}
_HF_PARAMS = {
    "hf-vit": {},
    "hf-dinov2": {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"},
}
_QKV = ("query", "key", "value")
_HF_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_TIMM_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _block_names(layout: Layout) -> dict[str, str]:
    """Full per-block tensor names, transformers -> timm."""
    names = {f"{hf}.{p}": f"{timm}.{p}" for hf, timm in _HF_BLOCK[layout].items() for p in ("weight", "bias")}
    return names | _HF_PARAMS[layout]


def to_timm_layout(state: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """Rename a checkpoint's tensors to timm's; query/key/value are concatenated into qkv.

    Tensors the layout does not know keep their names, so a mismatch report names them as in the file.
    """
    if layout == "timm":
        return dict(state)
    import torch

    blocks, out, qkv_parts = _block_names(layout), {}, {}
    for key, tensor in state.items():
        match = _HF_BLOCK_KEY.match(key)
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = tensor
        elif match and match.group(2) in blocks:
            out[f"blocks.{match.group(1)}.{blocks[match.group(2)]}"] = tensor
        elif match and (qkv := re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)",
                                            match.group(2))):
            qkv_parts.setdefault((match.group(1), qkv.group(2)), {})[qkv.group(1)] = (key, tensor)
        else:
            out[key] = tensor
    for (block, param), parts in qkv_parts.items():
        if len(parts) == 3:
            out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts[p][1] for p in _QKV], dim=0)
        else:  # an incomplete triple cannot be fused: report its parts under their own names
            out.update({name: tensor for name, tensor in parts.values()})
    return out


def from_timm_layout(state: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """The inverse of :func:`to_timm_layout`: timm tensors under the checkpoint's own names."""
    if layout == "timm":
        return dict(state)
    global_names = {timm: hf for hf, timm in _HF_GLOBAL.items()}
    block_names = {timm: hf for hf, timm in _block_names(layout).items()}
    out = {}
    for key, tensor in state.items():
        match = _TIMM_BLOCK_KEY.match(key)
        if key in global_names:
            out[global_names[key]] = tensor
        elif match and match.group(2) in block_names:
            out[f"encoder.layer.{match.group(1)}.{block_names[match.group(2)]}"] = tensor
        elif match and (qkv := re.fullmatch(r"attn\.qkv\.(weight|bias)", match.group(2))):
            for part, chunk in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"encoder.layer.{match.group(1)}.attention.attention.{part}.{qkv.group(1)}"] = chunk.clone()
        else:
            out[key] = tensor
    return out


# --- bands: matched by name, then by wavelength; the patch embedding adapted to the data's bands -----------

_COLOUR_ALIASES = {"r": "red", "g": "green", "b": "blue"}


def _band_key(name: str) -> str:
    """A band name spelt one way: case, spaces, '_' and '-' ignored; B01 = B1, B8a = B8A; R/G/B = red/green/blue."""
    key = re.sub(r"[\s_\-]", "", name.casefold())
    key = _COLOUR_ALIASES.get(key, key)
    number = re.fullmatch(r"b0*(\d+)(a?)", key)
    return f"b{int(number.group(1))}{number.group(2)}" if number else key


def match_band(channel: Channel, bands: tuple[Channel, ...],
               tolerance_nm: float = BAND_MATCH_TOLERANCE_NM) -> tuple[int | None, str]:
    """Index of the entry band ``channel`` is, and how it was matched ('name' or 'wavelength'); (None, '') if none.

    A name match counts only when the wavelengths, where both are known, agree within ``tolerance_nm``:
    band numbers are not shared across sensors (Landsat-8 B5 is near infrared, Sentinel-2 B5 red edge).
    Otherwise the entry band of the nearest centre wavelength within the tolerance is taken.
    """
    key = _band_key(channel.name)
    for index, band in enumerate(bands):
        both = channel.wavelength_nm is not None and band.wavelength_nm is not None
        disagree = both and abs(channel.wavelength_nm - band.wavelength_nm) > tolerance_nm
        if _band_key(band.name) == key and not disagree:
            return index, "name"
    if channel.wavelength_nm is not None:
        gaps = [(abs(band.wavelength_nm - channel.wavelength_nm), index) for index, band in enumerate(bands)
                if band.wavelength_nm is not None]
        if gaps and min(gaps)[0] <= tolerance_nm:
            return min(gaps)[1], "wavelength"
    return None, ""


@dataclass(frozen=True)
class BandAdaptation:
    """How a checkpoint's patch embedding was fitted to the data's bands (recorded with the model)."""

    adapted: bool
    copied: tuple[tuple[str, str, str], ...]  # (data band, entry band whose kernel it took, matched by)
    new: tuple[str, ...]  # data bands the checkpoint has no kernel for
    dropped: tuple[str, ...]  # entry bands the data lacks
    initialisation: str

    def as_record(self) -> dict[str, Any]:
        return {"adapted": self.adapted, "copied": [list(c) for c in self.copied], "new": list(self.new),
                "dropped": list(self.dropped), "initialisation": self.initialisation}


_SPLIT_INIT = ("copied kernels are divided by the number of data bands sharing them; new bands share the kernels of "
               "the entry bands the data lacks, summed and split evenly (zero when none is lacking), so a "
               "spectrally flat input embeds as it did in pretraining")
_GREY_INIT = ("one grey plane given as R, G and B, as the model card does: its kernel is the sum of the R, G and B "
              "kernels, which is exactly the pretrained model on the replicated plane")


def adapt_patch_embedding_by_name(weight, bands: tuple[Channel, ...], channels: tuple[Channel, ...], *,
                                  tolerance_nm: float = BAND_MATCH_TOLERANCE_NM, grey_as_rgb: bool = False):
    """Patch-embedding kernels (D, C, p, p) trained on ``bands``, fitted to the data's ``channels``.

    Each data band matched to an entry band (by name, then by wavelength: :func:`match_band`) takes that
    band's kernel. Initialisation (documented in the record): a kernel shared by k data bands is divided by
    k (a broad band split into narrow ones sums back to it); new bands share the summed kernels of the entry
    bands the data lacks, split evenly, and are zero when nothing is lacking. A spectrally flat input thus
    gives the embedding it gave in pretraining. With ``grey_as_rgb`` (an entry whose card feeds a grey image
    as R = G = B) a single unmatched grey channel takes the sum of the kernels. RGB is never tiled across
    bands. Returns the new kernels and a :class:`BandAdaptation`; the same bands in the same order give the
    kernels unchanged and ``adapted=False``.
    """
    import torch

    if weight.shape[1] != len(bands):
        raise ValueError(f"the patch embedding has {weight.shape[1]} input channels; {len(bands)} bands are declared")
    matches = [match_band(channel, bands, tolerance_nm) for channel in channels]
    if len(channels) == len(bands) and all(index == position for position, (index, _) in enumerate(matches)):
        return weight, BandAdaptation(False, tuple((c.name, b.name, how) for c, b, (_, how) in
                                                   zip(channels, bands, matches)), (), (), "as published")
    if grey_as_rgb and len(channels) == 1 and matches[0][0] is None:
        return weight.sum(dim=1, keepdim=True), BandAdaptation(True, (), (channels[0].name,), (), _GREY_INIT)
    shares = [sum(1 for index, _ in matches if index == i) for i in range(len(bands))]
    dropped = [i for i, count in enumerate(shares) if count == 0]
    new = [channel for channel, (index, _) in zip(channels, matches) if index is None]
    fill = (weight[:, dropped].sum(dim=1) / len(new)) if dropped and new else torch.zeros_like(weight[:, 0])
    kernels = [weight[:, index] / shares[index] if index is not None else fill for index, _ in matches]
    copied = tuple((c.name, bands[index].name, how) for c, (index, how) in zip(channels, matches) if index is not None)
    return torch.stack(kernels, dim=1), BandAdaptation(True, copied, tuple(c.name for c in new),
                                                       tuple(bands[i].name for i in dropped), _SPLIT_INIT)


def check_bands(entry: CatalogEntry, channels: tuple[Channel, ...], adapt_bands: bool,
                tolerance_nm: float = BAND_MATCH_TOLERANCE_NM) -> None:
    """Refuse data bands that differ from the checkpoint's (other bands, or the same in another order) unless
    adaptation by name was asked for; a grey image for an entry whose card replicates it is accepted."""
    if not entry.bands or adapt_bands:
        return
    matches = [match_band(channel, entry.bands, tolerance_nm)[0] for channel in channels]
    if len(channels) == len(entry.bands) and matches == list(range(len(entry.bands))):
        return
    if entry.grey_as_rgb and len(channels) == 1 and matches[0] is None:
        return
    expected, given = [b.name for b in entry.bands], [c.name for c in channels]
    if sorted(i for i in matches if i is not None) == list(range(len(entry.bands))) and None not in matches:
        problem = "the same bands in another order"
    else:
        lacking = [entry.bands[i].name for i in range(len(entry.bands)) if i not in matches]
        extra = [c.name for c, i in zip(channels, matches) if i is None]
        parts = (f"lacks {', '.join(lacking)}" if lacking else "",
                 f"has bands the checkpoint never saw: {', '.join(extra)}" if extra else "")
        problem = "; ".join(part for part in parts if part)
    raise BandMismatchError(
        f"{entry.name} was trained on the bands {', '.join(expected)} in this order; the data has {', '.join(given)} "
        f"({problem}). Give the bands in the entry's order, or set backbone.adapt_bands=true to copy the kernels of "
        "shared bands by name (new bands initialised as documented; the model is flagged adapted)")


# --- licence, checksum, builder -----------------------------------------------------------------------------

def accepted_licences() -> set[str]:
    """Catalog names whose licence the operator accepted through ``$VITRAIL_ACCEPT_LICENCES`` (comma-separated)."""
    return {name.strip().lower() for name in os.environ.get(ACCEPT_LICENCES_ENV, "").split(",") if name.strip()}


def check_licence(entry: CatalogEntry, accepted: bool) -> None:
    """Gated or non-commercial weights load only after an explicit acceptance (flag or environment)."""
    if not entry.needs_acceptance or accepted or entry.name in accepted_licences():
        return
    terms = ", ".join(t for t in ("gated on the hub" if entry.gated else "",
                                  "not for commercial use" if not entry.commercial_use else "") if t)
    raise LicenceNotAcceptedError(
        f"{entry.name} weights are under {entry.licence} ({terms}); accept that licence explicitly with "
        f"backbone.accept_licence=true or {ACCEPT_LICENCES_ENV}={entry.name} before loading them")


def verify_sha256(path: Path, entry: CatalogEntry) -> None:
    """Compare the file's sha256 with the published digest (or the prefix torchgeo puts in file names)."""
    if not entry.sha256:
        return
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    found = digest.hexdigest()
    if not found.startswith(entry.sha256.lower()):
        raise ChecksumMismatchError(
            f"{path}: sha256 {found[:16]}... is not the published {entry.sha256} of {entry.weights_file} "
            f"({entry.hub_id}); the file is truncated, corrupt or another checkpoint")


def require_timm_builder(entry: CatalogEntry) -> None:
    """Refuse, naming the package users build it with, an entry that is not a plain timm ViT."""
    if entry.builder == "timm":
        return
    import importlib.util

    package = None if entry.builder == "hypersigma" else entry.builder
    installed = package is not None and importlib.util.find_spec(package) is not None
    where = (f"the {package} package, installed here" if installed else
             f"the {package} package, not installed here (pip install {package})" if package else
             "code that is not on PyPI")
    raise UnsupportedBuilderError(
        f"{entry.name} is not a plain timm ViT ({entry.not_timm_because}); it is built with {entry.builder_call} "
        f"from {where}. Vitrail's fine-tuning, adapters and export take timm ViTs, so it lists this entry for "
        "provenance and does not imitate it with a look-alike ViT")


# --- building and loading --------------------------------------------------------------------------------

def create_catalog_model(entry: CatalogEntry, num_classes: int = 0, img_size: int | None = None,
                         depth: int | None = None, in_chans: int | None = None):
    """The entry's timm ViT with random weights; a head of ``num_classes`` logits reads the class token.

    ``in_chans`` defaults to the entry's band count. Works under ``with torch.device("meta"):`` so giant
    entries can be described without memory.
    """
    import timm

    require_timm_builder(entry)
    in_chans = in_chans or entry.in_chans
    kwargs = entry.timm_kwargs() | {"img_size": img_size or entry.input_size, "num_classes": num_classes,
                                    "global_pool": "token", "in_chans": in_chans}
    if depth is not None:
        kwargs["depth"] = depth
    model = timm.create_model(entry.architecture, pretrained=False, **kwargs)
    # The catalog name as the architecture, so a saved reference model is rebuilt with the entry's kwargs
    # (the bare timm name would miss LayerScale, SwiGLU, registers); and how its inputs are normalised.
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": entry.name, "timm_architecture": entry.architecture,
                            "mean": entry.mean, "std": entry.std, "input_size": (in_chans, entry.input_size,
                                                                                 entry.input_size),
                            "bands": tuple(b.name for b in entry.bands)}
    return model


def build_catalog_backbone(name: str, *, channels: tuple[Channel, ...], num_classes: int, img_size: int,
                           depth: int | None = None, weights: Literal["none", "hub", "file"] = "none",
                           weights_file: str | None = None, adapt_bands: bool = False, accept_licence: bool = False):
    """Build catalog entry ``name`` for tiles of ``channels`` and ``img_size`` px, with its weights when asked.

    ``weights='none'`` gives random weights: the entry is then an architecture only and takes the data's
    bands (no pretrained kernel exists to adapt). 'file' and 'hub' load the published checkpoint from an
    explicit ``weights_file``, else ``$VITRAIL_WEIGHTS_DIR/<name>/<file>``, else the local Hugging Face
    cache; nothing is downloaded. Before any file is read, the licence must be accepted where it is gated or
    non-commercial, and the data bands must be the entry's, in order, unless ``adapt_bands`` (then
    :func:`adapt_patch_embedding_by_name`; the model's ``pretrained_cfg['band_adaptation']`` records it).
    The file's sha256 is checked where published; every tensor is accounted for; position embeddings are
    resampled to ``img_size`` for entries that allow it; the head is always new.
    """
    entry = get_entry(name)
    require_timm_builder(entry)
    if img_size != entry.input_size and not entry.dynamic_size:
        raise CatalogError(f"{entry.name} takes {entry.input_size} px tiles only (its position embeddings are "
                           f"fixed); the data has {img_size} px tiles: tile at {entry.input_size} px")
    if weights == "none":
        return create_catalog_model(entry, num_classes=num_classes, img_size=img_size, depth=depth,
                                    in_chans=len(channels))
    check_licence(entry, accept_licence)
    check_bands(entry, channels, adapt_bands)
    path = resolve_weights_file(entry, weights_file)
    verify_sha256(path, entry)
    model = create_catalog_model(entry, num_classes=num_classes, img_size=img_size, depth=depth)
    load_catalog_weights(model, entry, read_checkpoint(path), str(path))
    _fit_patch_embedding(model, entry, channels)
    return model


def _fit_patch_embedding(model, entry: CatalogEntry, channels: tuple[Channel, ...]) -> None:
    """Swap the loaded patch embedding for one over the data's bands; record the adaptation on the model."""
    import torch
    from torch import nn

    proj = model.patch_embed.proj
    weight, adaptation = adapt_patch_embedding_by_name(proj.weight.detach(), entry.bands, channels,
                                                       grey_as_rgb=entry.grey_as_rgb)
    if adaptation.adapted:
        fitted = nn.Conv2d(len(channels), proj.out_channels, proj.kernel_size, proj.stride, proj.padding,
                           bias=proj.bias is not None)
        with torch.no_grad():
            fitted.weight.copy_(weight)
            if proj.bias is not None:
                fitted.bias.copy_(proj.bias)
        model.patch_embed.proj = fitted
    model.pretrained_cfg = {**model.pretrained_cfg, "band_adaptation": adaptation.as_record(),
                            "input_size": (len(channels),) + tuple(model.pretrained_cfg["input_size"][1:])}


def band_adaptation_of(model) -> dict[str, Any] | None:
    """The band adaptation recorded on a catalog model built with weights (None for other models), for the
    metric rows and tags that must say whether a backbone saw its own bands."""
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg.get("band_adaptation") if isinstance(cfg, dict) else None


def resolve_weights_file(entry: CatalogEntry, explicit: str | Path | None = None) -> Path:
    """Where the entry's weights are on this machine: explicit file, weights folder, local hub cache."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise WeightsNotFoundError(f"{path}: weights file for {entry.name} not found")
        return path
    tried = []
    weights_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if weights_dir:
        path = entry.local_path(weights_dir)
        if path.is_file():
            return path
        tried.append(str(path))
    cached = _hub_cache_file(entry)
    if cached is not None:
        return cached
    where = (f"put {entry.weights_file} from https://huggingface.co/{entry.hub_id}"
             f"{'' if not entry.revision else ' (revision ' + entry.revision + ')'} at "
             f"{entry.local_path(weights_dir or '$' + WEIGHTS_DIR_ENV)}")
    looked = f" (looked at {', '.join(tried)} and the local Hugging Face cache)" if tried else \
        f" ({WEIGHTS_DIR_ENV} is not set; looked in the local Hugging Face cache)"
    terms = f"; the hub asks you to accept its terms first ({entry.licence})" if entry.gated else ""
    raise WeightsNotFoundError(f"no weights for {entry.name}{looked}: {where}, or give weights_file; "
                               f"Vitrail does not download{terms}")


def _hub_cache_file(entry: CatalogEntry) -> Path | None:
    """The file in the local Hugging Face cache, if a hub client put it there; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(entry.hub_id, entry.weights_file, revision=entry.revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors of a safetensors file or a torch checkpoint (tensors only: ``weights_only=True``)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, a pickle with code, a foreign format
        raise CatalogError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CatalogError(f"{path}: expected a dictionary of tensors")
    return state


def load_catalog_weights(model, entry: CatalogEntry, state: Mapping[str, Any], origin: str) -> None:
    """Load a checkpoint into a model built by :func:`create_catalog_model`, every tensor accounted for.

    Allowed differences, and only these: the entry's ``ignored_keys`` and ``optional_keys``, blocks beyond a truncated
    model's depth, the model's new head, and position embeddings resampled to another tile size.
    Anything else raises :class:`CheckpointMismatchError` before a tensor is copied.
    """
    from timm.layers import resample_abs_pos_embed

    state = to_timm_layout(state, entry.layout)
    depth = len(model.blocks)
    state = {k: v for k, v in state.items()
             if not any(fnmatch(k, pattern) for pattern in entry.ignored_keys)
             and not ((m := _TIMM_BLOCK_KEY.match(k)) and int(m.group(1)) >= depth)}
    target = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape and entry.dynamic_size:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        native = entry.input_size // entry.patch_size
        if pos.shape[1] == native * native + prefix and pos.shape[2] == target["pos_embed"].shape[2]:
            state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), [native, native],
                                                        num_prefix_tokens=prefix)
    missing = sorted(k for k in target if k not in state and not k.startswith("head.")
                     and not any(fnmatch(k, pattern) for pattern in entry.optional_keys))
    unexpected = sorted(k for k in state if k not in target)
    reshaped = [f"{k} {tuple(state[k].shape)} instead of {tuple(target[k].shape)}"
                for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(origin, entry.name, missing, unexpected, reshaped)
    model.load_state_dict(state, strict=False)


def pool_tokens(entry: CatalogEntry, tokens, num_prefix_tokens: int):
    """The published embedding from ``forward_features`` tokens (N, T, D): class token, mean patch token, or
    both side by side (Virchow2); register tokens are not patches."""
    import torch

    cls, patches = tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)
    if entry.pooling == "cls":
        return cls
    return patches if entry.pooling == "mean" else torch.cat([cls, patches], dim=-1)


def _bands_summary(entry: CatalogEntry) -> str:
    if not entry.bands:
        return "any (by wavelength)" if entry.builder == "torchgeo" else "see builder"
    if entry.bands == RGB_BANDS:
        return "RGB" + (" (grey as R=G=B)" if entry.grey_as_rgb else "")
    if entry.bands == SENTINEL2_L1C_BANDS:
        return "S2 L1C B01-B12+B8A (13)"
    return ",".join(b.name for b in entry.bands) + f" ({len(entry.bands)})"


def catalog_table() -> str:
    """The catalog as a text table (``vitrail backbones``)."""
    header = ("name", "domain", "builder", "params", "input", "bands", "embed", "licence", "access")

    def licence(e: CatalogEntry) -> str:
        use = "commercial use" if e.commercial_use else "non-commercial"
        return f"{e.licence} ({use}{', accept first' if e.needs_acceptance else ''})"

    rows = [header] + [(e.name, ",".join(e.domains), e.architecture if e.builder == "timm" else e.builder,
                        "?" if e.published_params_m is None else f"{e.published_params_m:.0f}M",
                        f"{e.input_size}px/{e.patch_size}" + ("" if e.dynamic_size else " fixed"),
                        _bands_summary(e), f"{e.embedding_dim} {e.pooling}", licence(e),
                        ("gated " if e.gated else "open ") + e.hub_id)
                       for e in CATALOG.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    footer = (f"Weights are read from an explicit file, ${WEIGHTS_DIR_ENV}/<name>/<file>, or the local Hugging "
              f"Face cache; Vitrail does not download them. Licences marked 'accept first' load only with "
              f"backbone.accept_licence=true or {ACCEPT_LICENCES_ENV}=<name>,...; builders other than timm are "
              "listed for provenance and refused at build.")
    return "\n".join(lines + ["", footer])


def licence_tags(name: str) -> dict[str, str]:
    """Registry tags naming a catalog entry's weights and their licence (empty for a name not in the catalog).

    Every registered model built from catalog weights carries them, so whoever deploys it sees the terms
    (non-commercial, gated) without tracing its lineage by hand.
    """
    entry = find_entry(name)
    if entry is None:
        return {}
    return {"vitrail.catalog_entry": entry.name, "vitrail.licence": entry.licence,
            "vitrail.licence_commercial_use": str(entry.commercial_use).lower(),
            "vitrail.licence_gated": str(entry.gated).lower(),
            "vitrail.weights_origin": entry.hub_id + (f"@{entry.revision}" if entry.revision else "")}


def base_licence_tags(base_backbone: Mapping[str, Any] | None) -> dict[str, str]:
    """:func:`licence_tags` of a fine-tuned model's base (its metadata's ``base_backbone`` block): only when
    the base loaded catalog weights; a catalog architecture with random weights carries no one's licence."""
    if not base_backbone or base_backbone.get("weights", "none") == "none":
        return {}
    return licence_tags(str(base_backbone.get("name", "")))


def describe_entry(entry: CatalogEntry) -> dict[str, Any]:
    """An entry as plain JSON-able values (``vitrail backbones NAME``)."""
    from dataclasses import asdict

    return asdict(entry) | {"embedding_dim": entry.embedding_dim, "kwargs": dict(entry.kwargs),
                            "needs_licence_acceptance": entry.needs_acceptance,
                            "weights_path": str(entry.local_path("$" + WEIGHTS_DIR_ENV))}

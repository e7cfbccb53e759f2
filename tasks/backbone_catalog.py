"""Named foundation backbones: how to build each as a timm ViT that holds its published weights, and load them offline.

Each :class:`CatalogEntry` records what a user of the published checkpoint needs and what is easy to get
wrong: the timm architecture with the keyword arguments that match the checkpoint's tensors (LayerScale,
SwiGLU, register tokens...), the input size and normalisation, the embedding and its pooling, the key
layout of the file (timm, or Hugging Face transformers for the Phikon models), the tensors of the file
the timm model has no slot for, and where the weights come from with their licence (provenance only:
Vitrail never downloads them here).

Weights are looked for, in order, at an explicit file, at ``$VITRAIL_WEIGHTS_DIR/<entry>/<file>``, and
in the local Hugging Face cache (read only, no network). A checkpoint whose tensor names or shapes do not
match the entry raises :class:`CheckpointMismatchError` naming the tensors; nothing is loaded silently
half-way. Issue 12 extends this catalog to other domains; an entry is one more item in ``CATALOG``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from tasks.request_errors import RequestError

WEIGHTS_DIR_ENV = "VITRAIL_WEIGHTS_DIR"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0's own statistics, from its config.json on the hub (bioptimus/H-optimus-0).
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Layout = Literal["timm", "hf-vit", "hf-dinov2"]
Pooling = Literal["cls", "cls+mean"]


class CatalogError(RequestError):
    """A catalog backbone that cannot be built or loaded as asked; the message says what to change."""


class WeightsNotFoundError(CatalogError):
    """No weights file for a catalog entry was found locally; the message says what file to put where."""


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
    architecture: str  # timm model name the kwargs apply to
    kwargs: Mapping[str, Any]  # timm kwargs matching the checkpoint; callables named by dotted path
    input_size: int  # side of the square tile the model was trained on, in pixels
    patch_size: int
    mean: tuple[float, float, float]  # RGB in [0, 1]
    std: tuple[float, float, float]
    embed_dim: int  # width of a token
    pooling: Pooling  # how the published embedding is read from the tokens
    published_params_m: float  # parameter count the authors publish, in millions
    hub_id: str  # provenance only: Vitrail does not download
    weights_file: str  # the file's name on the hub; locally under $VITRAIL_WEIGHTS_DIR/<name>/
    licence: str
    gated: bool  # the hub asks users to accept terms before download
    commercial_use: bool
    source: str  # where the facts above come from
    layout: Layout = "timm"
    revision: str | None = None  # hub revision when pinned
    dynamic_size: bool = True  # position embeddings may be resampled to another tile size
    # Tensors the file holds that the timm model has no slot for (fnmatch patterns, after key mapping).
    ignored_keys: tuple[str, ...] = ()
    notes: str = ""

    @property
    def embedding_dim(self) -> int:
        """Length of the published embedding (cls+mean doubles the token width)."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

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

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        name="uni", title="UNI (ViT-L/16)", architecture="vit_large_patch16_224",
        kwargs={"init_values": 1e-5}, input_size=224, patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embed_dim=1024, pooling="cls", published_params_m=303.0, hub_id="MahmoodLab/UNI",
        weights_file="pytorch_model.bin", licence="CC-BY-NC-ND-4.0", gated=True, commercial_use=False,
        source="https://huggingface.co/MahmoodLab/UNI (timm.create_model('hf-hub:MahmoodLab/uni', "
               "init_values=1e-5, dynamic_img_size=True)); Chen et al., Nat Med 2024",
        notes="init_values is needed for the LayerScale tensors blocks.N.ls1/ls2.gamma"),
    CatalogEntry(
        name="uni2-h", title="UNI2-h (ViT-H/14, 8 registers)", architecture="vit_giant_patch14_224",
        kwargs={"patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **_SWIGLU},
        input_size=224, patch_size=14, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1536, pooling="cls",
        published_params_m=681.0, hub_id="MahmoodLab/UNI2-h", weights_file="pytorch_model.bin",
        licence="CC-BY-NC-ND-4.0", gated=True, commercial_use=False,
        source="https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs of the model card)"),
    CatalogEntry(
        name="virchow2", title="Virchow2 (ViT-H/14, 4 registers)", architecture="vit_huge_patch14_224",
        kwargs={"init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, **_SWIGLU},
        input_size=224, patch_size=14, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1280,
        pooling="cls+mean", published_params_m=632.0, hub_id="paige-ai/Virchow2",
        weights_file="model.safetensors", licence="CC-BY-NC-ND-4.0", gated=True, commercial_use=False,
        source="https://huggingface.co/paige-ai/Virchow2 (config.json model_args; mlp_layer=SwiGLUPacked, "
               "act_layer=SiLU); Zimmermann et al., arXiv:2408.00738 (632M parameters)",
        notes="published embedding: class token concatenated with the mean of the patch tokens "
              "(register tokens excluded), 2560 values; a fine-tuning head reads the class token"),
    CatalogEntry(
        name="h-optimus-0", title="H-optimus-0 (ViT-g/14, 4 registers)",
        architecture="vit_giant_patch14_reg4_dinov2", kwargs={"img_size": 224, "init_values": 1e-5},
        input_size=224, patch_size=14, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD, embed_dim=1536, pooling="cls",
        published_params_m=1130.0, hub_id="bioptimus/H-optimus-0", weights_file="pytorch_model.bin",
        licence="Apache-2.0", gated=True, commercial_use=True, dynamic_size=False,
        source="https://huggingface.co/bioptimus/H-optimus-0 (config.json: fixed 224 input, own mean/std; "
               "timm.create_model(..., init_values=1e-5, dynamic_img_size=False)); 1.1B parameters",
        notes="fixed input size: tiles must be 224 px (at 0.5 um/px per the model card)"),
    CatalogEntry(
        name="phikon", title="Phikon (ViT-B/16, iBOT)", architecture="vit_base_patch16_224",
        kwargs={"norm_layer": "layernorm:1e-12"}, input_size=224, patch_size=16, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, embed_dim=768, pooling="cls", published_params_m=86.0, hub_id="owkin/phikon",
        weights_file="pytorch_model.bin", layout="hf-vit", licence="Owkin non-commercial",
        gated=False, commercial_use=False, ignored_keys=("pooler.dense.*",),
        source="https://huggingface.co/owkin/phikon (transformers ViTModel; embedding last_hidden_state[:, 0]); "
               "Filiot et al., medRxiv 2023.07.21.23292757",
        notes="stored in transformers ViTModel layout: query/key/value are fused into timm's qkv; the "
              "unused pooler is dropped; LayerNorm epsilon 1e-12 as transformers' ViT"),
    CatalogEntry(
        name="phikon-v2", title="Phikon-v2 (ViT-L/16, DINOv2)", architecture="vit_large_patch16_224",
        kwargs={"init_values": 1e-5}, input_size=224, patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embed_dim=1024, pooling="cls", published_params_m=307.0, hub_id="owkin/phikon-v2",
        weights_file="model.safetensors", layout="hf-dinov2", licence="Owkin non-commercial",
        gated=False, commercial_use=False, ignored_keys=("embeddings.mask_token",),
        source="https://huggingface.co/owkin/phikon-v2 (transformers Dinov2Model, no registers); "
               "Filiot et al., arXiv:2409.09173",
        notes="stored in transformers Dinov2Model layout: query/key/value fused into qkv, layer_scale "
              "lambdas into ls.gamma; the masked-modelling token is dropped"),
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
        notes="the tile encoder only; the slide encoder (LongNet) is not a ViT and is not in this catalog"),
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


# --- building and loading --------------------------------------------------------------------------------

def create_catalog_model(entry: CatalogEntry, num_classes: int = 0, img_size: int | None = None,
                         depth: int | None = None):
    """The entry's timm ViT with random weights; a head of ``num_classes`` logits reads the class token.

    Works under ``with torch.device("meta"):`` so giant entries can be described without memory.
    """
    import timm

    kwargs = entry.timm_kwargs() | {"img_size": img_size or entry.input_size, "num_classes": num_classes,
                                    "global_pool": "token"}
    if depth is not None:
        kwargs["depth"] = depth
    model = timm.create_model(entry.architecture, pretrained=False, **kwargs)
    # The catalog name as the architecture, so a saved reference model is rebuilt with the entry's kwargs
    # (the bare timm name would miss LayerScale, SwiGLU, registers); and how its inputs are normalised.
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": entry.name, "timm_architecture": entry.architecture,
                            "mean": entry.mean, "std": entry.std, "input_size": (3, entry.input_size, entry.input_size)}
    return model


def build_catalog_backbone(name: str, *, in_chans: int, num_classes: int, img_size: int, depth: int | None = None,
                           weights: Literal["none", "hub", "file"] = "none", weights_file: str | None = None):
    """Build catalog entry ``name`` for RGB tiles of ``img_size`` px, with its weights when asked.

    ``weights='none'`` gives random weights; 'file' and 'hub' load the published checkpoint from an
    explicit ``weights_file``, else ``$VITRAIL_WEIGHTS_DIR/<name>/<file>``, else the local Hugging Face
    cache; nothing is downloaded. The position embeddings are resampled to ``img_size`` for entries
    that allow it; the head is always new.
    """
    entry = get_entry(name)
    if in_chans != 3:
        raise CatalogError(f"{entry.name} is an RGB model (3 channels: red, green, blue); the data has {in_chans} "
                           "channels. Use a timm model name for other channel counts")
    if img_size != entry.input_size and not entry.dynamic_size:
        raise CatalogError(f"{entry.name} takes {entry.input_size} px tiles only (its position embeddings are "
                           f"fixed); the data has {img_size} px tiles: tile at {entry.input_size} px")
    model = create_catalog_model(entry, num_classes=num_classes, img_size=img_size, depth=depth)
    if weights == "none":
        return model
    path = resolve_weights_file(entry, weights_file)
    load_catalog_weights(model, entry, read_checkpoint(path), str(path))
    return model


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
    where = (f"put {entry.weights_file} from https://huggingface.co/{entry.hub_id} at "
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

    Allowed differences, and only these: the entry's ``ignored_keys``, blocks beyond a truncated
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
    missing = sorted(k for k in target if k not in state and not k.startswith("head."))
    unexpected = sorted(k for k in state if k not in target)
    reshaped = [f"{k} {tuple(state[k].shape)} instead of {tuple(target[k].shape)}"
                for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(origin, entry.name, missing, unexpected, reshaped)
    model.load_state_dict(state, strict=False)


def pool_tokens(entry: CatalogEntry, tokens, num_prefix_tokens: int):
    """The published embedding from ``forward_features`` tokens (N, T, D): class token, or class token
    and mean patch token side by side (Virchow2; register tokens are not patches)."""
    import torch

    cls = tokens[:, 0]
    if entry.pooling == "cls":
        return cls
    return torch.cat([cls, tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)


def catalog_table() -> str:
    """The catalog as a text table (``vitrail backbones``)."""
    header = ("name", "model", "timm architecture", "params", "input", "embed", "licence", "access")
    def licence(e: CatalogEntry) -> str:
        return e.licence + ("" if e.commercial_use or "non-commercial" in e.licence else " (non-commercial)")

    rows = [header] + [(e.name, e.title, e.architecture, f"{e.published_params_m:.0f}M",
                        f"{e.input_size}px/{e.patch_size}" + ("" if e.dynamic_size else " fixed"),
                        f"{e.embedding_dim} {e.pooling}", licence(e), ("gated " if e.gated else "open ") + e.hub_id)
                       for e in CATALOG.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    footer = (f"Weights are read from an explicit file, ${WEIGHTS_DIR_ENV}/<name>/<file>, or the local Hugging "
              "Face cache; Vitrail does not download them.")
    return "\n".join(lines + ["", footer])


def describe_entry(entry: CatalogEntry) -> dict[str, Any]:
    """An entry as plain JSON-able values (``vitrail backbones NAME``)."""
    from dataclasses import asdict

    return asdict(entry) | {"embedding_dim": entry.embedding_dim, "kwargs": dict(entry.kwargs),
                            "weights_path": str(entry.local_path("$" + WEIGHTS_DIR_ENV))}

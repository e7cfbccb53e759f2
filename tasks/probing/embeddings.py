"""What gets probed: a backbone's pooled embedding per tile, and the two feature baselines, cached by digest.

A subject is a ViT encoder built the way fine-tuning builds it (a catalog entry, a timm name with random
or file weights, or a registered foundation encoder such as ``models:/foundation-satellite@candidate``).
Its embedding is the pooled output of the final norm: the catalog entry's own pooling where it has one
(class token, mean patch token, or both), else the mean patch token (MAE's linear-probe reading, He et al.
2022, where the class token is not trained by the objective).

The baselines that keep a comparison honest (a probe that cannot beat them learned nothing useful):

- ``random-init``: the first subject's architecture with random weights (same preprocessing).
- ``random-conv``: a fixed random two-layer convolutional network with mean and max pooling: cheap texture
  statistics (random features are strong texture descriptors, Jarrett et al. 2009, Saxe et al. 2011).
- ``channel-stats``: per channel mean, standard deviation and 10/50/90th percentiles of each tile.

Embeddings are cached under ``<cache>/<key>.npz`` where the key digests the model (its weights' SHA-256),
the dataset (its digest) and the preprocessing (statistics, pooling, tile size): a change to any of the
three computes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from tasks.dataset import Dataset
from tasks.models import BackboneParams
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

CACHE_FORMAT = "vitrail-probe-embeddings/1"
RANDOM_INIT, RANDOM_CONV, CHANNEL_STATS = "random-init", "random-conv", "channel-stats"
BASELINES = (RANDOM_INIT, RANDOM_CONV, CHANNEL_STATS)
BATCH = 256


class ProbeSubject(BaseModel):
    """One backbone to score: a registered foundation encoder, a catalog entry, or a timm ViT."""

    label: str = Field(..., min_length=1, max_length=60, pattern=r"^[A-Za-z0-9_.+-]+$",
                       description="Name of this backbone's rows in the table (letters, digits, . _ + -)")
    model_uri: str = Field("", max_length=1000,
                           description="A registered foundation encoder (models:/foundation-satellite@candidate, "
                                       "as `vitrail pretrain` prints) or an exported encoder.json; empty builds "
                                       "the backbone below")
    backbone: BackboneParams = Field(default_factory=BackboneParams,
                                     description="Catalog entry or timm ViT and its weights, when model_uri is empty")


@dataclass
class Featurizer:
    """A named map from physical-unit tiles (N, C, H, W) to embeddings (N, D), with what identifies it."""

    label: str
    kind: str  # "subject" or "baseline"
    embed: Callable[[torch.Tensor], torch.Tensor]
    model_digest: str
    preprocessing: dict
    adapted: bool = False
    details: dict = field(default_factory=dict)  # licence, registered version, ... (for the table's readers)

    @property
    def preprocessing_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.preprocessing, sort_keys=True).encode()).hexdigest()


# --- subjects ----------------------------------------------------------------------------------------------


def _pool_encoder(encoder: nn.Module, pooling: str) -> Callable[[torch.Tensor], torch.Tensor]:
    prefix = int(encoder.num_prefix_tokens)

    def pool(x: torch.Tensor) -> torch.Tensor:
        tokens = encoder.forward_features(x)
        cls, patches = tokens[:, 0], tokens[:, prefix:].mean(dim=1)
        if pooling == "cls":
            return cls
        return patches if pooling == "mean" else torch.cat([cls, patches], dim=-1)

    return pool


def _normalised(embed: Callable[[torch.Tensor], torch.Tensor], mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return lambda x: embed((x - m) / s)


def encoder_featurizer(label: str, encoder: nn.Module, mean, std, pooling: str, kind: str = "subject",
                       details: dict | None = None) -> Featurizer:
    """A ViT encoder read as an embedding: normalise by ``mean``/``std``, pool the final tokens."""
    from tasks.backbone_catalog import band_adaptation_of
    from tasks.training import state_digest

    encoder = encoder.eval()
    adaptation = band_adaptation_of(encoder) or {}
    preprocessing = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "pooling": pooling,
                     "input": "physical units as the dataset stores them"}
    return Featurizer(label=label, kind=kind, embed=_normalised(_pool_encoder(encoder, pooling), mean, std),
                      model_digest=state_digest(encoder), preprocessing=preprocessing,
                      adapted=bool(adaptation.get("adapted")),
                      details={**(details or {}), **({"band_adaptation": adaptation} if adaptation else {})})


def _catalog_details(backbone: BackboneParams) -> tuple[str, dict]:
    """The catalog entry's pooling and licence facts (mean-token pooling and no facts for plain timm names)."""
    from tasks.backbone_catalog import find_entry, licence_tags

    entry = find_entry(backbone.name)
    if entry is None or backbone.weights == "none":
        return "mean", {}
    return entry.pooling, licence_tags(entry.name)


def load_subject(subject: ProbeSubject, dataset: Dataset, download_dir: Path) -> tuple[Featurizer, BackboneParams]:
    """Build the subject's encoder for the dataset's bands; returns the featurizer and the backbone settings
    that rebuild it (fine-tuning starts from them; the random-init baseline uses them with ``weights='none'``).
    A registered encoder is downloaded under ``download_dir``."""
    from tasks.models import build_backbone

    info = dataset.info
    if subject.model_uri:
        return _load_registered(subject, dataset, download_dir)
    pooling, details = _catalog_details(subject.backbone)
    encoder = build_backbone(subject.backbone, info.channels, 0, info.tile_size)
    return (encoder_featurizer(subject.label, encoder, info.channel_mean, info.channel_std, pooling,
                               details={"backbone": subject.backbone.name, "weights": subject.backbone.weights,
                                        **details}), subject.backbone)


def _load_registered(subject: ProbeSubject, dataset: Dataset, download_dir: Path) -> tuple[Featurizer, BackboneParams]:
    """A pretrained encoder from the registry (or an encoder.json file), with its own preprocessing."""
    from tasks.models import build_backbone
    from tasks.pretraining import DESCRIPTION_FILE, finetune_backbone_params, read_encoder_description

    info = dataset.info
    if subject.model_uri.endswith(".json") and Path(subject.model_uri).is_file():
        description_path = Path(subject.model_uri)
    else:
        from tasks import tracking

        folder = Path(download_dir) / hashlib.sha256(subject.model_uri.encode()).hexdigest()[:16]
        description_path = tracking.download_model(subject.model_uri, folder) / DESCRIPTION_FILE
        if not description_path.is_file():
            raise RequestError(f"{subject.model_uri}: not a Vitrail encoder (no {DESCRIPTION_FILE} in it); "
                               "probe registered foundation-<domain> versions or encoder.json files")
    description = read_encoder_description(description_path)
    bands = [c["name"] for c in description["bands"]]
    if bands != [c.name for c in info.channels]:
        raise RequestError(f"{subject.model_uri}: the encoder was pretrained on bands {bands}, the dataset "
                           f"{dataset.path} has {[c.name for c in info.channels]}")
    backbone = finetune_backbone_params(description_path)
    encoder = build_backbone(backbone, info.channels, 0, info.tile_size)
    preprocessing = description["preprocessing"]
    details = {"model_uri": subject.model_uri, "weights_sha256": description.get("weights_sha256", ""),
               "pretraining_dataset_digest": description.get("dataset_digest", ""),
               "excluded_test_groups_digest": description.get("excluded_splits", {}).get("test", {})
               .get("groups_digest", "")}
    return (encoder_featurizer(subject.label, encoder, preprocessing["mean"], preprocessing["std"], "mean",
                               details=details), backbone)


# --- baselines ---------------------------------------------------------------------------------------------


class RandomConvFeatures(nn.Module):
    """Two random 3x3 convolution layers (ReLU, 2x2 average pooling between) read by global mean and max."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                 nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.net(x)
        return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)


def random_conv_featurizer(dataset: Dataset, seed: int) -> Featurizer:
    from tasks.training import state_digest

    info = dataset.info
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the baseline's weights depend on the seed only, not on what was built before
    net = RandomConvFeatures(len(info.channels)).eval()
    torch.random.set_rng_state(generator_state)
    preprocessing = {"mean": list(info.channel_mean), "std": list(info.channel_std), "pooling": "mean+max"}
    return Featurizer(label=RANDOM_CONV, kind="baseline", embed=_normalised(net, info.channel_mean, info.channel_std),
                      model_digest=state_digest(net), preprocessing=preprocessing)


def channel_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per channel mean, std and 10/50/90th percentiles of each tile: (N, 5 C)."""
    flat = x.flatten(2)
    quantiles = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]), dim=2).permute(1, 2, 0)
    return torch.cat([flat.mean(dim=2, keepdim=True), flat.std(dim=2, keepdim=True), quantiles], dim=2).flatten(1)


def channel_stats_featurizer() -> Featurizer:
    return Featurizer(label=CHANNEL_STATS, kind="baseline", embed=channel_statistics,
                      model_digest=hashlib.sha256(b"channel-stats/mean,std,p10,p50,p90").hexdigest(),
                      preprocessing={"features": "per-channel mean, std, p10, p50, p90 of physical units"})


def random_init_featurizer(backbone: BackboneParams, dataset: Dataset, template: Featurizer, seed: int) -> Featurizer:
    """The subject's architecture with random weights, read with the subject's preprocessing and pooling."""
    from tasks.models import build_backbone

    info = dataset.info
    torch.manual_seed(seed)
    encoder = build_backbone(backbone.model_copy(update={"weights": "none", "weights_file": None}), info.channels, 0,
                             info.tile_size)
    pre = template.preprocessing
    return encoder_featurizer(RANDOM_INIT, encoder, pre["mean"], pre["std"], pre["pooling"], kind="baseline")


# --- embedding, cached -------------------------------------------------------------------------------------


def cache_key(featurizer: Featurizer, dataset_digest: str, splits: tuple[str, ...]) -> str:
    payload = "|".join([CACHE_FORMAT, featurizer.model_digest, dataset_digest, featurizer.preprocessing_digest,
                        ",".join(splits)])
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.inference_mode()
def _embed_split(featurizer: Featurizer, images) -> np.ndarray:
    out = [featurizer.embed(torch.from_numpy(np.array(images[i:i + BATCH], dtype=np.float32))).float().numpy()
           for i in range(0, len(images), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def embed_dataset(featurizer: Featurizer, dataset: Dataset, cache_dir: Path | None,
                  splits: tuple[str, ...] = ("train", "val", "test")) -> tuple[dict[str, np.ndarray], bool]:
    """Embeddings of every split in ``splits`` the dataset has; ``(embeddings, read_from_cache)``."""
    from tasks.model_inputs import require_unwindowed

    require_unwindowed(dataset.info, "Probing")
    present = tuple(s for s in splits if s in dataset.splits)
    key = cache_key(featurizer, dataset.info.digest, present)
    path = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as stored:
            return {s: stored[s] for s in present}, True
    embeddings = {s: _embed_split(featurizer, dataset.splits[s].images) for s in present}
    if path is not None:
        from tasks.atomic_files import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial:
            with open(partial, "wb") as handle:
                np.savez(handle, **embeddings)
    return embeddings, False

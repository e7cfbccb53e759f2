"""What a model is fed: a dataset opened the way a given model consumes it.

Two things about a model change what its samples are, and every stage after training must see the same:

- its **input normalisation**, fitted on the training split when the model is trained (histopathology:
  Macenko or Reinhard stain normalisation against a reference fitted on training tiles). The choice and
  the fitted reference travel with the model (``architecture.json``, the ONNX metadata), so compression,
  validation and prediction apply exactly what training applied;
- whether it classifies **slides from bags of tiles** (:mod:`tasks.bags`).

:func:`load_dataset_for` opens a dataset as a model needs it: tiles normalised lazily as they are read
(nothing is rewritten on disk), then gathered into bags if the model takes bags.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from domains import get_domain
from tasks.bags import BagParams, bag_params_of, bag_view
from tasks.dataset import Dataset, Split, load_dataset
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

InputNormalisationName = Literal["none", "macenko", "reinhard"]
"""Every input normalisation some domain offers (see ``DomainSpec.input_normalisations``)."""
FIT_TILES = 2000
"""Training tiles (spread evenly over the split) a normalisation is fitted on."""


class NormalisedImages:
    """A split's images with the model's input normalisation applied as they are read (same indexing)."""

    def __init__(self, images, domain: str, normalisation: dict):
        self.images = images
        self.domain = domain
        self.normalisation = normalisation
        self.shape, self.ndim, self.dtype = tuple(images.shape), len(images.shape), np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        raw = np.asarray(self.images[key], dtype=np.float32)
        single = raw.ndim == len(self.shape) - 1
        out = apply_normalisation(self.domain, self.normalisation, raw[None] if single else raw)
        return out[0] if single else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def apply_normalisation(domain_name: str, normalisation: dict | None, images: np.ndarray) -> np.ndarray:
    """``images`` (N, C, H, W) float32 in physical units, normalised as ``normalisation`` says (None: as is)."""
    if not normalisation:
        return images
    domain = get_domain(domain_name)
    return domain.apply_input_normalisation(normalisation, images)


def fit_normalisation(dataset: Dataset, method: str, max_tiles: int = FIT_TILES) -> dict:
    """Fit the domain's input normalisation ``method`` on the training split (at most ``max_tiles`` tiles).

    Raises:
        RequestError: the domain does not offer ``method``, or the training tiles cannot fit it.
    """
    domain = get_domain(dataset.info.domain)
    if method not in domain.input_normalisations:
        offered = ", ".join(domain.input_normalisations) or "none"
        raise RequestError(f"input normalisation {method!r} is not offered for {domain.name} (offered: {offered})")
    train = dataset.splits.get("train")
    if train is None or len(train) == 0:
        raise RequestError(f"{dataset.path}: no training tiles to fit the {method} input normalisation on")
    picks = np.unique(np.linspace(0, len(train) - 1, min(max_tiles, len(train))).round().astype(np.int64))
    try:
        fitted = domain.fit_input_normalisation(method, np.asarray(train.images[picks], dtype=np.float32))
    except ValueError as error:
        raise RequestError(f"{dataset.path}: cannot fit the {method} input normalisation on the training "
                           f"tiles: {error}") from None
    log.info("%s input normalisation fitted on %d training tiles", method, len(picks))
    return fitted


def normalised_view(dataset: Dataset, normalisation: dict | None) -> Dataset:
    """The dataset with every split's images normalised on read (the dataset itself is unchanged)."""
    if not normalisation:
        return dataset
    domain = dataset.info.domain
    splits = {name: Split(images=NormalisedImages(split.images, domain, normalisation), labels=split.labels,
                          groups=split.groups, sample_ids=split.sample_ids)
              for name, split in dataset.splits.items()}
    return replace(dataset, splits=splits)


def normalisation_of(model) -> dict | None:
    """The input normalisation a model was trained with (its ``input_normalisation`` attribute), or None."""
    for module in model.modules():
        found = getattr(module, "input_normalisation", None)
        if isinstance(found, dict) and found:
            return found
    return None


def load_dataset_for(path: Path | str, model=None, bags: BagParams | None = None,
                     normalisation: dict | None = None) -> Dataset:
    """Open a dataset the way ``model`` (or the explicit ``bags`` and ``normalisation``) consumes it."""
    dataset = load_dataset(path)
    if model is not None:
        bags = bags if bags is not None else bag_params_of(model)
        normalisation = normalisation if normalisation is not None else normalisation_of(model)
    dataset = normalised_view(dataset, normalisation)
    if bags is None or not bags.enabled:
        return dataset
    return bag_view(dataset, bags)

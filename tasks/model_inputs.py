"""What a model is fed: a dataset opened the way a given model consumes it.

Three things about a model change what its samples are, and every stage after training must see the same:

- its **input units**: a model takes raw pixels, the stored units of the dataset it was trained on
  (Sentinel-2 digital numbers, 8-bit RGB, integer radiance), its normalisation folded into its own
  buffers (:class:`tasks.models.NormalizedClassifier`). The units are recorded with the model
  (``input_scaling``, per channel ``(scale, offset)`` to physical units); a dataset read for a model is
  converted to them (exactly the stored numbers when the dataset has the model's own scaling);

- its **input normalisation**, fitted on the training split when the model is trained (histopathology:
  Macenko or Reinhard stain normalisation against a reference fitted on training tiles). The choice and
  the fitted reference travel with the model (``architecture.json``, the ONNX metadata), so compression,
  validation and prediction apply exactly what training applied;
- whether it classifies **slides from bags of tiles** (:mod:`tasks.bags`).

:func:`load_dataset_for` opens a dataset as a model needs it: tiles in the model's input units and
normalised lazily as they are read (nothing is rewritten on disk), then gathered into bags if the model
takes bags. Training, validation, compression (calibration and evaluation), merging and the benchmarks
all read through it, so there is one convention for what a model takes.

The stain normalisation cannot move into the model's graph (Macenko needs a per-tile eigendecomposition,
which ONNX has no operator for): it stays a step before the model, recorded with it, applied by this
module and by predict in physical units (raw tiles are converted to physical, normalised and converted back).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from domains import Scaling, convert_units, get_domain, same_scaling
from tasks.bags import BagParams, bag_params_of, bag_view
from tasks.dataset import Dataset, Split, load_dataset
from tasks.dataset_store import LazySamples
from tasks.request_errors import RequestError

log = logging.getLogger(__name__)

InputNormalisationName = Literal["none", "macenko", "reinhard"]
"""Every input normalisation some domain offers (see ``DomainSpec.input_normalisations``)."""
FIT_TILES = 2000
"""Training tiles (spread evenly over the split) a normalisation is fitted on."""


STORED_UNITS = "stored"
"""``load_dataset_for(..., units=STORED_UNITS)``: the dataset's own stored units (what a model trained on it takes)."""


class NormalisedImages:
    """A split's images with the model's input normalisation applied as they are read (same indexing).

    ``scaling`` is the units of ``images`` (the model's input units): the normalisation works on physical
    values, so tiles are converted to physical units, normalised, and converted back.
    """

    def __init__(self, images, domain: str, normalisation: dict, scaling: Scaling = None):
        self.images = images
        self.domain = domain
        self.normalisation = normalisation
        self.scaling = scaling
        self.shape, self.ndim, self.dtype = tuple(images.shape), len(images.shape), np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        raw = np.asarray(self.images[key], dtype=np.float32)
        single = raw.ndim == len(self.shape) - 1
        out = apply_normalisation(self.domain, self.normalisation, raw[None] if single else raw, self.scaling)
        return out[0] if single else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def apply_normalisation(domain_name: str, normalisation: dict | None, images: np.ndarray,
                        scaling: Scaling = None) -> np.ndarray:
    """``images`` (N, C, H, W) float32 in the units ``scaling`` names (None: physical), normalised as
    ``normalisation`` says (None: as is) and returned in the same units."""
    if not normalisation:
        return images
    domain = get_domain(domain_name)
    physical = convert_units(images, scaling, None)
    return convert_units(domain.apply_input_normalisation(normalisation, physical), None, scaling)


def units_view(dataset: Dataset, units: Scaling) -> Dataset:
    """The dataset with every split's images in ``units`` (a model's input units; None: physical).

    The dataset's own scaling gives the stored numbers themselves (exact: no arithmetic); another scaling is
    one multiply-add per channel from the stored values.
    """
    stored = dataset.info.scaling
    if units is None:
        combined = stored  # stored -> physical, as load_dataset reads
    elif same_scaling(stored, units):
        combined = None  # the stored numbers as they are
    else:
        source = stored if stored is not None else tuple((1.0, 0.0) for _ in units)
        combined = tuple(((s / su), (o - ou) / su) for (s, o), (su, ou) in zip(source, units))
    splits = {}
    for name, split in dataset.splits.items():
        if not isinstance(split.images, LazySamples):
            raise TypeError(f"{dataset.path}: split {name} is not a lazily read dataset split")
        images = LazySamples(split.images.source, split.images.members, combined, np.float32)
        splits[name] = replace(split, images=images)
    return replace(dataset, splits=splits)


def require_unwindowed(info, stage: str) -> None:
    """Refuse a dataset whose models start with windows (CT: HU stored) in a stage that builds an encoder on the
    stored channels (MAE pretraining, probing): they would see unwindowed HU with window statistics.

    Raises:
        RequestError: the dataset records windows.
    """
    if getattr(info, "windows", None):
        names = ", ".join(w.name for w in info.windows)
        raise RequestError(f"{stage} does not take a dataset of CT windows yet ({names}: stored as HU, windowed "
                           "inside fine-tuned models); ingest with --channels image (or hu) for it")


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


def normalised_view(dataset: Dataset, normalisation: dict | None, units: Scaling = None) -> Dataset:
    """The dataset with every split's images normalised on read (the dataset itself is unchanged).

    ``units`` is the units the split images are in (see :func:`units_view`; None: physical).
    """
    if not normalisation:
        return dataset
    domain = dataset.info.domain
    splits = {name: Split(images=NormalisedImages(split.images, domain, normalisation, units), labels=split.labels,
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
                     normalisation: dict | None = None, units: Scaling | str = STORED_UNITS) -> Dataset:
    """Open a dataset the way ``model`` (or the explicit ``bags``, ``normalisation`` and ``units``) consumes it.

    Images come in ``model``'s input units (its ``input_scaling``; a model of physical units gets physical
    values), else in ``units``: by default the dataset's stored units, which is what a model built for the
    dataset by :func:`tasks.models.normalizing_model` takes.
    """
    from tasks.models import NormalizedClassifier, input_scaling_of

    dataset = load_dataset(path)
    if model is not None:
        bags = bags if bags is not None else bag_params_of(model)
        normalisation = normalisation if normalisation is not None else normalisation_of(model)
        if any(isinstance(m, NormalizedClassifier) for m in model.modules()):
            units = input_scaling_of(model)
    if units == STORED_UNITS:
        units = dataset.info.scaling
    dataset = units_view(dataset, units)
    dataset = normalised_view(dataset, normalisation, units)
    if bags is None or not bags.enabled:
        return dataset
    return bag_view(dataset, bags)

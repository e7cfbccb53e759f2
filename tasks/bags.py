"""Slide-level learning: a dataset's tiles gathered into bags, one label per bag (multiple-instance learning).

A whole-slide image carries one label (tumour or not) for tens of thousands of tiles. Attention-based
multiple-instance learning (Ilse et al. 2018, gated ABMIL) trains on *bags*: a set of a slide's tiles goes
through the tile encoder, a small attention network weighs the tiles, and the weighted mean is classified.
Only the slide label is needed.

This module makes bags a *view* of an ordinary tile dataset, so the one training loop, the compression
suite and the validation stage work on them unchanged: a bag is one "sample" of shape (T, C, H, W), its
label the slide's class. Which tiles form a bag comes from the dataset itself:

- sample ids of the form ``<bag>/<anything>`` put a tile into bag ``<bag>`` (the histopathology reader
  names tiles ``<slide pseudonym>/<x>,<y>``);
- the provenance entry :data:`BAG_LABELS_KEY` maps each bag to its class name (slides without a label
  are left out of every bag split).

Bags are drawn deterministically: a training slide gives ``bags_per_slide`` bags of ``bag_size`` tiles,
each drawn by a generator seeded by (seed, slide, draw) (with replacement only when the slide has fewer
tiles); a validation or test slide gives one bag of ``eval_bag_size`` tiles spread evenly over its tile
list, or all its tiles, cycled to that size, when it has fewer. A bag's tiles keep the slide's own order, so
a bag is read from the few chunks that hold the slide.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from pydantic import BaseModel, Field

from tasks.dataset import Dataset, DatasetError, Split

BAG_LABELS_KEY = "bag_labels"
"""Dataset provenance key: JSON object mapping each bag (slide pseudonym) to its class name."""
BAG_SEPARATOR = "/"
SLIDE_TASK = "slide-classification"
"""What a slide model predicts, as recorded on its validate run and in its registered model names
(``histopathology-slide-classification``); its promotion gate judges macro AUROC over slides."""


class BagParams(BaseModel):
    """Slide-level classification by attention multiple-instance learning (gated ABMIL)."""

    enabled: bool = Field(False, description="Learn one label per slide from bags of its tiles (attention MIL) "
                                             "instead of one label per tile")
    bag_size: int = Field(32, ge=1, le=4096, description="Tiles drawn from a slide for one training bag")
    bags_per_slide: int = Field(4, ge=1, le=256, description="Training bags drawn per slide per epoch, each a "
                                                             "different sample of its tiles")
    eval_bag_size: int = Field(64, ge=1, le=16384, description="Tiles per slide when validating, testing and "
                                                               "compressing (spread evenly over the slide)")
    attention_dim: int = Field(128, ge=8, le=4096, description="Hidden width of the gated attention network")
    predict_max_tiles: int = Field(1024, ge=1, le=65536,
                                   description="Most tiles of one slide scored together at prediction (a slide "
                                               "with more is scored on an even spread of them)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the training bag draws")


class BagImages:
    """The tiles of each bag of one split, read on demand: an array-like of shape (bags, T, C, H, W).

    Indexing (``x[i]``, ``x[a:b]``, ``x[[i, j]]``) returns float32 NumPy arrays in physical units, read
    from the split's lazy tile array; nothing is read before.
    """

    def __init__(self, tiles, members: list[np.ndarray]):
        self.tiles = tiles
        self.members = [np.asarray(m, dtype=np.int64) for m in members]
        size = len(self.members[0]) if self.members else 0
        self.shape = (len(self.members), size, *tuple(tiles.shape[1:]))
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"BagImages(bags={len(self)}, tiles_per_bag={self.shape[1]}, tile={self.shape[2:]})"

    def _bag(self, index: int) -> np.ndarray:
        return np.asarray(self.tiles[self.members[index]], dtype=np.float32)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"bag {key} out of range for {len(self)} bags")
            return self._bag(int(key) % len(self))
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        out = np.empty((len(positions), *self.shape[1:]), dtype=np.float32)
        for row, index in enumerate(positions.tolist()):
            out[row] = self._bag(int(index))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def bag_of(sample_id: str) -> str:
    """The bag a sample id names (the part before the last ``/``), or '' when it names none."""
    head, separator, _ = sample_id.rpartition(BAG_SEPARATOR)
    return head if separator else ""


def _evenly(positions: np.ndarray, size: int) -> np.ndarray:
    """``size`` of ``positions`` spread evenly over them; all of them, cycled, when there are fewer."""
    if len(positions) >= size:
        return positions[np.linspace(0, len(positions) - 1, size).round().astype(np.int64)]
    return np.resize(positions, size)


def _training_draw(positions: np.ndarray, size: int, seed: int, bag: int, draw: int) -> np.ndarray:
    rng = np.random.default_rng([seed, bag, draw])
    picked = rng.choice(len(positions), size=size, replace=len(positions) < size)
    return positions[np.sort(picked)]


def _bag_split(split: Split, bag_labels: dict[str, int], params: BagParams,
               training: bool) -> Split | None:
    bags: dict[str, list[int]] = {}
    for position, sample_id in enumerate(split.sample_ids.tolist()):
        name = bag_of(sample_id)
        if name in bag_labels:
            bags.setdefault(name, []).append(position)
    if not bags:
        return None
    members, labels, groups = [], [], []
    for number, name in enumerate(sorted(bags)):
        positions = np.asarray(bags[name], dtype=np.int64)
        draws = ([_training_draw(positions, params.bag_size, params.seed, number, d)
                  for d in range(params.bags_per_slide)] if training
                 else [_evenly(positions, params.eval_bag_size)])
        members += draws
        labels += [bag_labels[name]] * len(draws)
        groups += [split.groups[positions[0]]] * len(draws)
    return Split(images=BagImages(split.images, members), labels=np.asarray(labels, dtype=np.int64),
                 groups=np.asarray(groups))


def bag_view(dataset: Dataset, params: BagParams) -> Dataset:
    """The dataset's labelled slides as bags of tiles (see the module docstring); splits keep their slides.

    Raises:
        DatasetError: the dataset is not a tile classification dataset, names no bags in its sample ids,
            or records no bag labels.
    """
    info = dataset.info
    where = str(dataset.path)
    if info.task != "classification":
        raise DatasetError(f"{where}: slide-level (bag) learning needs a classification dataset, not {info.task}")
    try:
        names = json.loads(info.provenance.get(BAG_LABELS_KEY, "{}"))
    except ValueError as error:
        raise DatasetError(f"{where}: unreadable {BAG_LABELS_KEY} in dataset provenance ({error})") from None
    if not names:
        raise DatasetError(f"{where}: the dataset records no slide (bag) labels; ingest slides with a manifest "
                           "that has a label column to learn slide-level classes")
    unknown = sorted(set(names.values()) - set(info.class_names))
    if unknown:
        raise DatasetError(f"{where}: bag labels {unknown} are not among the dataset's classes "
                           f"({', '.join(info.class_names)})")
    bag_labels = {bag: info.class_names.index(name) for bag, name in names.items()}
    splits: dict[str, Split] = {}
    for split_name, split in dataset.splits.items():
        if split_name == "unlabelled":
            continue
        if split.sample_ids is None:
            raise DatasetError(f"{where}: split {split_name} was opened without sample ids; bags cannot be formed")
        bagged = _bag_split(split, bag_labels, params, training=split_name == "train")
        if bagged is not None:
            splits[split_name] = bagged
    if "train" not in splits:
        raise DatasetError(f"{where}: no labelled slide in the training split; slide-level learning needs some")
    counts = {name: len(split) for name, split in splits.items()}
    return replace(dataset, info=replace(info, split_counts=counts), splits=splits)


def bag_params_of(model) -> BagParams | None:
    """The bag settings a slide-level model was trained with (None for a tile model)."""
    for module in model.modules():
        params = getattr(module, "bag_params", None)
        if isinstance(params, BagParams):
            return params
    return None

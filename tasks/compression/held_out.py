"""A larger held-out split for benchmarks: the same held-out area, tiled densely.

A demo test split of 96 tiles makes one tile one point of accuracy, so goals stated in points are
judged on noise. This module re-reads the dataset's source with the domain's own reader at a smaller
stride and keeps only the tiles of the leakage groups (spatial blocks) that the dataset held out for
``test`` (and ``val``). The domain's tiler never lets a tile straddle two blocks, so the dense tiles
overlap each other but never a training block: the split stays leakage-free. Tiles are labelled by the
same rule as at ingest (majority class of the labelled pixels).

The stride is the largest (at most the dataset's own) that gives at least ``min_samples`` test tiles,
computed from the blocks' geometry before any pixel is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.request_errors import RequestError

BLOCK_GROUP = re.compile(r":block-(\d+)-(\d+)$")


@dataclass
class HeldOutSplits:
    """Dense held-out samples per split name (float32, in the units asked for: a model's input units), and how
    they were made."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    stride: int
    note: str
    counts: dict[str, int] = field(default_factory=dict)


def _tiles_per_block(block_shape: tuple[int, int], tile: int, stride: int) -> int:
    rows = max(0, (block_shape[0] - tile) // stride + 1)
    cols = max(0, (block_shape[1] - tile) // stride + 1)
    return rows * cols


def _block_shapes(groups: set[str], grid: tuple[int, int], block: int) -> list[tuple[int, int]]:
    shapes = []
    for group in groups:
        match = BLOCK_GROUP.search(group)
        if match is None:
            raise RequestError(f"group {group!r} is not a spatial block; dense re-tiling needs block groups")
        by, bx = int(match.group(1)), int(match.group(2))
        shapes.append((min(block, grid[0] - by * block), min(block, grid[1] - bx * block)))
    return shapes


def choose_stride(groups: set[str], grid: tuple[int, int], tile: int, block: int, original_stride: int,
                  min_samples: int) -> int:
    """The largest stride (<= the dataset's) whose dense tiling of ``groups`` gives >= ``min_samples`` tiles."""
    shapes = _block_shapes(groups, grid, block)
    for stride in range(original_stride, 0, -1):
        if sum(_tiles_per_block(s, tile, stride) for s in shapes) >= min_samples:
            return stride
    return 1


def dense_held_out(dataset, min_samples: int = 1000, splits: tuple[str, ...] = ("test", "val"),
                   units=None) -> HeldOutSplits:
    """Re-tile ``dataset``'s source densely inside its held-out blocks (see the module docstring).

    Re-tiled samples are converted from the source's scaling to ``units`` (a model's ``input_scaling``; None:
    physical), which must be the units ``dataset``'s splits are read in (:func:`tasks.model_inputs.load_dataset_for`).
    Falls back to the dataset's own splits, saying so in ``note``, when its provenance does not name
    a single tiled source (e.g. a multi-source or non-raster dataset).
    """
    from domains import IngestRequest, get_domain

    info = dataset.info
    prov = info.provenance
    fallback = HeldOutSplits(images={s: np.asarray(dataset.splits[s].images[:]) for s in splits if s in dataset.splits},
                             labels={s: np.asarray(dataset.splits[s].labels) for s in splits if s in dataset.splits},
                             stride=int(prov.get("stride", info.tile_size) or info.tile_size),
                             note="the dataset's own held-out splits (no single tiled source to re-tile densely)")
    if len(info.sources) != 1 or not prov.get("block_size") or not prov.get("grid_shape") or not prov.get("labels"):
        return fallback
    grid = tuple(int(v) for v in prov["grid_shape"].split("x"))
    tile, block, stride0 = info.tile_size, int(prov["block_size"]), int(prov.get("stride", info.tile_size))
    wanted = {s: set(dataset.splits[s].groups.tolist()) for s in splits if s in dataset.splits}
    try:
        stride = choose_stride(wanted["test"], grid, tile, block, stride0, min_samples)
    except RequestError:
        return fallback
    domain = get_domain(info.domain)
    request = IngestRequest(source=Path(info.sources[0]), labels=Path(prov["labels"]), tile_size=tile, stride=stride,
                            block_size=block, channels=tuple(c.name for c in info.channels),
                            class_names=info.class_names)
    images: dict[str, list] = {s: [] for s in wanted}
    labels: dict[str, list] = {s: [] for s in wanted}
    for batch in domain.read_samples(request):
        if len(batch.labels) == 0:
            continue
        for split, groups in wanted.items():
            keep = np.isin(batch.groups, list(groups)) & (batch.labels >= 0)
            if keep.any():
                images[split].append(batch.in_units(units, np.flatnonzero(keep)))
                labels[split].append(batch.labels[keep])
    result = HeldOutSplits(
        images={s: np.concatenate(v).astype(np.float32) for s, v in images.items() if v},
        labels={s: np.concatenate(v) for s, v in labels.items() if v}, stride=stride,
        note=(f"{info.sources[0]} re-tiled at stride {stride} px (dataset: {stride0}) inside the dataset's held-out "
              f"blocks of {block} px; tiles never straddle a block, so none overlaps a training block"))
    result.counts = {s: len(v) for s, v in result.labels.items()}
    return result

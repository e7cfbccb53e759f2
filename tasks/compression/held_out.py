"""A larger held-out split for benchmarks: the same held-out area, tiled densely.

A demo test split of 96 tiles makes one tile one point of accuracy, so goals stated in points are
judged on noise. This module re-reads the dataset's source with the domain's own reader at a smaller
stride and keeps only the tiles of the leakage groups (spatial blocks) that the dataset held out for
``test`` (and ``val``). The domain's tiler never lets a tile straddle two blocks, so the dense tiles
overlap each other but never a training block: the split stays leakage-free. Tiles are labelled by the
same rule as at ingest (majority class of the labelled pixels).

Each split's stride is the largest (at most the dataset's own) that gives it at least ``min_samples``
tiles, computed from the blocks' geometry before any pixel is read.
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
    """The test split's stride."""
    note: str
    counts: dict[str, int] = field(default_factory=dict)
    strides: dict[str, int] = field(default_factory=dict)
    """Each split's stride: the largest giving it ``min_samples`` tiles."""


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

    Each split gets its own stride, the largest giving it ``min_samples`` tiles: at 224 px on a small scene
    one stride for both would give the larger split tens of thousands of tiles (a ViT-S/16 preset's 448 px
    validation block at the 3 px its test block needs: 5625 tiles, 15 GB as float32). The source is read once
    per distinct stride. Re-tiled samples are converted from the source's scaling to ``units`` (a model's
    ``input_scaling``; None: physical), which must be the units ``dataset``'s splits are read in
    (:func:`tasks.model_inputs.load_dataset_for`). Falls back to the dataset's own splits, saying so in
    ``note``, when its provenance does not name a single tiled source (e.g. a multi-source or non-raster dataset).
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
        strides = {s: choose_stride(groups, grid, tile, block, stride0, min_samples) for s, groups in wanted.items()}
    except RequestError:
        return fallback
    domain = get_domain(info.domain)
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for stride in sorted(set(strides.values()), reverse=True):
        these = {s: groups for s, groups in wanted.items() if strides[s] == stride}
        request = IngestRequest(source=Path(info.sources[0]), labels=Path(prov["labels"]), tile_size=tile,
                                stride=stride, block_size=block, channels=tuple(c.name for c in info.channels),
                                class_names=info.class_names)
        # At most this many tiles per split (the geometry's count; nodata and unlabelled tiles are dropped):
        # filled in place, so a split never exists twice in memory as a list of batches and their concatenation.
        capacity = {s: sum(_tiles_per_block(shape, tile, stride) for shape in _block_shapes(groups, grid, block))
                    for s, groups in these.items()}
        filled = dict.fromkeys(these, 0)
        found: dict[str, list] = {s: [] for s in these}
        for batch in domain.read_samples(request):
            if len(batch.labels) == 0:
                continue
            for split, groups in these.items():
                keep = np.flatnonzero(np.isin(batch.groups, list(groups)) & (batch.labels >= 0))
                if not len(keep):
                    continue
                chunk = batch.in_units(units, keep)
                if split not in images:
                    images[split] = np.empty((capacity[split], *chunk.shape[1:]), dtype=np.float32)
                end = filled[split] + len(chunk)
                if end > capacity[split]:
                    raise RuntimeError(f"{info.sources[0]}: the reader gave more {split} tiles at stride {stride} "
                                       f"than its blocks hold ({capacity[split]})")
                images[split][filled[split]:end] = chunk
                filled[split] = end
                found[split].append(batch.labels[keep])
        for split in these:
            if split in images:
                images[split] = images[split][:filled[split]]
                labels[split] = np.concatenate(found[split])
    described = ", ".join(f"{strides[s]} px ({s})" for s in wanted)
    return HeldOutSplits(
        images=images, labels=labels, stride=strides.get("test", min(strides.values())),
        note=(f"{info.sources[0]} re-tiled at stride {described} (dataset: {stride0}) inside the dataset's held-out "
              f"blocks of {block} px; tiles never straddle a block, so none overlaps a training block"),
        counts={s: len(v) for s, v in labels.items()}, strides=strides)

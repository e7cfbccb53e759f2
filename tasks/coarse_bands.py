"""Coarse channels stored at their own resolution, and the samples rebuilt from them as they are read.

A reader that hands its batches :class:`domains.CoarsePatches` (the satellite reader does, for
Sentinel-2's 20 m and 60 m bands) gets them stored as these arrays beside ``images``, which then holds
only the other channels, all chunked alike (chunk ``i`` of every array holds the same samples)::

    images                 (N, fine channels, T, T)   the channels on the samples' own grid
    coarse-<f>             (N, channels, S, S)         per grid ``f`` times coarser: each sample's patch
    coarse-<f>-valid       (N, channels, S, S) uint8   where the patch's coarse pixels hold data
    coarse-<f>-spans       (N, 4) int32                the patch's rows and columns in use, the sample's offset
    valid                  (N, T, T) uint8             where every channel of the sample holds data

For a Sentinel-2 tile that is about 5.6 channels' worth of pixels instead of 13: less to compress,
digest and write at ingest, and a dataset about half the size. :class:`RebuiltSource` puts the
samples back together per decoded chunk (the reader's upsampling run on each patch, then the fill
where a sample is not valid), bit for bit what the reader handed over, so everything that reads a
dataset reads it as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from domains import CoarseGrid, CoarsePatches
from domains.satellite.tile_windows import upsample_tiles, upsampled_sums
from tasks.dataset_store import CachedChunks, ChunkSource

VALID = "valid"


def patch_names(grid: CoarseGrid) -> tuple[str, str, str]:
    """The stored arrays of one grid: patches, their validity, their spans."""
    return f"coarse-{grid.factor}", f"coarse-{grid.factor}-valid", f"coarse-{grid.factor}-spans"


def fine_channels(grids: tuple[CoarseGrid, ...], channels: int) -> list[int]:
    """Positions of the channels stored in ``images`` (on no coarse grid), in order."""
    coarse = {c for grid in grids for c in grid.channels}
    return [c for c in range(channels) if c not in coarse]


def stored_arrays(coarse: CoarsePatches) -> dict[str, np.ndarray]:
    """The arrays a batch's patches are stored as, by name (bool masks as uint8)."""
    arrays: dict[str, np.ndarray] = {}
    for grid, patches, valid, spans in zip(coarse.grids, coarse.patches, coarse.patch_valid, coarse.spans):
        names = patch_names(grid)
        arrays[names[0]] = patches
        arrays[names[1]] = valid.view(np.uint8)
        arrays[names[2]] = np.asarray(spans, dtype=np.int32)
    arrays[VALID] = coarse.valid.view(np.uint8)
    return arrays


def coarse_subset(coarse: CoarsePatches, index: slice | np.ndarray) -> CoarsePatches:
    """The patches of samples ``index`` (a slice or a boolean mask) of a batch."""
    return CoarsePatches(grids=coarse.grids, patches=tuple(p[index] for p in coarse.patches),
                         patch_valid=tuple(v[index] for v in coarse.patch_valid),
                         spans=tuple(s[index] for s in coarse.spans), valid=coarse.valid[index], fill=coarse.fill)


def interpolated_sums(coarse: CoarsePatches, size: int) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Per grid: its channels and, per sample, the sums and sums of squares of their values upsampled onto
    ``size`` px tiles before rounding (see :func:`~domains.satellite.tile_windows.upsampled_sums`; meaningful
    for samples not :func:`near_nodata`)."""
    return [(list(grid.channels), *upsampled_sums(patches, spans, grid.factor, size))
            for grid, patches, spans in zip(coarse.grids, coarse.patches, coarse.spans)]


def near_nodata(coarse: CoarsePatches) -> np.ndarray:
    """Per sample, whether a patch pixel or the sample itself is not valid everywhere (bool (n,))."""
    count = len(coarse.valid)
    near = ~coarse.valid.reshape(count, -1).all(axis=1)
    for patch_valid in coarse.patch_valid:
        near |= ~patch_valid.reshape(count, -1).all(axis=1)
    return near


def rebuild_samples(fine: np.ndarray, coarse: CoarsePatches, channels: int) -> np.ndarray:
    """The samples (n, ``channels``, T, T) from their stored fine channels and coarse patches."""
    count, _, height, width = fine.shape
    out = np.empty((count, channels, height, width), dtype=fine.dtype)
    out[:, fine_channels(coarse.grids, channels)] = fine
    round_values = bool(np.issubdtype(fine.dtype, np.integer))
    for grid, patches, patch_valid, spans in zip(coarse.grids, coarse.patches, coarse.patch_valid, coarse.spans):
        channels_of = list(grid.channels)
        # Patches valid everywhere (nearly all) in a few whole-chunk operations; the others likewise, nodata
        # left out of the weights.
        clean = patch_valid.reshape(count, -1).all(axis=1)
        for members, mask in ((clean, None), (~clean, patch_valid)):
            if not members.any():
                continue
            upsampled = np.empty((int(members.sum()), len(channels_of), height, width), dtype=fine.dtype)
            upsample_tiles(upsampled, patches[members], spans[members], grid.factor, round_values,
                           None if mask is None else mask[members])
            out[np.ix_(members, channels_of)] = upsampled
    invalid = ~coarse.valid
    if invalid.any():
        for grid in coarse.grids:
            for channel in grid.channels:
                out[:, channel][invalid] = coarse.fill[channel]
    return out


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


class RebuiltSource(CachedChunks):
    """Decoded chunks of a dataset's samples, rebuilt from ``images`` and the coarse arrays (see the module).

    Answers what :class:`tasks.dataset_store.LazySamples` asks of a :class:`ChunkSource` (``chunk``,
    ``is_cached``, ``num_chunks``, ``chunk_samples``, ``array.shape``, ``name``), keeping the last few
    rebuilt chunks as a ChunkSource keeps decoded ones.
    """

    def __init__(self, sources: dict[str, ChunkSource], grids: tuple[CoarseGrid, ...], fill: tuple[float, ...],
                 channels: int):
        self.fine = sources["images"]
        self.grids, self.fill, self.channels = grids, fill, channels
        self.parts = {name: sources[name] for grid in grids for name in patch_names(grid)}
        self.parts[VALID] = sources[VALID]
        self.name = "images"
        self.chunk_samples = self.fine.chunk_samples
        self.array = _Shape((int(self.fine.array.shape[0]), channels, *(int(s) for s in self.fine.array.shape[2:])))
        self._init_cache()

    @property
    def num_chunks(self) -> int:
        return self.fine.num_chunks

    def coarse_patches(self, index: int) -> CoarsePatches:
        """The stored coarse patches of chunk ``index`` (each array checked against its digest on first decode)."""
        patches, valid, spans = [], [], []
        for grid in self.grids:
            names = patch_names(grid)
            patches.append(self.parts[names[0]].chunk(index))
            valid.append(self.parts[names[1]].chunk(index).view(bool))
            spans.append(self.parts[names[2]].chunk(index))
        return CoarsePatches(grids=self.grids, patches=tuple(patches), patch_valid=tuple(valid), spans=tuple(spans),
                             valid=self.parts[VALID].chunk(index).view(bool), fill=self.fill)

    def _decode(self, index: int) -> np.ndarray:
        block = rebuild_samples(self.fine.chunk(index), self.coarse_patches(index), self.channels)
        block.flags.writeable = False
        return block

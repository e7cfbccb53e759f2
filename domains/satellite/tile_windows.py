"""A tile's window of a coarser band, and that window upsampled to the tile: the strip reader's values, bit for bit.

Sentinel-2's 20 m and 60 m bands hold a quarter and a thirty-sixth of the pixels of a 10 m band. A tile
stored with them upsampled to 10 m holds 13 full bands where the scene has about 5.6 (2.3x the bytes to
compress, digest and write); stored as the coarse pixels its bilinear upsampling reads, each coarse band
costs about what it costs in the scene. This module is the geometry and the arithmetic of that form:

* :func:`window_span` is the coarse rows (or columns) that upsampling a tile's fine rows reads,
  neighbours included and cut at the band's edge, as :func:`~domains.satellite.strips.upsample_into`
  reads them for a whole strip;
* :func:`upsample_tile` upsamples such a window onto the tile. It runs the strip reader's own functions
  on the window, whose first column is made to fall on a whole coarse pixel of the scene, so every fine
  pixel is computed from the same coarse pixels with the same weights in the same order: the values the
  strip reader gives the tile, bit for bit (tested), nodata weighting included; :func:`upsample_tiles`
  does the same for a whole chunk of tiles, a few array operations per tile, and :func:`upsampled_sums`
  gives the sums of such tiles (for statistics) without upsampling them;
* :func:`coarse_grids` and :class:`CoarsePatchBatch` (made by :class:`CoarsePatchBatches`) are how the tiling
  reader hands each tile's patches
  to a dataset (:class:`domains.CoarsePatches`), which stores them instead of the upsampled bands and
  rebuilds the tiles when read (:mod:`tasks.coarse_bands`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from domains.array_memory import ReusableArrays
from domains.satellite.strips import (
    CoarseRows,
    integer_upsampling,
    phase_weights,
    unit_norm,
    upsample_into,
    upsample_bilinear,
)
from domains.spec import CoarseGrid, CoarsePatches

if TYPE_CHECKING:
    from domains.satellite.scene import SceneLayout


def window_side(tile_size: int, factor: int) -> int:
    """The most coarse pixels :func:`window_span` gives along one axis for tiles of ``tile_size``."""
    return -(-(tile_size - 1) // factor) + 3


def window_span(start: int, tile_size: int, factor: int, coarse_length: int) -> tuple[int, int]:
    """Coarse indices ``[first, stop)`` that upsampling fine pixels ``start:start + tile_size`` by ``factor`` reads.

    A fine pixel ``i`` lies between coarse pixels ``floor((i + 0.5) / factor - 0.5)`` and the next one;
    :func:`~domains.satellite.strips.upsample_into` reads whole coarse rows from one before ``start //
    factor`` to one after ``(start + tile_size - 1) // factor``. The span is cut at the band's edges, where
    the reader repeats the edge pixel, which a window ending there makes :func:`upsample_tile` do too.
    """
    first = max(0, start // factor - 1)
    stop = min(coarse_length, (start + tile_size - 1) // factor + 2)
    return first, stop


def upsample_tile(out: np.ndarray, window: np.ndarray, valid: np.ndarray | None, factor: int,
                  origin: tuple[int, int], tile: tuple[int, int], round_values: bool) -> np.ndarray | None:
    """Upsample a coarse band's ``window`` onto the square tile whose top-left fine pixel is ``tile``, into ``out``.

    Args:
        out: (size, size) tile of the band, any real dtype (integers get rounded values with ``round_values``).
        window: coarse pixels spanning the tile along both axes (see :func:`window_span`), whose top-left
            pixel is ``origin`` (coarse row, column) of the band.
        valid: where ``window`` holds data, or None when everywhere; invalid pixels are left out of the
            weights as the strip reader leaves them out.
        factor: how many fine pixels one coarse pixel spans.
        origin: (row, column) of ``window[0, 0]`` on the band's grid.
        tile: (row, column) of the tile's top-left pixel on the fine grid.
        round_values: round to whole numbers before the cast into ``out``.

    Returns:
        The tile's valid mask (nearest coarse pixel valid, as the reader makes it), or None when every
        pixel the tile reads is valid.
    """
    size = out.shape[0]
    row, col = tile
    first_row, first_col = origin
    # Fine columns of the window before the tile: the window's column 0 starts a whole coarse pixel of the
    # scene, so each fine column keeps its phase (its weights) and reads the coarse pixels it reads in a strip.
    lead = col - first_col * factor
    if lead < 0 or out.shape != (size, size):
        raise ValueError(f"tile at column {col} starts before its window's first fine column "
                         f"{first_col * factor}, or out {out.shape} is not square")
    wide = np.empty((size, lead + size), dtype=out.dtype)
    if valid is None or valid.all():
        upsample_into(wide, window, factor, first_row, row, round_values)
        mask = None
    else:
        # The whole tile weighted around nodata at once (a tile is small: one pass beats one per run of rows
        # near nodata, as upsample_valid_into does for a strip). Where every neighbour is valid the weights of
        # the factors stored coarse add up to exactly one (unit_norm): the plain values, bit for bit.
        values, mask = upsample_bilinear(window, valid, factor, first_row, row, row + size, lead + size)
        if round_values:
            np.rint(values, out=values)
        with np.errstate(invalid="ignore"):  # NaN where no neighbour is valid: filled by the caller
            wide[...] = values
    out[...] = wide[:, lead:]
    return None if mask is None else mask[:, lead:]


def coarse_grids(layout: SceneLayout, tile_size: int) -> tuple[CoarseGrid, ...]:
    """The bands of ``layout`` on grids an integer factor coarser than its working grid, grouped by factor.

    A band of the same factor but another extent than the first one of its factor stays upsampled (a
    grid's patches share their spans); so does every band that GDAL warps (not an integer factor), and
    every band of a factor whose weights do not add up to exactly one (there the reader's values near
    nodata depend on the whole strip, not only on the tile's patch; see
    :func:`~domains.satellite.strips.unit_norm`).
    """
    members: dict[int, list[int]] = {}
    shapes: dict[int, tuple[int, int]] = {}
    for index, band in enumerate(layout.bands):
        if layout.on_grid(band):
            continue
        factor = integer_upsampling(band.transform, layout.transform)
        if factor is None or not unit_norm(factor) or shapes.setdefault(factor, band.shape) != band.shape:
            continue
        members.setdefault(factor, []).append(index)
    return tuple(CoarseGrid(factor, tuple(channels), window_side(tile_size, factor))
                 for factor, channels in sorted(members.items()))


class CoarsePatchBatch:
    """The coarse patches of a batch of tiles, filled tile by tile as the tiles are cut from a strip.

    Its arrays come from :class:`CoarsePatchBatches` and may hold an earlier batch's pixels: :meth:`add`
    writes every element of a tile's slot.
    """

    def __init__(self, grids: tuple[CoarseGrid, ...], band_shapes: list[tuple[int, int]], tile_size: int,
                 fill: tuple[float, ...], patches: list[np.ndarray], patch_valid: list[np.ndarray],
                 valid: np.ndarray):
        self.grids, self.band_shapes, self.tile_size, self.fill = grids, band_shapes, tile_size, fill
        self.patches, self.patch_valid, self.valid = patches, patch_valid, valid
        self.spans = [np.zeros((len(valid), 4), dtype=np.int32) for _ in grids]

    def add(self, k: int, row: int, col: int, coarse: dict[int, CoarseRows], valid: np.ndarray) -> None:
        """Keep tile ``k`` (top-left ``row``, ``col``) from a strip's coarse rows, and its valid mask."""
        size = self.tile_size
        self.valid[k] = valid
        for grid, patches, patch_valid, spans in zip(self.grids, self.patches, self.patch_valid, self.spans):
            height, width = self.band_shapes[grid.channels[0]]
            first_row, stop_row = window_span(row, size, grid.factor, height)
            first_col, stop_col = window_span(col, size, grid.factor, width)
            rows, cols = stop_row - first_row, stop_col - first_col
            spans[k] = (rows, cols, row - first_row * grid.factor, col - first_col * grid.factor)
            # The padding beyond a patch's span is stored too: zero pixels, marked valid (so a patch valid
            # everywhere is seen at a glance), the same whatever the slot held before.
            if rows < grid.side or cols < grid.side:
                patches[k] = 0
            patch_valid[k] = True
            for j, channel in enumerate(grid.channels):
                band = coarse[channel]
                top = first_row - band.first
                if top < 0 or top + rows > len(band.dn):
                    raise ValueError(f"coarse rows {band.first}:{band.first + len(band.dn)} of channel {channel} miss "
                                     f"rows {first_row}:{stop_row} of the tile at {row},{col}")
                patches[k, j, :rows, :cols] = band.dn[top:top + rows, first_col:stop_col]
                if band.valid is not None:
                    patch_valid[k, j, :rows, :cols] = band.valid[top:top + rows, first_col:stop_col]

    def take(self, count: int) -> CoarsePatches:
        """The first ``count`` tiles' patches (the arrays themselves when the batch is full: never written again)."""
        def cut(array: np.ndarray) -> np.ndarray:
            kept = array if count == len(array) else array[:count].copy()
            kept.flags.writeable = False
            return kept

        return CoarsePatches(grids=self.grids, patches=tuple(cut(a) for a in self.patches),
                             patch_valid=tuple(cut(a) for a in self.patch_valid),
                             spans=tuple(cut(a) for a in self.spans), valid=cut(self.valid), fill=self.fill)


def _neighbours(first: np.ndarray, length: np.ndarray, factor: int,
                size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis of each of n tiles, the two coarse pixels each of its ``size`` fine pixels reads and their
    weights (float32, :func:`~domains.satellite.strips.phase_weights`): ``(lower, upper, lower's weight, upper's
    weight)``, each (n, size). ``first`` is each tile's first fine pixel counted from its patch's first coarse
    pixel, ``length`` the patch's coarse pixels in use (beyond them the edge pixel repeats)."""
    offset, weight, keep = phase_weights(factor)
    fine = first[:, None] + np.arange(size)[None, :]
    phase = fine % factor
    lower = fine // factor + offset[phase]
    last = (length - 1)[:, None]
    return np.clip(lower, 0, last), np.clip(lower + 1, 0, last), keep[phase], weight[phase]


def upsample_tiles(out: np.ndarray, patches: np.ndarray, spans: np.ndarray, factor: int,
                   round_values: bool, valid: np.ndarray | None = None) -> None:
    """:func:`upsample_tile` of many tiles at once: ``out`` (n, c, T, T) from patches (n, c, S, S).

    ``spans`` (n, 4) gives each tile's patch rows and columns in use and its first fine row and column
    counted from the patch's first coarse pixel (see :class:`domains.CoarsePatches`). Each fine pixel is
    ``lower * (1 - w) + upper * w`` along columns, then rows, in float32, with the phase weights and the
    edge repetition of :func:`~domains.satellite.strips.upsample_into`: the same values bit for bit (tested),
    a few array operations per tile for all its channels instead of a call per tile and band (small tiles
    are read faster than a model trains on them).

    With ``valid`` (the patches' mask), nodata is left out of the weights as :func:`upsample_tile` leaves
    it out: the upsampled patch over the upsampled mask, in the same float32 arithmetic (where every
    neighbour is valid the mask upsamples to exactly one, see :func:`~domains.satellite.strips.unit_norm`,
    so those pixels keep the plain values). Pixels with no valid neighbour get an arbitrary value: the
    tile's valid mask marks them (and the nearest pixel's nodata) invalid.
    """
    count, _, size, _ = out.shape
    if count == 0:
        return
    rows, cols, first_row, first_col = (spans[:, k].astype(np.int64) for k in range(4))
    row_low, row_high, row_keep, row_weight = _neighbours(first_row, rows, factor, size)
    col_low, col_high, col_keep, col_weight = _neighbours(first_col, cols, factor, size)

    def upsampled(source: np.ndarray) -> np.ndarray:
        values = np.empty(out.shape, dtype=np.float32)
        # Tile by tile (a gather along one axis with one index list is a plain loop; np.take_along_axis over
        # the whole chunk built index arrays as large as the result, several times slower): columns first,
        # (c, S, T), then rows, (c, T, T), as the strip reader's passes.
        for k in range(count):
            wide = (np.take(source[k], col_low[k], axis=2) * col_keep[k]
                    + np.take(source[k], col_high[k], axis=2) * col_weight[k])
            values[k] = (np.take(wide, row_low[k], axis=1) * row_keep[k][:, None]
                         + np.take(wide, row_high[k], axis=1) * row_weight[k][:, None])
        return values

    if valid is None:
        values = upsampled(patches.astype(np.float32, copy=False))
    else:
        total = upsampled(np.where(valid, patches.astype(np.float32, copy=False), np.float32(0)))
        norm = upsampled(valid.astype(np.float32))
        with np.errstate(invalid="ignore", divide="ignore"):
            values = total / norm
    with np.errstate(invalid="ignore"):  # NaN only where no neighbour is valid (marked invalid)
        if round_values:
            np.rint(values, out=values)
        np.copyto(out, values, casting="unsafe")


class CoarsePatchBatches:
    """Makes :class:`CoarsePatchBatch` es of ``capacity`` tiles from reused memory.

    A full batch's arrays are handed to the dataset writer read-only and kept until stored; once it and
    everyone else have let go of them, they are filled again instead of fresh arrays, whose (huge) pages
    the kernel would zero first: about 15 MiB per batch of 224 px Sentinel-2 tiles.
    """

    def __init__(self, grids: tuple[CoarseGrid, ...], band_shapes: list[tuple[int, int]], capacity: int,
                 tile_size: int, dtype: np.dtype, fill: tuple[float, ...], keep: int = 6):
        self.grids, self.band_shapes, self.tile_size, self.fill = grids, band_shapes, tile_size, fill
        shapes = [(capacity, len(g.channels), g.side, g.side) for g in grids]
        self._patches = [ReusableArrays(shape, dtype, keep) for shape in shapes]
        self._patch_valid = [ReusableArrays(shape, bool, keep) for shape in shapes]
        self._valid = ReusableArrays((capacity, tile_size, tile_size), bool, keep)

    def new(self) -> CoarsePatchBatch:
        """An empty batch (its arrays' contents arbitrary until :meth:`CoarsePatchBatch.add` fills a slot)."""
        return CoarsePatchBatch(self.grids, self.band_shapes, self.tile_size, self.fill,
                                [pool.take() for pool in self._patches], [pool.take() for pool in self._patch_valid],
                                self._valid.take())


# Samples whose patches :func:`upsampled_sums` takes at once.
SUMS_BLOCK = 8


def _axis_weights(first: np.ndarray, length: np.ndarray, factor: int, size: int,
                  side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tile, the interpolation matrix ``M`` (``size`` fine by ``side`` coarse) of one axis, as ``M.T @ 1`` and
    the diagonal and first off-diagonal of ``M.T @ M`` (each fine pixel reads two neighbouring coarse pixels)."""
    count = len(first)
    low, high, w_low, w_high = _neighbours(first, length, factor, size)
    w_low, w_high = w_low.astype(np.float64), w_high.astype(np.float64)
    base = np.arange(count)[:, None] * side

    def add(index: np.ndarray, values: np.ndarray) -> np.ndarray:
        return np.bincount((base + index).ravel(), weights=values.ravel(), minlength=count * side).reshape(count, side)

    same = low == high  # at the patch's edge both neighbours are the edge pixel
    totals = add(low, w_low) + add(high, w_high)
    diagonal = add(low, np.where(same, (w_low + w_high) ** 2, w_low**2)) + add(high, np.where(same, 0.0, w_high**2))
    above = add(low, np.where(same, 0.0, w_low * w_high))
    return totals, diagonal, above


def upsampled_sums(patches: np.ndarray, spans: np.ndarray, factor: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile and channel, the sum and the sum of squares of its patches bilinearly upsampled, without upsampling.

    ``patches`` (n, c, S, S) and ``spans`` (n, 4) as :func:`upsample_tiles` takes them, every patch pixel valid.
    A tile upsampled is ``U = R P C.T`` (``R``, ``C``: each axis's interpolation matrix), so ``sum(U)`` is
    ``(R.T 1) P (C.T 1)`` and ``sum(U**2)`` is ``sum(P * (R.T R) P (C.T C))``, where both Gram matrices are
    tridiagonal: the products of each coarse pixel with itself and its neighbours (right, below and both
    diagonals; each pair twice), weighted. That is a few passes over the coarse pixels instead of several per
    fine pixel. These are the sums of the exact bilinear values; :func:`upsample_tiles` rounds each one to the
    stored dtype, so its sums differ by at most half a unit per pixel (on average far less: the rounding
    errors of a tile nearly cancel). Returns float64 (n, c) arrays, from float32 products.
    """
    count, channels, side, _ = patches.shape
    rows, cols, first_row, first_col = (spans[:, k].astype(np.int64) for k in range(4))
    row_total, row_diagonal, row_above = (a.astype(np.float32) for a in _axis_weights(first_row, rows, factor, size, side))
    col_total, col_diagonal, col_above = (a.astype(np.float32) for a in _axis_weights(first_col, cols, factor, size, side))
    sums = np.empty((count, channels), dtype=np.float64)
    squares = np.empty((count, channels), dtype=np.float64)

    def weighted(values: np.ndarray, by_row: np.ndarray, by_col: np.ndarray) -> np.ndarray:
        """Per sample and channel, ``sum over a, b of by_row[a] * values[a, b] * by_col[b]``."""
        per_row = np.matmul(values, by_col[:, None, :, None])[..., 0]
        return np.einsum("nca,na->nc", per_row, by_row, dtype=np.float64)

    # A few samples at a time: their float32 products stay in a core's cache.
    for start in range(0, count, SUMS_BLOCK):
        k = slice(start, start + SUMS_BLOCK)
        p = patches[k].astype(np.float32)
        diagonal_r, diagonal_c, above_r, above_c = row_diagonal[k], col_diagonal[k], row_above[k, :-1], col_above[k, :-1]
        sums[k] = weighted(p, row_total[k], col_total[k])
        squares[k] = (weighted(p * p, diagonal_r, diagonal_c)
                      + 2 * weighted(p[..., :-1] * p[..., 1:], diagonal_r, above_c)
                      + 2 * weighted(p[:, :, :-1] * p[:, :, 1:], above_r, diagonal_c)
                      + 2 * weighted(p[:, :, :-1, :-1] * p[:, :, 1:, 1:], above_r, above_c)
                      + 2 * weighted(p[:, :, :-1, 1:] * p[:, :, 1:, :-1], above_r, above_c))
    return sums, squares

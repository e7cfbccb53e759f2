"""Reading a scene strip by strip: each band windowed at its own resolution and resampled for that strip only.

Memory is set by a strip (a few hundred rows of the working grid), not by the scene: a full Sentinel-2 tile
reads like a demo crop, only for longer.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from domains.satellite.scene import (
    BandSource,
    SceneLayout,
    open_raster,
    read_band,
    reject_infinite,
    valid_pixels,
)
from domains.array_memory import ReusableArrays, release_free_memory
from domains.satellite.sensors import IDENTITY

# GDAL keeps decoded blocks in a cache that defaults to 5% of RAM: left alone, it grows with the scene until
# that cap. A bounded cache that still holds one row of blocks of every band keeps memory flat.
GDAL_CACHE_MB = 192
# Source pixels read around a coarse band's window, so that every bilinear kernel (2 x 2 source pixels)
# inside the strip sees the neighbours a whole-scene resampling would see.
WINDOW_MARGIN = 2
# Threads reading the band files of a strip at once (each file's bands stay on one thread).
READ_THREADS = 2
# Rows of blocks up to this tall are read to their end and the rows past a strip kept for the next one.
MAX_BLOCK_ROWS_AHEAD = 1024
# Free C heap memory is handed back to the system every this many strips (see release_free_memory): often
# enough that resident memory does not creep with the scene's height; not after every strip, since what
# is handed back is faulted in (zeroed) again by the next strips: 5% of a full-tile ingest's CPU at 1.
TRIM_EVERY_STRIPS = 8


def shifted_transform(transform: Any, col: int, row: int) -> Any:
    """The transform of a window whose top-left pixel is (``col``, ``row``) of ``transform``'s grid."""
    from affine import Affine

    # ``@``, not ``*``: affine 3 deprecates ``*`` (which rasterio.windows.transform still uses).
    return transform @ Affine.translation(col, row)


def integer_upsampling(coarse: Any, fine: Any) -> int | None:
    """The integer factor by which grid ``coarse`` is coarser than ``fine`` when they share origin and axes.

    Sentinel-2's 20 m and 60 m bands (2 and 6) and Landsat's 30 m bands beside the 15 m pan band (2) are
    such grids; None for anything else (rotated, shifted or non-integer grids are warped by GDAL).
    """
    if coarse.b or coarse.d or fine.b or fine.d or not fine.a or not fine.e:
        return None
    ratio_x, ratio_y = coarse.a / fine.a, coarse.e / fine.e
    factor = round(ratio_x)
    tolerance = 1e-9 * factor
    if factor < 2 or abs(ratio_x - factor) > tolerance or abs(ratio_y - factor) > tolerance:
        return None
    if abs(coarse.c - fine.c) > 1e-6 * abs(fine.a) or abs(coarse.f - fine.f) > 1e-6 * abs(fine.e):
        return None
    return factor


def phase_weights(factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per phase ``j`` of fine pixel ``factor * k + j``: its lower coarse neighbour's offset from ``k`` and the weights.

    A fine pixel's centre lies at ``(i + 0.5) / factor - 0.5`` in coarse pixel-centre coordinates, the
    convention of GDAL's bilinear warp kernel; for an integer factor the fraction depends only on the phase.
    Returns ``(offset, weight of the upper neighbour, weight of the lower one)``, the weights in float32.
    """
    position = (np.arange(factor, dtype=np.float64) + 0.5) / factor - 0.5
    lower = np.floor(position)
    weight = (position - lower).astype(np.float32)
    return lower.astype(np.int64), weight, (np.float32(1) - weight).astype(np.float32)


# Fine rows resampled per pass of :func:`upsample_into`: the pass's float32 scratch stays in a core's cache,
# so each output pixel costs one write to memory instead of a chain of whole-strip temporaries.
RESAMPLE_BLOCK_BYTES = 2 * 2**20


class _Scratch(threading.local):
    """Per-thread scratch arrays (of :func:`upsample_into`, and the windows GDAL decodes into), kept from call to call.

    Made afresh for every band of every strip, they cost a page fault per 4 KiB (too small for numpy's huge
    pages, and handed back to the system by :func:`release_free_memory`): about as much system time as the
    arithmetic took. Kept, they cost a few MiB per reading thread.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        buffer = self.buffers.get((name, dtype.str))
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=dtype)
            self.buffers[(name, dtype.str)] = buffer
        return buffer[:size].reshape(shape)


_SCRATCH = _Scratch()


def upsample_into(out: np.ndarray, coarse: np.ndarray, factor: int, source_row: int, top: int,
                  round_values: bool) -> None:
    """Bilinear upsampling of ``coarse`` by an integer ``factor`` onto fine rows ``top:top + len(out)``, into ``out``.

    ``coarse`` is a window of a band starting at coarse row ``source_row`` and column 0 (any real dtype,
    no NaN); ``out`` covers fine columns ``0:out.shape[1]`` and may have any real dtype (the float32
    result is rounded to whole numbers first when ``round_values``). Neighbours beyond the window's edge
    fall back on the edge pixel (the whole scene's edge when the window has margins elsewhere).

    The arithmetic is that of a separable float32 resampling, columns first, ``lower * (1 - w) +
    upper * w`` per axis, bit for bit; it runs phase by phase (fine pixels ``j``, ``j + factor``, ...
    share their weights) over cache-sized blocks of rows in per-thread scratch arrays, so no index
    gathers, no strip-sized temporaries and no fresh memory are needed.
    """
    rows_in, cols_in = coarse.shape
    rows_out, width = out.shape
    if rows_out == 0:
        return
    offset, weight, keep = phase_weights(factor)
    per_phase = [len(range(j, width, factor)) for j in range(factor)]
    # Coarse columns -1 .. per_phase[0] with the edge repeated: every phase's neighbours are plain slices.
    inner = min(per_phase[0] + 1, cols_in)
    block = max(1, RESAMPLE_BLOCK_BYTES // (4 * width * factor))
    first, last = top // factor, (top + rows_out - 1) // factor
    scratch = _SCRATCH
    fine = scratch.get("fine", (block * factor, width))
    widened = scratch.get("widened", (block + 2, width))
    scratch_cols = scratch.get("cols", (block + 2, per_phase[0]))
    scratch_rows = scratch.get("rows", (block, width))
    picked = scratch.get("picked", (block + 2, cols_in), coarse.dtype)
    # Integers of up to 16 bits upsampled by 2: the weights are 1/4 and 3/4, every float32 step is exact, so
    # a cheaper order of the same exact arithmetic gives the same values bit for bit (see _halves_columns).
    exact_halves = factor == 2 and coarse.dtype.kind in "ui" and coarse.dtype.itemsize <= 2
    source_block = scratch.get("source", (block + 2, per_phase[0] + 2))
    for start in range(first, last + 1, block):
        stop = min(start + block, last + 1)
        count = stop - start
        rows = np.clip(np.arange(start - 1, stop + 1) - source_row, 0, rows_in - 1)
        # The rows (edge rows repeated) and columns -1 .. per_phase[0] (edge repeated) of the block, as float32.
        taken = np.take(coarse, rows, axis=0, out=picked[:count + 2])
        source = source_block[:count + 2]
        source[:, 1:1 + inner] = taken[:, :inner]
        source[:, 1 + inner:] = taken[:, cols_in - 1:cols_in]
        source[:, 0] = taken[:, 0]
        wide = widened[:count + 2]
        if exact_halves:
            _halves_columns(wide, source, per_phase, scratch.get("steps", (block + 2, per_phase[0] + 1)))
            block_out = fine[:count * factor]
            _halves_rows(block_out, wide, count, scratch.get("row_steps", (block + 1, width)))
        else:
            for j in range(factor):
                lo, n = 1 + offset[j], per_phase[j]
                target = wide[:, j::factor]
                np.multiply(source[:, lo:lo + n], keep[j], out=target)
                upper = scratch_cols[:count + 2, :n]
                np.multiply(source[:, lo + 1:lo + 1 + n], weight[j], out=upper)
                np.add(target, upper, out=target)
            block_out = fine[:count * factor]
            upper = scratch_rows[:count]
            for j in range(factor):
                lo = 1 + offset[j]
                target = block_out[j::factor]
                np.multiply(wide[lo:lo + count], keep[j], out=target)
                np.multiply(wide[lo + 1:lo + 1 + count], weight[j], out=upper)
                np.add(target, upper, out=target)
        begin, end = max(top, start * factor), min(top + rows_out, stop * factor)
        result = block_out[begin - start * factor:end - start * factor]
        if round_values:
            # Rounded in float32 and cast on the way out: one pass, the values of rint then a cast.
            np.rint(result, out=out[begin - top:end - top], casting="unsafe")
        else:
            out[begin - top:end - top] = result


def _halves_columns(wide: np.ndarray, source: np.ndarray, per_phase: list[int], steps: np.ndarray) -> None:
    """The column pass of a factor-2 upsampling of integers (``source``: coarse columns -1 .. n, edge repeated).

    Fine column ``2k`` is ``c[k-1] / 4 + 3 c[k] / 4 = c[k] - (c[k] - c[k-1]) / 4`` and ``2k + 1`` is
    ``c[k] + (c[k+1] - c[k]) / 4``: one step per coarse column and one operation per fine pixel, instead of
    two products and a sum. For integers below 2**16 in magnitude every intermediate (a multiple of 1/4
    below 2**18) is exact in float32, as are the products and sums of the general form, so both give the
    same float32 numbers.
    """
    rows = len(wide)
    step = steps[:rows]
    np.subtract(source[:, 1:], source[:, :-1], out=step)
    np.multiply(step, np.float32(0.25), out=step)
    n0, n1 = per_phase
    np.subtract(source[:, 1:1 + n0], step[:, :n0], out=wide[:, 0::2])
    np.add(source[:, 1:1 + n1], step[:, 1:1 + n1], out=wide[:, 1::2])


def _halves_rows(block_out: np.ndarray, wide: np.ndarray, count: int, steps: np.ndarray) -> None:
    """The row pass of a factor-2 upsampling of column-passed integers (``wide``: coarse rows start-1 .. stop).

    As :func:`_halves_columns` along rows: every value is a multiple of 1/16 below 2**20 in magnitude,
    exact in float32, so the values are those of the general form bit for bit.
    """
    step = steps[:count + 1]
    np.subtract(wide[1:count + 2], wide[:count + 1], out=step)
    np.multiply(step, np.float32(0.25), out=step)
    np.subtract(wide[1:count + 1], step[:count], out=block_out[0::2])
    np.add(wide[1:count + 1], step[1:count + 1], out=block_out[1::2])


@functools.cache
def unit_norm(factor: int) -> bool:
    """Whether the bilinear weights of every phase of ``factor`` add up to exactly 1.0 in float32, per axis and
    both axes together: then a fine pixel whose neighbours are all valid has the value a plain (unweighted by
    validity) upsampling gives it, bit for bit. True for the factors of Sentinel-2 and Landsat grids."""
    _, weight, keep = phase_weights(factor)
    ones = [np.float32(keep[j] * np.float32(1)) + np.float32(weight[j] * np.float32(1)) for j in range(factor)]
    return all(np.float32(np.float32(keep[r] * c) + np.float32(weight[r] * c)) == 1
               for r in range(factor) for c in ones)


def upsample_bilinear(dn: np.ndarray, valid: np.ndarray, factor: int, source_row: int, top: int, bottom: int,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear upsampling of a coarse band window onto fine rows ``top:bottom`` by an integer ``factor``.

    The same kernel as GDAL's bilinear warp with nodata left out of the weights (the whole-scene reader's
    resampling), computed separably in numpy (:func:`upsample_into`): for aligned grids this is many
    times faster than a warp. ``dn`` and ``valid`` start at coarse row ``source_row`` and cover the
    band's full width.

    Returns:
        ``(values, valid)`` on the fine rows: float32, NaN where not valid; valid where the coarse pixel
        under the fine pixel's centre holds data.
    """
    shape = (bottom - top, width)
    if valid.all():
        # Nothing to leave out: plain weights, and every fine pixel is valid.
        out = np.empty(shape, dtype=np.float32)
        upsample_into(out, dn, factor, source_row, top, round_values=False)
        return out, np.ones(shape, dtype=bool)
    total = np.empty(shape, dtype=np.float32)
    upsample_into(total, np.where(valid, dn.astype(np.float32), np.float32(0)), factor, source_row, top, False)
    norm = np.empty(shape, dtype=np.float32)
    upsample_into(norm, valid.astype(np.float32), factor, source_row, top, False)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norm > 0, total / norm, np.float32(np.nan)).astype(np.float32)
    # Nearest neighbour of the coarse mask: fine pixel i lies in coarse pixel i // factor. GDAL's warper
    # likewise leaves a fine pixel empty when the coarse pixel under its centre is nodata.
    mask = _nearest_mask(valid, factor, source_row, top, bottom, width) & np.isfinite(out)
    out[~mask] = np.nan
    return out, mask


def nearest_valid(valid: np.ndarray, factor: int, source_row: int, top: int, bottom: int, width: int) -> np.ndarray | None:
    """The valid mask on fine rows ``top:bottom`` of a coarse window's mask (from coarse row ``source_row``), or None.

    Fine pixel ``i`` lies in coarse pixel ``i // factor``: the mask :func:`upsample_bilinear` gives (for a factor
    whose weights add up to one the nearest coarse pixel always weighs in, so a valid one leaves a value).
    """
    rows = _nearest_rows(factor, source_row, top, bottom, len(valid))
    if valid[rows].all():
        return None
    return _nearest_mask(valid, factor, source_row, top, bottom, width)


def _nearest_rows(factor: int, source_row: int, top: int, bottom: int, rows: int) -> np.ndarray:
    """The coarse row (of a window from ``source_row``, ``rows`` tall) under each fine row ``top:bottom``."""
    return np.clip(np.arange(top, bottom) // factor - source_row, 0, rows - 1)


def _nearest_mask(valid: np.ndarray, factor: int, source_row: int, top: int, bottom: int, width: int) -> np.ndarray:
    """The coarse mask ``valid`` (from coarse row ``source_row``) by nearest neighbour on fine rows ``top:bottom``."""
    columns = np.clip(np.arange(width) // factor, 0, valid.shape[1] - 1)
    return valid[_nearest_rows(factor, source_row, top, bottom, len(valid))][:, columns]


def _dirty_fine_rows(valid: np.ndarray, factor: int, source_row: int, top: int, bottom: int) -> list[tuple[int, int]]:
    """Runs ``(first, stop)`` of fine rows in ``top:bottom`` whose bilinear neighbours include an invalid pixel.

    Fine row ``i`` reads coarse rows ``floor((i + 0.5) / factor - 0.5)`` and the one below (clipped to the
    window), which include the coarse row under its centre; a fine row is dirty when one of them holds an
    invalid pixel anywhere in the band's width.
    """
    bad = ~valid.all(axis=1)
    fine = np.arange(top, bottom)
    lower = np.floor((fine + 0.5) / factor - 0.5).astype(np.int64) - source_row
    last = len(bad) - 1
    dirty = bad[np.clip(lower, 0, last)] | bad[np.clip(lower + 1, 0, last)]
    edges = np.flatnonzero(np.diff(np.concatenate(([False], dirty, [False])).astype(np.int8)))
    return [(top + int(a), top + int(b)) for a, b in zip(edges[::2], edges[1::2])]


def upsample_valid_into(out: np.ndarray, dn: np.ndarray, valid: np.ndarray, factor: int, source_row: int,
                        top: int, round_values: bool) -> np.ndarray | None:
    """:func:`upsample_bilinear` of ``dn`` (valid where ``valid``) written into ``out``; its valid mask, or None.

    Only the fine rows whose neighbours include an invalid pixel (a few rows per nodata pixel) go
    through the weighted, masked resampling; every other row is a plain :func:`upsample_into`, which
    gives the same values bit for bit there (see :func:`unit_norm`). Values are rounded when
    ``round_values`` (as :func:`upsample_into`); invalid pixels of ``out`` hold an arbitrary value.
    """
    bottom = top + len(out)
    if not unit_norm(factor):
        values, mask = upsample_bilinear(dn, valid, factor, source_row, top, bottom, out.shape[1])
        if round_values:
            np.rint(values, out=values)
        with np.errstate(invalid="ignore"):
            out[...] = values
        return mask
    upsample_into(out, dn, factor, source_row, top, round_values)
    runs = _dirty_fine_rows(valid, factor, source_row, top, bottom)
    if not runs:
        return None
    mask = np.ones(out.shape, dtype=bool)
    for first, stop in runs:
        # The coarse rows these fine rows (and upsample_into's blocks) read, edge clipping left as it was.
        low = max(0, first // factor - 1 - source_row)
        high = min(len(dn), (stop - 1) // factor + 2 - source_row)
        values, run_mask = upsample_bilinear(dn[low:high], valid[low:high], factor, source_row + low, first,
                                             stop, out.shape[1])
        if round_values:
            np.rint(values, out=values)
        with np.errstate(invalid="ignore"):
            out[first - top:stop - top] = values
        mask[first - top:stop - top] = run_mask
    return mask


def window_valid(dn: np.ndarray, band: BandSource, fill_dn: int | None) -> np.ndarray | None:
    """:func:`~domains.satellite.scene.valid_pixels` of a band window, or None when every pixel holds data.

    For integer bands the window's range is looked at first: a nodata or fill value outside
    ``[min, max]`` matches no pixel, and two reductions cost far less than the masks they spare (a
    window-sized array or three per band and strip, each a fresh page-zeroed allocation).
    """
    if dn.dtype.kind in "ui" and dn.size:
        low, high = int(dn.min()), int(dn.max())
        markers = [band.nodata, fill_dn if band.scale != IDENTITY else None]
        if not any(v is not None and not np.isnan(v) and float(v).is_integer() and low <= v <= high
                   for v in markers):
            return None
    valid = valid_pixels(dn, band.nodata, fill_dn, band.scale)
    return None if valid.all() else valid


def strip_dtype(layout: SceneLayout) -> np.dtype:
    """The dtype samples of ``layout`` are stored in: the bands' own, float32 for floating-point data."""
    dtypes = [band.dtype for band in layout.bands]
    if any(np.issubdtype(d, np.floating) for d in dtypes):
        return np.dtype(np.float32)
    return np.result_type(*dtypes)


def fill_values(layout: SceneLayout, dtype: np.dtype) -> np.ndarray:
    """Per-channel stored value meaning physical 0, written on invalid pixels (as the whole-scene reader does)."""
    values = []
    for band in layout.bands:
        if np.issubdtype(dtype, np.floating) or band.scale.scale == 0:
            values.append(0.0)
            continue
        info = np.iinfo(dtype)
        values.append(float(np.clip(np.rint(-band.scale.offset / band.scale.scale), info.min, info.max)))
    return np.array(values, dtype=dtype)


@dataclass(frozen=True)
class CoarseRows:
    """Rows ``first:first + len(dn)`` of a band ``factor`` times coarser than the working grid, full width, and
    where they hold data (None: everywhere)."""

    factor: int
    first: int
    dn: np.ndarray
    valid: np.ndarray | None


class StripReader:
    """Opens a scene's band files once and reads horizontal strips of its working grid.

    Bands on the working grid are read as they are stored. Coarser bands (Sentinel-2 20 m and 60 m) are
    read over the strip's extent plus :data:`WINDOW_MARGIN` source pixels and resampled onto the strip
    as :func:`~domains.satellite.scene.read_scene` resamples a whole scene: bilinear, nodata kept out of
    the weights, nearest neighbour for the valid mask (in numpy for grids coarser by an integer factor,
    see :func:`upsample_bilinear`; by GDAL's warper otherwise). Integer data is rounded back to the source
    dtype after resampling (at most half a digital number from the whole-scene float result).

    With ``keep_coarse``, the coarse rows of each band an integer factor coarser are kept too (see
    :meth:`take_coarse`); the bands of ``coarse_only`` (integer factors whose weights add up to one, see
    :func:`unit_norm`) are then not upsampled at all: strips hold only the other bands (``strip_channels``),
    and their valid masks take those bands' nodata from the nearest coarse pixel, as upsampling would.

    Use as a context manager: ``with StripReader(layout) as reader: raw, valid = reader.read_rows(0, 448)``.
    """

    def __init__(self, layout: SceneLayout, threads: int = READ_THREADS, keep_coarse: bool = False,
                 coarse_only: frozenset[int] = frozenset()):
        self.layout = layout
        # With keep_coarse, the coarse rows of each integer-factor band that a strip was upsampled from, by the
        # strip's top row, until taken (see take_coarse): a dataset stores them instead of the upsampled band.
        self.keep_coarse = keep_coarse or bool(coarse_only)
        for index in coarse_only:
            band = layout.bands[index]
            factor = None if layout.on_grid(band) else integer_upsampling(band.transform, layout.transform)
            if factor is None or not unit_norm(factor):
                raise ValueError(f"band {band.name} cannot be kept coarse only: it is not on a grid an integer "
                                 "factor coarser than the working grid, with weights adding up to one")
        self.coarse_only = coarse_only
        self.strip_channels = [i for i in range(len(layout.bands)) if i not in coarse_only]
        """The bands a strip holds, in order (all but ``coarse_only``)."""
        self._strip_position = {band: k for k, band in enumerate(self.strip_channels)}
        self._coarse: dict[int, dict[int, CoarseRows]] = {}
        self.dtype = strip_dtype(layout)
        self.fill = fill_values(layout, self.dtype)
        self.threads = max(1, threads)
        self._stack = ExitStack()
        self._datasets: dict[Any, Any] = {}
        self._pool = None
        # Per band: (first row, rows) decoded past the last window read, up to the end of its row of blocks.
        self._carried: dict[int, tuple[int, np.ndarray]] = {}
        # Reused memory (see ReusableArrays): strips and their masks, made on the first strip's shape (a
        # strip being read, one read ahead, one the caller still holds).
        self._strips: ReusableArrays | None = None
        self._masks: ReusableArrays | None = None

    def __enter__(self) -> StripReader:
        from concurrent.futures import ThreadPoolExecutor

        import rasterio

        self._stack.__enter__()
        try:
            self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
            for band in self.layout.bands:
                if band.path not in self._datasets:
                    self._datasets[band.path] = self._stack.enter_context(open_raster(band.path))
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="vitrail-strip")
            self._stack.callback(self._pool.shutdown, wait=True, cancel_futures=True)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._datasets.clear()
        self._stack.close()

    @property
    def scaling(self) -> tuple[tuple[float, float], ...]:
        """Per-channel (scale, offset) from stored values to physical units."""
        return tuple((float(b.scale.scale), float(b.scale.offset)) for b in self.layout.bands)

    def read_strips(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`read_rows` of each ``(top, bottom)`` of ``ranges`` in turn, the next strip read ahead.

        While the caller works on a strip (cutting tiles, storing them) the next one is decoded and
        resampled on the reader's threads, so those threads do not wait for the caller: memory holds one
        strip more. Errors are raised when the strip that caused them is reached.
        """
        from concurrent.futures import ThreadPoolExecutor

        if not ranges:
            return
        # Pooled strips sized for the tallest strip (the last one runs to the scene's edge): every strip then
        # reuses one, touching only the rows it has, instead of a taller strip needing an array of its own.
        self._pool_strips(max(bottom - top for top, bottom in ranges))
        # A thread of its own submits the next strip's band jobs and waits for them, as the caller would.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitrail-strip-ahead") as ahead:
            pending = ahead.submit(self.read_rows, *ranges[0])
            try:
                for index, (top, bottom) in enumerate(ranges[1:], start=1):
                    strip = pending.result()
                    pending = ahead.submit(self.read_rows, top, bottom)
                    yield strip
                    del strip
                    if index % TRIM_EVERY_STRIPS == 0:
                        release_free_memory()
                strip = pending.result()
            finally:
                # Whatever ends the iteration (the caller stopping early included), the strip in flight is
                # finished before the datasets it reads can close; its error, if any, is not the one to raise.
                if not pending.cancel():
                    pending.exception()
            yield strip

    def read_rows(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """Read rows ``top:bottom`` of the working grid.

        Returns:
            ``(raw, valid)``: raw (len(strip_channels), rows, W) in :attr:`dtype`, holding :attr:`fill` wherever
            ``valid`` (rows, W) is False; ``valid`` is True where every band holds data.

        Raises:
            DomainInputError: a band cannot be decoded in this strip or holds infinite values.
        """
        from concurrent.futures import wait

        height, width = bottom - top, self.layout.shape[1]
        shape = (len(self.strip_channels), height, width)
        if self._strips is None:
            self._pool_strips(height)
        raw = self._strips.take(shape)
        # One job per file (a GDAL dataset handle is not safe to share between threads); decoding and the
        # numpy resampling release the GIL, so the files of a strip are read on several cores at once.
        by_file: dict[Any, list[int]] = {}
        for i, band in enumerate(self.layout.bands):
            by_file.setdefault(band.path, []).append(i)
        coarse: dict[int, CoarseRows] = {}
        jobs = [self._pool.submit(self._read_bands, raw, members, top, bottom, coarse)
                for members in by_file.values()]
        wait(jobs)  # every job is done with ``raw`` before anything (an error included) leaves this method
        valid = self._masks.take((height, width))
        valid[...] = True
        for job in jobs:
            for band_valid in job.result():
                if band_valid is not None and not band_valid.all():
                    valid &= band_valid
        # Only the rows holding an invalid pixel are visited (a nodata pixel here and there is common).
        bad_rows = np.flatnonzero(~valid.all(axis=1))
        if len(bad_rows):
            breaks = np.flatnonzero(np.diff(bad_rows) > 1)
            for first, last in zip(bad_rows[np.r_[0, breaks + 1]], bad_rows[np.r_[breaks, len(bad_rows) - 1]]):
                invalid = ~valid[first:last + 1]
                for k, band in enumerate(self.strip_channels):
                    np.copyto(raw[k, first:last + 1], self.fill[band], where=invalid)
        if self.keep_coarse:
            self._coarse[top] = coarse
        return raw, valid

    def take_coarse(self, top: int) -> dict[int, CoarseRows]:
        """The coarse rows (by band position) that the strip read from row ``top`` was upsampled from (``keep_coarse``)."""
        return self._coarse.pop(top)

    def _pool_strips(self, height: int) -> None:
        """Pool strips of up to ``height`` rows: one being read, one read ahead, one the caller still holds."""
        if self._strips is None or self._strips.shape[1] < height:
            shape = (len(self.strip_channels), height, self.layout.shape[1])
            self._strips = ReusableArrays(shape, self.dtype, keep=3)
            self._masks = ReusableArrays(shape[1:], bool, keep=3)

    def _read_bands(self, raw: np.ndarray, members: list[int], top: int, bottom: int,
                    coarse: dict[int, CoarseRows]) -> list[np.ndarray | None]:
        """Read bands ``members`` (all of one file) into ``raw``; their valid masks (None: all valid)."""
        import rasterio
        from rasterio.windows import Window

        height, width = bottom - top, self.layout.shape[1]
        masks: list[np.ndarray | None] = []
        # GDAL options set by the main thread's Env do not reach pool threads when that Env is thread-local.
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            for i in members:
                band = self.layout.bands[i]
                dataset = self._datasets[band.path]
                if not self.layout.on_grid(band):
                    out = raw[self._strip_position[i]] if i not in self.coarse_only else None
                    masks.append(self._resample_into(out, dataset, band, top, bottom, coarse))
                    continue
                position = self._strip_position[i]
                # Straight into the strip when the band has its dtype (a cast could change what nodata matches).
                dn = self._read_window(i, dataset, top, bottom, keep=0,
                                       out=raw[position] if band.dtype == raw.dtype else None)
                if dn.dtype != raw.dtype:
                    raw[position] = dn
                reject_infinite(dn, band.path, band.name)
                masks.append(window_valid(dn, band, self.layout.sensor.fill_dn))
        return masks

    def _read_window(self, i: int, dataset: Any, first: int, last: int, keep: int,
                     out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``first:last`` of band ``i`` (full width), decoding every row of blocks once when read in order.

        GDAL decodes a whole block for any part of it and does not keep it for the next window, so a strip
        that ends inside a row of blocks would have that row decoded again by the next strip (a quarter
        to a half more decoding for strips a few hundred rows tall). The window is therefore read on to
        the end of its last row of blocks, and the rows past ``last`` (and ``keep`` rows before it, where
        the next window may start) are kept for the next call. Any other order of windows still reads
        correctly, from the file. The rows are written into ``out`` when given (and returned).
        """
        from rasterio.windows import Window

        band = self.layout.bands[i]
        height, width = band.shape
        block_rows = dataset.block_shapes[band.index - 1][0]
        # Tall blocks (a striped file of a few strips) are not read ahead: too many rows would be held.
        end = min(height, -(-last // block_rows) * block_rows) if block_rows <= MAX_BLOCK_ROWS_AHEAD else last
        carried = self._carried.pop(i, None)
        pieces: list[tuple[int, np.ndarray]] = []  # (first row, rows): consecutive, from ``first`` on
        read_from = first
        if carried is not None and carried[0] <= first < carried[0] + len(carried[1]):
            pieces.append((first, carried[1][first - carried[0]:]))
            read_from = carried[0] + len(carried[1])
        if read_from < last:
            # Decoded into this thread's scratch (copied out below): one buffer per reading thread, not per band.
            decoded = read_band(dataset, band.index, band.path, Window(0, read_from, width, end - read_from),
                                out=_SCRATCH.get("window", (end - read_from, width), band.dtype))
            pieces.append((read_from, decoded))
        # One window-sized array per call (not a concatenation of varying size): the allocator reuses it.
        rows = out if out is not None else np.empty((last - first, width), dtype=pieces[0][1].dtype)
        for start, piece in pieces:
            stop = min(last, start + len(piece))
            rows[start - first:stop - first] = piece[:stop - start]
        # Kept for the next call: a copy (a view would hold the whole window read).
        keep_from = max(first, last - keep)
        tail = [piece[max(0, keep_from - start):] for start, piece in pieces if start + len(piece) > keep_from]
        if tail and keep_from < height:
            self._carried[i] = (keep_from, np.concatenate(tail))
        return rows

    def _resample_into(self, out: np.ndarray | None, dataset: Any, band: BandSource, top: int, bottom: int,
                       coarse: dict[int, CoarseRows]) -> np.ndarray | None:
        """Resample a coarse band onto rows ``top:bottom`` into ``out`` (the strip's dtype, rounded if integer).

        Returns the band's valid mask on those rows, or None when every pixel is valid. Invalid pixels of
        ``out`` hold an arbitrary value (the caller fills them). With ``out`` None (a band kept coarse only)
        nothing is resampled: the mask is the one upsampling would give, each fine pixel's nearest coarse one.
        """
        from rasterio.windows import Window

        layout = self.layout
        width = layout.shape[1]
        inverse = ~band.transform
        # The strip's top and bottom edges in the band's own (fractional) rows.
        first = (inverse @ (layout.transform @ (0, top)))[1]
        last = (inverse @ (layout.transform @ (0, bottom)))[1]
        start = max(0, math.floor(min(first, last)) - WINDOW_MARGIN)
        stop = min(band.shape[0], math.ceil(max(first, last)) + WINDOW_MARGIN)
        # The next strip's window starts up to two margins (and a rounding) before this one's end.
        dn = self._read_window(self.layout.bands.index(band), dataset, start, stop, keep=2 * WINDOW_MARGIN + 2)
        reject_infinite(dn, band.path, band.name)
        band_valid = window_valid(dn, band, layout.sensor.fill_dn)
        factor = integer_upsampling(band.transform, layout.transform)
        if factor is not None and self.keep_coarse:
            coarse[self.layout.bands.index(band)] = CoarseRows(factor, start, dn, band_valid)
        if out is None:
            return None if band_valid is None else nearest_valid(band_valid, factor, start, top, bottom, width)
        # Bilinear weights are convex, so a rounded value stays within the range of the stored dtype.
        round_values = bool(np.issubdtype(out.dtype, np.integer))
        if factor is not None and band_valid is None:
            upsample_into(out, dn, factor, start, top, round_values)
            return None
        if band_valid is None:
            band_valid = np.ones(dn.shape, dtype=bool)
        if factor is not None:
            return upsample_valid_into(out, dn, band_valid, factor, start, top, round_values)
        values, fine_valid = self._warp_rows(dn, band_valid, band, start, top, bottom)
        if round_values:
            np.rint(values, out=values)
        # NaN (invalid) pixels cast to an arbitrary value here; the caller fills every invalid pixel.
        with np.errstate(invalid="ignore"):
            out[...] = values
        return fine_valid

    def _warp_rows(self, dn: np.ndarray, band_valid: np.ndarray, band: BandSource, start: int, top: int,
                   bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """GDAL's bilinear warp of a coarse window (from band row ``start``) onto rows ``top:bottom`` (any grid)."""
        from rasterio.warp import Resampling, reproject

        layout = self.layout
        width = layout.shape[1]
        values = dn.astype(np.float32)
        values[~band_valid] = np.nan
        source_transform = shifted_transform(band.transform, 0, start)
        strip_transform = shifted_transform(layout.transform, 0, top)
        resampled = np.full((bottom - top, width), np.nan, dtype=np.float32)
        # NaN as source nodata keeps nodata out of the bilinear weights of neighbouring valid pixels.
        reproject(
            values, resampled, src_transform=source_transform, src_crs=layout.crs, dst_transform=strip_transform,
            dst_crs=layout.crs, src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.bilinear,
        )
        mask = np.zeros((bottom - top, width), dtype=np.uint8)
        # A fine pixel inside a coarse nodata pixel is nodata: nearest neighbour keeps the mask's edges sharp.
        reproject(
            band_valid.astype(np.uint8), mask, src_transform=source_transform, src_crs=layout.crs,
            dst_transform=strip_transform, dst_crs=layout.crs, resampling=Resampling.nearest,
        )
        return resampled, mask.astype(bool) & np.isfinite(resampled)

"""Computing a capture's channels window by window in two passes, so memory does not grow with the capture.

The methane products fit their background statistics per detector window (the near-equal tiles of at
most 512 x 512 px of :func:`domains.hyperspectral.stack.compute_stack`). Statistics need every pixel of
their window before any pixel can be scored, so reading is split in two:

1. :func:`fit_statistics` reads each detector window in row chunks of a bounded pixel count: it finds
   the invalid pixels, the window's median brightness and saturated pixels (which decide the trusted
   pixels), then reads the window again to gather what the estimator needs (the Mag1c-SAS sample of
   trusted pixels, or the mean and scatter of all trusted pixels for MF/ACE). Only the small fitted
   statistics of each window are kept.
2. :func:`compute_window` then derives the channels of any rectangle (e.g. one leakage block) from one
   read of its bands, scoring each pixel with the statistics of the window that holds it.

The results equal the whole-cube :func:`compute_stack` within float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from domains.hyperspectral.bands import ChannelSource
from domains.hyperspectral.cube import Cube
from domains.hyperspectral.methane import (DEFAULT_WINDOW_NM, FilterStatistics, apply_statistics,
                                           fit_gaussian_statistics, fit_sparse_statistics, sas_sample,
                                           saturated_pixels, trusted_pixels)
from domains.hyperspectral.stack import DEFAULT_TILE, _splits, plan_bands, saturation_level
from domains.spec import DomainInputError

# Pixels per chunk read in the statistics pass: 16k pixels x ~60 bands x 4 bytes is about 4 MB.
CHUNK_PIXELS = 1 << 14


@dataclass
class StackPlan:
    """What to read for a list of channel sources, and the fitted statistics of every detector window."""

    cube: Cube
    sources: list[ChannelSource]
    band_idx: list[int]
    position: dict[int, int]
    filter_pos: np.ndarray
    absorption: np.ndarray | None
    row_windows: list[tuple[int, int]]
    col_windows: list[tuple[int, int]]
    statistics: dict[tuple[int, int, str], FilterStatistics | None] = field(default_factory=dict)
    invalid_pixels: int = 0

    @property
    def products(self) -> list[str]:
        return sorted({s.product for s in self.sources if s.product})


def plan_stack(cube: Cube, sources: list[ChannelSource], tile: tuple[int | None, int | None] = DEFAULT_TILE,
               window_nm: tuple[float, float] = DEFAULT_WINDOW_NM) -> StackPlan:
    """Bands to read and detector windows for ``sources`` (as :func:`compute_stack` chooses them)."""
    height, width = cube.grid
    band_idx, position, filter_pos, absorption = plan_bands(cube, sources, window_nm)
    return StackPlan(cube, sources, band_idx, position, filter_pos, absorption,
                     _splits(height, tile[0]), _splits(width, tile[1]))


def _row_chunks(r0: int, r1: int, width: int) -> list[tuple[int, int]]:
    rows = max(1, CHUNK_PIXELS // max(width, 1))
    return [(a, min(a + rows, r1)) for a in range(r0, r1, rows)]


def _window_pixels(plan: StackPlan, r0: int, r1: int, c0: int, c1: int):
    """Yield (valid mask, (N, B) valid detector pixels) of a window, chunk of rows by chunk of rows."""
    for a, b in _row_chunks(r0, r1, c1 - c0):
        block = plan.cube.read(plan.band_idx, slice(a, b), slice(c0, c1))
        good = ~plan.cube.invalid_mask(block, first_row=a)
        yield good, np.ascontiguousarray(block[plan.filter_pos][:, good].T)


def fit_statistics(plan: StackPlan, on_chunk=None) -> StackPlan:
    """Pass 1: count invalid pixels and fit every detector window's statistics for every product.

    ``on_chunk(rows, cols, invalid)`` is called with each chunk's invalid mask (for label statistics).
    A window with no more valid pixels than twice its detector bands gets no statistics (its products
    stay 0, as in :func:`compute_stack`).

    Raises:
        DomainInputError: NaNs without an ignore value, or nothing valid in the cube.
    """
    saturation = saturation_level(plan.cube)
    bands = len(plan.filter_pos)
    for r0, r1 in plan.row_windows:
        for c0, c1 in plan.col_windows:
            brightness, saturated = [], []
            for a, b in _row_chunks(r0, r1, c1 - c0):
                block = plan.cube.read(plan.band_idx, slice(a, b), slice(c0, c1))
                bad = plan.cube.invalid_mask(block, first_row=a)
                plan.invalid_pixels += int(bad.sum())
                if on_chunk is not None:
                    on_chunk(slice(a, b), slice(c0, c1), bad)
                if plan.products:
                    pixels = np.ascontiguousarray(block[plan.filter_pos][:, ~bad].T)
                    brightness.append(pixels.mean(axis=1))
                    flags = saturated_pixels(pixels, saturation)
                    saturated.append(flags if flags is not None else np.zeros(len(pixels), dtype=bool))
                del block
            if not plan.products:
                continue
            count = sum(len(x) for x in brightness)
            if count <= 2 * bands:
                for product in plan.products:
                    plan.statistics[(r0, c0, product)] = None
                continue
            trusted = trusted_pixels(np.concatenate(brightness), np.concatenate(saturated) if saturation is not None
                                     else None, bands)
            del brightness, saturated
            for product in plan.products:
                plan.statistics[(r0, c0, product)] = _fit_window(plan, product, trusted, (r0, r1, c0, c1))
    if plan.invalid_pixels == plan.cube.grid[0] * plan.cube.grid[1]:
        raise DomainInputError(plan.cube.path, "holds no valid pixel (every pixel is the data ignore value)")
    return plan


def _fit_window(plan: StackPlan, product: str, trusted: np.ndarray, window: tuple[int, int, int, int]
                ) -> FilterStatistics:
    """Second read of one window: the sample (Mag1c-SAS) or the moments (MF, ACE) of its trusted pixels."""
    if product == "mag1c_sas":
        trusted_at = np.flatnonzero(trusted)
        wanted = trusted_at[sas_sample(len(trusted_at), len(plan.filter_pos))]
        parts, offset = [], 0
        for _, pixels in _window_pixels(plan, *window):
            inside = wanted[(wanted >= offset) & (wanted < offset + len(pixels))] - offset
            parts.append(pixels[inside])
            offset += len(pixels)
        mu, cit, norm = fit_sparse_statistics(np.concatenate(parts), plan.absorption)
        return FilterStatistics(product, mu, cit, norm)
    # Mean and centred scatter merged chunk by chunk (Chan et al.'s pairwise update), in float64.
    count, mean, scatter, offset = 0, None, None, 0
    for _, pixels in _window_pixels(plan, *window):
        keep = trusted[offset : offset + len(pixels)]
        offset += len(pixels)
        x = pixels[keep].astype(np.float64)
        if not len(x):
            continue
        part_mean = x.mean(axis=0)
        centred = x - part_mean
        part_scatter = centred.T @ centred
        if mean is None:
            count, mean, scatter = len(x), part_mean, part_scatter
            continue
        total = count + len(x)
        delta = part_mean - mean
        scatter = scatter + part_scatter + np.outer(delta, delta) * (count * len(x) / total)
        mean = mean + delta * (len(x) / total)
        count = total
    return fit_gaussian_statistics(product, count, mean, scatter, plan.absorption)


def compute_window(plan: StackPlan, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: every channel of the rectangle ``rows`` x ``cols`` from one read of its bands.

    Returns:
        ``(stack, invalid)``: float32 (C, h, w) with 0 on invalid pixels, and bool (h, w).
    """
    (r0, r1), (c0, c1) = rows, cols
    block = plan.cube.read(plan.band_idx, slice(r0, r1), slice(c0, c1))
    invalid = plan.cube.invalid_mask(block, first_row=r0)
    good = ~invalid
    stack = np.zeros((len(plan.sources), r1 - r0, c1 - c0), dtype=np.float32)
    for channel, source in enumerate(plan.sources):
        if source.band >= 0:
            stack[channel] = np.where(good, block[plan.position[source.band]], 0.0)
            continue
        # Score each part of the rectangle with the statistics of the detector window holding it.
        for w0, w1 in plan.row_windows:
            a, b = max(w0, r0), min(w1, r1)
            if a >= b:
                continue
            for v0, v1 in plan.col_windows:
                c, d = max(v0, c0), min(v1, c1)
                stats = plan.statistics.get((w0, v0, source.product))
                if c >= d or stats is None:
                    continue
                part_good = good[a - r0 : b - r0, c - c0 : d - c0]
                pixels = np.ascontiguousarray(block[plan.filter_pos][:, a - r0 : b - r0, c - c0 : d - c0][:, part_good].T)
                out = np.zeros(part_good.shape, dtype=np.float32)
                out[part_good] = apply_statistics(pixels, stats)
                stack[channel, a - r0 : b - r0, c - c0 : d - c0] = out
    return stack, invalid

"""Building a model's input stack (bands + methane products) from a cube, one window at a time.

The capture is cut into near-equal tiles (default at most 512 x 512 px, the tile size of the on-board
reference) or into column groups spanning all lines (``tile=(None, k)``: pushbroom sensors such as EMIT
and AVIRIS-NG have one detector column per sample, and mag1c fits statistics per column for that
reason). Each window is read once with every band it needs, its methane product is computed from
the bands of the detector window (default 2122-2488 nm), and the result lands in a (C, H, W) float32
stack. Memory therefore stays near one window of raw bands plus the output stack.
"""

from __future__ import annotations

import math

import numpy as np

from domains.hyperspectral.bands import ChannelSource, good_bands
from domains.hyperspectral.cube import Cube
from domains.hyperspectral.methane import DEFAULT_WINDOW_NM, enhancement, unit_absorption_spectrum
from domains.spec import DomainInputError

DEFAULT_TILE = (512, 512)
# Bytes of bands read at once: windows side by side are read together up to this (a 512-row strip of an
# EMIT-sized capture's 55 detector and colour bands is 144 MB).
STRIP_BYTES = 256 * 2**20


def detector_bands(cube: Cube, window_nm: tuple[float, float] = DEFAULT_WINDOW_NM) -> tuple[np.ndarray, np.ndarray]:
    """Good bands inside the detector window and their CH4 unit absorption (per ppm·m).

    Raises:
        DomainInputError: fewer than 3 usable bands in the window (e.g. a VNIR-only sensor).
    """
    centres = cube.require_wavelengths()
    absorption = unit_absorption_spectrum(centres, cube.band_widths())
    picked = np.flatnonzero(good_bands(cube) & (centres >= window_nm[0]) & (centres <= window_nm[1]) & (absorption != 0))
    if len(picked) < 3:
        raise DomainInputError(cube.path, f"only {len(picked)} good bands lie in the methane window "
                                          f"{window_nm[0]:g}-{window_nm[1]:g} nm; a methane product needs at least 3")
    return picked, absorption[picked]


def _splits(length: int, size: int | None) -> list[tuple[int, int]]:
    if size is None or size >= length:
        return [(0, length)]
    parts = math.ceil(length / size)
    edges = np.linspace(0, length, parts + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def saturation_level(cube: Cube) -> float | None:
    """The value a saturated integer sample takes (its type's maximum); None for float data."""
    if cube.envi is not None and cube.envi.dtype.kind in "iu":
        return float(np.iinfo(cube.envi.dtype).max)
    return None


def plan_bands(cube: Cube, sources: list[ChannelSource], window_nm: tuple[float, float]
               ) -> tuple[list[int], dict[int, int], np.ndarray, np.ndarray | None]:
    """Cube bands to read for ``sources``: (band indices, position of each in the read, positions of the
    detector bands, the unit absorption spectrum over them or None when no product needs it)."""
    products = {s.product for s in sources if s.product}
    filter_idx, absorption = detector_bands(cube, window_nm) if products else (np.zeros(0, int), None)
    band_idx = sorted({s.band for s in sources if s.band >= 0} | set(filter_idx.tolist()))
    position = {b: i for i, b in enumerate(band_idx)}
    filter_pos = np.array([position[b] for b in filter_idx], dtype=int)
    return band_idx, position, filter_pos, absorption


def _pixel_major(block: np.ndarray, positions: np.ndarray, good: np.ndarray) -> np.ndarray:
    """(N, B) valid pixels of ``block`` (bands, h, w) at band ``positions``, pixel-major for the filters' matmuls.

    One gather: the detector window is a run of consecutive bands, so it is a view of the block, and masking
    its pixel-major view copies once (selecting bands, masking and transposing copied a window three times).
    """
    first = int(positions[0]) if len(positions) else 0
    consecutive = np.array_equal(positions, np.arange(first, first + len(positions)))
    bands = block[first:first + len(positions)] if consecutive else block[positions]
    return np.moveaxis(bands, 0, -1)[good]


def compute_stack(cube: Cube, sources: list[ChannelSource], tile: tuple[int | None, int | None] = DEFAULT_TILE,
                  window_nm: tuple[float, float] = DEFAULT_WINDOW_NM) -> tuple[np.ndarray, np.ndarray]:
    """Read and derive every channel of ``sources`` over the whole cube, window by window.

    Returns:
        ``(stack, invalid)``: float32 (C, H, W) with 0 on invalid pixels, and bool (H, W) invalid pixels.

    Raises:
        DomainInputError: NaNs without an ignore value, or nothing valid in the cube.
    """
    height, width = cube.grid
    band_idx, position, filter_pos, absorption = plan_bands(cube, sources, window_nm)
    saturation = saturation_level(cube)
    stack = np.zeros((len(sources), height, width), dtype=np.float32)
    invalid = np.zeros((height, width), dtype=bool)
    for r0, r1 in _splits(height, tile[0]):
        for run in _read_runs(_splits(width, tile[1]), (r1 - r0) * len(band_idx) * np.dtype(np.float32).itemsize):
            # One read for a run of windows side by side, each window a view of it: read one by one, every
            # window mapped the file again and faulted in the pages its neighbours had just read.
            first, last = run[0][0], run[-1][1]
            strip = cube.read(band_idx, slice(r0, r1), slice(first, last))
            strip_bad = cube.invalid_mask(strip, first_row=r0, first_col=first)
            invalid[r0:r1, first:last] = strip_bad
            for c0, c1 in run:
                block, good = strip[:, :, c0 - first:c1 - first], ~strip_bad[:, c0 - first:c1 - first]
                _derive_window(stack, block, good, (r0, r1, c0, c1), sources, position, filter_pos, absorption,
                               saturation)
    if invalid.all():
        raise DomainInputError(cube.path, "holds no valid pixel (every pixel is the data ignore value)")
    return stack, invalid


def _read_runs(windows: list[tuple[int, int]], bytes_per_column: int) -> list[list[tuple[int, int]]]:
    """Column windows grouped into runs of at most :data:`STRIP_BYTES` (a run holds at least one window)."""
    runs: list[list[tuple[int, int]]] = []
    for window in windows:
        if runs and (window[1] - runs[-1][0][0]) * bytes_per_column <= STRIP_BYTES:
            runs[-1].append(window)
        else:
            runs.append([window])
    return runs


def _derive_window(stack: np.ndarray, block: np.ndarray, good: np.ndarray, where: tuple[int, int, int, int],
                   sources: list[ChannelSource], position: dict[int, int], filter_pos: np.ndarray,
                   absorption: np.ndarray | None, saturation: float | None) -> None:
    """Fill ``stack`` over one window from its bands ``block`` (bands, h, w) and its valid pixels ``good``."""
    r0, r1, c0, c1 = where
    pixels = None
    for channel, source in enumerate(sources):
        if source.band >= 0:
            stack[channel, r0:r1, c0:c1] = np.where(good, block[position[source.band]], 0.0)
            continue
        if pixels is None:
            pixels = _pixel_major(block, filter_pos, good)
        if len(pixels) <= 2 * len(filter_pos):
            continue  # too few valid pixels to estimate a covariance: leave the product at 0
        out = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
        out[good] = enhancement(pixels, absorption, source.product, saturation)
        stack[channel, r0:r1, c0:c1] = out

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
        for c0, c1 in _splits(width, tile[1]):
            block = cube.read(band_idx, slice(r0, r1), slice(c0, c1))
            bad = cube.invalid_mask(block, first_row=r0)
            invalid[r0:r1, c0:c1] = bad
            good = ~bad
            pixels = None
            for channel, source in enumerate(sources):
                if source.band >= 0:
                    stack[channel, r0:r1, c0:c1] = np.where(good, block[position[source.band]], 0.0)
                    continue
                if pixels is None:
                    # (N, B) valid pixels of the detector bands, pixel-major for the filter's matmuls.
                    pixels = np.ascontiguousarray(block[filter_pos][:, good].T)
                if len(pixels) <= 2 * len(filter_pos):
                    continue  # too few valid pixels to estimate a covariance: leave the product at 0
                out = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
                out[good] = enhancement(pixels, absorption, source.product, saturation)
                stack[channel, r0:r1, c0:c1] = out
    if invalid.all():
        raise DomainInputError(cube.path, "holds no valid pixel (every pixel is the data ignore value)")
    return stack, invalid

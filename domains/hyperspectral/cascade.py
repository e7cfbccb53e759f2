"""On-board screening cascade: the Mag1c-SAS product decides which tiles the segmentation model sees.

Plumes cover a few per cent of a capture. The enhancement product is computed for every pixel anyway (it is
one of the model's channels), so a tile whose 3 x 3 mean enhancement stays below ``screen_ppmm`` everywhere
is background without running the model; only candidate tiles are segmented. In those, a plume pixel needs
the model's vote *and* an enhanced footprint under it: the ViT's patches blur plume edges, the physics
product has them at full resolution. Tiles of the hyperspectral demo dataset whose 3 x 3 mean stayed below
400 ppm·m held 0.1 % of the plume pixels (:data:`DEFAULT_SCREEN_PPMM`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_SCREEN_PPMM = 400.0
# Model channels the cascade screens on (enhancement in ppm·m), the first present wins; ACE is a cosine, not ppm·m.
SCREEN_CHANNELS = ("ch4_mag1c", "ch4_mf")


@dataclass
class CascadeCounts:
    """What the cascade did over a capture: tiles seen and sent to the model, seconds screening and in the model."""

    tiles: int = 0
    model_tiles: int = 0
    screen_seconds: float = 0.0
    model_seconds: float = 0.0


def screening_channel(channels) -> int:
    """Index, among a model's ``channels``, of the methane channel the cascade screens on.

    Raises:
        ValueError: the model has no methane enhancement channel in ppm·m.
    """
    names = [c.name for c in channels]
    found = next((names.index(name) for name in SCREEN_CHANNELS if name in names), None)
    if found is None:
        raise ValueError(f"screening needs a methane enhancement channel in ppm·m ({' or '.join(SCREEN_CHANNELS)}) "
                         f"among the model's channels: {', '.join(names)}")
    return found


def enhanced_pixels(batch: np.ndarray, product: int, threshold: float) -> np.ndarray:
    """(N, H, W): where the 3 x 3 mean of channel ``product`` of ``batch`` (N, C, H, W) exceeds ``threshold``
    (a plume's footprint, not one noisy pixel)."""
    from scipy import ndimage

    return ndimage.uniform_filter(batch[:, product].astype(np.float32), size=(1, 3, 3), mode="nearest") > threshold


def screen_tiles(batch: np.ndarray, product: int, threshold: float) -> np.ndarray:
    """Which tiles of ``batch`` (N, C, H, W) are plume candidates: some pixel is enhanced (:func:`enhanced_pixels`)."""
    return enhanced_pixels(batch, product, threshold).reshape(len(batch), -1).any(axis=1)


def screened(infer: Callable[[np.ndarray], np.ndarray], product: int, threshold: float, classes: int,
             background: int = 0, counts: CascadeCounts | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``infer`` (N, C, H, W) -> per-pixel probabilities (N, K, H, W), run on candidate tiles only.

    Screened-out tiles and the non-enhanced pixels of candidate tiles get all their probability on class
    ``background``. ``product`` is the enhancement channel's index in the batch, in ppm·m like ``threshold``;
    ``counts``, when given, accumulates what the cascade did.
    """
    counts = counts if counts is not None else CascadeCounts()

    def cascade(batch: np.ndarray) -> np.ndarray:
        clock = time.perf_counter()
        enhanced = enhanced_pixels(batch, product, threshold)
        candidates = enhanced.reshape(len(batch), -1).any(axis=1)
        counts.tiles += len(batch)
        counts.screen_seconds += time.perf_counter() - clock
        if not candidates.any():
            return _background(len(batch), classes, batch.shape[2:], background)
        clock = time.perf_counter()
        chosen = np.asarray(infer(np.ascontiguousarray(batch[candidates])), dtype=np.float32)
        counts.model_seconds += time.perf_counter() - clock
        counts.model_tiles += int(candidates.sum())
        clock = time.perf_counter()
        probabilities = _background(len(batch), classes, batch.shape[2:], background)
        quiet = ~enhanced[candidates]
        moved = np.where(quiet[:, None], 0.0, chosen)  # a quiet pixel's probability all goes to background
        moved[:, background] += np.where(quiet, chosen.sum(axis=1), 0.0)
        probabilities[candidates] = moved
        counts.screen_seconds += time.perf_counter() - clock
        return probabilities

    return cascade


def _background(n: int, classes: int, shape: tuple[int, ...], background: int) -> np.ndarray:
    out = np.zeros((n, classes, *shape), dtype=np.float32)
    out[:, background] = 1.0
    return out

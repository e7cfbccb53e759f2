"""Tissue masks on a low-resolution view of a slide, pen-ink removal, and blank/blurry tile rejection.

The mask follows the usual bright-field recipe (Otsu on HSV saturation: stained tissue is coloured,
glass is grey-white) with every morphology size given in micrometres, so the same parameters hold at
any thumbnail resolution and for any scanner. Marker ink (blue, green, red) is saturated too and would
pass as tissue; it is detected by hue and removed with a margin before the morphology.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TissueParams:
    """Tissue-mask settings; sizes are micrometres (or square micrometres), never pixels.

    Attributes:
        min_saturation: floor under the Otsu saturation threshold, so a slide that is nearly all
            glass does not turn its faint noise into "tissue".
        max_brightness: pixels brighter than this (HSV value, 0..1) with low saturation are glass.
        min_brightness: pixels darker than this are black (scanner borders, folds filled with dirt),
            never tissue.
        closing_um: radius of the closing that joins nearby tissue fragments.
        opening_um: radius of the opening that removes dust and thin threads.
        min_object_um2: tissue pieces smaller than this are dropped.
        max_hole_um2: holes inside tissue smaller than this are filled (lumen and fat stay open).
        pen_filter: remove blue, green and red marker ink.
        pen_margin_um: ink is widened by this much before removal (its edges are less saturated).
        min_pen_um2: ink-coloured patches smaller than this are not pen strokes (dense nuclei, debris).
    """

    min_saturation: float = 0.05
    max_brightness: float = 0.92
    min_brightness: float = 0.08
    closing_um: float = 40.0
    opening_um: float = 10.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 10_000.0
    pen_filter: bool = True
    pen_margin_um: float = 30.0
    min_pen_um2: float = 5_000.0


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask at ``mpp`` um/px, pixel (r, c) covering level-0 (c, r) * mpp / slide mpp."""

    mask: np.ndarray
    mpp: float
    pen_fraction: float
    tissue_fraction: float

    def to_png(self, path: Path | str) -> Path:
        """Write the mask as a 1-bit PNG (white = tissue) and return its path."""
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.mask.astype(bool)).convert("1").save(path, format="PNG", optimize=True)
        return path


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1], float32, for uint8 RGB (..., 3)."""
    pixels = rgb[..., :3].astype(np.float32) / 255.0
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    high = pixels.max(axis=-1)
    low = pixels.min(axis=-1)
    spread = high - low
    saturation = np.where(high > 0, spread / np.maximum(high, 1e-6), 0.0).astype(np.float32)
    safe = np.maximum(spread, 1e-6)
    hue = np.where(high == r, ((g - b) / safe) % 6.0,
                   np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    hue = np.where(spread > 0, hue, 0.0).astype(np.float32)
    return hue, saturation, high


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance of the histogram)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 1.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * centres)
    mean_low = mass_low / np.maximum(weight_low, 1)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or red marker ink (bool, same height/width as ``rgb``).

    H&E is pink to purple (hue about 280-350 degrees, moderate saturation); inks sit elsewhere:
    green ink at hue 70-170, blue ink at 190-245 with high saturation, red ink near 0 with very high
    saturation (eosin's pink is less saturated and bluer).
    """
    hue, saturation, value = rgb_to_hsv(rgb)
    green = (hue >= 70) & (hue <= 170) & (saturation > 0.2) & (value > 0.25)
    # Dark blue-grey pixels (dense nuclei, debris) share blue ink's hue; ink is brighter.
    blue = (hue >= 190) & (hue <= 245) & (saturation > 0.4) & (value > 0.45)
    red = ((hue <= 12) | (hue >= 350)) & (saturation > 0.6) & (value > 0.35)
    return green | blue | red


def _dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Dilation by a disk of ``radius_px``, via the Euclidean distance transform (cost independent of radius)."""
    from scipy import ndimage

    if radius_px <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius_px


def _erode(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Erosion by a disk of ``radius_px``; outside the image counts as foreground (edges are not eaten)."""
    from scipy import ndimage

    if radius_px <= 0 or mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(mask) > radius_px


def tissue_mask(thumb: np.ndarray, thumb_mpp: float, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of a slide thumbnail (uint8 RGB at ``thumb_mpp`` um/px).

    Otsu on HSV saturation (floored by ``params.min_saturation``) over pixels that are neither glass nor
    black, minus marker ink, then closing, opening, small-object removal and small-hole filling with
    kernel sizes converted from micrometres at this resolution.
    """
    from scipy import ndimage

    if thumb.ndim != 3 or thumb.shape[2] < 3 or thumb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8 RGB (H, W, 3), got {thumb.dtype} {thumb.shape}")
    if thumb_mpp <= 0:
        raise ValueError(f"thumbnail mpp must be positive, got {thumb_mpp}")
    _, saturation, value = rgb_to_hsv(thumb)
    glass = (value > params.max_brightness) & (saturation < 0.1)
    black = value < params.min_brightness
    pen = pen_mask(thumb) if params.pen_filter else np.zeros(saturation.shape, bool)
    # Ink strokes are wide; isolated ink-coloured specks are stain or debris, not pen.
    pen = _drop_small(pen, params.min_pen_um2 / (thumb_mpp * thumb_mpp))
    if pen.any() and params.pen_margin_um > 0:
        pen = _dilate(pen, params.pen_margin_um / thumb_mpp)
    # Otsu separates glass from tissue, so glass must be in the histogram it splits (without it, Otsu
    # would split pale eosin from hematoxylin instead).
    measured = ~(black | pen)
    threshold = max(params.min_saturation, otsu_threshold(saturation[measured]) if measured.any() else 1.0)
    mask = measured & ~glass & (saturation > threshold)
    if params.closing_um > 0:
        radius = params.closing_um / thumb_mpp
        mask = _erode(_dilate(mask, radius), radius) & ~(pen | black)
    if params.opening_um > 0:
        radius = params.opening_um / thumb_mpp
        mask = _dilate(_erode(mask, radius), radius)
    pixel_area = thumb_mpp * thumb_mpp
    mask = _drop_small(mask, params.min_object_um2 / pixel_area)
    if params.max_hole_um2 > 0:
        holes = ndimage.binary_fill_holes(mask) & ~mask
        mask |= _small_parts(holes, params.max_hole_um2 / pixel_area)
    return TissueMask(mask=mask, mpp=float(thumb_mpp), pen_fraction=float(pen.mean()),
                      tissue_fraction=float(mask.mean()))


def _small_parts(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """Connected parts of ``mask`` smaller than ``max_pixels``."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    small = sizes < max_pixels
    small[0] = False
    return small[labels]


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its connected parts smaller than ``min_pixels``."""
    if min_pixels <= 1:
        return mask
    return mask & ~_small_parts(mask, min_pixels)


def tissue_fraction(mask: TissueMask, origins: np.ndarray, size_level0: float,
                    level0_mpp: float | tuple[float, float]) -> np.ndarray:
    """Fraction (n,) of each square tile (level-0 origin, side ``size_level0`` level-0 px) that is tissue.

    ``level0_mpp`` is the slide's level-0 resolution (one value, or (x, y)); with the mask's own mpp it
    maps level-0 pixels onto mask pixels. Parts of a tile outside the mask count as not tissue. Computed
    from an integral image, so it costs the same for any tile size.
    """
    mpp_x, mpp_y = (level0_mpp, level0_mpp) if np.isscalar(level0_mpp) else level0_mpp
    origins = np.asarray(origins, dtype=np.float64).reshape(-1, 2)
    height, width = mask.mask.shape
    integral = np.zeros((height + 1, width + 1), np.int64)
    integral[1:, 1:] = mask.mask.astype(np.int64).cumsum(0).cumsum(1)
    scale_x, scale_y = mpp_x / mask.mpp, mpp_y / mask.mpp
    # The tile's footprint in whole mask pixels, at least one pixel (a tile may be smaller than a pixel).
    c0 = np.round(origins[:, 0] * scale_x).astype(np.int64)
    r0 = np.round(origins[:, 1] * scale_y).astype(np.int64)
    c1 = np.maximum(np.round((origins[:, 0] + size_level0) * scale_x).astype(np.int64), c0 + 1)
    r1 = np.maximum(np.round((origins[:, 1] + size_level0) * scale_y).astype(np.int64), r0 + 1)
    footprint = (c1 - c0) * (r1 - r0)
    c0, c1 = np.clip(c0, 0, width), np.clip(c1, 0, width)
    r0, r1 = np.clip(r0, 0, height), np.clip(r1, 0, height)
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return inside / footprint


# Variance of the Laplacian (on grey levels 0..255) under which a tissue tile is out of focus. Sharp H&E
# tiles at 0.5 um/px score in the hundreds to thousands; defocused ones fall to tens.
BLUR_THRESHOLD = 40.0


def _grey(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    return (tiles[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))


def laplacian_variance(tiles: np.ndarray) -> np.ndarray:
    """Variance (n,) of the 4-neighbour Laplacian of each tile's grey levels (a focus measure)."""
    grey = _grey(tiles)
    lap = (grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
           - 4.0 * grey[:, 1:-1, 1:-1])
    return lap.reshape(len(lap), -1).var(axis=1)


def is_blurry(tiles: np.ndarray, threshold: float = BLUR_THRESHOLD) -> np.ndarray:
    """Bool (n,): tiles whose variance of the Laplacian is below ``threshold`` (out of focus)."""
    return laplacian_variance(tiles) < threshold


def is_background(tiles: np.ndarray, min_tissue: float = 0.1) -> np.ndarray:
    """Bool (n,): tiles with less than ``min_tissue`` of their pixels tissue-coloured (glass, black, ink only).

    Per pixel: not glass (bright and unsaturated), not black, not marker ink, and saturated above
    :attr:`TissueParams.min_saturation`.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    params = TissueParams()
    flat = tiles.reshape(len(tiles), -1, tiles.shape[-1])
    _, saturation, value = rgb_to_hsv(flat)
    tissue = ((saturation > params.min_saturation) & (value >= params.min_brightness)
              & ~((value > params.max_brightness) & (saturation < 0.1)) & ~pen_mask(flat))
    return tissue.mean(axis=1) < min_tissue

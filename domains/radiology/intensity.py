"""Intensities by modality (CT windows in HU, MR percentiles, radiograph VOI) and resampling to the model grid.

Window and percentile scaling are one clip-and-scale each and resampling is an anti-aliased zoom, so they
are written on numpy/scipy here: MONAI's equivalents (``ScaleIntensityRange``,
``ScaleIntensityRangePercentiles``, ``Resize``) compute the same thing but importing ``monai.transforms``
pulls in torch and takes about 14 s on the 2-core CPU machines ingest runs on (measured), for every
ingest and predict call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from domains.spec import Channel, WindowChannel


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units: ``level`` (centre) and ``width``."""

    level: float
    width: float

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """HU clipped to the window and scaled to [0, 1]."""
        low = self.level - self.width / 2
        return np.clip((hu - low) / self.width, 0.0, 1.0).astype(np.float32)


# Common presets (e.g. the RSNA/radiopaedia conventions: lung W1500/L-600, mediastinum W350/L50,
# soft tissue W400/L40, bone W1800/L400, brain W80/L40).
CT_WINDOWS: dict[str, Window] = {
    "lung": Window(-600.0, 1500.0),
    "mediastinum": Window(50.0, 350.0),
    "soft_tissue": Window(40.0, 400.0),
    "bone": Window(400.0, 1800.0),
    "brain": Window(40.0, 80.0),
}
IMAGE_CHANNEL = "image"
"""The modality-appropriate single view: CT mediastinum window, MR/other percentiles, radiographs VOI."""
CT_DEFAULT_WINDOW = "mediastinum"
MR_PERCENTILES = (1.0, 99.0)
HU_VIEW = "hu"
"""A CT series in Hounsfield units, unwindowed: what a dataset of CT windows stores (the model windows it)."""
AIR_HU = -1024.0
"""The HU the padding around a resampled CT slice takes (air: the bottom of the CT range, as [0, 1] views pad with 0)."""


@dataclass(frozen=True)
class ChannelRecipe:
    """How one model channel is made: a view (``image`` or a CT window) and a slice offset (2.5D)."""

    view: str
    offset: int = 0

    @property
    def name(self) -> str:
        return self.view if self.offset == 0 else f"{self.view}@{self.offset:+d}"


def parse_channels(names: tuple[str, ...] | None) -> tuple[ChannelRecipe, ...]:
    """Parse channel names ``<view>`` or ``<view>@<offset>`` (e.g. ``lung``, ``image@-1``).

    ``view`` is ``image`` or a CT window name (:data:`CT_WINDOWS`). Several windows stack CT windows as
    channels; offsets stack neighbouring slices as channels (2.5D), ``@-1``/``@+1`` being the slices
    before and after along the slice normal (clamped at the ends of a volume; a 2D image is its own
    neighbour). Both combine: ``("lung@-1", "lung", "lung@+1")``. None means ``("image",)``.

    Raises:
        ValueError: an unknown view or a malformed offset.
    """
    if not names:
        return (ChannelRecipe(IMAGE_CHANNEL),)
    recipes = []
    for name in names:
        view, _, offset = name.partition("@")
        if view not in CT_WINDOWS and view not in (IMAGE_CHANNEL, HU_VIEW):
            raise ValueError(f"unknown radiology channel {name!r}: the view must be {IMAGE_CHANNEL!r} or a CT "
                             f"window ({', '.join(CT_WINDOWS)}), optionally with a slice offset like '@-1'")
        try:
            shift = int(offset) if offset else 0
        except ValueError:
            raise ValueError(f"bad slice offset in channel {name!r}: expected e.g. 'image@-1'") from None
        recipes.append(ChannelRecipe(view, shift))
    if len({r.name for r in recipes}) != len(recipes):
        raise ValueError(f"channel names repeat: {names}")
    if any(r.view == HU_VIEW for r in recipes) and any(r.view != HU_VIEW for r in recipes):
        raise ValueError(f"channels {names}: {HU_VIEW!r} (CT in HU) cannot be mixed with windowed views")
    return tuple(recipes)


def stored_recipes(recipes: tuple[ChannelRecipe, ...]) -> tuple[tuple[ChannelRecipe, ...], tuple[WindowChannel, ...] | None]:
    """What a dataset stores for the requested channels, and the windows its model starts with.

    CT windows only (``lung``, ``lung@-1,lung,lung@+1``...): one HU plane per slice offset used
    (``hu``, ``hu@-1``...), and per requested channel a :class:`WindowChannel` on its plane, so the
    windowing is the model's first layer. Anything else (``image``, ``hu``) is stored as asked, no windows:
    the ``image`` view of MR and radiographs is a per-series scaling with no absolute units to window.
    """
    if not recipes or not all(r.view in CT_WINDOWS for r in recipes):
        return recipes, None
    offsets = sorted({r.offset for r in recipes})
    planes = tuple(ChannelRecipe(HU_VIEW, offset) for offset in offsets)
    windows = tuple(WindowChannel(name=r.name, source=offsets.index(r.offset),
                                  low=CT_WINDOWS[r.view].level - CT_WINDOWS[r.view].width / 2,
                                  high=CT_WINDOWS[r.view].level + CT_WINDOWS[r.view].width / 2) for r in recipes)
    return planes, windows


def channels_of(recipes: tuple[ChannelRecipe, ...]) -> tuple[Channel, ...]:
    """The :class:`Channel` records of parsed recipes (no wavelength: these are not spectral)."""
    return tuple(Channel(name=r.name) for r in recipes)


class ChannelMismatch(ValueError):
    """A channel that does not apply to a series (a CT window asked of an MR series)."""


def percentile_scale(volume: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Scale so the ``lower``/``upper`` percentiles of the whole volume map to 0/1, clipped to [0, 1]."""
    low, high = np.percentile(volume, [lower, upper])
    if high - low < 1e-6:
        return np.zeros_like(volume, dtype=np.float32)
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def view_volume(volume: np.ndarray, modality: str, view: str) -> np.ndarray:
    """One view of a (S, H, W) volume in modality units, in [0, 1].

    CT volumes are in HU; radiographs (``CR``/``DX``/``MG``/``RG``/``PX``) were already VOI-transformed
    and inverted by the reader, so their ``image`` view is a plain min-max over the image; other
    modalities get percentile scaling over the whole series, so slices of one volume stay comparable.

    Raises:
        ChannelMismatch: a CT window asked for a non-CT series.
    """
    if view == HU_VIEW:
        if modality != "CT":
            raise ChannelMismatch(f"channel {view!r} is CT in HU but the series is {modality}")
        return np.asarray(volume, dtype=np.float32)
    if view in CT_WINDOWS:
        if modality != "CT":
            raise ChannelMismatch(f"channel {view!r} is a CT window but the series is {modality}")
        return CT_WINDOWS[view].apply(volume)
    if modality == "CT":
        return CT_WINDOWS[CT_DEFAULT_WINDOW].apply(volume)
    if modality in RADIOGRAPH_MODALITIES:
        return percentile_scale(volume, 0.0, 100.0)
    return percentile_scale(volume, *MR_PERCENTILES)


RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "PX", "IO"})


class FieldOfViewError(ValueError):
    """An image whose physical extent is empty or not a number (zero, negative or non-finite spacing or size)."""


def square_layout(height: int, width: int, spacing_yx: tuple[float, float], size: int) -> tuple[int, int, int, int]:
    """Where an ``height`` x ``width`` image lands in the ``size`` square: (out_h, out_w, top, left).

    The longer physical side fills the square; the shorter is centred (the rest is padding).

    Raises:
        FieldOfViewError: the image has no usable field of view (an empty image, or a pixel spacing that is
            zero, negative or not finite, as some exports write for radiographs without calibration).
    """
    if height < 1 or width < 1:
        raise FieldOfViewError(f"the image is empty ({height} x {width} pixels)")
    if not all(math.isfinite(s) and s > 0 for s in spacing_yx):
        raise FieldOfViewError(f"pixel spacing {tuple(spacing_yx)} mm is not positive and finite, so the image has "
                               "no usable field of view")
    extent_y, extent_x = height * spacing_yx[0], width * spacing_yx[1]
    field_of_view = max(extent_y, extent_x)
    if not (math.isfinite(field_of_view) and extent_y > 0 and extent_x > 0):
        raise FieldOfViewError(f"a {height} x {width} image at pixel spacing {tuple(spacing_yx)} mm has no usable "
                               "field of view")
    out_h = min(size, max(1, round(size * extent_y / field_of_view)))
    out_w = min(size, max(1, round(size * extent_x / field_of_view)))
    return out_h, out_w, (size - out_h) // 2, (size - out_w) // 2


def fit_to_square(slices: np.ndarray, spacing_yx: tuple[float, float], size: int, fill: float = 0.0) -> np.ndarray:
    """Resample (S, H, W) slices onto ``size`` x ``size``, keeping the physical aspect ratio.

    The longer physical side fills the square; the shorter is centred and padded with ``fill``: 0, the
    bottom of every [0, 1] view (air/background), or :data:`AIR_HU` for HU. Downsampling is smoothed first (Gaussian, sigma = (f - 1) / 2
    for a reduction by f) so small structures are averaged rather than aliased.
    """
    from scipy import ndimage

    count, height, width = slices.shape
    out_h, out_w, top, left = square_layout(height, width, spacing_yx, size)
    factors = (height / out_h, width / out_w)
    data = slices.astype(np.float32, copy=False)
    sigma = [0.0] + [max(0.0, (f - 1) / 2) for f in factors]
    if any(s > 0 for s in sigma):
        data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
    data = ndimage.zoom(data, (1.0, out_h / height, out_w / width), order=1, mode="nearest", grid_mode=True)
    out = np.full((count, size, size), fill, dtype=np.float32)
    out[:, top:top + data.shape[1], left:left + data.shape[2]] = data[:, :size, :size]
    return out


def fit_labels_to_square(labels: np.ndarray, spacing_yx: tuple[float, float], size: int) -> np.ndarray:
    """Resample (S, H, W) class ids like :func:`fit_to_square` resamples the image, by nearest neighbour.

    Same output size and placement as the image (so a label pixel lies on the image pixel it labels); no
    smoothing; the padding is -1 (ignored by training and metrics). Returns int16.
    """
    from scipy import ndimage

    count, height, width = labels.shape
    out_h, out_w, top, left = square_layout(height, width, spacing_yx, size)
    data = ndimage.zoom(labels.astype(np.int16, copy=False), (1.0, out_h / height, out_w / width), order=0,
                        mode="nearest", grid_mode=True)
    out = np.full((count, size, size), -1, dtype=np.int16)
    out[:, top:top + data.shape[1], left:left + data.shape[2]] = data[:, :size, :size]
    return out


def unfit_from_square(maps: np.ndarray, height: int, width: int, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Undo :func:`fit_to_square` on (S, K, size, size) per-pixel maps: crop the padding, resample to (H, W).

    Linear interpolation of the maps (probabilities), so an argmax afterwards gives smooth class borders
    rather than blocks. Returns (S, K, H, W) float32.
    """
    from scipy import ndimage

    count, k, size, _ = maps.shape
    out_h, out_w, top, left = square_layout(height, width, spacing_yx, size)
    inner = maps[:, :, top:top + out_h, left:left + out_w].astype(np.float32, copy=False)
    data = ndimage.zoom(inner, (1.0, 1.0, height / out_h, width / out_w), order=1, mode="nearest", grid_mode=True)
    if data.shape[2:] != (height, width):  # rounding of the zoomed size: pad by edge or crop to the exact grid
        pad = [(0, 0), (0, 0), (0, max(0, height - data.shape[2])), (0, max(0, width - data.shape[3]))]
        data = np.pad(data, pad, mode="edge")[:, :, :height, :width]
    return data

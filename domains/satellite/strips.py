"""Reading a scene strip by strip: each band windowed at its own resolution and resampled for that strip only.

Memory is set by a strip (a few hundred rows of the working grid), not by the scene: a full Sentinel-2 tile
reads like a demo crop, only for longer.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
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

# GDAL keeps decoded blocks in a cache that defaults to 5% of RAM: left alone, it grows with the scene until
# that cap. A bounded cache that still holds one row of blocks of every band keeps memory flat.
GDAL_CACHE_MB = 192
# Source pixels read around a coarse band's window, so that every bilinear kernel (2 x 2 source pixels)
# inside the strip sees the neighbours a whole-scene resampling would see.
WINDOW_MARGIN = 2


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


def _bilinear_axis(first: int, stop: int, factor: int, source_start: int, source_length: int):
    """Neighbour indices (within the source window) and weights of fine pixels ``first:stop`` along one axis.

    A fine pixel's centre lies at ``(i + 0.5) / factor - 0.5`` in coarse pixel-centre coordinates, the
    convention of GDAL's bilinear warp kernel; neighbours beyond the raster's edge fall back on the edge
    pixel, which is what excluding them and renormalising the weights gives.
    """
    position = (np.arange(first, stop, dtype=np.float64) + 0.5) / factor - 0.5 - source_start
    lower = np.floor(position)
    weight = (position - lower).astype(np.float32)
    lower = lower.astype(np.int64)
    return (np.clip(lower, 0, source_length - 1), np.clip(lower + 1, 0, source_length - 1), weight)


def upsample_bilinear(dn: np.ndarray, valid: np.ndarray, factor: int, source_row: int, top: int, bottom: int,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear upsampling of a coarse band window onto fine rows ``top:bottom`` by an integer ``factor``.

    The same kernel as GDAL's bilinear warp with nodata left out of the weights (the whole-scene reader's
    resampling), computed separably in numpy: for aligned grids this is several times faster than a warp.
    ``dn`` and ``valid`` start at coarse row ``source_row`` and cover the band's full width.

    Returns:
        ``(values, valid)`` on the fine rows: float32, NaN where not valid; valid where the coarse pixel
        under the fine pixel's centre holds data.
    """
    rows_low, rows_high, row_weight = _bilinear_axis(top, bottom, factor, source_row, dn.shape[0])
    cols_low, cols_high, col_weight = _bilinear_axis(0, width, factor, 0, dn.shape[1])
    weight = valid.astype(np.float32)
    values = np.where(valid, dn.astype(np.float32), np.float32(0)).astype(np.float32)
    row_weight = row_weight[:, None]

    # In place: two strip-sized temporaries per axis instead of four (this is the reader's hot loop).
    def along_rows(x: np.ndarray) -> np.ndarray:
        out = x[rows_low]
        out *= 1 - row_weight
        high = x[rows_high]
        high *= row_weight
        out += high
        return out

    def along_cols(x: np.ndarray) -> np.ndarray:
        out = x[:, cols_low]
        out *= 1 - col_weight
        high = x[:, cols_high]
        high *= col_weight
        out += high
        return out

    # Columns first, on the coarse rows: the gathers that widen the rows then copy whole rows, which is cheap.
    if valid.all():
        # Nothing to leave out: plain weights, and every fine pixel is valid.
        out = along_rows(along_cols(values)).astype(np.float32, copy=False)
        return out, np.ones(out.shape, dtype=bool)
    else:
        total = along_rows(along_cols(values))
        norm = along_rows(along_cols(weight))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(norm > 0, total / norm, np.float32(np.nan)).astype(np.float32)
    # Nearest neighbour of the coarse mask: fine pixel i lies in coarse pixel i // factor. GDAL's warper
    # likewise leaves a fine pixel empty when the coarse pixel under its centre is nodata.
    nearest_rows = np.arange(top, bottom) // factor - source_row
    nearest_cols = np.arange(width) // factor
    mask = valid[nearest_rows][:, nearest_cols] & np.isfinite(out)
    out[~mask] = np.nan
    return out, mask


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


class StripReader:
    """Opens a scene's band files once and reads horizontal strips of its working grid.

    Bands on the working grid are read as they are stored. Coarser bands (Sentinel-2 20 m and 60 m) are
    read over the strip's extent plus :data:`WINDOW_MARGIN` source pixels and resampled onto the strip
    as :func:`~domains.satellite.scene.read_scene` resamples a whole scene: bilinear, nodata kept out of
    the weights, nearest neighbour for the valid mask (in numpy for grids coarser by an integer factor,
    see :func:`upsample_bilinear`; by GDAL's warper otherwise). Integer data is rounded back to the source
    dtype after resampling (at most half a digital number from the whole-scene float result).

    Use as a context manager: ``with StripReader(layout) as reader: raw, valid = reader.read_rows(0, 448)``.
    """

    def __init__(self, layout: SceneLayout):
        self.layout = layout
        self.dtype = strip_dtype(layout)
        self.fill = fill_values(layout, self.dtype)
        self._stack = ExitStack()
        self._datasets: dict[Any, Any] = {}

    def __enter__(self) -> StripReader:
        import rasterio

        self._stack.__enter__()
        try:
            self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
            for band in self.layout.bands:
                if band.path not in self._datasets:
                    self._datasets[band.path] = self._stack.enter_context(open_raster(band.path))
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

    def read_rows(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """Read rows ``top:bottom`` of the working grid.

        Returns:
            ``(raw, valid)``: raw (C, rows, W) in :attr:`dtype`, holding :attr:`fill` wherever ``valid``
            (rows, W) is False; ``valid`` is True where every band holds data.

        Raises:
            DomainInputError: a band cannot be decoded in this strip or holds infinite values.
        """
        from rasterio.windows import Window

        height, width = bottom - top, self.layout.shape[1]
        raw = np.empty((len(self.layout.bands), height, width), dtype=self.dtype)
        valid = np.ones((height, width), dtype=bool)
        for i, band in enumerate(self.layout.bands):
            dataset = self._datasets[band.path]
            if self.layout.on_grid(band):
                dn = read_band(dataset, band.index, band.path, Window(0, top, width, height))
                reject_infinite(dn, band.path, band.name)
                valid &= valid_pixels(dn, band.nodata, self.layout.sensor.fill_dn, band.scale)
                raw[i] = dn
                continue
            values, band_valid = self._resample_rows(dataset, band, top, bottom)
            valid &= band_valid
            if np.issubdtype(self.dtype, np.integer):
                # Bilinear weights are convex, so a value stays within the range of the stored dtype.
                np.rint(values, out=values)
            # NaN (invalid) pixels cast to an arbitrary value here; every invalid pixel gets the fill below.
            with np.errstate(invalid="ignore"):
                raw[i] = values
        if not valid.all():
            invalid = ~valid
            for i, fill in enumerate(self.fill):
                raw[i][invalid] = fill
        return raw, valid

    def _resample_rows(self, dataset: Any, band: BandSource, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored values of a coarse band resampled onto rows ``top:bottom`` (float32, NaN where invalid)."""
        from rasterio.warp import Resampling, reproject
        from rasterio.windows import Window

        layout = self.layout
        width = layout.shape[1]
        inverse = ~band.transform
        # The strip's top and bottom edges in the band's own (fractional) rows.
        first = (inverse @ (layout.transform @ (0, top)))[1]
        last = (inverse @ (layout.transform @ (0, bottom)))[1]
        start = max(0, math.floor(min(first, last)) - WINDOW_MARGIN)
        stop = min(band.shape[0], math.ceil(max(first, last)) + WINDOW_MARGIN)
        window = Window(0, start, band.shape[1], stop - start)
        dn = read_band(dataset, band.index, band.path, window)
        reject_infinite(dn, band.path, band.name)
        band_valid = valid_pixels(dn, band.nodata, layout.sensor.fill_dn, band.scale)
        factor = integer_upsampling(band.transform, layout.transform)
        if factor is not None:
            return upsample_bilinear(dn, band_valid, factor, start, top, bottom, width)
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

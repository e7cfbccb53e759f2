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
    exactly as :func:`~domains.satellite.scene.read_scene` resamples a whole scene: bilinear, nodata kept
    out of the weights, nearest neighbour for the valid mask. Integer data is rounded back to the source
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
                info = np.iinfo(self.dtype)
                values = np.clip(np.rint(values, out=values), info.min, info.max, out=values)
            values[~band_valid] = 0
            raw[i] = values
        raw[:, ~valid] = self.fill[:, None]
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

"""Cloud and cloud-shadow masks of a scene: the sensor's own quality layer, or an offline segmentation model.

Two sources, either or both:

* ``qa``: the quality layer the agency ships (Landsat Collection 2 ``QA_PIXEL``, Collection 1 ``BQA``,
  Sentinel-2 L2A ``SCL``, HLS ``Fmask``), its bits or classes decoded below;
* ``model``: ukis-csmask (DLR, Apache-2.0), U-Nets exported to ONNX and shipped inside the wheel, for
  Sentinel-2 and Landsat 5/7/8 top-of-atmosphere (``l1c``) or surface (``l2a``) reflectance; it needs
  blue, green, red and NIR (and uses SWIR 1.6/2.2 um too when present), found here by wavelength.

``auto`` takes the quality layer where the scene has one and the model otherwise. The mask is computed
strip by strip, like everything else a scene is read through; SAR scenes have no clouds to mask.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from domains.spec import DomainInputError

CLOUD_MASK_METHODS = ("none", "qa", "model", "auto")

# Wavelength windows (nm) of the bands ukis-csmask's models take, in its own names.
_CSMASK_BANDS = (
    ("blue", 440.0, 520.0), ("green", 520.0, 600.0), ("red", 630.0, 690.0), ("nir", 770.0, 900.0),
    ("swir16", 1550.0, 1750.0), ("swir22", 2080.0, 2350.0),
)


def decode_quality(kind: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cloud and cloud-shadow pixels of a quality layer.

    * ``landsat-qa-pixel`` (Collection 2, LSDS-1619 table 6-3): cloud = bit 3 (cloud), bit 1 (dilated
      cloud) or bit 2 (cirrus); shadow = bit 4;
    * ``landsat-bqa`` (Collection 1): cloud = bit 4, or high cloud confidence (bits 5-6 = 3), or high cirrus
      confidence (bits 11-12 = 3); shadow = high shadow confidence (bits 7-8 = 3);
    * ``sentinel2-scl`` (L2A scene classification): cloud = classes 8, 9, 10 (medium/high probability,
      thin cirrus); shadow = class 3;
    * ``hls-fmask`` (HLS v2.0): cloud = bit 1, bit 0 (cirrus) or bit 2 (adjacent to cloud/shadow); shadow
      = bit 3. Fill (255) is neither.

    Returns:
        ``(cloud, shadow)`` boolean arrays shaped like ``values``.
    """
    v = values.astype(np.int64)
    if kind == "landsat-qa-pixel":
        return (v & 0b1110) != 0, (v & 0b10000) != 0
    if kind == "landsat-bqa":
        cloud = ((v >> 4) & 1).astype(bool) | (((v >> 5) & 3) == 3) | (((v >> 11) & 3) == 3)
        return cloud, ((v >> 7) & 3) == 3
    if kind == "sentinel2-scl":
        return np.isin(v, (8, 9, 10)), v == 3
    if kind == "hls-fmask":
        data = v != 255
        return data & ((v & 0b111) != 0), data & ((v & 0b1000) != 0)
    raise ValueError(f"unknown quality layer kind {kind!r}")


@dataclass(frozen=True)
class CloudMasker:
    """How one scene's clouds are found: the method chosen and, for the model, which channels feed it.

    Attributes:
        method: ``qa`` or ``model`` (``auto`` and ``none`` are resolved before one is built).
        description: what is recorded with datasets and predictions (quality layer kind, or the model
            package, its version and the model file's own version).
        channel_index: for the model, the index of each of its bands among the scene's channels.
        band_order: for the model, its names of those bands.
        product_level: for the model, ``l1c`` or ``l2a``.
    """

    method: str
    description: str
    channel_index: tuple[int, ...] = ()
    band_order: tuple[str, ...] = ()
    product_level: str = "l1c"


def plan_cloud_mask(method: str, layout: Any) -> CloudMasker | None:
    """Decide how the clouds of the scene ``layout`` (a :class:`~domains.satellite.scene.SceneLayout`) are masked.

    Returns:
        None for ``none`` and for SAR scenes; a :class:`CloudMasker` otherwise.

    Raises:
        DomainInputError: ``qa`` was asked for a scene without a quality layer, or ``model`` for a scene
            lacking the bands it needs; the message names the scene and what is missing.
    """
    if method not in CLOUD_MASK_METHODS:
        raise DomainInputError(layout.path, f"cloud mask {method!r} is unknown; choose one of "
                                            f"{', '.join(CLOUD_MASK_METHODS)}")
    if method == "none" or layout.sensor.kind != "optical":
        return None
    if method in ("qa", "auto") and layout.quality is not None:
        return CloudMasker("qa", f"qa:{layout.quality.kind}")
    if method == "qa":
        raise DomainInputError(layout.path, "cloud mask 'qa' needs the sensor's quality layer (QA_PIXEL, BQA, SCL "
                                            "or Fmask) beside the bands; none was found (use 'model' or 'auto')")
    found: dict[str, int] = {}
    for index, channel in enumerate(layout.channels):
        for name, low, high in _CSMASK_BANDS:
            if channel.wavelength_nm is not None and low <= channel.wavelength_nm <= high and name not in found:
                found[name] = index
    # NIR: the narrow band (Sentinel-2 B8A, 865 nm) is closer to Landsat's NIR the model was also trained on.
    for index, channel in enumerate(layout.channels):
        if channel.wavelength_nm is not None and 855.0 <= channel.wavelength_nm <= 875.0:
            found["nir"] = index
    missing = [name for name in ("blue", "green", "red", "nir") if name not in found]
    if missing:
        raise DomainInputError(layout.path, f"the cloud model needs {', '.join(missing)} band(s) among the bands "
                                            f"read ({', '.join(c.name for c in layout.channels)})")
    if not {"swir16", "swir22"} <= set(found):
        found = {k: v for k, v in found.items() if k in ("blue", "green", "red", "nir")}
    level = "l2a" if layout.level in ("l2a", "l2sr") else "l1c"
    version = _csmask_version()
    bands = "6b" if len(found) == 6 else "4b"
    return CloudMasker("model", f"ukis-csmask {version} model_{bands}_{level}", tuple(found.values()),
                       tuple(found), level)


def _csmask_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ukis-csmask")
    except PackageNotFoundError:
        raise RuntimeError("the cloud model needs the ukis-csmask package (pip install ukis-csmask)") from None


class CloudRows:
    """Cloud/shadow mask of rows of a scene's working grid, strip by strip (use as a context manager)."""

    def __init__(self, layout: Any, masker: CloudMasker, threads: int = 2):
        self.layout = layout
        self.masker = masker
        self.threads = threads
        self._stack = ExitStack()
        self._quality = None
        self.model_version = ""

    def __enter__(self) -> CloudRows:
        if self.masker.method == "qa":
            from domains.satellite.scene import open_raster

            self._quality = self._stack.enter_context(open_raster(self.layout.quality.path))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def rows(self, top: int, bottom: int, physical: np.ndarray | None, valid: np.ndarray) -> np.ndarray:
        """Boolean (rows, W): cloud or shadow on rows ``top:bottom``; ``physical`` (C, rows, W) feeds the model."""
        if self.masker.method == "qa":
            cloud, shadow = decode_quality(self.masker.description.removeprefix("qa:"), self._quality_rows(top, bottom))
        else:
            cloud, shadow = self._model_rows(physical, valid)
        return (cloud | shadow) & valid

    def _quality_rows(self, top: int, bottom: int) -> np.ndarray:
        from rasterio.warp import Resampling, reproject

        from domains.satellite.strips import shifted_transform

        layout, quality = self.layout, self.layout.quality
        out = np.zeros((bottom - top, layout.shape[1]), dtype=np.dtype(self._quality.dtypes[0]))
        if quality.shape == layout.shape and quality.transform.almost_equals(layout.transform):
            from rasterio.windows import Window

            return self._quality.read(1, window=Window(0, top, layout.shape[1], bottom - top))
        # A coarser layer (Sentinel-2 SCL at 20 m under 10 m bands): the class under each pixel's centre.
        reproject(self._quality_band(), out, dst_transform=shifted_transform(layout.transform, 0, top),
                  dst_crs=layout.crs, resampling=Resampling.nearest)
        return out

    def _quality_band(self) -> Any:
        import rasterio

        return rasterio.band(self._quality, 1)

    def _model_rows(self, physical: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import warnings

        from ukis_csmask.mask import CSmask

        image = np.moveaxis(physical[list(self.masker.channel_index)], 0, -1).astype(np.float32)
        image = np.where(valid[..., None], image, 0.0).astype(np.float32)
        # The models were trained at about 30 m: at 10 m they call dark fields shadow and bright roofs cloud
        # (the cloud-free bundled Sentinel-2 crop: 49 % cloud/shadow at 10 m, 0 % at 30 m). Finer grids are
        # averaged to ~30 m and the mask is repeated back.
        factor = max(1, round(30.0 / abs(self.layout.transform.a))) if self.layout.crs.is_projected else 1
        rows, cols = valid.shape
        if factor > 1:
            pad = ((0, -rows % factor), (0, -cols % factor), (0, 0))
            image = np.pad(image, pad, mode="edge")
            image = image.reshape(image.shape[0] // factor, factor, image.shape[1] // factor, factor, -1)
            image = image.mean(axis=(1, 3)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a strip under 256 px is padded by the package
            mask = CSmask(image, list(self.masker.band_order), product_level=self.masker.product_level,
                          invalid_buffer=0, intra_op_num_threads=self.threads, inter_op_num_threads=1,
                          providers=["CPUExecutionProvider"], batch_size=4)
        classes = mask.csm[..., 0]
        if factor > 1:
            classes = np.repeat(np.repeat(classes, factor, axis=0), factor, axis=1)[:rows, :cols]
        self.model_version = mask.model_version
        return classes == 1, classes == 2


def cloud_fraction(cloudy: np.ndarray, valid: np.ndarray) -> float:
    """Share of valid pixels that are cloud or shadow (0 when nothing is valid)."""
    count = int(np.count_nonzero(valid))
    return float(np.count_nonzero(cloudy & valid)) / count if count else 0.0

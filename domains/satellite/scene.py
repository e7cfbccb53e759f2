"""Reading a multispectral scene (a folder of band files or one multi-band GeoTIFF) onto one grid."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from domains.satellite.sensors import (
    IDENTITY,
    BandFile,
    ReflectanceScale,
    Sensor,
    get_scaling,
    get_sensor,
    infer_sensor,
    scan_band_folder,
)
from domains.input_guards import (check_encodable_name, check_readable, check_source_size, describe_failure,
                                  input_errors_named)
from domains.spec import Channel, DomainInputError

if TYPE_CHECKING:
    from affine import Affine
    from rasterio.crs import CRS


@dataclass
class Scene:
    """One scene on one pixel grid, in physical units.

    Attributes:
        data: float32 (C, H, W) reflectance (or the unit of ``scales``); 0 wherever ``valid`` is False.
        valid: bool (H, W), True where every band holds data.
        channels: the bands of ``data``, in order.
        crs: coordinate reference system of the grid.
        transform: affine map from (col, row) to CRS coordinates of the grid.
        sensor: name of the sensor whose band table applies.
        path: the folder or file the scene was read from.
        scales: the scaling applied to each channel.
    """

    data: np.ndarray
    valid: np.ndarray
    channels: tuple[Channel, ...]
    crs: CRS
    transform: Affine
    sensor: str
    path: Path
    scales: tuple[ReflectanceScale, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """Grid shape (H, W)."""
        return self.valid.shape

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units (metres for projected CRSs)."""
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def band_names(self) -> tuple[str, ...]:
        """Names of the channels, in order."""
        return tuple(c.name for c in self.channels)

    @property
    def scaling(self) -> str:
        """Which scaling was applied, e.g. ``sentinel2-l1c: reflectance = DN * 0.0001 + 0``.

        Bands scaled differently (Landsat surface temperature beside reflectance) are listed per band.
        """
        return describe_scales(self.channels, self.scales)

    @property
    def scene_id(self) -> str:
        """Short stable name of the scene (the folder name, or the file name without suffix)."""
        return self.path.name if self.path.is_dir() else self.path.stem

    def select(self, names: tuple[str, ...] | list[str]) -> Scene:
        """Return a scene holding only the bands ``names``, in that order.

        Raises:
            DomainInputError: a band is missing; the message names it and lists the bands present.
        """
        index = _band_index(self.band_names, names, self.path)
        return Scene(
            data=self.data[index],
            valid=self.valid,
            channels=tuple(self.channels[i] for i in index),
            crs=self.crs,
            transform=self.transform,
            sensor=self.sensor,
            path=self.path,
            scales=tuple(self.scales[i] for i in index),
        )


def describe_scales(channels: tuple[Channel, ...], scales: tuple[ReflectanceScale, ...]) -> str:
    """One line naming the scaling of every channel (grouped when several channels share one)."""
    distinct = list(dict.fromkeys(scales))
    if len(distinct) == 1:
        return distinct[0].describe()
    return "; ".join(
        f"{', '.join(c.name for c, s in zip(channels, scales) if s == scale)} -> {scale.describe()}"
        for scale in distinct
    )


def _band_index(present: tuple[str, ...], wanted: tuple[str, ...] | list[str], path: Path) -> list[int]:
    upper = [p.upper() for p in present]
    missing = [w for w in wanted if w.upper() not in upper]
    if missing:
        raise DomainInputError(
            path, f"scene lacks band(s) {', '.join(missing)}; it holds {', '.join(present) or 'no bands'}"
        )
    return [upper.index(w.upper()) for w in wanted]


class _GdalWarnings(logging.Handler):
    """Collects the warnings GDAL reports through rasterio's logger while a file is opened."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# GDAL only warns (and drops the tag) when a TIFF directory is cut short, so a file truncated inside its
# header opens "fine" without georeference; these words in its warnings reveal the truncation.
_DAMAGE_WORDS = ("io error", "read error", "truncat", "corrupt", "cannot read")


@contextmanager
def open_raster(path: Path) -> Iterator[Any]:
    """Open a raster with rasterio, turning unreadable or damaged files into :class:`DomainInputError`."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    check_readable(path, "file")
    check_encodable_name(path)
    logger = logging.getLogger("rasterio._env")
    handler = _GdalWarnings()
    level = logger.level
    if logger.getEffectiveLevel() > logging.WARNING:
        # An application that silences rasterio must not blind this check.
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            # A file without georeference is reported by our own CRS check, with the file name.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(path)
    except RasterioError as error:
        raise DomainInputError(path, f"cannot be opened as a raster (truncated or not a GeoTIFF?): {error}") from None
    except (MemoryError, DomainInputError):
        raise
    except Exception as error:  # e.g. a file name GDAL cannot take: still this file's problem, said plainly
        raise DomainInputError(path, f"cannot be opened as a raster ({describe_failure(error)})") from error
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    damage = [m for m in handler.messages if any(word in m.lower() for word in _DAMAGE_WORDS)]
    if damage:
        dataset.close()
        raise DomainInputError(path, f"is truncated or corrupt: {damage[0]}")
    with dataset:
        yield dataset


def read_band(dataset: Any, index: int, path: Path, window: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    """Read band ``index`` (1-based) of an open dataset, whole or a rasterio ``window`` of it (into ``out`` if given).

    Read failures become :class:`DomainInputError`.
    """
    from rasterio.errors import RasterioError

    try:
        return dataset.read(index, window=window, out=out)
    except RasterioError as error:
        # Truncated files usually open (the header is intact) and fail here, on the missing tiles. rasterio's
        # own text is "Read failed. See previous exception for details.", and that exception (GDAL's reason)
        # is not shown to the user: quote it instead.
        reason = error.__cause__ or error
        raise DomainInputError(path, f"band {index} cannot be read (truncated or corrupt file?): {reason}") from None


def check_raster_header(dataset: Any, path: Path) -> None:
    """Refuse, from the header alone, a raster too large for the configured limit or of a non-real data type."""
    check_source_size(path, (dataset.height, dataset.width, dataset.count), "rows x columns x bands")
    kinds = {np.dtype(d).kind for d in dataset.dtypes}
    if not kinds <= {"u", "i", "f", "b"}:
        raise DomainInputError(path, f"data type {', '.join(sorted(set(dataset.dtypes)))} is not supported: bands "
                                     "must hold real numbers (integer digital numbers or floating-point reflectance)")


def reject_infinite(values: np.ndarray, path: Path, band: str) -> None:
    """Refuse a band (or a window of it) holding infinite values, naming the file and the band."""
    # NaN is a common nodata marker in float rasters; infinity is not, it is a broken value.
    if np.issubdtype(values.dtype, np.floating):
        infinite = int(np.isinf(values).sum())
        if infinite:
            raise DomainInputError(path, f"band {band} holds {infinite} infinite values (NaN marks nodata; infinity "
                                         "is a corrupt value): repair or mask them")


def _require_georeference(dataset: Any, path: Path) -> None:
    if dataset.transform.is_identity and dataset.gcps[0]:
        # Sentinel-1 SAFE measurements (and other level-1 SAR/optical products) are in sensor geometry.
        raise DomainInputError(path, "is in sensor geometry (ground control points, no geotransform): "
                                     "terrain-correct or orthorectify it first (SNAP, gdalwarp)")
    if dataset.crs is None:
        raise DomainInputError(path, "has no CRS: a scene must be georeferenced (set one with gdal_edit.py -a_srs)")
    if dataset.transform.is_identity:
        raise DomainInputError(path, "has no geotransform: a scene must be georeferenced")


def _resolve_scaling(
    scaling: str | ReflectanceScale | None, default: ReflectanceScale, dtype: np.dtype
) -> ReflectanceScale:
    if isinstance(scaling, ReflectanceScale):
        return scaling
    if scaling is not None:
        return get_scaling(scaling)
    # Floating-point rasters were written by a tool that already converted digital numbers; a product whose
    # own scaling is the identity (SAR backscatter, linear or dB) keeps its name, which says the unit.
    if np.issubdtype(dtype, np.floating) and (default.scale, default.offset) != (1.0, 0.0):
        return IDENTITY
    return default


def valid_pixels(dn: np.ndarray, nodata: float | None, fill_dn: int | None, scale: ReflectanceScale) -> np.ndarray:
    """Boolean mask of the pixels of ``dn`` holding data (not the file's nodata, NaN or the sensor's fill DN)."""
    valid = np.ones(dn.shape, dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        if np.issubdtype(dn.dtype, np.integer) and float(nodata).is_integer() and np.can_cast(
                np.min_scalar_type(int(nodata)), dn.dtype):
            # Compared in the band's own integer type: a float nodata would widen every pixel to float64.
            nodata = dn.dtype.type(int(nodata))
        valid &= dn != nodata
    if np.issubdtype(dn.dtype, np.floating):
        valid &= np.isfinite(dn)
    elif fill_dn is not None and scale != IDENTITY:
        # Agencies mark "no data" with DN 0 (Sentinel-2 L1C/L2A, Landsat C2) whether or not the file says so.
        valid &= dn != fill_dn
    return valid


def read_scene(
    path: Path | str,
    channels: tuple[str, ...] | list[str] | None = None,
    sensor: str | None = None,
    scaling: str | ReflectanceScale | None = None,
) -> Scene:
    """Read a scene onto one grid, in reflectance.

    Two layouts are read:

    * a folder of single-band files named after their band (Sentinel-2 ``..._B04.tif``/``..._B8A_20m.jp2``,
      Landsat Collection 2 ``LC09_..._SR_B4.TIF``). Bands are resampled (bilinear) onto the grid of the
      finest band among those read, and ordered by the sensor table unless ``channels`` orders them;
    * one multi-band GeoTIFF/COG. Its bands are named by ``channels`` (which must then list every band of
      the file, in file order) or, when ``channels`` is None, by band descriptions that match the sensor
      table. With descriptions, ``channels`` may also pick a subset in any order.

    Args:
        path: the scene folder or file.
        channels: band names to read, in the order wanted; None reads every band found.
        sensor: name of the band table (``sentinel2``, ``landsat8``, ``landsat9``); None infers it from the
            file or band names.
        scaling: name of a scaling in :data:`~domains.satellite.sensors.SCALINGS` or a
            :class:`ReflectanceScale` applied to every band; None uses the product's own (band folders)
            or the sensor's default for integer data and none for floating-point data.

    Returns:
        The scene; pixels where any band is nodata (file nodata, NaN, or the sensor's fill DN) are
        invalid and hold 0.

    Raises:
        DomainInputError: the path is missing or unreadable, lacks a CRS, its bands disagree in CRS or
            extent, the band count or names do not fit, a band is missing, the layout is unknown, a band
            holds infinite values or a non-real data type, the header declares more values than
            ``VITRAIL_MAX_SOURCE_SAMPLES``, or no pixel is valid. The message names the file and the
            problem; no other exception escapes for a bad file.
    """
    path = check_readable(path, "any")
    with input_errors_named(path):
        return _read_scene(path, channels, sensor, scaling)


def _read_scene(
    path: Path,
    channels: tuple[str, ...] | list[str] | None,
    sensor: str | None,
    scaling: str | ReflectanceScale | None,
) -> Scene:
    layout = inspect_scene(path, channels, sensor, scaling)
    scene = _read_whole_scene(layout)
    if not scene.valid.any():
        raise DomainInputError(path, "holds no valid pixel: every pixel is nodata in at least one band")
    return scene


@dataclass(frozen=True)
class BandSource:
    """Where one channel of a scene is stored and how its digital numbers read.

    Attributes:
        path: the file holding the band.
        index: 1-based band index inside ``path``.
        name: band name as the sensor table spells it.
        transform: the band's own grid (coarser than the scene's for 20 m/60 m bands).
        shape: the band's own (rows, columns).
        nodata: the file's nodata value for this band, or None.
        dtype: data type stored in the file.
        scale: scaling from stored values to physical units.
    """

    path: Path
    index: int
    name: str
    transform: Affine
    shape: tuple[int, int]
    nodata: float | None
    dtype: np.dtype
    scale: ReflectanceScale
    time: int | None = None
    """Index of the band's date in a time series (its channel is then ``t<time>:<name>``); None otherwise."""


@dataclass(frozen=True)
class QualitySource:
    """A scene's quality layer: where it is stored and how its values decode (see ``domains.satellite.clouds``).

    Attributes:
        path: the file.
        kind: the decoding (``landsat-qa-pixel``, ``landsat-bqa``, ``sentinel2-scl``, ``hls-fmask``).
        transform: its own grid (Sentinel-2 SCL is at 20 m beside 10 m bands).
        shape: its own (rows, columns).
    """

    path: Path
    kind: str
    transform: Affine
    shape: tuple[int, int]


@dataclass(frozen=True)
class SceneLayout:
    """A checked scene whose pixels are not read yet: its bands, their files and the working grid.

    Built from headers only (:func:`inspect_scene`), so it costs the same for a full Sentinel-2 tile as for
    a demo crop; pixels are then read whole (:func:`read_scene`) or window by window
    (:mod:`domains.satellite.strips`).
    """

    path: Path
    sensor: Sensor
    bands: tuple[BandSource, ...]
    crs: CRS
    transform: Affine
    shape: tuple[int, int]
    level: str = ""
    """Processing level (``l1c``, ``l2a``, ``l1``, ``l2sr``, ``grd-db``...), "" when the files do not show it."""
    quality: QualitySource | None = None
    """The sensor's own quality layer (QA_PIXEL, BQA, SCL, Fmask), read as a cloud mask, never as a band."""
    dates: tuple[str, ...] = ()
    """For a time series (:mod:`domains.satellite.timeseries`): each date, in time order."""

    @property
    def channels(self) -> tuple[Channel, ...]:
        """The channels, in the order of ``bands`` (``t<i>:<band>`` for the dates of a time series)."""
        channels = []
        for band in self.bands:
            c = self.sensor.channel(band.name)
            channels.append(c if band.time is None else Channel(f"t{band.time}:{c.name}", c.wavelength_nm,
                                                                c.resolution_m))
        return tuple(channels)

    @property
    def scales(self) -> tuple[ReflectanceScale, ...]:
        """Each channel's scaling."""
        return tuple(b.scale for b in self.bands)

    def on_grid(self, band: BandSource) -> bool:
        """Whether ``band`` is stored on the working grid itself (no resampling needed)."""
        return band.shape == self.shape and band.transform.almost_equals(self.transform)


def inspect_scene(
    path: Path,
    channels: tuple[str, ...] | list[str] | None,
    sensor: str | None,
    scaling: str | ReflectanceScale | None,
) -> SceneLayout:
    """Check a scene from its headers and say where each wanted band lies; no pixel is decoded.

    Takes the arguments of :func:`read_scene` and raises the same :class:`DomainInputError`s for
    everything the headers show (layout, band names and count, CRS, extents, data type, size guard).
    """
    try:
        table = get_sensor(sensor) if sensor is not None else None
        if isinstance(scaling, str):
            scaling = get_scaling(scaling)
    except ValueError as error:
        raise DomainInputError(path, str(error)) from None
    wanted = tuple(channels) if channels is not None else None
    if wanted is not None and not wanted:
        raise DomainInputError(path, "channels is empty: name at least one band, or pass None to read all")
    if wanted is not None and len(set(b.upper() for b in wanted)) != len(wanted):
        raise DomainInputError(path, f"channels {', '.join(wanted)} name a band twice")
    from domains.satellite.stac import is_stac_source, scan_stac_item
    from domains.satellite.timeseries import is_time_series, inspect_time_series

    if path.is_dir() and is_time_series(path):
        return inspect_time_series(path, wanted, table, scaling)
    if is_stac_source(path):
        return _inspect_scan(scan_stac_item(path, table), wanted, scaling)
    if path.is_dir():
        return _inspect_band_folder(path, wanted, table, scaling)
    return _inspect_multiband(path, wanted, table, scaling)


def _inspect_band_folder(
    folder: Path, wanted: tuple[str, ...] | None, table: Sensor | None, scaling: str | ReflectanceScale | None
) -> SceneLayout:
    return _inspect_scan(scan_band_folder(folder, table), wanted, scaling)


def _inspect_scan(scan: Any, wanted: tuple[str, ...] | None, scaling: str | ReflectanceScale | None) -> SceneLayout:
    """Check the headers of a scene's band files (a folder's, or a STAC item's assets) and lay out its grid."""
    folder, sensor, files = scan.folder, scan.sensor, scan.bands
    names = tuple(files)
    missing = [b for b in (wanted or ()) if b.upper() not in {n.upper() for n in names}]
    if missing:
        raise DomainInputError(folder, f"lacks band(s) {', '.join(missing)}; it holds {', '.join(names)}")
    selected: list[BandFile] = [files[n] for n in (_canonical(sensor, wanted, folder) if wanted else names)]

    # Headers only: geometry problems are reported before any pixel is decoded.
    headers = []
    for band in selected:
        with open_raster(band.path) as ds:
            check_raster_header(ds, band.path)
            _require_georeference(ds, band.path)
            if ds.count != 1:
                raise DomainInputError(band.path, f"a band file must hold 1 band, this one holds {ds.count}")
            headers.append((band, ds.crs, ds.transform, ds.shape, ds.bounds, ds.nodata, np.dtype(ds.dtypes[0])))
    finest = min(headers, key=lambda h: abs(h[2].a) * abs(h[2].e))
    _, crs, transform, shape, bounds, _, _ = finest
    # Every band is resampled onto the finest grid: that, not each file, is what gets allocated.
    check_source_size(folder, (*shape, len(headers)), "rows x columns x bands on the finest band's grid")
    tolerance = min(abs(transform.a), abs(transform.e)) / 2
    for band, band_crs, _, _, band_bounds, _, _ in headers:
        if band_crs != crs:
            raise DomainInputError(
                band.path, f"CRS {band_crs.to_string()} differs from {finest[0].path.name}'s {crs.to_string()}"
            )
        if max(abs(a - b) for a, b in zip(band_bounds, bounds)) > tolerance:
            raise DomainInputError(
                band.path,
                f"extent {tuple(round(v, 3) for v in band_bounds)} differs from "
                f"{finest[0].path.name}'s {tuple(round(v, 3) for v in bounds)}",
            )
    bands = tuple(
        BandSource(
            path=band.path, index=1, name=band.band, transform=band_transform, shape=tuple(band_shape),
            nodata=nodata, dtype=dtype, scale=_resolve_scaling(scaling, band.scaling, dtype),
        )
        for band, _, band_transform, band_shape, _, nodata, dtype in headers
    )
    quality = None
    if scan.quality is not None:
        quality = _inspect_quality(scan.quality.path, scan.quality.kind, crs, bounds, tolerance, finest[0].path)
    return SceneLayout(path=folder, sensor=sensor, bands=bands, crs=crs, transform=transform, shape=tuple(shape),
                       level=scan.level, quality=quality)


def _inspect_quality(path: Path, kind: str, crs: CRS, bounds: Any, tolerance: float, reference: Path) -> QualitySource:
    """Check a quality layer's header: one integer band covering the bands' extent in their CRS."""
    with open_raster(path) as ds:
        check_raster_header(ds, path)
        _require_georeference(ds, path)
        if ds.count != 1 or not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise DomainInputError(path, f"quality layer ({kind}) must be one integer band; it holds {ds.count} "
                                         f"band(s) of {ds.dtypes[0]}")
        # A mask on another grid would mark the wrong pixels cloudy: refuse it rather than warp it silently.
        if ds.crs != crs:
            raise DomainInputError(path, f"quality layer ({kind}) is on another grid: CRS {ds.crs.to_string()} "
                                         f"differs from {reference.name}'s {crs.to_string()}")
        if max(abs(a - b) for a, b in zip(ds.bounds, bounds)) > max(tolerance, abs(ds.transform.a) / 2):
            raise DomainInputError(
                path, f"quality layer ({kind}) is on another grid: extent {tuple(round(v, 3) for v in ds.bounds)} "
                      f"differs from {reference.name}'s {tuple(round(v, 3) for v in bounds)}")
        return QualitySource(path=path, kind=kind, transform=ds.transform, shape=tuple(ds.shape))


def _read_whole_scene(layout: SceneLayout) -> Scene:
    """Read every band of ``layout`` whole onto its grid, in physical units (prediction's reader)."""
    from rasterio.warp import Resampling, reproject

    shape, transform, crs = layout.shape, layout.transform, layout.crs
    data = np.zeros((len(layout.bands), *shape), dtype=np.float32)
    valid = np.ones(shape, dtype=bool)
    for i, band in enumerate(layout.bands):
        with open_raster(band.path) as ds:
            dn = read_band(ds, band.index, band.path)
        reject_infinite(dn, band.path, band.name)
        band_valid = valid_pixels(dn, band.nodata, layout.sensor.fill_dn, band.scale)
        values = band.scale.apply(dn)
        if layout.on_grid(band):
            data[i] = values
            valid &= band_valid
            continue
        values[~band_valid] = np.nan
        resampled = np.full(shape, np.nan, dtype=np.float32)
        # NaN as source nodata keeps nodata out of the bilinear weights of neighbouring valid pixels.
        reproject(
            values, resampled, src_transform=band.transform, src_crs=crs, dst_transform=transform, dst_crs=crs,
            src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.bilinear,
        )
        mask = np.zeros(shape, dtype=np.uint8)
        # A fine pixel inside a coarse nodata pixel is nodata: nearest neighbour keeps the mask's edges sharp.
        reproject(
            band_valid.astype(np.uint8), mask, src_transform=band.transform, src_crs=crs, dst_transform=transform,
            dst_crs=crs, resampling=Resampling.nearest,
        )
        band_valid = mask.astype(bool) & np.isfinite(resampled)
        data[i] = resampled
        valid &= band_valid
    data[:, ~valid] = 0.0
    return Scene(
        data=data,
        valid=valid,
        channels=layout.channels,
        crs=crs,
        transform=transform,
        sensor=layout.sensor.name,
        path=layout.path,
        scales=layout.scales,
    )


def _canonical(sensor: Sensor, wanted: tuple[str, ...], path: Path) -> tuple[str, ...]:
    """Spell requested band names as the sensor table does (``b8a`` -> ``B8A``)."""
    out = []
    for name in wanted:
        try:
            out.append(sensor.channel(name).name)
        except KeyError as error:
            raise DomainInputError(path, str(error.args[0])) from None
    return tuple(out)


def _inspect_multiband(
    path: Path, wanted: tuple[str, ...] | None, table: Sensor | None, scaling: str | ReflectanceScale | None
) -> SceneLayout:
    with open_raster(path) as ds:
        check_raster_header(ds, path)
        _require_georeference(ds, path)
        descriptions = tuple(d or "" for d in ds.descriptions)
        described = _described_sensor(descriptions, table)
        if wanted is None and described is None:
            raise DomainInputError(
                path,
                f"unknown band layout: the file has {ds.count} bands without band descriptions naming them; "
                "give its band names in file order (vitrail --bands B02,B03,B04,B08 --sensor sentinel2; "
                "bands=[...] in a flow form)",
            )
        if described is not None:
            sensor = described
            file_bands = tuple(sensor.channel(d).name for d in descriptions)
            names = _canonical(sensor, wanted, path) if wanted is not None else file_bands
            indexes = [i + 1 for i in _band_index(file_bands, names, path)]
        else:
            assert wanted is not None
            if len(wanted) != ds.count:
                raise DomainInputError(
                    path,
                    f"wrong band count: channels lists {len(wanted)} bands ({', '.join(wanted)}) "
                    f"but the file holds {ds.count}",
                )
            try:
                sensor = table if table is not None else infer_sensor(wanted)
            except ValueError as error:
                raise DomainInputError(path, str(error)) from None
            names = _canonical(sensor, wanted, path)
            indexes = list(range(1, ds.count + 1))
        dtype = np.dtype(ds.dtypes[0])
        scale = _resolve_scaling(scaling, sensor.scaling, dtype)
        bands = tuple(
            BandSource(
                path=path, index=index, name=name, transform=ds.transform, shape=tuple(ds.shape),
                nodata=ds.nodatavals[index - 1], dtype=np.dtype(ds.dtypes[index - 1]), scale=scale,
            )
            for name, index in zip(names, indexes)
        )
        return SceneLayout(path=path, sensor=sensor, bands=bands, crs=ds.crs, transform=ds.transform,
                           shape=tuple(ds.shape))


def _described_sensor(descriptions: tuple[str, ...], table: Sensor | None) -> Sensor | None:
    """The sensor whose table names every band description, or None if the descriptions name no bands."""
    if not descriptions or not all(descriptions):
        return None
    if table is not None:
        known = {b.upper() for b in table.band_names}
        return table if all(d.upper() in known for d in descriptions) else None
    try:
        return infer_sensor(descriptions)
    except ValueError:
        return None

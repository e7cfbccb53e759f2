"""An imaging-spectrometer capture opened lazily: ENVI cubes and multi-band GeoTIFFs behind one reader.

A :class:`Cube` knows its shape, band wavelengths/FWHMs, bad bands, ignore value and (when it has one)
its map grid, and reads any band subset over a row/column window as float32 radiance. Nothing is
loaded until a window is asked for, so a 1242 x 1280 x 285 capture is processed strip by strip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domains.hyperspectral.envi import EnviHeader, read_envi_header, read_envi_window
from domains.input_guards import check_encodable_name, check_readable, check_source_size, input_errors_named
from domains.spec import DomainInputError

GEOTIFF_SUFFIXES = (".tif", ".tiff")
ENVI_SUFFIXES = (".hdr", ".img", ".dat", ".bsq", ".bil", ".bip", ".raw")


@dataclass(frozen=True)
class Cube:
    """A hyperspectral capture on disk, read by window.

    Attributes:
        path: the file named by the user (header, data file or GeoTIFF).
        kind: ``"envi"`` or ``"geotiff"``.
        shape: (bands, lines, samples).
        wavelengths_nm: band centres, or None when the file does not say.
        fwhm_nm: band widths, or None (then estimated from the band spacing where needed).
        bad_bands: True for bands the file flags as bad (ENVI ``bbl``), or None.
        ignore_value: radiance value marking pixels without data, or None.
        band_names: per-band names (from the file, else ``band_001``...).
        crs: CRS as WKT/EPSG string, or None; transform: GDAL 6-tuple, or None.
    """

    path: Path
    kind: str
    shape: tuple[int, int, int]
    wavelengths_nm: tuple[float, ...] | None
    fwhm_nm: tuple[float, ...] | None
    bad_bands: tuple[bool, ...] | None
    ignore_value: float | None
    band_names: tuple[str, ...]
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    envi: EnviHeader | None = None
    geotiff_dtype: str | None = None

    @property
    def dtype(self) -> np.dtype:
        """The stored sample type (one for all bands; a GeoTIFF with mixed types reports float32)."""
        if self.envi is not None:
            return np.dtype(self.envi.dtype)
        return np.dtype(self.geotiff_dtype or "float32")

    @property
    def bands(self) -> int:
        return self.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    @property
    def cube_id(self) -> str:
        name = self.path.name
        for suffix in (*ENVI_SUFFIXES, *GEOTIFF_SUFFIXES):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    def require_wavelengths(self) -> np.ndarray:
        """Band centres in nm; raise a clear error when the file has none."""
        if self.wavelengths_nm is None:
            where = "header field 'wavelength'" if self.kind == "envi" else "band tags/descriptions"
            raise DomainInputError(self.path, f"has no band wavelengths ({where} missing); they are needed to pick "
                                              "bands by wavelength and to compute the methane product")
        return np.asarray(self.wavelengths_nm, dtype=np.float64)

    def band_widths(self) -> np.ndarray:
        """FWHM per band in nm: from the file, else the spacing to the neighbouring bands."""
        if self.fwhm_nm is not None:
            return np.asarray(self.fwhm_nm, dtype=np.float64)
        centres = self.require_wavelengths()
        if len(centres) == 1:
            return np.array([10.0])
        return np.abs(np.gradient(centres))

    def read(self, bands: np.ndarray | list[int] | None = None, rows: slice = slice(None),
             cols: slice = slice(None)) -> np.ndarray:
        """Read bands x window as float32 (bands, rows, cols), values as stored (no masking)."""
        if self.envi is not None:
            return read_envi_window(self.envi, bands, rows, cols)
        import rasterio
        from rasterio.windows import Window

        r0, r1, _ = rows.indices(self.shape[1])
        c0, c1, _ = cols.indices(self.shape[2])
        indexes = [int(b) + 1 for b in (range(self.bands) if bands is None else bands)]
        with rasterio.open(self.path) as ds:
            return ds.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype="float32")

    def invalid_mask(self, block: np.ndarray, first_row: int = 0, first_col: int = 0) -> np.ndarray:
        """(rows, cols) True where a pixel has no data: the ignore value (or NaN) in any band read.

        Raises:
            DomainInputError: non-finite values where the file declares no ignore value for them.
        """
        finite = np.isfinite(block)
        if not finite.all():
            bad = ~finite.all(axis=0)
            if self.ignore_value is None or not np.isnan(self.ignore_value):
                r, c = np.argwhere(bad)[0]
                raise DomainInputError(
                    self.path,
                    f"{int(bad.sum())} pixels hold NaN/inf values (first at row {first_row + r}, col {first_col + c}) and the file "
                    "declares no NaN 'data ignore value'; mark them with a data ignore value or repair the cube",
                )
        invalid = ~finite.all(axis=0)
        if self.ignore_value is not None and np.isfinite(self.ignore_value):
            invalid |= (block == np.float32(self.ignore_value)).any(axis=0)
        return invalid


_NUMBER = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*(nm|um|µm|micrometers|nanometers)?", re.IGNORECASE)


def _wavelength_from_text(text: str) -> float | None:
    """Pull a wavelength out of a band description such as ``"Band 12 (551.2 nm)"`` or ``"0.5512 um"``."""
    matches = [m for m in _NUMBER.finditer(text or "") if m.group(2)]
    if not matches:
        return None
    value, unit = float(matches[-1].group(1)), matches[-1].group(2).lower()
    return value * 1000.0 if unit in ("um", "µm", "micrometers") else value


def _open_geotiff(path: Path) -> Cube:
    import rasterio

    check_encodable_name(path)
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as error:
        raise DomainInputError(path, f"cannot be opened as a GeoTIFF: {error}") from None
    with ds:
        check_source_size(path, (ds.height, ds.width, ds.count), "lines x samples x bands")
        if not {np.dtype(d).kind for d in ds.dtypes} <= {"u", "i", "f"}:
            raise DomainInputError(path, f"data type {', '.join(sorted(set(ds.dtypes)))} is not supported: a cube "
                                         "must hold real radiance values")
        tags = ds.tags()
        waves: list[float | None] = []
        widths: list[float | None] = []
        for index in range(1, ds.count + 1):
            band_tags = {k.lower(): v for k, v in ds.tags(index).items()}
            value = band_tags.get("wavelength")
            wave = None
            if value is not None:
                try:
                    wave = float(value)
                    unit = band_tags.get("wavelength_units", tags.get("wavelength_units", ""))
                    wave *= 1000.0 if unit.lower() in ("micrometers", "um", "µm") or wave < 30 else 1.0
                except ValueError:
                    wave = None
            if wave is None:
                wave = _wavelength_from_text(ds.descriptions[index - 1] or "")
            waves.append(wave)
            fw = band_tags.get("fwhm")
            widths.append(float(fw) * (1000.0 if float(fw) < 1 else 1.0) if fw else None)
        # Dataset-level lists, as ENVI-style tags ("{400.1, 405.2, ...}") or comma lists.
        if any(w is None for w in waves) and "wavelength" in {k.lower() for k in tags}:
            raw = next(v for k, v in tags.items() if k.lower() == "wavelength")
            values = [float(v) for v in raw.strip("{} ").split(",") if v.strip()]
            if len(values) != ds.count:
                raise DomainInputError(path, f"tag 'wavelength' lists {len(values)} values for {ds.count} bands")
            scale = 1000.0 if max(values) < 30 else 1.0
            waves = [v * scale for v in values]
        if any(w is None for w in waves):
            wavelengths = None
        else:
            wavelengths = tuple(float(w) for w in waves)
        fwhm = tuple(float(w) for w in widths) if all(w is not None for w in widths) else None
        names = tuple(d or f"band_{i + 1:03d}" for i, d in enumerate(ds.descriptions))
        crs = ds.crs.to_string() if ds.crs else None
        transform = tuple(ds.transform)[:6] if ds.crs else None
        nodata = ds.nodata
        return Cube(path=path, kind="geotiff", shape=(ds.count, ds.height, ds.width), wavelengths_nm=wavelengths,
                    fwhm_nm=fwhm, bad_bands=None, ignore_value=nodata, band_names=names, crs=crs, transform=transform,
                    geotiff_dtype=ds.dtypes[0] if len(set(ds.dtypes)) == 1 else None)


def _envi_georeference(header: EnviHeader) -> tuple[str | None, tuple[float, ...] | None]:
    """CRS and transform of an ENVI cube with a ``map info`` field, read through GDAL's ENVI driver."""
    if not header.map_info:
        return None, None
    import warnings

    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(header.data_path) as ds:
                if ds.crs is None:
                    return None, tuple(ds.transform)[:6]
                return ds.crs.to_string(), tuple(ds.transform)[:6]
    except Exception:  # noqa: BLE001 - georeferencing is optional; the pixels are still valid
        return None, None


def open_cube(path: Path | str) -> Cube:
    """Open an ENVI cube (header or data file) or a multi-band GeoTIFF without reading its pixels.

    Raises:
        DomainInputError: the file does not exist or cannot be read, is not a supported cube, its header is
            bad, or it declares more values than ``VITRAIL_MAX_SOURCE_SAMPLES``; no other exception escapes.
    """
    path = check_readable(path, "any")
    with input_errors_named(path):
        return _open_cube(path)


def _open_cube(path: Path) -> Cube:
    if path.is_dir():
        headers = sorted(path.glob("*.hdr"))
        tifs = sorted(p for p in path.iterdir() if p.suffix.lower() in GEOTIFF_SUFFIXES)
        if len(headers) + len(tifs) != 1:
            raise DomainInputError(path, f"a folder source must hold exactly one cube (.hdr or .tif), found "
                                         f"{len(headers)} headers and {len(tifs)} GeoTIFFs")
        path = check_readable((headers or tifs)[0], "file")
    if path.suffix.lower() in GEOTIFF_SUFFIXES:
        return _open_geotiff(path)
    header = read_envi_header(path)
    names = header.band_names or tuple(f"band_{i + 1:03d}" for i in range(header.bands))
    crs, transform = _envi_georeference(header)
    return Cube(path=path, kind="envi", shape=header.shape, wavelengths_nm=header.wavelengths_nm,
                fwhm_nm=header.fwhm_nm, bad_bands=header.bad_bands, ignore_value=header.ignore_value,
                band_names=names, crs=crs, transform=transform, envi=header)


def is_cube_file(path: Path) -> bool:
    """True for a file that names a cube: an ENVI header, or a GeoTIFF (or a link named like one, even broken)."""
    return (path.is_file() or path.is_symlink()) and path.suffix.lower() in (".hdr", *GEOTIFF_SUFFIXES)

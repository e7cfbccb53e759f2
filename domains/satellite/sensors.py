"""Band tables, reflectance scalings and band-file naming of the optical sensors Vitrail reads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domains.spec import Channel, DomainInputError

# Suffixes a single band may be stored in (JPEG 2000 is what ESA ships inside a SAFE product).
BAND_FILE_SUFFIXES = (".tif", ".tiff", ".jp2")


@dataclass(frozen=True)
class ReflectanceScale:
    """Linear map from stored digital numbers to physical units: ``value = dn * scale + offset``.

    Attributes:
        name: short identifier recorded with every scene and dataset.
        scale: multiplicative factor.
        offset: additive term applied after scaling.
        unit: physical unit of the result.
    """

    name: str
    scale: float
    offset: float
    unit: str = "reflectance"

    def apply(self, dn: np.ndarray) -> np.ndarray:
        """Return ``dn`` in physical units as float32."""
        return (dn.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)

    def describe(self) -> str:
        """One line such as ``sentinel2-l1c: reflectance = DN * 0.0001 + 0``."""
        return f"{self.name}: {self.unit} = DN * {self.scale:g} + {self.offset:g}"


# Sentinel-2 L1C/L2A products store reflectance x 10000 (ESA S2 Product Specification, QUANTIFICATION_VALUE).
SENTINEL2_L1C = ReflectanceScale("sentinel2-l1c", 1e-4, 0.0)
# From processing baseline 04.00 (January 2022) ESA adds 1000 to every DN so that dark pixels keep negative
# noise; RADIO_ADD_OFFSET / BOA_ADD_OFFSET = -1000 in the product metadata undoes it.
SENTINEL2_BASELINE_0400 = ReflectanceScale("sentinel2-pb0400", 1e-4, -0.1)
# Landsat Collection 2 Level-2 surface reflectance and surface temperature (USGS LSDS-1619, section 6).
LANDSAT_C2_L2_SR = ReflectanceScale("landsat-c2-l2-sr", 2.75e-5, -0.2)
LANDSAT_C2_L2_ST = ReflectanceScale("landsat-c2-l2-st", 0.00341802, 149.0, unit="kelvin")
# Collection 2 Level-1 ships REFLECTANCE_MULT/ADD = 2e-5/-0.1 for every OLI band in the MTL file; this is
# top-of-atmosphere reflectance without the sun-elevation correction, which needs the MTL file.
LANDSAT_C2_L1_TOA = ReflectanceScale("landsat-c2-l1-toa", 2e-5, -0.1)
# Nominal TIRS radiance rescaling of Collection 2 Level-1 (RADIANCE_MULT/ADD in the MTL file).
LANDSAT_C2_L1_THERMAL = ReflectanceScale("landsat-c2-l1-radiance", 3.342e-4, 0.1, unit="W/(m2 sr um)")
# Data already in physical units (float rasters written by another tool).
IDENTITY = ReflectanceScale("identity", 1.0, 0.0)

SCALINGS: dict[str, ReflectanceScale] = {
    s.name: s
    for s in (
        SENTINEL2_L1C,
        SENTINEL2_BASELINE_0400,
        LANDSAT_C2_L2_SR,
        LANDSAT_C2_L2_ST,
        LANDSAT_C2_L1_TOA,
        LANDSAT_C2_L1_THERMAL,
        IDENTITY,
    )
}


@dataclass(frozen=True)
class Sensor:
    """Band table and storage conventions of one sensor.

    Attributes:
        name: identifier used in requests and provenance (``sentinel2``, ``landsat8``, ...).
        title: human-readable name.
        channels: every band, in the order the agency numbers them.
        scaling: scaling applied to integer data when none is named.
        fill_dn: digital number the agency uses for "no data" even when a file does not say so.
    """

    name: str
    title: str
    channels: tuple[Channel, ...]
    scaling: ReflectanceScale
    fill_dn: int | None = 0

    @property
    def band_names(self) -> tuple[str, ...]:
        """Band names in table order."""
        return tuple(c.name for c in self.channels)

    def channel(self, name: str) -> Channel:
        """Return the channel called ``name`` (case-insensitive); KeyError lists the table."""
        for c in self.channels:
            if c.name.upper() == name.upper():
                return c
        raise KeyError(f"{self.title} has no band {name!r}; bands are {', '.join(self.band_names)}")


# Centre wavelengths of Sentinel-2A (ESA spectral response functions, COPE-GSEG-EOPG-TN-15-0007 v3.0).
SENTINEL2_CHANNELS: tuple[Channel, ...] = (
    Channel("B01", 442.7, 60.0),
    Channel("B02", 492.7, 10.0),
    Channel("B03", 559.8, 10.0),
    Channel("B04", 664.6, 10.0),
    Channel("B05", 704.1, 20.0),
    Channel("B06", 740.5, 20.0),
    Channel("B07", 782.8, 20.0),
    Channel("B08", 832.8, 10.0),
    Channel("B8A", 864.7, 20.0),
    Channel("B09", 945.1, 60.0),
    Channel("B10", 1373.5, 60.0),
    Channel("B11", 1613.7, 20.0),
    Channel("B12", 2202.4, 20.0),
)

# Landsat 8 OLI/TIRS and Landsat 9 OLI-2/TIRS-2 share band positions to within a nanometre or two; the
# thermal bands are sensed at 100 m (USGS delivers them resampled to 30 m).
LANDSAT_OLI_TIRS_CHANNELS: tuple[Channel, ...] = (
    Channel("B1", 443.0, 30.0),
    Channel("B2", 482.0, 30.0),
    Channel("B3", 561.4, 30.0),
    Channel("B4", 654.6, 30.0),
    Channel("B5", 864.7, 30.0),
    Channel("B6", 1608.9, 30.0),
    Channel("B7", 2200.7, 30.0),
    Channel("B8", 589.5, 15.0),
    Channel("B9", 1373.5, 30.0),
    Channel("B10", 10895.0, 100.0),
    Channel("B11", 12005.0, 100.0),
)

SENTINEL2 = Sensor("sentinel2", "Sentinel-2 MSI", SENTINEL2_CHANNELS, SENTINEL2_L1C)
LANDSAT8 = Sensor("landsat8", "Landsat 8 OLI/TIRS", LANDSAT_OLI_TIRS_CHANNELS, LANDSAT_C2_L2_SR)
LANDSAT9 = Sensor("landsat9", "Landsat 9 OLI-2/TIRS-2", LANDSAT_OLI_TIRS_CHANNELS, LANDSAT_C2_L2_SR)

SENSORS: dict[str, Sensor] = {s.name: s for s in (SENTINEL2, LANDSAT8, LANDSAT9)}


def get_sensor(name: str) -> Sensor:
    """Return the sensor called ``name``; the ValueError lists the known sensors."""
    try:
        return SENSORS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown sensor {name!r}; known sensors: {', '.join(SENSORS)}") from None


def get_scaling(name: str) -> ReflectanceScale:
    """Return the reflectance scaling called ``name``; the ValueError lists the known ones."""
    try:
        return SCALINGS[name]
    except KeyError:
        raise ValueError(f"unknown scaling {name!r}; known scalings: {', '.join(SCALINGS)}") from None


def infer_sensor(band_names: tuple[str, ...] | list[str]) -> Sensor:
    """Return the first sensor whose table holds every name in ``band_names``.

    Sentinel-2 is tried first: its zero-padded names (``B04``) never collide with Landsat's (``B4``)
    except for ``B10``/``B11``, where the domain's reference sensor is the better guess.

    Raises:
        ValueError: no sensor has all the bands; the message lists each sensor's table.
    """
    wanted = {n.upper() for n in band_names}
    for sensor in SENSORS.values():
        if wanted <= {b.upper() for b in sensor.band_names}:
            return sensor
    tables = "; ".join(f"{s.name}: {', '.join(s.band_names)}" for s in SENSORS.values())
    raise ValueError(f"bands {', '.join(band_names)} do not all belong to one known sensor ({tables})")


@dataclass(frozen=True)
class BandFile:
    """A file recognised as holding one band of a scene.

    Attributes:
        path: the file.
        sensor: name of the sensor whose table holds the band.
        band: band name as spelled in the sensor table.
        scaling: the scaling its product level implies.
    """

    path: Path
    sensor: str
    band: str
    scaling: ReflectanceScale


# Landsat Collection 2 product identifiers start LXSS: X = C (OLI+TIRS), O (OLI) or T (TIRS); SS = 08/09.
# Level-2 band files carry an SR_ or ST_ prefix: LC09_L2SP_014034_20230101_20230103_02_T1_SR_B4.TIF.
_LANDSAT = re.compile(
    r"^L[COT](?P<mission>0[89])_(?P<level>L[12][A-Z]{2})_.*?_(?:(?P<product>SR|ST)_)?B(?P<band>1[01]|[1-9])$",
    re.IGNORECASE,
)
# Sentinel-2: ..._B04.jp2 (L1C granule), ..._B04_10m.jp2 (L2A granule), S2_T18_B8A.tif (cropped exports).
_SENTINEL2 = re.compile(r"(?:^|[_.-])B(?P<band>0[1-9]|1[0-2]|8A)(?:_(?:10|20|60)m)?$", re.IGNORECASE)

# Layers that sit beside band files in agency products and are not spectral bands.
_AUXILIARY = re.compile(
    r"(?:^|[_.-])(SCL|AOT|WVP|TCI|CLD|SNW|PVI|QA|QA_PIXEL|QA_RADSAT|QA_AEROSOL|SR_QA_AEROSOL|ST_QA|ST_ATRAN|"
    r"ST_CDIST|ST_DRAD|ST_EMIS|ST_EMSD|ST_TRAD|ST_URAD|SAA|SZA|VAA|VZA|MSK_\w+)(?:_(?:10|20|60)m)?$",
    re.IGNORECASE,
)


def recognise_band_file(path: Path | str) -> BandFile | None:
    """Recognise the sensor and band of a single-band file from its name alone.

    Landsat Collection 2 names are tried first, since their ``_B10``/``_B11`` would otherwise look like
    Sentinel-2 bands.

    Args:
        path: a file path; only its name is looked at (the file need not exist).

    Returns:
        The recognised band, or None if the name follows no known convention.
    """
    path = Path(path)
    if path.suffix.lower() not in BAND_FILE_SUFFIXES:
        return None
    stem = path.stem
    match = _LANDSAT.match(stem)
    if match:
        sensor = LANDSAT8 if match["mission"] == "08" else LANDSAT9
        band = f"B{int(match['band'])}"
        product = (match["product"] or "").upper()
        if product == "SR":
            scaling = LANDSAT_C2_L2_SR
        elif product == "ST":
            scaling = LANDSAT_C2_L2_ST
        elif band in ("B10", "B11"):
            scaling = LANDSAT_C2_L1_THERMAL
        else:
            scaling = LANDSAT_C2_L1_TOA
        return BandFile(path, sensor.name, band, scaling)
    match = _SENTINEL2.search(stem)
    if match:
        return BandFile(path, SENTINEL2.name, f"B{match['band'].upper()}", SENTINEL2_L1C)
    return None


def is_auxiliary_layer(path: Path | str) -> bool:
    """True for files that agency products ship beside the bands (masks, angles, quality layers)."""
    return bool(_AUXILIARY.search(Path(path).stem))


def raster_files(folder: Path) -> list[Path]:
    """Visible files in ``folder`` whose suffix is one a band may be stored in, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        # A dangling or looping link named like a band is kept, so that reading it reports it.
        if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
        and p.suffix.lower() in BAND_FILE_SUFFIXES
    )


def recognise_band_folder(folder: Path | str) -> tuple[Sensor, dict[str, BandFile]]:
    """Recognise a folder of single-band files as one scene of one sensor.

    Known auxiliary layers (scene classification, quality bands, angles) are skipped.

    Args:
        folder: the scene folder.

    Returns:
        The sensor and its band files keyed by band name, in the sensor table's order.

    Raises:
        DomainInputError: the folder holds no recognised band file, holds rasters whose names follow no
            known convention, mixes sensors, or holds two files for one band. The message names the
            folder and lists what was found.
    """
    folder = Path(folder)
    files = raster_files(folder)
    recognised: list[BandFile] = []
    unknown: list[str] = []
    for path in files:
        band = recognise_band_file(path)
        if band is not None:
            recognised.append(band)
        elif not is_auxiliary_layer(path):
            unknown.append(path.name)
    found = ", ".join(p.name for p in files) or "no raster files"
    if not recognised:
        raise DomainInputError(
            folder,
            "unknown band layout: no file is named like a Sentinel-2 band (..._B04.tif, ..._B8A_20m.jp2) "
            f"or a Landsat Collection 2 band (LC09_..._SR_B4.TIF); found: {found}",
        )
    if unknown:
        raise DomainInputError(
            folder, f"unknown band layout: files {', '.join(unknown)} are not recognised band files; found: {found}"
        )
    sensors = sorted({b.sensor for b in recognised})
    if len(sensors) > 1:
        raise DomainInputError(folder, f"mixes bands of several sensors ({', '.join(sensors)}); found: {found}")
    sensor = SENSORS[sensors[0]]
    by_band: dict[str, BandFile] = {}
    for band in recognised:
        if band.band in by_band:
            raise DomainInputError(
                folder, f"band {band.band} is stored twice ({by_band[band.band].path.name}, {band.path.name})"
            )
        by_band[band.band] = band
    ordered = {name: by_band[name] for name in sensor.band_names if name in by_band}
    return sensor, ordered


def is_band_folder(folder: Path | str) -> bool:
    """True if ``folder`` is a directory holding at least one recognised band file."""
    folder = Path(folder)
    return folder.is_dir() and any(recognise_band_file(p) is not None for p in raster_files(folder))

"""Band tables, reflectance scalings, processing levels and band-file naming of the sensors Vitrail reads."""

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
# Collection 1 surface reflectance (USGS ESPA ``sr_band`` files) stores reflectance x 10000.
LANDSAT_C1_L2_SR = ReflectanceScale("landsat-c1-l2-sr", 1e-4, 0.0)
# Level-1 digital numbers kept as they are: Collection 1 and Thematic Mapper/ETM+ rescaling differs per band
# and scene, and is only known from the scene's MTL file (read when it lies beside the bands).
LANDSAT_L1_DN = ReflectanceScale("landsat-l1-dn", 1.0, 0.0, unit="DN")
# HLS v2.0 L30/S30 surface reflectance: int16 reflectance x 10000, fill -9999 (HLS v2.0 User Guide, table 4).
HLS_SR = ReflectanceScale("hls-sr", 1e-4, 0.0)
# Sentinel-1 GRD backscatter exported as float sigma0 (linear power) or in decibels: already physical.
SAR_LINEAR = ReflectanceScale("sar-linear", 1.0, 0.0, unit="sigma0 (linear)")
SAR_DB = ReflectanceScale("sar-db", 1.0, 0.0, unit="sigma0 (dB)")

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
        LANDSAT_C1_L2_SR,
        LANDSAT_L1_DN,
        HLS_SR,
        SAR_LINEAR,
        SAR_DB,
    )
}



# Sensor kinds: optical sensors go through cloud masking, SAR does not (clouds are transparent to C-band).
SensorKind = str


@dataclass(frozen=True)
class Sensor:
    """Band table and storage conventions of one sensor.

    Attributes:
        name: identifier used in requests and provenance (``sentinel2``, ``landsat8``, ...).
        title: human-readable name.
        channels: every band, in the order the agency numbers them.
        scaling: scaling applied to integer data when none is named.
        fill_dn: digital number the agency uses for "no data" even when a file does not say so.
        kind: ``optical`` or ``sar``.
        levels: the processing levels Vitrail tells apart for this sensor (recorded with datasets and models,
            and compared by predict: a model trained on surface reflectance is refused top-of-atmosphere data).
    """

    name: str
    title: str
    channels: tuple[Channel, ...]
    scaling: ReflectanceScale
    fill_dn: int | None = 0
    kind: SensorKind = "optical"
    levels: tuple[str, ...] = ()

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
# Landsat 4/5 Thematic Mapper (USGS Landsat 4-5 TM handbook): thermal B6 sensed at 120 m, delivered at 30 m.
LANDSAT_TM_CHANNELS: tuple[Channel, ...] = (
    Channel("B1", 485.0, 30.0),
    Channel("B2", 560.0, 30.0),
    Channel("B3", 660.0, 30.0),
    Channel("B4", 830.0, 30.0),
    Channel("B5", 1650.0, 30.0),
    Channel("B6", 11450.0, 120.0),
    Channel("B7", 2215.0, 30.0),
)
# Landsat 7 ETM+: TM's bands plus a 15 m panchromatic B8; thermal B6 at 60 m (low gain ``B6_VCID_1`` is read).
LANDSAT_ETM_CHANNELS: tuple[Channel, ...] = (
    Channel("B1", 477.0, 30.0),
    Channel("B2", 560.0, 30.0),
    Channel("B3", 661.0, 30.0),
    Channel("B4", 835.0, 30.0),
    Channel("B5", 1648.0, 30.0),
    Channel("B6", 11335.0, 60.0),
    Channel("B7", 2220.0, 30.0),
    Channel("B8", 710.0, 15.0),
)
# NASA HLS v2.0 as Prithvi-EO takes it (names as in tasks.backbone_catalog.HLS_PRITHVI_BANDS): L30 bands
# B02-B07 and S30 bands B02, B03, B04, B8A, B11, B12 harmonised to one 30 m grid.
HLS_CHANNELS: tuple[Channel, ...] = (
    Channel("blue", 490.0, 30.0),
    Channel("green", 560.0, 30.0),
    Channel("red", 665.0, 30.0),
    Channel("nir_narrow", 865.0, 30.0),
    Channel("swir_1", 1610.0, 30.0),
    Channel("swir_2", 2190.0, 30.0),
)
# HLS band codes of each product onto the table above (HLS v2.0 User Guide, table 3).
HLS_PRODUCT_BANDS = {
    "L30": {"B02": "blue", "B03": "green", "B04": "red", "B05": "nir_narrow", "B06": "swir_1", "B07": "swir_2"},
    "S30": {"B02": "blue", "B03": "green", "B04": "red", "B8A": "nir_narrow", "B11": "swir_1", "B12": "swir_2"},
}
# Sentinel-1 C-band SAR (5.405 GHz, wavelength 5.547 cm), GRD IW at 10 m pixel spacing.
SENTINEL1_CHANNELS: tuple[Channel, ...] = tuple(Channel(p, 5.5466e7, 10.0) for p in ("VV", "VH", "HH", "HV"))

SENTINEL2 = Sensor("sentinel2", "Sentinel-2 MSI", SENTINEL2_CHANNELS, SENTINEL2_L1C, levels=("l1c", "l2a"))
LANDSAT8 = Sensor("landsat8", "Landsat 8 OLI/TIRS", LANDSAT_OLI_TIRS_CHANNELS, LANDSAT_C2_L2_SR, levels=("l1", "l2sr"))
LANDSAT9 = Sensor("landsat9", "Landsat 9 OLI-2/TIRS-2", LANDSAT_OLI_TIRS_CHANNELS, LANDSAT_C2_L2_SR,
                  levels=("l1", "l2sr"))
LANDSAT7 = Sensor("landsat7", "Landsat 7 ETM+", LANDSAT_ETM_CHANNELS, LANDSAT_C2_L2_SR, levels=("l1", "l2sr"))
LANDSAT5 = Sensor("landsat5", "Landsat 5 TM", LANDSAT_TM_CHANNELS, LANDSAT_C2_L2_SR, levels=("l1", "l2sr"))
LANDSAT4 = Sensor("landsat4", "Landsat 4 TM", LANDSAT_TM_CHANNELS, LANDSAT_C2_L2_SR, levels=("l1", "l2sr"))
HLS = Sensor("hls", "Harmonized Landsat Sentinel-2 (HLS v2.0 L30/S30)", HLS_CHANNELS, HLS_SR, fill_dn=-9999,
             levels=("l2sr",))
SENTINEL1 = Sensor("sentinel1", "Sentinel-1 C-SAR GRD", SENTINEL1_CHANNELS, SAR_LINEAR, fill_dn=None, kind="sar",
                   levels=("grd-linear", "grd-db"))

# Order matters to infer_sensor: the first table holding every band name wins.
SENSORS: dict[str, Sensor] = {
    s.name: s for s in (SENTINEL2, LANDSAT8, LANDSAT9, LANDSAT7, LANDSAT5, LANDSAT4, HLS, SENTINEL1)
}
_LANDSAT_MISSIONS = {"04": LANDSAT4, "05": LANDSAT5, "07": LANDSAT7, "08": LANDSAT8, "09": LANDSAT9}


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
    except for ``B10``/``B11``, where the domain's reference sensor is the better guess; Landsat 8/9 come
    before the older Landsat tables, whose bands are a subset of the same names.

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
        level: processing level the name shows (``l1c``, ``l2a``, ``l1``, ``l2sr``, ``grd-db``...), "" if none.
        resolution: the resolution suffix of the name in metres (Sentinel-2 L2A ``_20m``), None if none.
    """

    path: Path
    sensor: str
    band: str
    scaling: ReflectanceScale
    level: str = ""
    resolution: int | None = None


@dataclass(frozen=True)
class QualityFile:
    """A sensor's own quality layer, read as a cloud/shadow mask and never as a model input.

    Attributes:
        path: the file.
        sensor: the sensor it belongs to.
        kind: how its values decode: ``landsat-qa-pixel`` (Collection 2 bit flags), ``landsat-bqa``
            (Collection 1 bit flags), ``sentinel2-scl`` (L2A scene classification), ``hls-fmask`` (HLS bits).
        resolution: the resolution suffix of the name in metres, None if none.
    """

    path: Path
    sensor: str
    kind: str
    resolution: int | None = None


# Landsat product identifiers (Collection 1 and 2): LXSS_LLLL_PPPRRR_YYYYMMDD_yyyymmdd_CC_TX_<layer>, X = C
# (OLI+TIRS), O (OLI), T (TIRS or TM), E (ETM+), M (MSS); SS the mission. Level-2 Collection 2 band files carry
# an SR_ or ST_ prefix, Collection 1 ESPA surface reflectance ``sr_band4``.
_LANDSAT_ID = re.compile(
    r"^L[COTEM](?P<mission>0[4-9])_(?P<level>L[12][A-Z]{2})_\d{6}_\d{8}_\d{8}_(?P<collection>0[12])_"
    r"(?:T1|T2|RT)_(?P<layer>.+)$",
    re.IGNORECASE,
)
# A Landsat band at the end of any name: ``_B4``, ``_SR_B4``, ``_ST_B10``, ``_sr_band4``, ``_B6_VCID_1``.
_LANDSAT_BAND = re.compile(
    r"(?:^|[_.-])(?:(?P<product>SR|ST|TOA)_)?(?:BAND|B)(?P<band>1[01]|[1-9])(?P<vcid>_VCID_[12])?$", re.IGNORECASE
)
_LANDSAT_QA = {"QA_PIXEL": "landsat-qa-pixel", "BQA": "landsat-bqa", "PIXEL_QA": "landsat-qa-pixel"}
# Sentinel-2: ..._B04.jp2 (L1C granule), ..._B04_10m.jp2 (L2A granule), S2_T18_B8A.tif (cropped exports).
_SENTINEL2 = re.compile(r"(?:^|[_.-])B(?P<band>0[1-9]|1[0-2]|8A)(?:_(?P<res>10|20|60)m)?$", re.IGNORECASE)
_SENTINEL2_SCL = re.compile(r"(?:^|[_.-])SCL(?:_(?P<res>10|20|60)m)?$", re.IGNORECASE)
# HLS v2.0: HLS.S30.T10SEH.2021001T184741.v2.0.B8A.tif; any name with an L30/S30 token and a band code, or a
# band named as the table names it (``scene_nir_narrow.tif``).
_HLS = re.compile(r"(?:^|[_.-])(?P<product>[LS]30)[_.-](?:.*[_.-])?(?P<code>B\d\d|B8A|FMASK)$", re.IGNORECASE)
_HLS_NAMED = re.compile(r"(?:^|[_.-])(?P<band>BLUE|GREEN|RED|NIR_NARROW|SWIR_1|SWIR_2|FMASK)$", re.IGNORECASE)
# Sentinel-1 GRD: exports ``S1A_IW_GRDH_..._VV.tif`` / ``..._VH_dB.tif``; SAFE measurements
# ``s1a-iw-grd-vv-20230101t...-001.tiff``.
_SENTINEL1 = re.compile(r"(?:^|[_.-])(?P<pol>VV|VH|HH|HV)(?:[_.-](?P<unit>DB|LINEAR|LIN))?$", re.IGNORECASE)
_SENTINEL1_SAFE = re.compile(r"^s1[abcd]-\w+-grd[a-z]?-(?P<pol>vv|vh|hh|hv)-", re.IGNORECASE)

# Layers that sit beside band files in agency products and are not spectral bands.
_AUXILIARY = re.compile(
    r"(?:^|[_.-])(SCL|AOT|WVP|TCI|CLD|SNW|PVI|QA|QA_PIXEL|QA_RADSAT|QA_AEROSOL|SR_QA_AEROSOL|ST_QA|ST_ATRAN|"
    r"ST_CDIST|ST_DRAD|ST_EMIS|ST_EMSD|ST_TRAD|ST_URAD|SAA|SZA|VAA|VZA|BQA|PIXEL_QA|RADSAT_QA|SR_ATMOS_OPACITY|"
    r"SR_CLOUD_QA|B6_VCID_2|FMASK|MSK_\w+)(?:_(?:10|20|60)m)?$",
    re.IGNORECASE,
)


def _landsat_scaling(mission: str, product: str, band: str, collection: str) -> ReflectanceScale:
    """The scaling a Landsat band's product prefix and collection imply (MTL values replace L1 ones when read)."""
    if product == "SR":
        return LANDSAT_C2_L2_SR
    if product == "ST":
        return LANDSAT_C2_L2_ST
    if product == "ESPA_SR":
        return LANDSAT_C1_L2_SR
    # Nominal Collection 2 OLI rescaling; Collection 1 and TM/ETM+ are kept in DN unless an MTL file says more.
    if collection == "02" and mission in ("08", "09"):
        return LANDSAT_C2_L1_THERMAL if band in ("B10", "B11") else LANDSAT_C2_L1_TOA
    return LANDSAT_L1_DN


def _landsat_layer(path: Path, mission: str, layer: str, collection: str, sensor: Sensor) -> BandFile | QualityFile | None:
    upper = layer.upper()
    for token, kind in _LANDSAT_QA.items():
        if upper == token or upper.endswith("_" + token):
            return QualityFile(path, sensor.name, kind)
    match = _LANDSAT_BAND.search(layer)
    if not match or (match["vcid"] and match["vcid"].upper() != "_VCID_1"):
        return None
    band = f"B{int(match['band'])}"
    if band not in sensor.band_names:
        return None
    product = (match["product"] or "").upper()
    if product == "SR" and re.search(r"SR_BAND\d+$", layer, re.IGNORECASE):
        product = "ESPA_SR"  # Collection 1 ESPA surface reflectance (sr_band4): reflectance x 10000
    level = "l2sr" if product in ("SR", "ESPA_SR") else "l2st" if product == "ST" else "l1"
    return BandFile(path, sensor.name, band, _landsat_scaling(mission, product, band, collection), level)


def _recognise_landsat(path: Path, stem: str, table: Sensor | None) -> BandFile | QualityFile | None:
    match = _LANDSAT_ID.match(stem)
    if match:
        sensor = _LANDSAT_MISSIONS[match["mission"]]
        return _landsat_layer(path, match["mission"], match["layer"], match["collection"], sensor)
    if table is None or not table.name.startswith("landsat"):
        return None
    # --sensor given: any prefix, the band suffix decides; the collection is unknown (Level-1 stays in DN).
    mission = table.name.removeprefix("landsat").zfill(2)
    return _landsat_layer(path, mission, stem, "", table)


def _recognise_sentinel2(path: Path, stem: str) -> BandFile | QualityFile | None:
    quality = _SENTINEL2_SCL.search(stem)
    if quality:
        return QualityFile(path, SENTINEL2.name, "sentinel2-scl", int(quality["res"]) if quality["res"] else None)
    match = _SENTINEL2.search(stem)
    if not match:
        return None
    resolution = int(match["res"]) if match["res"] else None
    # Resolution suffixes are what L2A granules use (R10m/..._B04_10m.jp2); L1C granules have none.
    return BandFile(path, SENTINEL2.name, f"B{match['band'].upper()}", SENTINEL2_L1C,
                    "l2a" if resolution else "", resolution)


def _recognise_hls(path: Path, stem: str, named_allowed: bool) -> BandFile | QualityFile | None:
    match = _HLS.search(stem)
    if match:
        code = match["code"].upper()
        if code == "FMASK":
            return QualityFile(path, HLS.name, "hls-fmask")
        band = HLS_PRODUCT_BANDS[match["product"].upper()].get(code)
        return BandFile(path, HLS.name, band, HLS_SR, "l2sr") if band else None
    match = _HLS_NAMED.search(stem) if named_allowed else None
    if match:
        if match["band"].upper() == "FMASK":
            return QualityFile(path, HLS.name, "hls-fmask")
        return BandFile(path, HLS.name, match["band"].lower(), HLS_SR, "l2sr")
    return None


def _recognise_sentinel1(path: Path, stem: str) -> BandFile | None:
    match = _SENTINEL1_SAFE.match(stem)
    if match:
        return BandFile(path, SENTINEL1.name, match["pol"].upper(), SAR_LINEAR, "grd-linear")
    match = _SENTINEL1.search(stem)
    if not match:
        return None
    db = (match["unit"] or "").upper() == "DB"
    return BandFile(path, SENTINEL1.name, match["pol"].upper(), SAR_DB if db else SAR_LINEAR,
                    "grd-db" if db else "grd-linear")


def recognise_layer(path: Path | str, sensor: Sensor | str | None = None) -> BandFile | QualityFile | None:
    """Recognise a band file or a quality layer from its name alone.

    Without ``sensor``, names must follow an agency convention: Landsat product identifiers (Collection 1
    and 2, Level-1 and Level-2, Landsat 4-9), HLS v2.0 (``HLS.L30....B05.tif``), Sentinel-1 (``S1A_..._VV.tif``,
    SAFE measurement files) and Sentinel-2 band suffixes (``_B04``, ``_B8A_20m``). With ``sensor`` given,
    any prefix is accepted and the band suffix decides (``scene_B1.tif``, ``x_SR_B4.TIF``, ``x_BQA.tif``).

    Args:
        path: a file path; only its name is looked at (the file need not exist).
        sensor: the sensor (or its name) the user said the files are from, or None.

    Returns:
        A :class:`BandFile`, a :class:`QualityFile`, or None if the name follows no known convention.
    """
    path = Path(path)
    if path.suffix.lower() not in BAND_FILE_SUFFIXES:
        return None
    table = get_sensor(sensor) if isinstance(sensor, str) else sensor
    stem = path.stem
    if table is None:
        for found in (_recognise_landsat(path, stem, None), _recognise_hls(path, stem, named_allowed=False)):
            if found is not None:
                return found
        if re.match(r"^S1[ABCD]_", stem, re.IGNORECASE) or _SENTINEL1_SAFE.match(stem):
            return _recognise_sentinel1(path, stem)
        return _recognise_sentinel2(path, stem)
    if table.name.startswith("landsat"):
        return _recognise_landsat(path, stem, table)
    if table is HLS:
        return _recognise_hls(path, stem, named_allowed=True)
    if table is SENTINEL1:
        return _recognise_sentinel1(path, stem)
    return _recognise_sentinel2(path, stem)


def recognise_band_file(path: Path | str, sensor: Sensor | str | None = None) -> BandFile | None:
    """Recognise the sensor and band of a single-band file from its name alone (see :func:`recognise_layer`).

    Landsat product identifiers are tried first, since their ``_B10``/``_B11`` would otherwise look like
    Sentinel-2 bands. Quality layers are not bands: None.
    """
    found = recognise_layer(path, sensor)
    return found if isinstance(found, BandFile) else None


def is_auxiliary_layer(path: Path | str) -> bool:
    """True for files that agency products ship beside the bands (masks, angles, quality layers)."""
    return bool(_AUXILIARY.search(Path(path).stem))


def _visible_rasters(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        # A dangling or looping link named like a band is kept, so that reading it reports it.
        if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
        and p.suffix.lower() in BAND_FILE_SUFFIXES
    )


def safe_image_folders(folder: Path) -> list[Path] | None:
    """The folders of a SAFE product holding its images, or None if ``folder`` is not a SAFE product.

    Sentinel-2: ``GRANULE/<granule>/IMG_DATA`` (L1C) and its ``R10m``/``R20m``/``R60m`` (L2A); one granule per
    product. Sentinel-1: ``measurement``.
    """
    granules = folder / "GRANULE"
    if granules.is_dir():
        images = sorted(g / "IMG_DATA" for g in granules.iterdir() if (g / "IMG_DATA").is_dir())
        if len(images) != 1:
            raise DomainInputError(folder, f"a SAFE product must hold exactly one granule with IMG_DATA; found "
                                           f"{len(images)}")
        return [images[0], *sorted(p for p in images[0].iterdir() if p.is_dir() and re.fullmatch(r"R\d+m", p.name))]
    if (folder / "measurement").is_dir() and (folder / "manifest.safe").exists():
        return [folder / "measurement"]
    return None


def raster_files(folder: Path) -> list[Path]:
    """Visible files of a scene folder whose suffix is one a band may be stored in, sorted by name.

    A SAFE product's image folders are searched instead of the folder itself.
    """
    folders = safe_image_folders(folder) or [folder]
    return [p for f in folders for p in _visible_rasters(f)]


@dataclass(frozen=True)
class FolderScan:
    """A folder recognised as one scene of one sensor.

    Attributes:
        folder: the scene folder.
        sensor: the sensor.
        bands: band files keyed by band name, in the sensor table's order.
        quality: the sensor's own quality layer, if the folder holds one.
        level: processing level (one of ``sensor.levels``), "" when the names do not show it.
    """

    folder: Path
    sensor: Sensor
    bands: dict[str, BandFile]
    quality: QualityFile | None
    level: str


# When a product holds several quality layers (SAFE L2A: SCL at 20 m and 60 m), the first kind, finest wins.
_QUALITY_PREFERENCE = ("landsat-qa-pixel", "landsat-bqa", "sentinel2-scl", "hls-fmask")


def scan_band_folder(folder: Path | str, sensor: Sensor | str | None = None) -> FolderScan:
    """Recognise a folder of single-band files (or a SAFE product) as one scene of one sensor.

    Band files are recognised by :func:`recognise_layer` (any prefix when ``sensor`` is given); quality
    layers (QA_PIXEL, BQA, SCL, Fmask) are kept apart as the scene's mask; other known auxiliary layers
    (angles, aerosol, thumbnails) are skipped. Where a band is stored at several resolutions (SAFE L2A),
    the finest is read. A Landsat Level-1 folder holding its ``*_MTL.txt`` is rescaled to top-of-atmosphere
    reflectance with the file's own coefficients and sun elevation.

    Raises:
        DomainInputError: the folder holds no recognised band file, holds rasters whose names follow no
            known convention, mixes sensors, or holds two files for one band. The message names the
            folder and lists what was found.
    """
    folder = Path(folder)
    try:
        table = get_sensor(sensor) if isinstance(sensor, str) else sensor
    except ValueError as error:
        raise DomainInputError(folder, str(error)) from None
    files = raster_files(folder)
    recognised: list[BandFile] = []
    quality: list[QualityFile] = []
    unknown: list[str] = []
    for path in files:
        found = recognise_layer(path, table)
        if isinstance(found, BandFile):
            recognised.append(found)
        elif isinstance(found, QualityFile):
            quality.append(found)
        elif not is_auxiliary_layer(path):
            unknown.append(path.name)
    found_names = ", ".join(p.name for p in files) or "no raster files"
    if not recognised:
        hint = (f"no file ends in a {table.title} band name ({', '.join(table.band_names)})" if table is not None
                else "no file is named like a Sentinel-2 band (..._B04.tif, ..._B8A_20m.jp2), a Landsat band "
                     "(LC09_..._SR_B4.TIF), an HLS band (HLS.L30...B05.tif) or a Sentinel-1 band (S1A_..._VV.tif); "
                     "give --sensor to match files by band suffix whatever their prefix")
        raise DomainInputError(folder, f"unknown band layout: {hint}; found: {found_names}")
    if unknown:
        raise DomainInputError(
            folder, f"unknown band layout: files {', '.join(unknown)} are not recognised band files"
                    f"{'' if table is None else ' of ' + table.title}; found: {found_names}"
                    f"{'; give --sensor to match files by band suffix whatever their prefix' if table is None else ''}"
        )
    sensors = sorted({b.sensor for b in recognised})
    if len(sensors) > 1:
        raise DomainInputError(folder, f"mixes bands of several sensors ({', '.join(sensors)}); found: {found_names}; "
                                       "give --sensor to say which")
    found_sensor = SENSORS[sensors[0]]
    if table is not None and table.name != found_sensor.name:
        raise DomainInputError(folder, f"sensor {table.name} was asked for but the band files are {found_sensor.title}")
    by_band: dict[str, BandFile] = {}
    for band in recognised:
        held = by_band.get(band.band)
        if held is not None:
            if held.resolution is None or band.resolution is None:
                raise DomainInputError(
                    folder, f"band {band.band} is stored twice ({held.path.name}, {band.path.name})"
                )
            if band.resolution > held.resolution:
                continue
        by_band[band.band] = band
    ordered = {name: by_band[name] for name in found_sensor.band_names if name in by_band}
    chosen = min(quality, key=lambda q: (_QUALITY_PREFERENCE.index(q.kind), q.resolution or 0), default=None)
    level = _folder_level(folder, found_sensor, list(ordered.values()), chosen)
    ordered = _with_product_scaling(folder, found_sensor, ordered, level)
    return FolderScan(folder, found_sensor, ordered, chosen, level)


def _folder_level(folder: Path, sensor: Sensor, bands: list[BandFile], quality: QualityFile | None) -> str:
    """The processing level a scene folder's names show, "" when they do not."""
    levels = {b.level for b in bands if b.level}
    if sensor is SENTINEL2:
        text = str(folder.resolve()).upper()
        if "MSIL2A" in text or "l2a" in levels or (quality is not None and quality.kind == "sentinel2-scl"):
            return "l2a"
        return "l1c" if "MSIL1C" in text else ""
    if len(levels) > 1 and sensor.name.startswith("landsat"):
        return "l2sr" if "l2sr" in levels else sorted(levels)[0]
    return next(iter(levels), "")


def _with_product_scaling(folder: Path, sensor: Sensor, bands: dict[str, BandFile], level: str) -> dict[str, BandFile]:
    """Band files with the scaling their product's metadata implies beyond what names show."""
    from dataclasses import replace

    if sensor is SENTINEL2:
        # Processing baseline 04.00 and later add 1000 to every DN (the SAFE name says N0400, N0509...).
        baseline = re.search(r"_N(\d{4})_", str(folder.resolve()))
        if baseline and int(baseline[1]) >= 400:
            return {k: replace(b, scaling=SENTINEL2_BASELINE_0400) for k, b in bands.items()}
        return bands
    if sensor.name.startswith("landsat") and level == "l1":
        mtl = sorted(folder.glob("*_MTL.txt"))
        if mtl:
            return {k: replace(b, scaling=landsat_mtl_scaling(mtl[0], b.band)) for k, b in bands.items()}
    return bands


def read_landsat_mtl(path: Path) -> dict[str, dict[str, str]]:
    """Parse a Landsat ``*_MTL.txt`` (``GROUP = X`` / ``KEY = value`` lines) into values by group."""
    groups: dict[str, dict[str, str]] = {}
    current: list[str] = []
    for line in Path(path).read_text(errors="replace").splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        value = value.strip('"')
        if key == "GROUP":
            current.append(value)
        elif key == "END_GROUP":
            current = current[:-1]
        elif key and value and current:
            groups.setdefault(current[-1], {})[key] = value
    return groups


def landsat_mtl_scaling(path: Path, band: str) -> ReflectanceScale:
    """Top-of-atmosphere reflectance (sun-elevation corrected) or thermal radiance of ``band`` from its MTL file.

    Coefficients come from the Level-1 rescaling group (``LEVEL1_RADIOMETRIC_RESCALING`` in Collection 2,
    ``RADIOMETRIC_RESCALING`` in Collection 1): reflectance = (M * DN + A) / sin(sun elevation) (USGS
    "Using the Landsat Level-1 data product"). A Level-2 MTL also holds Level-2 groups, which are not read.

    Raises:
        DomainInputError: the file lacks the band's coefficients or the sun elevation.
    """
    import math

    groups = read_landsat_mtl(path)
    rescaling = groups.get("LEVEL1_RADIOMETRIC_RESCALING") or groups.get("RADIOMETRIC_RESCALING") or {}
    attributes = groups.get("IMAGE_ATTRIBUTES") or groups.get("PRODUCT_PARAMETERS") or {}
    number = band.removeprefix("B")
    try:
        if f"REFLECTANCE_MULT_BAND_{number}" in rescaling:
            elevation = math.radians(float(attributes["SUN_ELEVATION"]))
            mult = float(rescaling[f"REFLECTANCE_MULT_BAND_{number}"]) / math.sin(elevation)
            add = float(rescaling[f"REFLECTANCE_ADD_BAND_{number}"]) / math.sin(elevation)
            return ReflectanceScale("landsat-l1-toa-mtl", mult, add)
        suffix = "_VCID_1" if f"RADIANCE_MULT_BAND_{number}_VCID_1" in rescaling else ""
        return ReflectanceScale("landsat-l1-radiance-mtl", float(rescaling[f"RADIANCE_MULT_BAND_{number}{suffix}"]),
                                float(rescaling[f"RADIANCE_ADD_BAND_{number}{suffix}"]), unit="W/(m2 sr um)")
    except (KeyError, ValueError) as error:
        raise DomainInputError(path, f"MTL file lacks the rescaling of band {band} ({error})") from None


def recognise_band_folder(folder: Path | str, sensor: Sensor | str | None = None) -> tuple[Sensor, dict[str, BandFile]]:
    """The sensor and band files of a scene folder (:func:`scan_band_folder` without the quality layer)."""
    scan = scan_band_folder(folder, sensor)
    return scan.sensor, scan.bands


def is_band_folder(folder: Path | str) -> bool:
    """True if ``folder`` is a directory holding at least one recognised band file (or is a SAFE product)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    try:
        files = raster_files(folder)
    except DomainInputError:
        return True  # a damaged SAFE product: listed, so that reading it reports what is wrong
    return any(recognise_band_file(p) is not None for p in files)

"""Tiny generated scenes of every supported sensor, under the agencies' own file and folder names.

Each example is a small land-cover scene (the river/fields/town map of :mod:`domains.satellite.examples`)
whose reflectance follows the class spectra at each band's wavelength, stored the way the agency ships it
(digital numbers with the product's scale and offset, its nodata/fill value, its quality layer), so the
readers are tested against the formats users bring, not against a format of our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domains.satellite.examples import EXAMPLE_CRS, EXAMPLE_ORIGIN, example_class_map
from domains.satellite.sensors import (
    HLS_PRODUCT_BANDS,
    HLS_SR,
    LANDSAT_C1_L2_SR,
    LANDSAT_C2_L1_THERMAL,
    LANDSAT_C2_L1_TOA,
    LANDSAT_C2_L2_SR,
    LANDSAT_C2_L2_ST,
    SENSORS,
    SENTINEL2_BASELINE_0400,
    SENTINEL2_L1C,
    ReflectanceScale,
)

# Reflectance of water, vegetation and bare/built land at a few wavelengths (nm), interpolated in between:
# water dark beyond the red edge, vegetation bright on the NIR plateau, bare land rising towards SWIR.
_WAVELENGTHS = np.array([443.0, 490.0, 560.0, 665.0, 705.0, 740.0, 783.0, 842.0, 865.0, 945.0, 1375.0, 1610.0, 2190.0])
_REFLECTANCE = np.array([
    [0.130, 0.110, 0.095, 0.065, 0.055, 0.045, 0.040, 0.035, 0.032, 0.012, 0.001, 0.018, 0.012],
    [0.125, 0.095, 0.085, 0.055, 0.105, 0.250, 0.300, 0.330, 0.340, 0.095, 0.0015, 0.180, 0.090],
    [0.150, 0.140, 0.150, 0.170, 0.190, 0.210, 0.220, 0.240, 0.250, 0.075, 0.002, 0.290, 0.250],
])
# Brightness temperature (K) of each class for thermal bands, and SAR backscatter (sigma0, linear) VV / VH.
_KELVIN = np.array([288.0, 295.0, 305.0])
_SIGMA0 = {"VV": np.array([0.01, 0.12, 0.30]), "VH": np.array([0.002, 0.03, 0.06]),
           "HH": np.array([0.01, 0.12, 0.30]), "HV": np.array([0.002, 0.03, 0.06])}
# Cloud-free quality values: Landsat C2 QA_PIXEL "clear" (bit 6) with low cloud/shadow confidence (bits 8, 10),
# C1 BQA "clear, low confidence" (bits 5, 7, 9, 11), S2 SCL class 4 (vegetation), HLS Fmask 0.
CLEAR_QA = {"landsat-qa-pixel": 21824, "landsat-bqa": 2720, "sentinel2-scl": 4, "hls-fmask": 0}

EXAMPLE_DATE = "20230615"


@dataclass(frozen=True)
class SensorExample:
    """One generated scene: where it is and how it is named.

    Attributes:
        name: example identifier (``landsat8-c2-l2``, ...).
        sensor: the sensor table it belongs to.
        level: its processing level.
        path: the scene folder (or SAFE product) to give as a source.
        files: names of the band and quality files written.
        needs_sensor: True when the names follow no agency convention and ``--sensor`` must be given.
    """

    name: str
    sensor: str
    level: str
    path: Path
    files: tuple[str, ...]
    needs_sensor: bool = False


def _reflectance(classes: np.ndarray, wavelength: float) -> np.ndarray:
    per_class = np.array([np.interp(wavelength, _WAVELENGTHS, row) for row in _REFLECTANCE])
    return per_class[classes]


def _texture(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, size=2)
    return 1.0 + 0.06 * np.sin(2 * np.pi * 2 * cols + phase[0]) * np.cos(2 * np.pi * 1.5 * rows + phase[1])


def write_raster(path: Path, band: np.ndarray, resolution: float, nodata: float | None,
                 crs: str = EXAMPLE_CRS, origin: tuple[float, float] = EXAMPLE_ORIGIN) -> Path:
    """Write one band as a GeoTIFF (or JPEG 2000 for ``.jp2``) on the example grid at ``resolution`` metres."""
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    jp2 = path.suffix.lower() == ".jp2"
    profile = dict(
        driver="JP2OpenJPEG" if jp2 else "GTiff", width=band.shape[1], height=band.shape[0], count=1,
        dtype=band.dtype.name, crs=crs, nodata=nodata,
        transform=Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1]),
        **({"QUALITY": "100", "REVERSIBLE": "YES"} if jp2 else {"compress": "deflate"}),
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(band, 1)
    return path


def _downsample(values: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return values
    h, w = values.shape
    return values.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _digital_numbers(physical: np.ndarray, scale: ReflectanceScale, dtype: str, fill: int) -> np.ndarray:
    info = np.iinfo(dtype)
    dn = np.clip(np.rint((physical - scale.offset) / scale.scale), info.min, info.max).astype(dtype)
    # The agency's fill value never occurs in valid data.
    dn[dn == fill] = fill + 1
    return dn


def _optical_band(classes: np.ndarray, texture: np.ndarray, wavelength: float, factor: int,
                  scale: ReflectanceScale, dtype: str, fill: int, rng: np.random.Generator) -> np.ndarray:
    if wavelength > 8000:  # thermal: brightness temperature, or radiance for Level-1 files
        physical = _KELVIN[classes] * texture ** 0.1
        if scale.unit != "kelvin":
            physical = 0.1 + (physical - 270.0) * 0.2  # a plausible TIRS radiance range (W/(m2 sr um))
    else:
        physical = _reflectance(classes, wavelength) * texture
    physical = _downsample(physical, factor)
    physical = physical + rng.normal(0.0, 0.002, size=physical.shape)
    return _digital_numbers(physical, scale, dtype, fill)


def _landsat_mtl(path: Path, bands: dict[str, ReflectanceScale], collection: str, sun_elevation: float = 90.0) -> Path:
    """A minimal MTL file holding what the reader takes from it (Level-1 rescaling and sun elevation)."""
    group = "LEVEL1_RADIOMETRIC_RESCALING" if collection == "02" else "RADIOMETRIC_RESCALING"
    attributes = "IMAGE_ATTRIBUTES" if collection == "02" else "PRODUCT_PARAMETERS"
    lines = ["GROUP = L1_METADATA_FILE" if collection == "01" else "GROUP = LANDSAT_METADATA_FILE",
             f"  GROUP = {attributes}", f"    SUN_ELEVATION = {sun_elevation:.8f}", f"  END_GROUP = {attributes}",
             f"  GROUP = {group}"]
    for band, scale in bands.items():
        number = band.removeprefix("B")
        kind = "RADIANCE" if scale.unit != "reflectance" else "REFLECTANCE"
        lines += [f"    {kind}_MULT_BAND_{number} = {scale.scale:.4E}", f"    {kind}_ADD_BAND_{number} = {scale.offset:.5f}"]
    lines += [f"  END_GROUP = {group}", "END_GROUP", "END"]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sensor_example(directory: Path | str, name: str, seed: int = 0, size: int = 60,
                         classes: np.ndarray | None = None) -> SensorExample:
    """Write the example scene ``name`` (one of :data:`SENSOR_EXAMPLES`) under ``directory``.

    Args:
        directory: where the scene folder is created.
        name: which example.
        seed: seed of texture and noise.
        size: side of the finest grid in pixels, a multiple of 6.
        classes: the class map to draw (values 0 water, 1 vegetation, 2 bare/built) on the finest grid;
            None draws the river/fields/town map.

    Returns:
        The example's description, its scene path among it.
    """
    if name not in SENSOR_EXAMPLES:
        raise ValueError(f"unknown sensor example {name!r}; known: {', '.join(SENSOR_EXAMPLES)}")
    if size < 12 or size % 6:
        raise ValueError(f"size must be a multiple of 6 and at least 12, got {size}")
    classes = example_class_map(size) if classes is None else np.asarray(classes)
    return SENSOR_EXAMPLES[name](Path(directory), classes, _texture(size, seed), np.random.default_rng(seed))


def _sentinel2(directory: Path, classes, texture, rng, safe: bool) -> SensorExample:
    sensor = SENSORS["sentinel2"]
    size = classes.shape[0]
    written = []
    if safe:
        product = directory / "S2A_MSIL2A_20230615T155821_N0509_R097_T18SUJ_20230615T200000.SAFE"
        image_data = product / "GRANULE" / "L2A_T18SUJ_A041000_20230615T160000" / "IMG_DATA"
        (product / "MTD_MSIL2A.xml").parent.mkdir(parents=True, exist_ok=True)
        (product / "MTD_MSIL2A.xml").write_text("<n1:Level-2A_User_Product/>\n")
        (product / "manifest.safe").write_text("<xfdu:XFDU/>\n")
        scale = SENTINEL2_BASELINE_0400
    else:
        product = directory / "S2B_T18SUJ_20230615_export"
        scale = SENTINEL2_L1C
    for channel in sensor.channels:
        if safe and channel.name == "B10":
            continue  # L2A products drop the cirrus band
        factor = int(channel.resolution_m // 10)
        dn = _optical_band(classes, texture, channel.wavelength_nm, factor, scale, "uint16", 0, rng)
        if safe:
            resolution = int(channel.resolution_m)
            path = image_data / f"R{resolution}m" / f"T18SUJ_20230615T155821_{channel.name}_{resolution}m.jp2"
        else:
            path = product / f"S2B_T18SUJ_20230615_{channel.name}.tif"
        write_raster(path, dn, channel.resolution_m, 0)
        written.append(path.name)
    if safe:
        scl = np.full((size // 2, size // 2), CLEAR_QA["sentinel2-scl"], dtype=np.uint8)
        scl[_downsample(classes.astype(float), 2) < 0.5] = 6  # water
        path = write_raster(image_data / "R20m" / "T18SUJ_20230615T155821_SCL_20m.jp2", scl, 20.0, 0)
        written.append(path.name)
    return SensorExample("sentinel2-l2a-safe" if safe else "sentinel2-l1c-flat", "sentinel2",
                         "l2a" if safe else "", product, tuple(written))


def _landsat(directory: Path, classes, texture, rng, mission: str, level: str, collection: str,
             prefix: str | None = None) -> SensorExample:
    sensor = SENSORS[f"landsat{int(mission)}"]
    code = {"04": "LT", "05": "LT", "07": "LE", "08": "LC", "09": "LC"}[mission]
    product_id = f"{code}{mission}_{'L2SP' if level == 'l2sr' else 'L1TP'}_014034_{EXAMPLE_DATE}_20230620_{collection}_T1"
    folder = directory / (prefix or product_id)
    stem = prefix or product_id
    written = []
    mtl_bands: dict[str, ReflectanceScale] = {}
    for channel in sensor.channels:
        if channel.resolution_m == 15:
            continue  # the panchromatic band is on its own 15 m grid; the examples keep one 30 m grid
        thermal = channel.wavelength_nm > 8000
        if level == "l2sr":
            if thermal and collection == "01":
                continue
            scale = (LANDSAT_C2_L2_ST if thermal else LANDSAT_C2_L2_SR) if collection == "02" else LANDSAT_C1_L2_SR
            product = ("ST_" if thermal else "SR_") if collection == "02" else "sr_band"
        else:
            # Level-1 DN with an MTL file holding each band's own rescaling.
            scale = LANDSAT_C2_L1_THERMAL if thermal else LANDSAT_C2_L1_TOA
            mtl_bands[channel.name] = scale
            product = ""
        band_token = channel.name.removeprefix("B") if product == "sr_band" else channel.name
        suffix = "_VCID_1" if thermal and mission == "07" and level == "l1" else ""
        name = f"{stem}_{product}{band_token}{suffix}.TIF"
        dtype = "int16" if product == "sr_band" else "uint16"
        write_raster(folder / name, _optical_band(classes, texture, channel.wavelength_nm, 1, scale, dtype, 0, rng),
                     30.0, 0)
        written.append(name)
    quality = "landsat-qa-pixel" if collection == "02" else "landsat-bqa"
    qa_name = f"{stem}_{'QA_PIXEL' if collection == '02' else 'BQA'}.TIF"
    write_raster(folder / qa_name, np.full(classes.shape, CLEAR_QA[quality], dtype=np.uint16), 30.0, 1)
    written.append(qa_name)
    if mtl_bands:
        _landsat_mtl(folder / f"{stem}_MTL.txt", mtl_bands, collection)
    return SensorExample("", sensor.name, level, folder, tuple(written), needs_sensor=prefix is not None)


def _hls(directory: Path, classes, texture, rng, product: str) -> SensorExample:
    stem = f"HLS.{product}.T18SUJ.2023166T155821.v2.0"
    folder = directory / stem
    written = []
    wavelengths = {c.name: c.wavelength_nm for c in SENSORS["hls"].channels}
    for code, band in HLS_PRODUCT_BANDS[product].items():
        name = f"{stem}.{code}.tif"
        write_raster(folder / name, _optical_band(classes, texture, wavelengths[band], 1, HLS_SR, "int16", -9999, rng),
                     30.0, -9999)
        written.append(name)
    write_raster(folder / f"{stem}.Fmask.tif", np.zeros(classes.shape, dtype=np.uint8), 30.0, 255)
    written.append(f"{stem}.Fmask.tif")
    return SensorExample(f"hls-{product.lower()}", "hls", "l2sr", folder, tuple(written))


def _sentinel1(directory: Path, classes, texture, rng, db: bool) -> SensorExample:
    stem = "S1A_IW_GRDH_1SDV_20230615T225011_20230615T225036_049000_05E4A1_8F2B"
    folder = directory / (stem + ("_dB" if db else ""))
    written = []
    for pol in ("VV", "VH"):
        sigma0 = _SIGMA0[pol][classes] * texture * rng.gamma(4.0, 0.25, size=classes.shape)  # speckle
        values = 10 * np.log10(np.maximum(sigma0, 1e-5)) if db else sigma0
        name = f"{stem}_{pol}{'_dB' if db else ''}.tif"
        write_raster(folder / name, values.astype(np.float32), 10.0, np.nan)
        written.append(name)
    return SensorExample("sentinel1-grd-db" if db else "sentinel1-grd-linear", "sentinel1",
                         "grd-db" if db else "grd-linear", folder, tuple(written))


def _named(example: SensorExample, name: str) -> SensorExample:
    from dataclasses import replace

    return replace(example, name=name)


SENSOR_EXAMPLES = {
    "sentinel2-l1c-flat": lambda d, c, t, r: _sentinel2(d, c, t, r, safe=False),
    "sentinel2-l2a-safe": lambda d, c, t, r: _sentinel2(d, c, t, r, safe=True),
    "landsat9-c2-l1": lambda d, c, t, r: _named(_landsat(d, c, t, r, "09", "l1", "02"), "landsat9-c2-l1"),
    "landsat8-c2-l2": lambda d, c, t, r: _named(_landsat(d, c, t, r, "08", "l2sr", "02"), "landsat8-c2-l2"),
    "landsat8-c1-l1-any-prefix": lambda d, c, t, r: _named(
        _landsat(d, c, t, r, "08", "l1", "01", prefix="my_landsat_scene"), "landsat8-c1-l1-any-prefix"),
    "landsat8-c1-l2-espa": lambda d, c, t, r: _named(_landsat(d, c, t, r, "08", "l2sr", "01"), "landsat8-c1-l2-espa"),
    "landsat7-c2-l1": lambda d, c, t, r: _named(_landsat(d, c, t, r, "07", "l1", "02"), "landsat7-c2-l1"),
    "landsat5-c1-l1": lambda d, c, t, r: _named(_landsat(d, c, t, r, "05", "l1", "01"), "landsat5-c1-l1"),
    "landsat4-c2-l2": lambda d, c, t, r: _named(_landsat(d, c, t, r, "04", "l2sr", "02"), "landsat4-c2-l2"),
    "hls-l30": lambda d, c, t, r: _hls(d, c, t, r, "L30"),
    "hls-s30": lambda d, c, t, r: _hls(d, c, t, r, "S30"),
    "sentinel1-grd-linear": lambda d, c, t, r: _sentinel1(d, c, t, r, db=False),
    "sentinel1-grd-db": lambda d, c, t, r: _sentinel1(d, c, t, r, db=True),
}
"""Every generated example by name: each supported sensor, level and naming convention at least once."""


# Quality values of a cloud and of a cloud shadow: Landsat C2 QA_PIXEL "high confidence cloud, dilated" and
# "shadow", C1 BQA "cloud, high confidence" and "high shadow confidence", S2 SCL classes 9 and 3, Fmask bits.
CLOUD_QA = {"landsat-qa-pixel": 55052, "landsat-bqa": 2800, "sentinel2-scl": 9, "hls-fmask": 0b10}
SHADOW_QA = {"landsat-qa-pixel": 23888, "landsat-bqa": 3008, "sentinel2-scl": 3, "hls-fmask": 0b1000}


def cloud_map(size: int, seed: int = 0, clouds: int = 3, radius: float = 0.16) -> np.ndarray:
    """A map of round clouds (1) with their shadows (2) cast to the south-east, elsewhere clear (0)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size), dtype=np.uint8)
    centres = rng.uniform(0.15, 0.75, size=(clouds, 2))
    shift = 0.12
    for r, c in centres:
        out[((rows - r - shift) ** 2 + (cols - c - shift) ** 2 < radius ** 2) & (out == 0)] = 2
    for r, c in centres:
        out[(rows - r) ** 2 + (cols - c) ** 2 < radius ** 2] = 1
    return out


def _cloud_reflectance(wavelength: float) -> float:
    # Thick water cloud: bright and flat through the visible and NIR, darker in the SWIR (ice/water absorption).
    if wavelength > 8000:
        return 255.0
    return 0.75 if wavelength < 1000 else 0.5 if wavelength < 1800 else 0.35


def _rewrite_profile(profile: dict) -> dict:
    profile = {k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize", "tiled")}
    if profile["driver"] == "JP2OpenJPEG":
        profile.update(QUALITY="100", REVERSIBLE="YES")
    return profile


def _rewrite(path: Path, values: np.ndarray, profile: dict) -> None:
    """Replace a raster's pixels through a new file: overwriting in place makes GDAL delete the files it
    counts as the dataset's, a Landsat ``*_MTL.txt`` beside the band among them."""
    import os

    import rasterio

    partial = path.with_name(f".{path.name}.partial{path.suffix}")
    with rasterio.open(partial, "w", **_rewrite_profile(profile)) as ds:
        ds.write(values, 1)
    os.replace(partial, path)


def cover_with_clouds(example: SensorExample, clouds: np.ndarray) -> SensorExample:
    """Overwrite an optical example's bands and quality layer with the clouds and shadows of ``clouds``.

    Cloud pixels take a thick cloud's reflectance, shadow pixels keep a third of theirs; the quality
    layer flags both as the agency would.
    """
    import rasterio

    from domains.satellite.sensors import scan_band_folder

    scan = scan_band_folder(example.path, example.sensor if example.needs_sensor else None)
    finest = clouds.shape[0]
    for band in scan.bands.values():
        with rasterio.open(band.path) as ds:
            dn, profile = ds.read(1), ds.profile
        factor = finest // dn.shape[0]
        here = clouds[::factor, ::factor]
        physical = dn.astype(np.float64) * band.scaling.scale + band.scaling.offset
        wavelength = scan.sensor.channel(band.band).wavelength_nm
        physical[here == 1] = _cloud_reflectance(wavelength) if band.scaling.unit != "W/(m2 sr um)" else 1.0
        if wavelength < 8000:  # a shadow is darker, not colder
            physical[here == 2] *= 1 / 3
        info = np.iinfo(dn.dtype)
        out = np.clip(np.rint((physical - band.scaling.offset) / band.scaling.scale), info.min, info.max)
        _rewrite(band.path, out.astype(dn.dtype), profile)
    if scan.quality is not None:
        with rasterio.open(scan.quality.path) as ds:
            qa, profile = ds.read(1), ds.profile
        here = clouds[:: finest // qa.shape[0], :: finest // qa.shape[0]]
        qa[here == 1] = CLOUD_QA[scan.quality.kind]
        qa[here == 2] = SHADOW_QA[scan.quality.kind]
        _rewrite(scan.quality.path, qa, profile)
    return example

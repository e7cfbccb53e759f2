"""Every supported sensor read from files named as its agency names them (generated tiny scenes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.satellite.scene import inspect_scene, read_scene
from domains.satellite.sensor_examples import SENSOR_EXAMPLES, write_sensor_example
from domains.satellite.sensors import landsat_mtl_scaling, recognise_layer
from domains.satellite.tiling import read_samples
from domains.spec import DomainInputError, IngestRequest

# Water pixel of the example map (row 18 of a 36 px grid lies in the river) and its reflectance near 665 nm.
EXPECTED = {
    # name: (sensor, level, quality kind, a red band, expected red reflectance of water)
    "sentinel2-l1c-flat": ("sentinel2", "", None, "B04", 0.065),
    "sentinel2-l2a-safe": ("sentinel2", "l2a", "sentinel2-scl", "B04", 0.065),
    "landsat9-c2-l1": ("landsat9", "l1", "landsat-qa-pixel", "B4", 0.065),
    "landsat8-c2-l2": ("landsat8", "l2sr", "landsat-qa-pixel", "B4", 0.065),
    "landsat8-c1-l1-any-prefix": ("landsat8", "l1", "landsat-bqa", "B4", 0.065),
    "landsat8-c1-l2-espa": ("landsat8", "l2sr", "landsat-bqa", "B4", 0.065),
    "landsat7-c2-l1": ("landsat7", "l1", "landsat-qa-pixel", "B3", 0.065),
    "landsat5-c1-l1": ("landsat5", "l1", "landsat-bqa", "B3", 0.065),
    "landsat4-c2-l2": ("landsat4", "l2sr", "landsat-qa-pixel", "B3", 0.065),
    "hls-l30": ("hls", "l2sr", "hls-fmask", "red", 0.065),
    "hls-s30": ("hls", "l2sr", "hls-fmask", "red", 0.065),
    "sentinel1-grd-linear": ("sentinel1", "grd-linear", None, "VV", None),
    "sentinel1-grd-db": ("sentinel1", "grd-db", None, "VV", None),
}


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sensors")
    return {name: write_sensor_example(root / name, name, size=36) for name in SENSOR_EXAMPLES}


def test_every_example_is_checked() -> None:
    assert set(EXPECTED) == set(SENSOR_EXAMPLES)


@pytest.mark.parametrize("name", list(SENSOR_EXAMPLES))
def test_sensor_example_reads_in_physical_units(examples, name: str) -> None:
    example = examples[name]
    sensor, level, quality, red, water = EXPECTED[name]
    given = example.sensor if example.needs_sensor else None
    layout = inspect_scene(example.path, None, given, None)
    assert (layout.sensor.name, layout.level) == (sensor, level)
    assert (layout.quality.kind if layout.quality else None) == quality
    # Quality layers are masks, never model inputs.
    assert not {"QA_PIXEL", "BQA", "SCL", "FMASK"} & {c.name.upper() for c in layout.channels}
    scene = read_scene(example.path, sensor=given)
    band = scene.select((red,)).data[0]
    if water is not None:
        # The scale and offset of each product (C2 L2 SR: DN * 2.75e-5 - 0.2; S2 baseline 04.00: -1000 DN)
        # bring the water pixel back to the reflectance it was generated with.
        assert band[18, 2] == pytest.approx(water, abs=0.01)
        assert scene.select((red,)).scales[0].unit == "reflectance"
    elif level == "grd-db":
        assert band[18, 2] < -10  # water backscatter in dB
    else:
        assert 0 < band[18, 2] < 0.05
    batches = list(read_samples(IngestRequest(source=example.path, sensor=given, tile_size=12, stride=12,
                                              block_size=12)))
    assert sum(len(b.images) for b in batches) == 9
    assert batches[-1].provenance["sensor"] == sensor
    assert batches[-1].provenance["level"] == level


def test_landsat8_folder_with_arbitrary_prefix_needs_only_the_sensor(examples) -> None:
    """The reported bug: ``..._B1.tif ... _B11.tif, _BQA.tif`` was refused even with --sensor landsat8."""
    folder = examples["landsat8-c1-l1-any-prefix"].path
    names = sorted(p.name for p in folder.glob("*.TIF"))
    assert "my_landsat_scene_B11.TIF" in names and "my_landsat_scene_BQA.TIF" in names
    with pytest.raises(DomainInputError, match="--sensor"):
        inspect_scene(folder, None, None, None)
    layout = inspect_scene(folder, ("B4", "B5"), "landsat8", None)
    assert [b.name for b in layout.bands] == ["B4", "B5"]
    # The MTL beside the bands rescales Level-1 DN to top-of-atmosphere reflectance.
    assert layout.bands[0].scale.name == "landsat-l1-toa-mtl"


def test_asking_for_another_sensor_than_the_names_show_is_refused(examples) -> None:
    with pytest.raises(DomainInputError, match="landsat9 was asked for but the band files are Landsat 8"):
        inspect_scene(examples["landsat8-c2-l2"].path, None, "landsat9", None)


def test_safe_product_reads_each_band_at_its_finest_resolution(examples, tmp_path: Path) -> None:
    import shutil

    product = examples["sentinel2-l2a-safe"].path
    copy = tmp_path / product.name
    shutil.copytree(product, copy)
    r10 = next(copy.glob("GRANULE/*/IMG_DATA/R10m"))
    r20 = r10.parent / "R20m"
    # An L2A product also ships the 10 m bands resampled to 20 m: the 10 m file must win.
    shutil.copy(r10 / "T18SUJ_20230615T155821_B04_10m.jp2", r20 / "T18SUJ_20230615T155821_B04_20m.jp2")
    layout = inspect_scene(copy, ("B04",), None, None)
    assert layout.bands[0].path.parent.name == "R10m"
    assert layout.bands[0].scale.name == "sentinel2-pb0400"


def test_quality_band_on_another_grid_is_a_clear_error(examples, tmp_path: Path) -> None:
    import shutil

    from domains.satellite.sensor_examples import write_raster

    folder = tmp_path / "scene"
    shutil.copytree(examples["landsat8-c2-l2"].path, folder)
    qa = next(folder.glob("*_QA_PIXEL.TIF"))
    write_raster(qa, np.full((36, 36), 21824, dtype=np.uint16), 30.0, 1, origin=(500000.0, 4000000.0))
    with pytest.raises(DomainInputError, match="QA_PIXEL.TIF: quality layer .*is on another grid"):
        inspect_scene(folder, None, None, None)


@pytest.mark.parametrize(
    ("name", "sensor", "found"),
    [
        ("scene_B1.tif", "landsat8", ("landsat8", "B1")),
        ("scene_B11.tif", "landsat8", ("landsat8", "B11")),
        ("scene_BQA.tif", "landsat8", "landsat-bqa"),
        ("x_QA_PIXEL.TIF", "landsat9", "landsat-qa-pixel"),
        ("x_SCL_20m.jp2", "sentinel2", "sentinel2-scl"),
        ("anything.nir_narrow.tif", "hls", ("hls", "nir_narrow")),
        ("HLS.S30.T10SEH.2021001T184741.v2.0.B8A.tif", None, ("hls", "nir_narrow")),
        ("HLS.L30.T10SEH.2021001T184741.v2.0.B05.tif", None, ("hls", "nir_narrow")),
        ("s1a-iw-grd-vh-20230101t000000-20230101t000025-046000-058000-002.tiff", None, ("sentinel1", "VH")),
        ("my_VV_dB.tif", "sentinel1", ("sentinel1", "VV")),
        ("LE07_L1TP_014034_20100101_20200101_02_T1_B6_VCID_2.TIF", None, None),
        ("scene_B8.tif", "landsat5", None),  # Thematic Mapper has no band 8
    ],
)
def test_band_suffix_rules(name: str, sensor: str | None, found) -> None:
    layer = recognise_layer(name, sensor)
    if found is None:
        assert layer is None
    elif isinstance(found, str):
        assert layer.kind == found
    else:
        assert (layer.sensor, layer.band) == found


def test_mtl_rescaling_includes_sun_elevation(tmp_path: Path) -> None:
    mtl = tmp_path / "X_MTL.txt"
    mtl.write_text("GROUP = LANDSAT_METADATA_FILE\n GROUP = IMAGE_ATTRIBUTES\n  SUN_ELEVATION = 30.0\n"
                   " END_GROUP = IMAGE_ATTRIBUTES\n GROUP = LEVEL1_RADIOMETRIC_RESCALING\n"
                   "  REFLECTANCE_MULT_BAND_4 = 2.0000E-05\n  REFLECTANCE_ADD_BAND_4 = -0.100000\n"
                   " END_GROUP = LEVEL1_RADIOMETRIC_RESCALING\n GROUP = LEVEL2_SURFACE_REFLECTANCE_PARAMETERS\n"
                   "  REFLECTANCE_MULT_BAND_4 = 2.75E-05\n END_GROUP = LEVEL2_SURFACE_REFLECTANCE_PARAMETERS\nEND\n")
    scale = landsat_mtl_scaling(mtl, "B4")
    # sin(30 deg) = 0.5: the Level-1 coefficients doubled; the Level-2 group is not read.
    assert (scale.scale, scale.offset) == pytest.approx((4e-5, -0.2))
    with pytest.raises(DomainInputError, match="MTL file lacks the rescaling of band B7"):
        landsat_mtl_scaling(mtl, "B7")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_sentinel1_safe_measurement_in_radar_geometry_is_a_clear_error(tmp_path: Path) -> None:
    import rasterio
    from rasterio.control import GroundControlPoint

    product = tmp_path / "S1A_IW_GRDH_1SDV_20230615T225011_20230615T225036_049000_05E4A1_8F2B.SAFE"
    (product / "measurement").mkdir(parents=True)
    (product / "manifest.safe").write_text("<xfdu:XFDU/>\n")
    gcps = [GroundControlPoint(row, col, -75.0 + col / 100, 37.0 + row / 100) for row in (0, 20) for col in (0, 20)]
    for pol in ("vv", "vh"):
        path = product / "measurement" / f"s1a-iw-grd-{pol}-20230615t225011-20230615t225036-049000-05e4a1-001.tiff"
        with rasterio.open(path, "w", driver="GTiff", width=20, height=20, count=1, dtype="uint16") as ds:
            ds.write(np.ones((1, 20, 20), dtype=np.uint16))
            ds.gcps = (gcps, "EPSG:4326")
    with pytest.raises(DomainInputError, match="sensor geometry .*terrain-correct"):
        inspect_scene(product, None, None, None)

"""Band tables and band-file name recognition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.satellite.sensors import (
    LANDSAT8,
    SENTINEL2,
    SENTINEL2_BASELINE_0400,
    get_sensor,
    infer_sensor,
    recognise_band_file,
    recognise_band_folder,
)
from domains.spec import DomainInputError


def test_sentinel2_table_has_13_bands_in_esa_order() -> None:
    assert SENTINEL2.band_names == (
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"
    )
    resolutions = {c.name: c.resolution_m for c in SENTINEL2.channels}
    assert {n for n, r in resolutions.items() if r == 10} == {"B02", "B03", "B04", "B08"}
    assert {n for n, r in resolutions.items() if r == 60} == {"B01", "B09", "B10"}
    wavelengths = [c.wavelength_nm for c in SENTINEL2.channels]
    assert wavelengths == sorted(wavelengths)


def test_landsat_table() -> None:
    assert LANDSAT8.band_names == tuple(f"B{i}" for i in range(1, 12))
    assert LANDSAT8.channel("B8").resolution_m == 15
    assert LANDSAT8.channel("B10").resolution_m == 100
    assert get_sensor("landsat9").channels == LANDSAT8.channels


@pytest.mark.parametrize(
    ("name", "band"),
    [
        ("S2_T18_B8A.tif", "B8A"),
        ("S2_T18_B01.tif", "B01"),
        ("T18TWL_20230101T154641_B04_10m.jp2", "B04"),
        ("T18TWL_20230101T154641_B8A_20m.jp2", "B8A"),
        ("T18TWL_20230101T154641_B12.jp2", "B12"),
        ("t18twl_b08.TIF", "B08"),
    ],
)
def test_recognises_sentinel2_names(name: str, band: str) -> None:
    found = recognise_band_file(Path("/x") / name)
    assert found is not None
    assert (found.sensor, found.band) == ("sentinel2", band)


@pytest.mark.parametrize(
    ("name", "sensor", "band", "scaling"),
    [
        ("LC09_L1TP_014034_20230101_20230103_02_T1_B4.TIF", "landsat9", "B4", "landsat-c2-l1-toa"),
        ("LC08_L2SP_044034_20210508_20210518_02_T1_SR_B4.TIF", "landsat8", "B4", "landsat-c2-l2-sr"),
        ("LC08_L2SP_044034_20210508_20210518_02_T1_ST_B10.TIF", "landsat8", "B10", "landsat-c2-l2-st"),
        ("LC09_L1TP_014034_20230101_20230103_02_T1_B11.TIF", "landsat9", "B11", "landsat-c2-l1-radiance"),
        ("LC08_L1TP_014034_20230101_20230103_02_T1_B8.TIF", "landsat8", "B8", "landsat-c2-l1-toa"),
    ],
)
def test_recognises_landsat_collection2_names(name: str, sensor: str, band: str, scaling: str) -> None:
    found = recognise_band_file(name)
    assert found is not None
    assert (found.sensor, found.band, found.scaling.name) == (sensor, band, scaling)


@pytest.mark.parametrize(
    "name", ["LC08_L2SP_044034_20210508_20210518_02_T1_QA_PIXEL.TIF", "T18TWL_20230101T154641_SCL_20m.jp2",
             "B4.tif", "scene_B13.tif", "image.tif", "S2_T18_B04.png"]
)
def test_other_names_are_not_bands(name: str) -> None:
    assert recognise_band_file(name) is None


def test_infer_sensor_from_band_names() -> None:
    assert infer_sensor(["B02", "B8A"]).name == "sentinel2"
    assert infer_sensor(["B2", "B5"]).name == "landsat8"
    with pytest.raises(ValueError, match="B99"):
        infer_sensor(["B02", "B99"])


def test_folder_with_unknown_names_is_an_error(tmp_path: Path) -> None:
    for name in ("red.tif", "nir.tif"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DomainInputError) as error:
        recognise_band_folder(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "unknown band layout" in message
    assert "red.tif" in message and "nir.tif" in message


def test_folder_skips_auxiliary_layers_and_orders_by_table(tmp_path: Path) -> None:
    for name in ("T_B08.tif", "T_B02.tif", "T_B8A.tif", "T_SCL_20m.tif", "MTD_TL.xml"):
        (tmp_path / name).write_bytes(b"")
    sensor, files = recognise_band_folder(tmp_path)
    assert sensor.name == "sentinel2"
    assert list(files) == ["B02", "B08", "B8A"]


def test_folder_with_a_band_twice_is_an_error(tmp_path: Path) -> None:
    for name in ("A_B04.tif", "B_B04_10m.tif"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DomainInputError, match="B04 is stored twice"):
        recognise_band_folder(tmp_path)


def test_baseline_0400_offset_is_available() -> None:
    dn = np.array([1000, 2000], dtype=np.uint16)
    np.testing.assert_allclose(SENTINEL2_BASELINE_0400.apply(dn), [0.0, 0.1], atol=1e-6)

"""Reading scenes: band folders, multi-band files, resampling, scaling, nodata and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from domains.satellite.scene import read_scene
from domains.satellite.sensors import SENTINEL2
from domains.spec import DomainInputError

SIZE = 60  # side of the example's 10 m grid
CORNER = 12  # side of the example's nodata corner (north-east)


def read_dn(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def band_file(folder: Path, band: str) -> Path:
    (match,) = folder.glob(f"*_{band}.tif")
    return match


def test_band_folder_is_read_onto_the_10m_grid(example: dict[str, Path]) -> None:
    scene = read_scene(example["scene_dir"])
    assert scene.data.shape == (13, SIZE, SIZE) and scene.data.dtype == np.float32
    assert scene.band_names == SENTINEL2.band_names
    assert scene.channels == SENTINEL2.channels
    assert scene.sensor == "sentinel2"
    assert scene.crs.to_epsg() == 32618
    assert scene.resolution == (10.0, 10.0)
    assert (scene.transform.c, scene.transform.f) == (438120.0, 4177080.0)
    with rasterio.open(band_file(example["scene_dir"], "B02")) as ds:
        assert scene.transform == ds.transform


def test_valid_mask_marks_the_nodata_corner(example: dict[str, Path]) -> None:
    scene = read_scene(example["scene_dir"])
    expected = np.ones((SIZE, SIZE), dtype=bool)
    expected[:CORNER, SIZE - CORNER :] = False
    np.testing.assert_array_equal(scene.valid, expected)
    assert (scene.data[:, ~scene.valid] == 0).all()


def test_reflectance_scaling_is_dn_over_10000(example: dict[str, Path]) -> None:
    scene = read_scene(example["scene_dir"])
    dn = read_dn(band_file(example["scene_dir"], "B04"))
    index = scene.band_names.index("B04")
    np.testing.assert_allclose(scene.data[index][scene.valid], dn[scene.valid] / 10000, rtol=1e-6)
    assert scene.scaling == "sentinel2-l1c: reflectance = DN * 0.0001 + 0"
    # Vegetation in the example is bright in the near infrared: reflectance, not DN.
    assert 0.0 < scene.data.max() < 0.5


def test_baseline_0400_scaling_can_be_chosen(example: dict[str, Path]) -> None:
    plain = read_scene(example["scene_dir"], channels=("B04",))
    shifted = read_scene(example["scene_dir"], channels=("B04",), scaling="sentinel2-pb0400")
    np.testing.assert_allclose(shifted.data[0][plain.valid], plain.data[0][plain.valid] - 0.1, atol=1e-6)
    assert shifted.scaling.startswith("sentinel2-pb0400")


def test_coarse_bands_are_resampled_bilinearly(tmp_path: Path, write_tif) -> None:
    folder = tmp_path / "scene"
    write_tif(folder / "X_B02.tif", np.full((6, 6), 500, dtype=np.uint16), resolution=10)
    rows = np.array([[1000], [2000], [3000]], dtype=np.uint16).repeat(3, axis=1)
    write_tif(folder / "X_B05.tif", rows, resolution=20)
    write_tif(folder / "X_B01.tif", np.full((1, 1), 1200, dtype=np.uint16), resolution=60)
    scene = read_scene(folder)
    assert scene.band_names == ("B01", "B02", "B05")
    assert scene.shape == (6, 6) and scene.resolution == (10.0, 10.0)
    b05 = scene.data[2, :, 0]
    # Fine-pixel centres sit a quarter of a coarse pixel from coarse centres: 0.75/0.25 weights inside.
    np.testing.assert_allclose(b05[1:5], [0.125, 0.175, 0.225, 0.275], atol=1e-6)
    assert b05[0] == pytest.approx(0.1) and b05[5] == pytest.approx(0.3)
    np.testing.assert_allclose(scene.data[0], 0.12, atol=1e-6)
    assert scene.valid.all()


def test_coarse_nodata_masks_every_fine_pixel_inside_it(tmp_path: Path, write_tif) -> None:
    folder = tmp_path / "scene"
    write_tif(folder / "X_B02.tif", np.full((6, 6), 500, dtype=np.uint16))
    coarse = np.full((3, 3), 2000, dtype=np.uint16)
    coarse[0, 0] = 0
    write_tif(folder / "X_B05.tif", coarse, resolution=20)
    scene = read_scene(folder)
    expected = np.ones((6, 6), dtype=bool)
    expected[:2, :2] = False
    np.testing.assert_array_equal(scene.valid, expected)
    # Nodata does not bleed into the bilinear values of its neighbours.
    np.testing.assert_allclose(scene.data[1][scene.valid], 0.2, atol=1e-6)


def test_channels_select_and_order_folder_bands(example: dict[str, Path]) -> None:
    full = read_scene(example["scene_dir"])
    scene = read_scene(example["scene_dir"], channels=("B8A", "b04", "B10"))
    assert scene.band_names == ("B8A", "B04", "B10")
    np.testing.assert_array_equal(scene.data[1], full.data[full.band_names.index("B04")])
    np.testing.assert_array_equal(scene.data[0], full.data[full.band_names.index("B8A")])


def test_missing_band_is_named(scene_copy: Path) -> None:
    band_file(scene_copy, "B03").unlink()
    with pytest.raises(DomainInputError) as error:
        read_scene(scene_copy, channels=("B02", "B03", "B04"))
    assert str(scene_copy) in str(error.value) and "B03" in error.value.problem


def test_multiband_file_with_descriptions(example: dict[str, Path]) -> None:
    folder = read_scene(example["scene_dir"])
    scene = read_scene(example["multiband"])
    assert scene.band_names == SENTINEL2.band_names and scene.sensor == "sentinel2"
    assert scene.transform == folder.transform and scene.crs == folder.crs
    np.testing.assert_array_equal(scene.valid, folder.valid)
    np.testing.assert_allclose(scene.data, folder.data, atol=1e-4)
    subset = read_scene(example["multiband"], channels=("B04", "B03", "B02"))
    np.testing.assert_array_equal(subset.data[0], scene.data[3])


@pytest.fixture
def undescribed(example: dict[str, Path], tmp_path: Path, write_tif) -> Path:
    """The example's multi-band file rewritten without band descriptions."""
    with rasterio.open(example["multiband"]) as ds:
        bands = ds.read()
    return write_tif(tmp_path / "stack.tif", bands)


def test_multiband_file_with_explicit_channels(undescribed: Path, example: dict[str, Path]) -> None:
    scene = read_scene(undescribed, channels=SENTINEL2.band_names, sensor="sentinel2")
    reference = read_scene(example["multiband"])
    np.testing.assert_array_equal(scene.data, reference.data)
    assert scene.band_names == SENTINEL2.band_names
    assert read_scene(undescribed, channels=SENTINEL2.band_names).sensor == "sentinel2"


def test_multiband_without_names_needs_channels(undescribed: Path) -> None:
    with pytest.raises(DomainInputError) as error:
        read_scene(undescribed)
    assert "stack.tif" in str(error.value) and "unknown band layout" in error.value.problem


def test_multiband_wrong_band_count(undescribed: Path) -> None:
    with pytest.raises(DomainInputError) as error:
        read_scene(undescribed, channels=("B02", "B03", "B04", "B08"))
    assert "stack.tif" in str(error.value)
    assert "wrong band count" in error.value.problem and "holds 13" in error.value.problem


def test_float_multiband_is_taken_as_reflectance_with_nan_nodata(tmp_path: Path, write_tif) -> None:
    bands = np.full((2, 4, 4), 0.25, dtype=np.float32)
    bands[:, 0, 0] = np.nan
    path = write_tif(tmp_path / "refl.tif", bands, nodata=None, descriptions=("B04", "B08"))
    scene = read_scene(path)
    assert scene.scaling.startswith("identity")
    assert not scene.valid[0, 0] and scene.valid.sum() == 15
    assert scene.data[0, 0, 0] == 0.0 and scene.data[1, 3, 3] == pytest.approx(0.25)


def test_landsat_folder_uses_pan_grid_and_collection2_scaling(tmp_path: Path, write_tif) -> None:
    folder = tmp_path / "LC09_L1TP_014034_20230101_20230103_02_T1"
    for band in (4, 2, 3):
        write_tif(folder / f"{folder.name}_B{band}.TIF", np.full((4, 4), 10000, dtype=np.uint16), resolution=30)
    write_tif(folder / f"{folder.name}_B8.TIF", np.full((8, 8), 20000, dtype=np.uint16), resolution=15)
    write_tif(folder / f"{folder.name}_QA_PIXEL.TIF", np.zeros((4, 4), dtype=np.uint16), resolution=30)
    scene = read_scene(folder)
    assert scene.sensor == "landsat9"
    assert scene.band_names == ("B2", "B3", "B4", "B8")
    assert scene.shape == (8, 8) and scene.resolution == (15.0, 15.0)
    np.testing.assert_allclose(scene.data[0], 10000 * 2e-5 - 0.1, atol=1e-6)
    np.testing.assert_allclose(scene.data[3], 20000 * 2e-5 - 0.1, atol=1e-6)
    assert "landsat-c2-l1-toa" in scene.scaling


def test_landsat_surface_reflectance_scaling(tmp_path: Path, write_tif) -> None:
    folder = tmp_path / "sr"
    for band in (2, 3):
        write_tif(
            folder / f"LC08_L2SP_044034_20210508_20210518_02_T1_SR_B{band}.TIF",
            np.full((3, 3), 10000, dtype=np.uint16),
            resolution=30,
        )
    scene = read_scene(folder)
    assert scene.sensor == "landsat8"
    np.testing.assert_allclose(scene.data, 10000 * 2.75e-5 - 0.2, atol=1e-6)


# Bad input: each error is a DomainInputError naming the file and the problem.


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DomainInputError) as error:
        read_scene(tmp_path / "nowhere")
    assert "nowhere" in str(error.value) and "does not exist" in error.value.problem


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_geotiff(scene_copy: Path, keep: float) -> None:
    path = band_file(scene_copy, "B04")
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])
    with pytest.raises(DomainInputError) as error:
        read_scene(scene_copy)
    assert path.name in str(error.value)
    assert "truncated" in error.value.problem
    # GDAL's reason, not rasterio's pointer to an exception the user never sees (issue 9: one clear line)
    assert "previous exception" not in error.value.problem, error.value.problem


def test_truncated_multiband(example: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    content = example["multiband"].read_bytes()
    path.write_bytes(content[: len(content) * 2 // 3])
    with pytest.raises(DomainInputError) as error:
        read_scene(path)
    assert "cut.tif" in str(error.value) and "truncated" in error.value.problem


def test_not_a_geotiff(tmp_path: Path) -> None:
    path = tmp_path / "scene.tif"
    path.write_text("this is not a raster")
    with pytest.raises(DomainInputError) as error:
        read_scene(path, channels=("B04",))
    assert "scene.tif" in str(error.value) and "cannot be opened" in error.value.problem


def test_missing_crs(tmp_path: Path, write_tif) -> None:
    path = write_tif(tmp_path / "nocrs.tif", np.ones((2, 4, 4), dtype=np.uint16), crs=None)
    with pytest.raises(DomainInputError) as error:
        read_scene(path, channels=("B04", "B08"))
    assert "nocrs.tif" in str(error.value) and "no CRS" in error.value.problem


def test_band_without_crs_in_a_folder(scene_copy: Path, write_tif) -> None:
    path = band_file(scene_copy, "B8A")
    write_tif(path, read_dn(path), resolution=20, crs=None)
    with pytest.raises(DomainInputError) as error:
        read_scene(scene_copy)
    assert path.name in str(error.value) and "no CRS" in error.value.problem


def test_bands_with_different_crs(scene_copy: Path, write_tif) -> None:
    path = band_file(scene_copy, "B11")
    write_tif(path, read_dn(path), resolution=20, crs="EPSG:32619")
    with pytest.raises(DomainInputError) as error:
        read_scene(scene_copy)
    assert path.name in str(error.value) and "CRS" in error.value.problem


def test_bands_with_different_extent(scene_copy: Path, write_tif) -> None:
    path = band_file(scene_copy, "B09")
    write_tif(path, read_dn(path), resolution=60, origin=(438120.0 + 600, 4177080.0))
    with pytest.raises(DomainInputError) as error:
        read_scene(scene_copy)
    assert path.name in str(error.value) and "extent" in error.value.problem


def test_all_nodata_scene(tmp_path: Path, write_tif) -> None:
    bands = np.ones((3, 4, 4), dtype=np.uint16)
    bands[1] = 0  # one band empty everywhere leaves no pixel valid in all bands
    path = write_tif(tmp_path / "empty.tif", bands, descriptions=("B02", "B03", "B04"))
    with pytest.raises(DomainInputError) as error:
        read_scene(path)
    assert "empty.tif" in str(error.value) and "no valid pixel" in error.value.problem


def test_unknown_band_layout(example: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "renamed"
    folder.mkdir()
    for i, path in enumerate(sorted(example["scene_dir"].iterdir())):
        shutil.copy(path, folder / f"layer{i}.tif")
    with pytest.raises(DomainInputError) as error:
        read_scene(folder)
    assert str(folder) in str(error.value) and "unknown band layout" in error.value.problem
    assert "layer0.tif" in error.value.problem


def test_unknown_sensor(example: dict[str, Path]) -> None:
    with pytest.raises(DomainInputError, match="unknown sensor 'spot7'"):
        read_scene(example["multiband"], sensor="spot7")


def test_all_nan_scene(tmp_path: Path, write_tif) -> None:
    path = write_tif(tmp_path / "nan.tif", np.full((2, 4, 4), np.nan, dtype=np.float32), nodata=None)
    with pytest.raises(DomainInputError) as error:
        read_scene(path, channels=("B04", "B08"))
    assert "nan.tif" in str(error.value) and "no valid pixel" in error.value.problem


@pytest.mark.parametrize(
    ("channels", "problem"), [((), "channels is empty"), (("B04", "b04"), "twice"), (("B04", "B99"), "B99")]
)
def test_bad_channel_lists(example: dict[str, Path], channels: tuple[str, ...], problem: str) -> None:
    with pytest.raises(DomainInputError, match=problem):
        read_scene(example["scene_dir"], channels=channels)


def test_unknown_scaling(example: dict[str, Path]) -> None:
    with pytest.raises(DomainInputError, match="unknown scaling 'dn'"):
        read_scene(example["scene_dir"], scaling="dn")

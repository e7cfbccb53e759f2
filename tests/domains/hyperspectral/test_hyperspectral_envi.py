"""ENVI reading and writing: interleaves, header fields, windows and every bad input."""

from __future__ import annotations

import numpy as np
import pytest

from domains.hyperspectral.cube import open_cube
from domains.hyperspectral.envi import read_envi_header, read_envi_window, write_envi
from domains.hyperspectral.stack import compute_stack
from domains.hyperspectral.bands import select_channels
from domains.spec import DomainInputError


def test_three_interleaves_decode_to_the_same_cube(examples):
    cubes = [open_cube(examples[il]["source"]) for il in ("bsq", "bil", "bip")]
    full = [c.read() for c in cubes]
    assert full[0].shape == (120, 48, 48)
    np.testing.assert_array_equal(full[0], full[1])
    np.testing.assert_array_equal(full[0], full[2])
    window = [c.read([3, 50, 110], slice(5, 17), slice(30, 41)) for c in cubes]
    for w in window:
        np.testing.assert_array_equal(w, full[0][[3, 50, 110], 5:17, 30:41])


def test_header_fields_round_trip(example):
    cube = open_cube(example["data"])  # opening by the data file finds the header beside it
    assert cube.kind == "envi" and cube.shape == (120, 48, 48)
    assert cube.wavelengths_nm[0] == pytest.approx(381.0) and cube.wavelengths_nm[-1] == pytest.approx(2493.0)
    assert len(cube.fwhm_nm) == 120 and any(cube.bad_bands) and not all(cube.bad_bands)
    assert cube.ignore_value == -9999.0
    assert cube.crs == "EPSG:32613" and cube.transform[0] == 60.0


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
def test_big_endian_int16_with_offset_and_micrometre_wavelengths(tmp_path, interleave):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 3000, size=(60, 5, 7)).astype(">i2")
    path = write_envi(tmp_path / f"c.{interleave}", data, wavelengths_nm=None, interleave=interleave,
                      byte_order=1, header_offset=128)
    header_path = path.with_suffix(".hdr")
    header_path.write_text(header_path.read_text() + "wavelength units = Micrometers\nwavelength = {"
                           + ", ".join(f"{v:.4f}" for v in np.linspace(0.4, 2.5, 60)) + "}\n")
    header = read_envi_header(header_path)
    assert header.dtype == np.dtype(">i2") and header.header_offset == 128
    assert header.wavelengths_nm[-1] == pytest.approx(2500.0)
    np.testing.assert_array_equal(read_envi_window(header, None, slice(None), slice(None)), data.astype(np.float32))


def _copy(example, tmp_path):
    import shutil

    for key in ("source", "data"):
        shutil.copy(example[key], tmp_path / example[key].name)
    return tmp_path / example["source"].name, tmp_path / example["data"].name


def test_truncated_data_file_is_named(example, tmp_path):
    header, data = _copy(example, tmp_path)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    with pytest.raises(DomainInputError, match=rf"{data.name}.*truncated"):
        open_cube(header)


def test_band_count_mismatch_between_header_and_data(example, tmp_path):
    header, _ = _copy(example, tmp_path)
    header.write_text(header.read_text().replace("bands = 120", "bands = 121"))
    with pytest.raises(DomainInputError, match="header field 'wavelength' has 120 entries for 121 bands"):
        open_cube(header)


def test_missing_wavelengths_is_a_clear_error(example, tmp_path):
    header, _ = _copy(example, tmp_path)
    text = "\n".join(line for line in header.read_text().splitlines() if not line.startswith(("wavelength", "fwhm")))
    header.write_text(text + "\n")
    cube = open_cube(header)
    with pytest.raises(DomainInputError, match="no band wavelengths"):
        select_channels(cube, None)


def test_missing_required_field_and_not_envi(example, tmp_path):
    header, _ = _copy(example, tmp_path)
    good = header.read_text()
    header.write_text(good.replace("samples = 48\n", ""))
    with pytest.raises(DomainInputError, match="lacks the required field 'samples'"):
        open_cube(header)
    header.write_text("not a header\n" + good)
    with pytest.raises(DomainInputError, match="not an ENVI header"):
        open_cube(header)


def test_nan_without_ignore_value_is_an_error_naming_the_pixel(example, tmp_path):
    header, data = _copy(example, tmp_path)
    header.write_text(header.read_text().replace("data ignore value = -9999\n", ""))
    raw = np.memmap(data, dtype="<f4", mode="r+", shape=(48, 120, 48))  # BIL: line, band, sample
    raw[7, 110, 9] = np.nan  # a band inside the methane window, so it is read
    raw.flush()
    del raw
    cube = open_cube(header)
    with pytest.raises(DomainInputError, match=r"1 pixels hold NaN.*row 7, col 9"):
        compute_stack(cube, select_channels(cube, None))


def test_ignore_value_pixels_are_masked_not_fatal(example, tmp_path):
    header, data = _copy(example, tmp_path)
    raw = np.memmap(data, dtype="<f4", mode="r+", shape=(48, 120, 48))
    raw[:, :, :5] = -9999.0  # a no-data strip at the swath edge
    raw[10, 100, 20] = -9999.0  # and one dropped sample
    raw.flush()
    del raw
    cube = open_cube(header)
    stack, invalid = compute_stack(cube, select_channels(cube, None))
    assert invalid[:, :5].all() and invalid[10, 20] and invalid.sum() == 48 * 5 + 1
    assert (stack[:, invalid] == 0).all() and np.isfinite(stack).all()


def test_missing_data_file_and_missing_header(tmp_path):
    (tmp_path / "lonely.hdr").write_text("ENVI\nsamples = 2\nlines = 2\nbands = 1\ndata type = 4\n")
    with pytest.raises(DomainInputError, match="has no data file beside it"):
        open_cube(tmp_path / "lonely.hdr")
    (tmp_path / "orphan.img").write_bytes(b"\0" * 16)
    with pytest.raises(DomainInputError, match="has no ENVI header"):
        open_cube(tmp_path / "orphan.img")


def test_multiband_geotiff_with_wavelength_descriptions(tmp_path, example):
    import rasterio

    cube = open_cube(example["source"])
    data = cube.read()
    path = tmp_path / "cube.tif"
    with rasterio.open(path, "w", driver="GTiff", width=48, height=48, count=120, dtype="float32") as ds:
        ds.write(data)
        for i, w in enumerate(cube.wavelengths_nm, start=1):
            ds.set_band_description(i, f"Band {i} ({w:.2f} nm)")
    tif = open_cube(path)
    assert tif.kind == "geotiff" and tif.shape == cube.shape
    np.testing.assert_allclose(tif.wavelengths_nm, cube.wavelengths_nm, atol=0.01)
    np.testing.assert_array_equal(tif.read([5, 90], slice(2, 9), slice(3, 4)), data[[5, 90], 2:9, 3:4])

"""Bad radiology inputs: each is named and counted, and the rest of the batch is still read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from domains import DomainInputError, IngestRequest
from domains.radiology import dicom_reader
from domains.radiology.sampling import read_samples
from sample_batches import collect_batches  # tests/domains is on sys.path through its conftest.py

GOOD_IMAGES = 10  # the example: 3 CT + 3 MR + 1 DX + 3 NIfTI slices


def _read(source, labels=None):
    return collect_batches(read_samples(IngestRequest(source=source, labels=labels, tile_size=8)))


def _quarantine(samples):
    return json.loads(samples.provenance["quarantine"])


def test_truncated_file_is_quarantined_and_the_rest_read(example_copy):
    victim = sorted((example_copy["source"] / "PLANTED-ID-103").glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])  # cut inside the pixel data
    samples = _read(example_copy["source"])
    assert len(samples.images) == GOOD_IMAGES - 1
    [record] = _quarantine(samples)
    assert record["reason"] == "unreadable" and record["item"].startswith("f-")
    assert "truncated" in record["problem"] or "damaged" in record["problem"]
    assert samples.dropped == {"unreadable": 1}


def test_pydicom_truncated_mr_is_reported(tmp_path, testdata, example_copy):
    import shutil

    shutil.copy(testdata("MR_truncated.dcm"), example_copy["source"] / "truncated.dcm")
    samples = _read(example_copy["source"])
    assert samples.dropped == {"unreadable": 1} and len(samples.images) == GOOD_IMAGES


def test_missing_pixel_data_is_named(example_copy):
    import pydicom

    victim = sorted((example_copy["source"] / "PLANTED-ID-103").glob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    del ds.PixelData
    ds.save_as(victim)
    samples = _read(example_copy["source"])
    assert samples.dropped == {"no_pixel_data": 1}
    assert _quarantine(samples)[0]["problem"] == "the object has no pixel data"


def test_series_with_mixed_shapes_is_rejected_whole(tmp_path, write_ct_series, example_copy):
    write_ct_series(example_copy["source"] / "mixed", positions=[0, 2, 4], shapes=[(12, 12), (12, 12), (10, 12)])
    samples = _read(example_copy["source"])
    assert samples.dropped == {"inconsistent_series": 3} and len(samples.images) == GOOD_IMAGES
    assert "mixed shapes" in _quarantine(samples)[0]["problem"]


def test_series_with_mixed_pixel_spacings_or_uneven_gaps_is_rejected(write_ct_series, example_copy):
    write_ct_series(example_copy["source"] / "spacing", positions=[0, 2, 4], spacing=[(1, 1), (1, 1), (0.5, 0.5)],
                    patient="P-SPACING")
    write_ct_series(example_copy["source"] / "gaps", positions=[0, 2, 9], patient="P-GAPS")
    samples = _read(example_copy["source"])
    problems = sorted(q["problem"] for q in _quarantine(samples))
    assert samples.dropped == {"inconsistent_series": 6}
    assert any("uneven" in p for p in problems) and any("mixed pixel spacings" in p for p in problems)


def test_missing_codec_names_the_package_to_install(example_copy, testdata, monkeypatch):
    import shutil

    import pydicom.pixels

    class Unavailable:
        is_available = False

    real = pydicom.pixels.get_decoder
    shutil.copy(testdata("MR_small_jp2klossless.dcm"), example_copy["source"] / "j2k.dcm")
    # As if pylibjpeg-openjpeg and pillow were not installed: JPEG 2000 has no working decoder.
    monkeypatch.setattr("pydicom.pixels.get_decoder",
                        lambda uid: Unavailable() if str(uid).startswith("1.2.840.10008.1.2.4.9") else real(uid))
    samples = _read(example_copy["source"])
    [record] = _quarantine(samples)
    assert samples.dropped == {"missing_codec": 1}
    assert "JPEG 2000" in record["problem"] and "pip install pylibjpeg and pylibjpeg-openjpeg" in record["problem"]


def test_transfer_syntax_without_any_decoder_is_named():
    with pytest.raises(DomainInputError, match="MPEG2.*no installed pydicom decoder"):
        dicom_reader.check_codec("1.2.840.10008.1.2.4.100", "f-x")


def test_damaged_jpeg_stream_is_quarantined_not_fatal(example_copy, testdata):
    import shutil

    shutil.copy(testdata("JPEG-lossy.dcm"), example_copy["source"] / "broken-jpeg.dcm")  # known-bad 12-bit stream
    samples = _read(example_copy["source"])
    assert samples.dropped == {"unreadable": 1}
    assert "JPEG Extended" in _quarantine(samples)[0]["problem"]


def test_undecodable_pixels_log_no_traceback(tmp_path, testdata, caplog):
    """pydicom logs each failing decoder with a stack dump; the quarantine entry already says why."""
    import logging

    from domains.radiology.dicom_reader import FileReadError, read_dicom_frames

    with caplog.at_level(logging.DEBUG), pytest.raises(FileReadError, match="cannot be decoded"):
        read_dicom_frames(testdata("JPEG-lossy.dcm"), "f-test")
    decoder_records = [r for r in caplog.records if r.name.startswith("pydicom.pixels")]
    assert decoder_records, "pydicom no longer logs decoder failures; this test no longer checks anything"
    assert all(r.exc_info is None and r.exc_text is None for r in caplog.records)


def test_nifti_with_nans_is_quarantined(example_copy):
    import nibabel as nib

    data = np.zeros((6, 6, 2), np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(example_copy["source"] / "nan.nii.gz"))
    samples = _read(example_copy["source"])
    assert samples.dropped == {"non_finite": 1}
    assert "1 of 72 voxels are NaN" in _quarantine(samples)[0]["problem"]


def test_csv_naming_unknown_patients_is_an_error_with_row_numbers_not_ids(example_copy):
    csv = example_copy["labels"]
    csv.write_text(csv.read_text() + "PLANTED-ID-999,1,0,0\n")
    with pytest.raises(DomainInputError, match=r"labels.csv: 1 row\(s\) name .* not in the source \(rows 6\)") as err:
        _read(example_copy["source"], csv)
    assert "PLANTED" not in str(err.value)


@pytest.mark.parametrize("content, problem", [
    ("nodule,effusion\n1,0\n", "no key column"),
    ("patient_id,study_uid,nodule\nPLANTED-ID-101,1.2.3,1\n", "row 2 must fill exactly one"),
    ("patient_id,nodule\nPLANTED-ID-101,yes\n", "row 2, column 'nodule': expected 0, 1 or empty"),
    ("patient_id,nodule\nPLANTED-ID-101,1\nPLANTED-ID-101,0\n", "row 3 repeats the patient_id of row 2"),
])
def test_malformed_csv_is_named(example_copy, content, problem):
    example_copy["labels"].write_text(content)
    with pytest.raises(DomainInputError, match=problem):
        _read(example_copy["source"], example_copy["labels"])


def test_every_file_bad_raises(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"not dicom at all")
    (tmp_path / "b.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(DomainInputError, match=r"no usable images in 2 file\(s\).*not a DICOM file"):
        _read(tmp_path)


def test_empty_or_missing_source_raises(tmp_path):
    with pytest.raises(DomainInputError, match="no DICOM or NIfTI files"):
        _read(tmp_path)
    with pytest.raises(DomainInputError, match="does not exist"):
        _read(tmp_path / "nowhere")

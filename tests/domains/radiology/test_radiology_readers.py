"""Reading real and synthetic DICOM/NIfTI: modalities, transfer syntaxes, multi-frame, DICOMDIR, ordering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest, apply_windows
from domains.radiology.intensity import CT_WINDOWS, fit_to_square, parse_channels
from domains.radiology.sampling import read_samples
from domains.radiology.source import read_source
from sample_batches import collect_batches  # tests/domains is on sys.path through its conftest.py


def _only_series(source):
    read = read_source(source)
    assert len(read.series) == 1, read.quarantine
    return read.series[0]


def test_ct_small_is_read_in_hounsfield_units(testdata):
    series = _only_series(testdata("CT_small.dcm"))
    assert series.modality == "CT" and series.frames[0].pixels.shape == (128, 128)
    hu = series.frames[0].pixels
    # CT_small has RescaleIntercept -1024: raw values near 0 become air-like negative HU.
    assert hu.min() < -500 and hu.dtype == np.float32
    assert series.spacing[1:] == pytest.approx((0.661468, 0.661468), abs=1e-5)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_lossless_transfer_syntaxes_decode_to_the_same_pixels(name, testdata):
    reference = _only_series(testdata("MR_small.dcm")).frames[0].pixels
    decoded = _only_series(testdata(name)).frames[0].pixels
    np.testing.assert_array_equal(decoded, reference)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "image_dfl.dcm"])
def test_lossy_jpeg_jpeg2000_and_deflate_files_read(name, testdata):
    series = _only_series(testdata(name))
    assert all(np.isfinite(f.pixels).all() and f.pixels.std() > 0 for f in series.frames)


def test_dicomdir_expands_to_its_records_and_skips_irregular_series(testdata):
    read = read_source(testdata("dicomdirtests/DICOMDIR"))
    assert {s.modality for s in read.series} >= {"CR", "CT", "MR"}
    # The DICOMDIR's CT study has one regular 5-slice volume; the rest of its CT slices have uneven gaps.
    assert any(s.is_volume and s.modality == "CT" and len(s.frames) == 5 for s in read.series)
    assert read.dropped["inconsistent_series"] > 0
    assert all(q["item"].startswith("se-") for q in read.quarantine)


def test_series_is_ordered_by_position_along_the_normal_not_by_file_name(tmp_path, write_ct_series):
    # File names sort 0,1,2,3 while positions run 30, 10, 20, 0 mm: order must follow position.
    write_ct_series(tmp_path / "s", positions=[30, 10, 20, 0], names=["a.dcm", "b.dcm", "c.dcm", "d.dcm"])
    series = _only_series(tmp_path / "s")
    assert series.is_volume and series.spacing[0] == pytest.approx(10.0)
    assert [float(f.pixels[0, 0]) for f in series.frames] == [0.0, 10.0, 20.0, 30.0]


def test_example_ct_series_written_in_reverse_name_order_is_read_by_position(example):
    read = read_source(example["source"])
    ct = next(s for s in read.series if s.modality == "CT" and s.kind == "dicom")
    # The example's bright centre square grows by 100 HU per slice along +z.
    centres = [float(f.pixels[8, 8]) for f in ct.frames]
    assert centres == sorted(centres) and centres[0] == pytest.approx(400.0)


def _enhanced_ct(path: Path, positions: list[float]) -> Path:
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["enhanced", str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["enhanced-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["enhanced-series"])
    ds.Modality, ds.PatientID = "CT", "PLANTED-ENHANCED"
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.8], 2.0
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in positions:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    frames = np.stack([np.full((8, 10), 1024 + int(z), np.uint16) for z in positions])
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(positions), 8, 10
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_uses_per_frame_positions_and_shared_rescale(tmp_path):
    _enhanced_ct(tmp_path / "enhanced.dcm", positions=[4.0, -2.0, 1.0])
    series = _only_series(tmp_path / "enhanced.dcm")
    assert series.is_volume and len(series.frames) == 3
    assert [float(f.pixels[0, 0]) for f in series.frames] == [-2.0, 1.0, 4.0]
    assert series.spacing == pytest.approx((3.0, 0.8, 0.8))


def test_nifti_is_reoriented_to_ras_and_shown_radiologically(tmp_path):
    import nibabel as nib

    data = np.zeros((4, 6, 2), np.float32)
    data[0, 5, :] = 7.0
    # Negative x and y zooms (LPS-like storage): voxel i grows towards the patient's left, j towards
    # posterior. So i=0 is the patient's rightmost column and j=5 the most posterior row.
    nib.save(nib.Nifti1Image(data, np.diag([-2.0, -1.0, 3.0, 1.0])), str(tmp_path / "v.nii"))
    series = _only_series(tmp_path / "v.nii")
    assert series.spacing == pytest.approx((3.0, 1.0, 2.0))
    image = series.frames[0].pixels
    assert image.shape == (6, 4)
    # Radiological display: patient's right in column 0, anterior in row 0.
    assert image[5, 0] == 7.0 and image.sum() == 7.0


def test_nibabel_anatomical_and_4d_examples_read():
    import nibabel

    data = Path(nibabel.__file__).parent / "tests" / "data"
    anatomical = _only_series(data / "anatomical.nii")
    assert anatomical.kind == "nifti" and anatomical.is_volume and len(anatomical.frames) > 1
    read = read_source(data / "example4d.nii.gz")
    assert read.notes["nifti_4d"].startswith("first volume") and len(read.series) == 1


def test_monochrome1_radiograph_is_inverted(tmp_path):
    from domains.radiology.dicom_writer import ImageGeometry, synthetic_uid, write_dicom_image

    stored = np.zeros((10, 10), np.uint16)
    stored[:, 5:] = 4000  # MONOCHROME1: high stored value displays dark
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        write_dicom_image(tmp_path / photometric / "x.dcm", stored, modality="DX", patient_id="P",
                          study_uid=synthetic_uid(photometric), series_uid=synthetic_uid(photometric, 1),
                          sop_uid=synthetic_uid(photometric, 2), geometry=ImageGeometry(), window=(2000, 4000),
                          photometric=photometric)
    mono1 = _only_series(tmp_path / "MONOCHROME1").frames[0].pixels
    mono2 = _only_series(tmp_path / "MONOCHROME2").frames[0].pixels
    assert mono1[:, :5].mean() > mono1[:, 5:].mean()
    assert mono2[:, :5].mean() < mono2[:, 5:].mean()


def test_ct_windows_stack_as_channels_and_slices_as_2_5d(example):
    samples = collect_batches(read_samples(IngestRequest(source=example["source"], tile_size=16,
                                         channels=("lung", "bone", "lung@-1", "lung@+1"))))
    # Stored: one HU plane per slice offset; the windows (what the model makes of them) are recorded.
    assert [c.name for c in samples.channels] == ["hu@-1", "hu", "hu@+1"]
    assert [(w.name, w.source) for w in samples.windows] == [("lung", 1), ("bone", 1), ("lung@-1", 0), ("lung@+1", 2)]
    assert samples.provenance["modalities"] == "CT"  # the MR and DX series do not fit CT windows
    assert samples.dropped["channel_mismatch"] == 4  # 3 MR slices + 1 DX image
    dicom = [i for i, s in enumerate(samples.sample_ids) if samples.locations[i][0] == 1][0]
    # Slice 1's "@-1" plane is slice 0's HU: same series, previous index.
    prev = dicom - 1
    np.testing.assert_array_equal(samples.images[dicom, 0], samples.images[prev, 1])
    assert np.array_equal(samples.images, np.rint(samples.images)) and samples.images.min() <= -1000
    views = apply_windows(samples.images, samples.windows)
    assert (views >= 0).all() and (views <= 1).all()
    np.testing.assert_array_equal(views[dicom, 2], views[prev, 0])


def test_window_presets_and_channel_parsing():
    assert CT_WINDOWS["lung"].apply(np.array([-1350.0, -600.0, 150.0])).tolist() == [0.0, 0.5, 1.0]
    assert [r.name for r in parse_channels(("image@-2", "brain"))] == ["image@-2", "brain"]
    with pytest.raises(ValueError, match="unknown radiology channel"):
        parse_channels(("liver",))


def test_resampling_keeps_the_physical_aspect_ratio():
    slices = np.ones((1, 20, 40), np.float32)
    square = fit_to_square(slices, (1.0, 1.0), 16)
    assert square.shape == (1, 16, 16)
    assert square[0, 0].sum() == 0 and square[0, 8].min() > 0.99  # padded above and below, filled across
    anisotropic = fit_to_square(np.ones((1, 20, 40), np.float32), (2.0, 1.0), 16)
    assert anisotropic[0].min() > 0.99  # 40 mm x 40 mm: fills the square


def test_samples_without_labels_are_unlabelled(example):
    samples = collect_batches(read_samples(IngestRequest(source=example["source"], tile_size=8)))
    assert samples.task == "multilabel" and (samples.labels == -1).all()
    assert samples.labels.shape == (len(samples.images), 3)


def test_labels_keyed_by_file_series_and_study_take_precedence(example_copy, example):
    import pydicom

    source = example_copy["source"]
    mr_folder = source / "PLANTED-ID-102"
    first = sorted(mr_folder.iterdir())[0]
    study_uid = pydicom.dcmread(first).StudyInstanceUID
    csv = example_copy["labels"]
    rel = first.relative_to(source).as_posix()
    csv.write_text(f"patient_id,study_uid,file,nodule,effusion\nPLANTED-ID-102,,,0,0\n,{study_uid},,1,\n,,{rel},1,1\n")
    samples = collect_batches(read_samples(IngestRequest(source=source, labels=csv, tile_size=8)))
    assert samples.class_names == ("nodule", "effusion")
    labelled = samples.labels[(samples.labels >= 0).any(axis=1)]
    # MR has 3 slices: one named by file (1,1), two by study (1,-1); other patients unlabelled.
    assert sorted(map(tuple, labelled.tolist())) == [(1, -1), (1, -1), (1, 1)]

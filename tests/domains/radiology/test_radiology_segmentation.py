"""Segmentation masks at ingest (read on the image's voxel grid) and NIfTI masks written back by predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from domains import Channel, DomainInputError, IngestRequest, PredictionRequest
from domains.radiology import SPEC
from domains.radiology.examples import write_segmentation_pair
from domains.radiology.prediction import SEGMENTATION_FORMAT
from sample_batches import collect_batches  # tests/domains is on sys.path through its conftest.py

CLASSES = ("background", "lesion")


def _pairs(root: Path, patients=("PLANTED-ID-201", "PLANTED-ID-202"), **kwargs) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    for patient in patients:
        write_segmentation_pair(root / "source" / patient / f"{patient}_ct.nii.gz",
                                root / "masks" / patient / f"{patient}_ct.nii.gz", rng, **kwargs)
    return root / "source", root / "masks"


def _ingest(source, labels, tile_size=16, class_names=None):
    return collect_batches(SPEC.read_samples(IngestRequest(source=source, labels=labels, tile_size=tile_size,
                                                           class_names=class_names)))


def test_mask_pixels_land_on_the_structure_and_padding_is_ignored(tmp_path):
    # 24 x 12 voxels of 1 mm: slices show x as columns (24 -> 16) and y as rows (12 -> 8, centred), so rows
    # 0..3 and 12..15 of the 16 x 16 sample are padding.
    source, masks = _pairs(tmp_path, patients=("PLANTED-ID-201",), shape=(24, 12, 4), spacing=(1.0, 1.0, 2.0),
                           centre=(8.0, 6.0, 1.5), radius_mm=3.0)
    samples = _ingest(source, masks)
    assert samples.task == "segmentation" and samples.class_names == CLASSES
    assert samples.labels.shape == (4, 16, 16) and samples.labels.dtype == np.int16
    assert (samples.labels[:, :4] == -1).all() and (samples.labels[:, 12:] == -1).all()
    assert (samples.labels[:, 4:12] >= 0).all()
    lesion = samples.labels == 1
    assert lesion.sum() > 0
    image = samples.images[:, 0]
    assert image[lesion].mean() > 0.9 > image[samples.labels == 0].mean() + 0.3  # 300 HU vs ~40 HU
    # The affine's x axis is -1 mm: voxel 0 is the patient's rightmost, shown in column 0 (radiological view),
    # so the sphere at voxel x = 8 of 24 lands around column 8 * 16 / 24 = 5, left of the centre.
    columns = np.nonzero(lesion.any(axis=(0, 1)))[0]
    assert columns.max() < 8
    assert samples.provenance["label_kind"] == "masks" and samples.provenance["masks_used"] == "1"


def test_single_mask_file_and_csv_mapping_and_class_names(tmp_path):
    source, masks = _pairs(tmp_path, patients=("PLANTED-ID-203",))
    mask = next(masks.rglob("*.nii.gz"))
    one = _ingest(next(source.rglob("*.nii.gz")), mask, class_names=("bg", "tumour"))
    assert one.class_names == ("bg", "tumour") and (one.labels == 1).any()
    table = tmp_path / "masks.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "mask"])
        writer.writerow(["PLANTED-ID-203/PLANTED-ID-203_ct.nii.gz", mask.relative_to(tmp_path).as_posix()])
    by_csv = _ingest(source, table)
    np.testing.assert_array_equal(by_csv.labels, one.labels)


def test_mask_off_the_image_grid_is_refused_naming_both_by_key(tmp_path):
    source, masks = _pairs(tmp_path, patients=("PLANTED-ID-204",))
    mask = next(masks.rglob("*.nii.gz"))
    original = nib.load(str(mask))
    shifted = original.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj), shifted), str(mask))
    with pytest.raises(DomainInputError, match=r"mask f-[0-9a-f]{12} of series se-[0-9a-f]{12}: the mask is not on the image's voxel grid") as error:
        _ingest(source, masks)
    assert "PLANTED" not in str(error.value)
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj)[:-1], original.affine), str(mask))
    with pytest.raises(DomainInputError, match="not on the image's voxel grid"):
        _ingest(source, masks)


def test_mask_in_another_axis_order_is_reoriented_exactly(tmp_path):
    source, masks = _pairs(tmp_path, patients=("PLANTED-ID-205",))
    reference = _ingest(source, masks).labels
    mask = next(masks.rglob("*.nii.gz"))
    canonical = nib.as_closest_canonical(nib.load(str(mask)))  # RAS order: a different voxel order, same voxels
    nib.save(canonical, str(mask))
    np.testing.assert_array_equal(_ingest(source, masks).labels, reference)


def test_unknown_mask_values_are_refused(tmp_path):
    source, masks = _pairs(tmp_path, patients=("PLANTED-ID-206",))
    mask = next(masks.rglob("*.nii.gz"))
    image = nib.load(str(mask))
    data = np.asarray(image.dataobj).astype(np.int16)
    data[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(data, image.affine), str(mask))
    with pytest.raises(DomainInputError, match=r"mask values \[2\] have no class name"):
        _ingest(source, masks, class_names=CLASSES)
    assert _ingest(source, masks).class_names == ("background", "label_1", "label_2")
    data[0, 0, 0] = 255
    nib.save(nib.Nifti1Image(data, image.affine), str(mask))
    with pytest.raises(DomainInputError, match="mask value 255 is above 15"):
        _ingest(source, masks)
    data[0, 0, 0] = -3
    nib.save(nib.Nifti1Image(data, image.affine), str(mask))
    with pytest.raises(DomainInputError, match="negative mask value -3"):
        _ingest(source, masks)


def test_masks_labelling_nothing_are_an_error_and_series_without_mask_are_unlabelled(tmp_path):
    source, masks = _pairs(tmp_path)
    extra = masks / "PLANTED-ID-999" / "other.nii.gz"
    extra.parent.mkdir()
    extra.write_bytes(next(masks.rglob("*.nii.gz")).read_bytes())
    with pytest.raises(DomainInputError, match=r"1 mask\(s\) label nothing in the source: mask f-") as error:
        _ingest(source, masks)
    assert "PLANTED" not in str(error.value)
    extra.unlink()
    next(masks.glob("PLANTED-ID-202/*")).unlink()
    samples = _ingest(source, masks)
    labelled = (samples.labels.reshape(len(samples.labels), -1) >= 0).any(axis=1)
    assert labelled.sum() == len(samples.labels) // 2 and samples.provenance["labelled_images"] == str(labelled.sum())


def test_mask_file_names_leave_no_trace_in_the_dataset(tmp_path):
    from tasks.dataset import SplitParams, build_dataset, load_dataset

    source, masks = _pairs(tmp_path, patients=("PLANTED-ID-207", "PLANTED-ID-208", "PLANTED-ID-209"))
    table = tmp_path / "masks.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "mask"])
        for mask in sorted(masks.rglob("*.nii.gz")):  # masks named after the patient, in another layout
            renamed = tmp_path / "drawn" / f"SECRET-MASKNAME-{mask.parent.name}.nii.gz"
            renamed.parent.mkdir(exist_ok=True)
            mask.rename(renamed)
            writer.writerow([f"{mask.parent.name}/{mask.name}", renamed.relative_to(tmp_path).as_posix()])
    out = tmp_path / "dataset"
    info = build_dataset("radiology", IngestRequest(source=source, labels=table, tile_size=8), out,
                         SplitParams(val_fraction=0.0, test_fraction=0.34))
    assert info.task == "segmentation" and load_dataset(out).info.digest == info.digest
    written = "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())
    for text in ("PLANTED", "SECRET", "MASKNAME", "drawn", str(tmp_path)):
        assert text not in written, f"{text!r} leaked into the dataset"


def _lesion_infer(batch):
    probability = (batch[:, 0] > 0.7)  # lesion ~1.0, tissue ~0.45 in the mediastinum window; midway.astype(np.float32)
    return np.stack([1.0 - probability, probability], axis=1)


def test_predict_writes_a_nifti_mask_in_the_inputs_geometry(tmp_path):
    rng = np.random.default_rng(5)
    affine = np.array([[0.0, 0.0, 2.0, -5.0], [-1.0, 0.0, 0.0, 12.0], [0.0, -1.25, 0.0, 7.0], [0, 0, 0, 1.0]])
    image, mask = write_segmentation_pair(tmp_path / "in" / "PLANTED-ID-301.nii.gz", tmp_path / "truth.nii.gz", rng,
                                          shape=(18, 14, 5), affine=affine, radius_mm=3.5)
    output = tmp_path / "out" / "study.json"
    summary = SPEC.predict(PredictionRequest(
        input=image, output=output, channels=(Channel("image"),), class_names=CLASSES, tile_size=18, stride=18,
        infer=_lesion_infer, batch_size=4, task="segmentation"))
    written = nib.load(str(tmp_path / "out" / "study.nii.gz"))
    truth = nib.load(str(mask))
    assert written.shape == truth.shape == (18, 14, 5) and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, affine)
    predicted, expected = np.asarray(written.dataobj), np.asarray(truth.dataobj)
    dice = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum())
    assert dice > 0.95
    report = json.loads(output.read_text())
    assert report["format"] == SEGMENTATION_FORMAT and report["classes"] == list(CLASSES)
    [study] = report["studies"]
    [series] = study["series"]
    assert series["mask"] == "study.nii.gz" and series["shape"] == [18, 14, 5]
    assert study["voxels"]["lesion"] == int(predicted.sum()) == summary.class_counts["lesion"]
    assert study["volume_mm3"]["lesion"] == pytest.approx(predicted.sum() * 2.5)
    assert study["present"] == ["lesion"] and summary.samples == 14  # axial slices: the j axis is S-I here
    assert "PLANTED" not in output.read_text()
    with pytest.raises(ValueError, match="infer returned shape"):
        SPEC.predict(PredictionRequest(input=image, output=output, channels=(Channel("image"),), class_names=CLASSES,
                                       tile_size=18, stride=18, infer=lambda b: np.zeros((len(b), 2)), task="segmentation"))


def test_predict_on_a_dicom_volume_writes_its_grid(tmp_path, write_ct_series):
    write_ct_series(tmp_path / "src" / "ct", [0.0, 2.0, 4.0], shape=(10, 12), spacing=(0.8, 0.8))
    output = tmp_path / "report.json"
    SPEC.predict(PredictionRequest(input=tmp_path / "src" / "ct", output=output, channels=(Channel("image"),),
                                   class_names=CLASSES, tile_size=12, stride=12, task="segmentation",
                                   infer=lambda b: np.stack([np.ones_like(b[:, 0]), np.zeros_like(b[:, 0])], axis=1)))
    written = nib.load(str(tmp_path / "report.nii.gz"))
    assert written.shape == (12, 10, 3) and not np.asarray(written.dataobj).any()
    np.testing.assert_allclose(np.diag(written.affine)[:3], [-0.8, -0.8, 2.0])
    # The mask written on the DICOM grid is read back onto the same grid as a label (CSV keyed by file).
    data = np.asarray(written.dataobj).copy()
    data[5, 4, 1] = 1
    nib.save(nib.Nifti1Image(data, written.affine), str(tmp_path / "drawn.nii.gz"))
    (tmp_path / "masks.csv").write_text("file,mask\nct/001.dcm,drawn.nii.gz\n")
    samples = _ingest(tmp_path / "src", tmp_path / "masks.csv", tile_size=12)
    assert samples.task == "segmentation" and samples.labels.shape == (3, 12, 12)
    assert (samples.labels[:, 0] == -1).all() and np.argwhere(samples.labels == 1).tolist() == [[1, 5, 5]]

"""The de-identification gate: no planted identifier survives into samples, provenance or predictions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from domains import IngestRequest, PredictionRequest
from domains.radiology import SPEC
from domains.radiology.deidentify import (
    AUDIT_FILE_NAME,
    deidentify_dataset,
    pseudonym,
    remap_uid,
    write_deidentification_audit,
)
from domains.radiology.dicom_writer import PLANTED_BIRTH_DATE, PLANTED_PRIVATE_VALUE
from domains.radiology.examples import EXAMPLE_PATIENTS
from domains.radiology.sampling import read_samples
from sample_batches import collect_batches  # tests/domains is on sys.path through its conftest.py


def _original_uids(source) -> set[str]:
    import pydicom

    uids = set()
    for path in source.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return uids


def _identifying_strings(source) -> list[str]:
    # Everything planted: "PLANTED" is in every fake name/ID/address/comment, the folder and file names and
    # the CSV ids; plus the birth date and every original instance UID of the example.
    return ["PLANTED", "planted", PLANTED_BIRTH_DATE, *sorted(_original_uids(source)), str(source)]


def _everything_returned(samples) -> str:
    return "\n".join([
        samples.source, *map(str, samples.sample_ids), *map(str, samples.groups), *samples.class_names,
        *(c.name for c in samples.channels), json.dumps(samples.provenance), json.dumps(samples.dropped),
    ])


def test_no_planted_identifier_reaches_the_sample_set(example_copy):
    # Add a burned-in file and a damaged file so quarantine records are part of what is checked.
    source = example_copy["source"]
    (source / "PLANTED-ID-105_broken.dcm").write_bytes(b"PLANTED garbage")
    samples = collect_batches(read_samples(IngestRequest(source=source, labels=example_copy["labels"], tile_size=8)))
    text = _everything_returned(samples)
    for needle in _identifying_strings(source):
        assert needle not in text, needle
    assert samples.source.startswith("radiology:")
    assert int(samples.provenance["deid_private_tags_removed"]) >= 2 * 7


def test_no_planted_identifier_reaches_prediction_outputs(example, tmp_path):
    output = tmp_path / "report.json"

    def infer(batch):
        return np.full((len(batch), 3), 0.25, np.float32)

    SPEC.predict(PredictionRequest(input=example["source"], output=output, channels=SPEC.default_channels,
                                   class_names=SPEC.default_class_names, tile_size=8, stride=8, infer=infer,
                                   task="multilabel"))
    text = output.read_text() + output.with_suffix(".csv").read_text()
    for needle in _identifying_strings(example["source"]):
        assert needle not in text, needle


def test_gate_keeps_pixels_and_geometry_and_removes_the_rest(example):
    import pydicom

    path = next((example["source"] / EXAMPLE_PATIENTS[1]).glob("*.dcm"))
    ds = pydicom.dcmread(path)
    original_study = str(ds.StudyInstanceUID)
    keys, audit = deidentify_dataset(ds, "f-test")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "InstitutionName",
                    "ReferringPhysicianName", "ImageComments", "AccessionNumber", "StudyDescription"):
        assert keyword not in ds and keyword in audit.removed
    assert not any(element.tag.is_private for element in ds)
    assert audit.private_tags_removed == 2
    assert PLANTED_PRIVATE_VALUE not in str(ds) and "PLANTED" not in str(ds)
    assert ds.StudyInstanceUID == remap_uid(original_study) and "StudyInstanceUID" in audit.remapped_uids
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # a class UID names no one: kept
    assert ds.pixel_array.shape == (16, 16) and "ImagePositionPatient" in ds
    assert keys.patient == pseudonym("patient", EXAMPLE_PATIENTS[1])
    # The audit names attributes, never values.
    assert "PLANTED" not in json.dumps(audit.__dict__)


def test_uid_remapping_is_consistent_and_depends_on_the_salt(monkeypatch):
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert remap_uid(uid) == remap_uid(uid) != remap_uid(uid + "1")
    assert remap_uid(uid).startswith("2.25.") and len(remap_uid(uid)) <= 64
    default_key, default_uid = pseudonym("patient", "PLANTED-ID-101"), remap_uid(uid)
    monkeypatch.setenv("VITRAIL_DEID_SALT", "site-secret")
    assert remap_uid(uid) != default_uid and pseudonym("patient", "PLANTED-ID-101") != default_key


def test_same_series_split_over_two_folders_keeps_one_series_key(example, tmp_path):
    # UIDs map consistently: slices of one series in two folders are reassembled into one volume.
    ct_folder = next(p for p in example["source"].iterdir() if p.name.startswith(EXAMPLE_PATIENTS[0]))
    files = sorted(ct_folder.glob("*.dcm"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(files[0], tmp_path / "a")
    for f in files[1:]:
        shutil.copy(f, tmp_path / "b")
    samples = collect_batches(read_samples(IngestRequest(source=tmp_path, tile_size=8)))
    assert len({sid.rsplit("/", 1)[0] for sid in samples.sample_ids}) == 1 and len(samples.images) == 3


def test_burned_in_annotation_is_quarantined_unless_allowed(example_copy, monkeypatch):
    import pydicom

    victim = next((example_copy["source"] / EXAMPLE_PATIENTS[2]).glob("*.dcm"))
    ds = pydicom.dcmread(victim)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(victim)
    samples = collect_batches(read_samples(IngestRequest(source=example_copy["source"], tile_size=8)))
    assert samples.dropped == {"burned_in_annotation": 1}
    assert samples.provenance["deid_burned_in_quarantined"] == "1"
    assert "VITRAIL_ALLOW_BURNED_IN=1" in samples.provenance["quarantine"]
    monkeypatch.setenv("VITRAIL_ALLOW_BURNED_IN", "1")
    allowed = collect_batches(read_samples(IngestRequest(source=example_copy["source"], tile_size=8)))
    assert allowed.dropped == {} and len(allowed.images) == len(samples.images) + 1


def test_audit_is_written_beside_the_dataset_without_values(example, tmp_path):
    samples = collect_batches(read_samples(IngestRequest(source=example["source"], tile_size=8)))
    path = write_deidentification_audit(samples.provenance, tmp_path)
    assert path == tmp_path / AUDIT_FILE_NAME
    audit = json.loads(path.read_text())
    files = [f for action in audit["actions"] for f in action["files"]]
    assert len(files) == 7 and all(f.startswith("f-") for f in files)
    assert any("PatientName" in action["removed"] for action in audit["actions"])
    assert audit["summary"]["deid_files"] == "7"
    assert "PLANTED" not in path.read_text()


def test_missing_patient_id_falls_back_to_the_study_and_is_counted(example_copy):
    import pydicom

    for path in (example_copy["source"] / EXAMPLE_PATIENTS[1]).glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientID = ""
        ds.save_as(path)
    samples = collect_batches(read_samples(IngestRequest(source=example_copy["source"], tile_size=8)))
    assert samples.provenance["patients_without_id"] == "1"
    assert len(set(samples.groups.tolist())) == 4


@pytest.mark.parametrize("kind", ["patient", "study", "series", "file"])
def test_pseudonyms_are_distinct_per_kind(kind):
    assert pseudonym(kind, "X") != pseudonym("patient" if kind != "patient" else "file", "X")

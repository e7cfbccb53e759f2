"""The ingest stage on radiology input: the dataset, its audit and prediction names carry no identity."""

from __future__ import annotations

from pathlib import Path

from domains import IngestRequest, get_domain
from domains.radiology.dicom_writer import PLANTED_TEXT
from tasks.dataset import SplitParams, build_dataset, load_dataset

PLANTED = ("PLANTED", *PLANTED_TEXT.values())


def _files_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_ingest_writes_the_audit_beside_the_dataset_and_no_identifier_anywhere(tmp_path: Path) -> None:
    spec = get_domain("radiology")
    example = spec.write_example(tmp_path / "input")
    out = tmp_path / "dataset"
    info = build_dataset("radiology", IngestRequest(source=example["source"], labels=example["labels"], tile_size=8),
                         out, SplitParams(val_fraction=0.0, test_fraction=0.3))
    audit = out / "deidentification_audit.json"
    assert audit.is_file() and "PatientName" in audit.read_text()
    assert info.task == "multilabel" and load_dataset(out).info.digest == info.digest
    written = _files_text(out)
    for text in PLANTED:
        assert text not in written, f"{text!r} leaked into the dataset"


def test_prediction_outputs_are_named_by_pseudonym(tmp_path: Path) -> None:
    spec = get_domain("radiology")
    example = spec.write_example(tmp_path / "input")
    for study in spec.list_prediction_inputs(example["source"]):
        name = spec.name_prediction(study)
        assert name.startswith("study-") and "PLANTED" not in name
        assert name == spec.name_prediction(study)  # stable

"""De-identification end to end: identifiers planted in slide metadata, label images, file names and the
manifest reach no output of ingest, fine-tuning (MLflow run) and prediction, nor their logs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from domains.histopathology.examples import tissue_texture, write_aperio_svs, write_dicom_wsi

# Scanner metadata (Aperio ImageDescription fields and DICOM attributes), label text, names and manifest ids.
METADATA = ("SS-SECRET-4711", "DOE^JANE^SCAN", "BC-99887766", "12/31/25", "jdoe-night-shift")
DICOM_IDS = {"PatientName": "ROE^RICHARD", "PatientID": "MRN-DICOM-271828", "AccessionNumber": "ACC-161803",
             "ContainerIdentifier": "SLIDE-BC-141421", "PatientBirthDate": "19700101"}
LABEL_TEXT = "LABEL-MRN-31337 "
NAMES = ("DOE_JANE", "ROE_RICHARD", "POE_EDGAR", "MRN-0042", "ST-ELSEWHERE")
APERIO_FIELDS = (f"ScanScope ID = {METADATA[0]}|Filename = {METADATA[1]}|Barcode = {METADATA[2]}|"
                 f"Date = {METADATA[3]}|User = {METADATA[4]}")


def label_photo() -> np.ndarray:
    """A slide-label photo whose pixel bytes spell an identifier (stored uncompressed, so it is in the file)."""
    text = (LABEL_TEXT * 4000).encode()[:96 * 160 * 3]
    return np.frombuffer(text, np.uint8).reshape(96, 160, 3).copy()


def slide_pixels(seed: int, side: int = 768) -> np.ndarray:
    image = np.ones((side, side, 3), np.float32)
    image[64:side - 64, 64:side - 64] = tissue_texture(np.random.default_rng(seed), side - 128, side - 128)
    return (image * 255).round().astype(np.uint8)


def write_identifying_cohort(root: Path) -> tuple[Path, Path]:
    """Three Aperio slides and one DICOM WSI, every one with planted metadata and a label image."""
    source = root / "slides"
    rows = []
    for index, (name, patient) in enumerate([("DOE_JANE_1.svs", "MRN-0042-DOE"), ("DOE_JANE_2.svs", "MRN-0042-DOE"),
                                             ("POE_EDGAR_1.svs", "MRN-0043-POE")]):
        write_aperio_svs(source / name, slide_pixels(index), 0.25, label=label_photo(), description=APERIO_FIELDS,
                         label_description=f"label 160x96 {METADATA[2]}")
        rows.append([name, patient, "ST-ELSEWHERE-HOSPITAL", "tumor" if index % 2 else "normal"])
    first = write_dicom_wsi(source / "ROE_RICHARD_case", slide_pixels(9), 0.25, tile=128, label=label_photo(),
                            compression=None,
                            identifiers=DICOM_IDS, seed="roe")
    rows.append([first.relative_to(source).as_posix(), "MRN-0044-ROE", "ST-ELSEWHERE-HOSPITAL", "tumor"])
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["slide", "patient", "site", "label"], *rows])
    return source, manifest


def forbidden_values() -> list[str]:
    return [*METADATA, *DICOM_IDS.values(), LABEL_TEXT.strip(), *NAMES]


def test_planted_identifiers_are_in_the_inputs(tmp_path: Path):
    """The planting works: each identifier is in the slide files and OpenSlide finds the label images (else
    the end-to-end test proves nothing)."""
    import openslide

    source, manifest = write_identifying_cohort(tmp_path)
    blob = b"".join(p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()) + manifest.read_bytes()
    for value in [*METADATA, *DICOM_IDS.values(), LABEL_TEXT.strip()]:
        assert value.encode() in blob, value
    with openslide.OpenSlide(str(source / "DOE_JANE_1.svs")) as svs:
        assert "label" in list(svs.associated_images) and svs.properties["aperio.ScanScope ID"] == METADATA[0]
        assert LABEL_TEXT.encode() in np.asarray(svs.associated_images["label"].convert("RGB")).tobytes()
    with openslide.OpenSlide(str(source / "ROE_RICHARD_case" / "level-0.dcm")) as dicom:
        assert "label" in list(dicom.associated_images) and dicom.properties["dicom.PatientID"] == DICOM_IDS["PatientID"]
        assert LABEL_TEXT.encode() in np.asarray(dicom.associated_images["label"].convert("RGB")).tobytes()


@pytest.mark.slow
def test_no_identifier_reaches_the_dataset_mlflow_run_predictions_or_logs(tmp_path: Path, monkeypatch, capfd, caplog):
    import logging

    import openslide.lowlevel as lowlevel

    from flows.finetune import FinetuneParams, finetune_backbone
    from flows.ingest import IngestParams, TilingParams, ingest_dataset
    from flows.predict import PredictParams, predict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workdir's own store, scanned below

    def refuse(*args, **kwargs):
        raise AssertionError("an associated image (label/macro) was read")

    monkeypatch.setattr(lowlevel, "read_associated_image", refuse)  # trip-wire: label pixels are never read
    caplog.set_level(logging.INFO)
    source, manifest = write_identifying_cohort(tmp_path / "inputs")
    work = tmp_path / "work"
    ingested = ingest_dataset(IngestParams(domain="histopathology", source=str(source), labels=str(manifest),
                                           out=str(work / "dataset"),
                                           tiling=TilingParams(tile_size=32, stride=32, tile_mpp=1.0)))
    assert ingested.quarantined == 0 and sum(ingested.split_counts.values()) > 0
    tuned = finetune_backbone(FinetuneParams(
        domain="histopathology", dataset=ingested.dataset, workdir=str(work),
        backbone={"name": "vit_tiny_patch16_224", "patch_size": 8, "depth": 1}, lora={"rank": 2, "alpha": 4},
        train={"epochs": 1, "batch_size": 32}))
    predicted = predict(PredictParams(domain="histopathology", input=str(source), output=str(work / "predictions"),
                                      model_uri=tuned.model_uri, workdir=str(work), threads=1))
    assert not predicted.failed and len(predicted.outputs) == 4

    files = [p for p in work.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".tif", ".geojson", ".png", ".parquet"} <= kinds  # dataset, reports, predictions, masks
    assert (work / "mlflow.db").is_file() and any(p.is_relative_to(work / "mlartifacts") for p in files)
    logs = capfd.readouterr()
    texts = {"stdout": logs.out, "stderr": logs.err, "log records": caplog.text,
             "receipts": repr((ingested, tuned, predicted))}
    for value in forbidden_values():
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value!r} found in {path.relative_to(work)}"
            assert value not in str(path.relative_to(work)), f"{value!r} in the name {path.relative_to(work)}"
        for where, text in texts.items():
            assert value not in text, f"{value!r} found in the {where}"
    # Label pixels did not become a tile: the stored tiles hold no run of the label's bytes.
    from tasks.dataset import load_dataset

    dataset = load_dataset(ingested.dataset)
    label_bytes = LABEL_TEXT.encode()
    for split in dataset.splits.values():
        stored = (np.asarray(split.images[:]) * 255).round().astype(np.uint8)
        assert label_bytes not in stored.tobytes()

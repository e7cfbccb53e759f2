"""Per-study findings reports and the expansion of a drop folder into studies."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from domains import Channel, PredictionRequest
from domains.radiology import SPEC
from domains.radiology.examples import EXAMPLE_PATIENTS
from domains.radiology.prediction import AGGREGATION, REPORT_FORMAT

FINDINGS = ("nodule", "effusion", "cardiomegaly")


def _predict(input_path, output, infer, channels=("image",), batch_size=64):
    return SPEC.predict(PredictionRequest(
        input=input_path, output=output, channels=tuple(Channel(c) for c in channels), class_names=FINDINGS,
        tile_size=8, stride=8, infer=infer, batch_size=batch_size, task="multilabel"))


def _slice_score_infer(batch):
    # Score = mean brightness for "nodule", constant elsewhere: the max over slices must pick the brightest.
    mean = batch.mean(axis=(1, 2, 3))
    return np.stack([mean, np.full_like(mean, 0.7), np.full_like(mean, 0.1)], axis=1).astype(np.float32)


def test_report_aggregates_slices_by_max_and_writes_json_and_csv(example, tmp_path):
    ct_folder = next(p for p in example["source"].iterdir() if p.name.startswith(EXAMPLE_PATIENTS[0]))
    output = tmp_path / "study.json"
    summary = _predict(ct_folder, output, _slice_score_infer, batch_size=2)
    report = json.loads(output.read_text())
    assert report["format"] == REPORT_FORMAT and report["aggregation"] == AGGREGATION == "max"
    [study] = report["studies"]
    [series] = study["series"]
    slice_scores = [s["scores"]["nodule"] for s in series["slices"]]
    assert len(slice_scores) == 3 and series["volume"] is True
    assert study["scores"]["nodule"] == pytest.approx(max(slice_scores))
    assert study["scores_mean"]["nodule"] == pytest.approx(np.mean(slice_scores), abs=1e-5)
    assert study["positive"] == ["effusion"] and study["study"].startswith("st-") and study["patient"].startswith("p-")
    assert summary.samples == 3 and summary.class_counts == {"nodule": 0, "effusion": 1, "cardiomegaly": 0}
    rows = list(csv.DictReader(output.with_suffix(".csv").open()))
    assert [r["level"] for r in rows] == ["study", "series", "slice", "slice", "slice"]
    assert float(rows[0]["effusion"]) == pytest.approx(0.7)


def test_a_folder_of_several_studies_gives_one_report_entry_per_study(example, tmp_path):
    summary = _predict(example["source"], tmp_path / "all.json", _slice_score_infer)
    report = json.loads((tmp_path / "all.json").read_text())
    assert len(report["studies"]) == 4 and summary.samples == 10
    assert summary.class_counts["effusion"] == 4


def test_bad_infer_output_is_rejected(example, tmp_path):
    with pytest.raises(ValueError, match="infer returned shape"):
        _predict(example["source"], tmp_path / "x.json", lambda b: np.zeros((len(b), 2), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        _predict(example["source"], tmp_path / "x.json", lambda b: np.full((len(b), 3), np.nan, np.float32))


def test_prediction_uses_the_models_channels(example, tmp_path):
    seen = []

    def infer(batch):
        seen.append(batch.shape)
        return np.zeros((len(batch), 3), np.float32)

    summary = _predict(example["source"], tmp_path / "ct.json", infer, channels=("lung", "bone"))
    assert {shape[1:] for shape in seen} == {(2, 8, 8)}
    report = json.loads((tmp_path / "ct.json").read_text())
    assert summary.samples == 6  # the DICOM and NIfTI CT volumes; MR and DX are quarantined
    assert report["dropped"] == {"channel_mismatch": 4}


def test_list_prediction_inputs_one_study_or_drop_folder(example, tmp_path):
    source = example["source"]
    assert SPEC.list_prediction_inputs(source / EXAMPLE_PATIENTS[1]) == [source / EXAMPLE_PATIENTS[1]]
    single = next((source / EXAMPLE_PATIENTS[2]).glob("*.dcm"))
    assert SPEC.list_prediction_inputs(single) == [single]
    assert SPEC.list_prediction_inputs(source) == sorted(source.iterdir())
    # A study whose series lie in sub-folders is still one input.
    study = tmp_path / "study"
    shutil.copytree(source / EXAMPLE_PATIENTS[1], study / "series1")
    assert SPEC.list_prediction_inputs(study) == [study]

"""Streaming radiology ingest: headers first, then one series at a time in bounded batches, in flat memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest
from domains.radiology.examples import write_volume_series
from domains.radiology.sampling import read_samples
from domains.radiology.source import read_source, scan_source


def _cohort(folder: Path, studies: int, slices: int = 8, size: int = 128) -> Path:
    rng = np.random.default_rng(studies)
    for index in range(studies):
        patient = f"PLANTED-ID-{index:04d}"
        write_volume_series(folder / patient, rng, seed=index, patient_id=patient, modality="CT", slices=slices,
                            size=size)
    return folder


def test_header_pass_groups_series_without_decoding_pixels(example, monkeypatch):
    from domains.radiology import source

    def no_decoding(*args, **kwargs):
        raise AssertionError("the header pass decoded pixels")

    monkeypatch.setattr(source, "read_dicom_frames", no_decoding)
    monkeypatch.setattr(source, "read_nifti_series", no_decoding)
    scan = scan_source(example["source"])
    monkeypatch.undo()
    full = read_source(example["source"])
    # Same series, same files per series, and the same de-identification audit as a full read.
    assert sorted(p.series for p in scan.plans) == sorted(s.series for s in full.series)
    assert {p.series: sorted(p.file_keys) for p in scan.plans} == {s.series: sorted(set(s.file_keys)) for s in full.series}
    assert [a.file for a in scan.audits] == [a.file for a in full.audits] and scan.audits
    assert not scan.series and not scan.quarantine


def test_batches_are_bounded_and_the_last_carries_the_whole_source(example):
    batches = list(read_samples(IngestRequest(source=example["source"], labels=example["labels"], tile_size=8,
                                              batch_samples=3)))
    assert [len(b.images) for b in batches] == [3, 3, 3, 1]
    ids = np.concatenate([b.sample_ids for b in batches])
    assert len(set(ids.tolist())) == 10 and all(i.count("/") == 3 for i in ids)
    assert all(not b.provenance and not b.quarantine for b in batches[:-1])
    last = batches[-1].provenance
    assert last["images"] == "10" and last["series"] == "4" and json.loads(last["deidentification_audit"])["actions"]
    assert all(b.class_names == batches[0].class_names and b.task == "multilabel" for b in batches)


_MEASURE = """
import sys, tracemalloc
import nibabel, pydicom, pydicom.pixels, scipy.ndimage
from domains.radiology.sampling import read_samples
from domains.spec import IngestRequest
tracemalloc.start()
count = 0
for batch in read_samples(IngestRequest(source=sys.argv[1], tile_size=64, batch_samples=8)):
    count += len(batch.images)
print(tracemalloc.get_traced_memory()[1], count)
"""


@pytest.mark.slow  # about 30 s: two cohorts written, then read under tracemalloc
def test_peak_memory_is_one_series_not_the_cohort(tmp_path):
    """Traced peak for a cohort of 4N studies stays within 1.3x of N studies (N = 5, 8 slices of 128 px)."""
    peaks = {}
    for studies in (5, 20):
        source = _cohort(tmp_path / f"cohort{studies}", studies)
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(source)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[3])
        peak, count = map(int, run.stdout.split())
        assert count == studies * 8
        peaks[studies] = peak
    print(json.dumps({"peak_traced_bytes": peaks}))
    assert peaks[20] <= 1.3 * peaks[5], peaks


def test_ingest_of_small_batches_writes_the_complete_audit_and_quarantine(example_copy, tmp_path):
    """The dataset writer gets the batches one by one; the reports still see every file and every problem."""
    from tasks.dataset import SplitParams, build_dataset

    # Cut inside the pixel data: the header pass keeps the file, decoding its series quarantines it.
    truncated = sorted((example_copy["source"] / "PLANTED-ID-102").glob("*.dcm"))[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    headers = {a.file for a in scan_source(example_copy["source"]).audits}
    [bad] = read_source(example_copy["source"]).quarantine
    assert bad["item"] in headers and len(headers) == 7  # its header was fine: the file failed in the second pass
    expected_audit = headers - {bad["item"]}
    out = tmp_path / "dataset"
    info = build_dataset("radiology", IngestRequest(source=example_copy["source"], labels=example_copy["labels"],
                                                    tile_size=8, batch_samples=2),
                         out, SplitParams(val_fraction=0.0, test_fraction=0.3))
    audit = json.loads((out / "deidentification_audit.json").read_text())
    files = {f for action in audit["actions"] for f in action["files"]}
    assert files == expected_audit and len(files) == 6
    assert audit["summary"]["deid_files"] == "6"
    assert info.dropped == {"unreadable": 1}

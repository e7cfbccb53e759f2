"""The demo cohort: seeded, built from the bundled real slide, tumours planted where the GeoJSON says."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from domains import IngestRequest
from domains.histopathology import demo
from domains.histopathology.manifest import label_points, read_annotations
from domains.spec import DomainInputError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("histo-demo")
    return demo.write_demo_cohort(folder, patients=5, side=320)


def _rows(manifest):
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def test_demo_reads_the_bundled_real_slide():
    path = demo.demo_slide_path()
    assert path.name == "CMU-1-Small-Region.svs" and path.stat().st_size > 1_000_000
    image, mpp = demo.read_demo_tissue()
    assert image.shape == (2967, 2220, 3) and mpp == pytest.approx(0.499)


def test_missing_demo_slide_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(demo, "SAMPLE_NAME", "absent.svs")
    with pytest.raises(DomainInputError, match="missing"):
        demo.demo_slide_path()


def test_cohort_is_seeded_and_labels_what_was_planted(cohort, tmp_path):
    import tifffile

    slides, manifest = cohort
    rows = _rows(manifest)
    assert len(rows) == 5 + demo.DEMO_SECOND_SLIDE
    assert {r["label"] for r in rows} == {"normal", "tumor"}
    for row in rows:  # a patient's slides share the patient's label
        assert {r["label"] for r in rows if r["patient"] == row["patient"]} == {row["label"]}
    again, _ = demo.write_demo_cohort(tmp_path, patients=5, side=320)
    for row in rows:
        first, second = tifffile.imread(slides / row["slide"]), tifffile.imread(again / row["slide"])
        assert first.shape == (320, 320, 3) and (first == second).all()
    with tifffile.TiffFile(slides / rows[0]["slide"]) as tif:
        assert len(tif.pages) >= 3  # a pyramid: 320, 160, 80


def _haematoxylin(pixels: np.ndarray) -> np.ndarray:
    od = -np.log((pixels.astype(np.float32) + 1) / 256)
    return od @ demo.HAEMATOXYLIN_OD


def test_plant_tumour_changes_only_tissue_inside_the_region():
    image, _ = demo.read_demo_tissue()
    tissue, rng = demo.tissue_indicator(image), np.random.default_rng(0)
    base, donor = demo._crop(rng, image, tissue, 256, 0.5), demo._crop(rng, image, tissue, 256, 0.5)
    region = np.zeros((256, 256), bool)
    region[64:192, 64:192] = True
    planted = demo.plant_tumour(base, donor, region)
    changed = (planted != base).any(axis=2)
    assert changed[region].mean() > 0.3 and not changed[~region].any()
    # Where it changed, it holds the half-scale donor with 35 % more haematoxylin optical density.
    from PIL import Image

    half = np.asarray(Image.fromarray(donor).resize((128, 128), Image.Resampling.BOX))
    dense = np.tile(half, (2, 2, 1))
    ratio = _haematoxylin(planted)[changed].mean() / _haematoxylin(dense)[changed].mean()
    assert 1.2 < ratio < 1.45


def test_cohort_tumour_regions_hold_tissue_and_normal_slides_have_none(cohort):
    import tifffile

    slides, manifest = cohort
    for row in _rows(manifest):
        regions = read_annotations(manifest.parent / row["annotations"]).regions
        names = sorted({r.name for r in regions})
        assert names == (["normal", "tumor"] if row["label"] == "tumor" else ["normal"])
        if row["label"] != "tumor":
            continue
        pixels = tifffile.imread(slides / row["slide"])
        yy, xx = np.mgrid[0:320, 0:320]
        labels = label_points(regions, np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1),
                              {"normal": 0, "tumor": 1}).reshape(320, 320)
        assert demo.tissue_indicator(pixels)[labels == 1].mean() > 0.3


def test_demo_cohort_ingests_with_both_classes_and_patient_groups(cohort):
    from domains.histopathology.reader import read_samples

    slides, manifest = cohort
    batches = list(read_samples(IngestRequest(source=slides, labels=manifest, tile_size=32, stride=32)))
    labels = np.concatenate([b.labels for b in batches])
    groups = np.concatenate([b.groups for b in batches])
    assert set(labels.tolist()) == {0, 1} and len(set(groups.tolist())) == 5
    assert batches[-1].quarantine == []
    # Every slide gives tiles: crops are chosen so that the reader's own tissue mask keeps them.
    ids = np.concatenate([b.sample_ids for b in batches])
    assert len({i.split("/")[0] for i in ids.tolist()}) == len(_rows(manifest))
    assert json.loads(batches[-1].provenance["slide_labels"])  # slide labels travel for slide-level work

"""The histopathology reader on real pyramidal TIFF slides: tiles, labels, patient groups, quarantine, the gate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from domains import IngestRequest
from domains.histopathology.examples import EXAMPLE_PATIENTS, tissue_texture, write_example, write_pyramid_tiff
from domains.histopathology.reader import read_samples, write_ingest_reports
from domains.spec import DomainInputError

# A scanner's ImageDescription full of identifiers (Aperio style): none may reach any output.
PLANTED = ("SS-SECRET-1234", "DOE^JOHN", "BARCODE-998877", "11/22/2026", "dr.who")
APERIO_DESCRIPTION = (f"Aperio Image Library v12.0.5\r\n384x384 -> 384x384 JPEG/RGB Q=70|AppMag = 20|MPP = 0.5|"
                      f"ScanScope ID = {PLANTED[0]}|Filename = {PLANTED[1]}|Barcode = {PLANTED[2]}|"
                      f"Date = {PLANTED[3]}|User = {PLANTED[4]}")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example(tmp_path_factory.mktemp("histo-example"), seed=0)


def _read(source, labels=None, **kwargs) -> list:
    options = dict(tile_size=16, stride=16)
    options.update(kwargs)
    return list(read_samples(IngestRequest(source=source, labels=labels, **options)))


def _all(batches, name):
    return np.concatenate([np.asarray(getattr(b, name)) for b in batches])


def test_example_reads_into_bounded_uint8_batches_grouped_by_patient(example):
    batches = _read(example["source"], example["labels"], batch_samples=100)
    assert all(len(b.images) <= 100 for b in batches) and len(batches) > 3
    first = batches[0]
    assert first.images.dtype == np.uint8 and first.images.shape[1:] == (3, 16, 16)
    assert first.scaling == ((1 / 255, 0.0),) * 3 and [c.name for c in first.channels] == ["R", "G", "B"]
    labels, groups, ids = _all(batches, "labels"), _all(batches, "groups"), _all(batches, "sample_ids")
    assert set(labels.tolist()) == {0, 1} and first.class_names == ("normal", "tumor")
    assert len(set(groups.tolist())) == len(EXAMPLE_PATIENTS) and all(g.startswith("p-") for g in groups)
    assert len(set(ids.tolist())) == len(ids)
    # Left half of each slide is outlined "normal", right half "tumor": the label follows the tile centre.
    locations = _all(batches, "locations")
    centre_x = locations[:, 1] + 8
    assert (labels[centre_x < 192] == 0).all() and (labels[centre_x >= 192] == 1).all()
    provenance = batches[-1].provenance
    assert provenance["slides_read"] == "4" and provenance["tile_mpp"] == "0.5"
    assert provenance["label_kind"] == "regions"


def test_tiles_are_cut_at_the_requested_mpp(example):
    fine = _all(_read(example["source"], example["labels"]), "images")
    coarse = _read(example["source"], example["labels"], tile_mpp=1.0)
    # Twice the microns per pixel: a tile covers four times the area, so about a quarter as many tiles.
    assert 0.15 < len(_all(coarse, "images")) / len(fine) < 0.4
    assert coarse[-1].provenance["tile_mpp"] == "1.0"


def test_slide_labels_without_regions_label_every_tile_of_the_slide(example, tmp_path):
    manifest = tmp_path / "slide_labels.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "label"])
        writer.writerows([["A1.tif", "P1", "benign"], ["B1.tif", "P2", "malignant"], ["C1.tif", "P3", "benign"]])
    batches = _read(example["source"], manifest, tile_size=32, stride=32)
    assert batches[0].class_names == ("benign", "malignant")
    labels, groups = _all(batches, "labels"), _all(batches, "groups")
    for group in set(groups.tolist()):
        assert len(set(labels[groups == group].tolist())) == 1  # one patient, one slide, one label
    # B2.tif is in the folder but not in this manifest: left out and said so.
    [entry] = batches[-1].quarantine
    assert entry["reason"] == "not_in_manifest" and entry["item"].startswith("sl-")
    assert json.loads(batches[-1].provenance["slide_labels"]).keys() == \
        json.loads(batches[-1].provenance["slide_patients"]).keys()


def test_without_a_manifest_every_slide_is_unlabelled_and_its_own_group(example):
    batches = _read(example["source"], tile_size=32, stride=32)
    assert (_all(batches, "labels") == -1).all()
    assert len(set(_all(batches, "groups").tolist())) == 4


def test_a_broken_slide_is_quarantined_and_the_others_are_read(example, tmp_path):
    import shutil

    source = tmp_path / "slides"
    shutil.copytree(example["source"], source)
    (source / "B1.tif").write_bytes(b"")
    data = (source / "C1.tif").read_bytes()
    (source / "C1.tif").write_bytes(data[: len(data) // 2])
    batches = _read(source, example["labels"], tile_size=32, stride=32)
    quarantine = batches[-1].quarantine
    assert sorted(q["reason"] for q in quarantine) == ["unreadable_slide", "unreadable_slide"]
    assert any("empty file" in q["problem"] for q in quarantine)
    assert any("truncated" in q["problem"] for q in quarantine)
    text = json.dumps(quarantine)
    assert "B1" not in text and "C1" not in text and str(source) not in text
    assert batches[-1].provenance["slides_read"] == "2"


def test_no_readable_slide_at_all_is_an_error_naming_the_source(tmp_path):
    source = tmp_path / "slides"
    source.mkdir()
    (source / "only.svs").write_bytes(b"")
    with pytest.raises(DomainInputError, match="no slide could be read") as error:
        _read(source)
    assert str(source) in str(error.value)


def _plain_slide(path, description=None, resolution=True, side=384):
    rng = np.random.default_rng(sum(path.name.encode()))  # another slide, other pixels (copies are duplicates)
    image = np.ones((side, side, 3), np.float32)
    image[32:352, 32:352] = tissue_texture(rng, 320, 320)
    pixels = (image * 255).astype(np.uint8)
    if resolution:
        return write_pyramid_tiff(path, pixels, 0.5, tile=64, description=description)
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(64, 64), description=description)
    return path


def test_slide_without_mpp_is_refused_unless_given(tmp_path):
    source = tmp_path / "slides"
    _plain_slide(source / "nompp.tif", resolution=False)
    with pytest.raises(DomainInputError, match="--mpp"):
        _read(source, tile_size=32, stride=32)
    batches = _read(source, tile_size=32, stride=32, mpp=0.5)
    facts = json.loads(batches[-1].provenance["slide_facts"])
    assert "user --mpp" in json.dumps(facts)


def test_identifiers_in_slide_metadata_and_manifest_reach_no_output(tmp_path):
    from tasks.dataset import SplitParams, write_dataset

    source = tmp_path / "slides"
    names = ["DOE_JOHN_1.tif", "DOE_JOHN_2.tif", "ROE_JANE_1.tif", "POE_EDGAR_1.tif"]
    for name in names:
        _plain_slide(source / name, description=APERIO_DESCRIPTION)
    manifest = tmp_path / "manifest.csv"
    patients = ["MRN-0001-JOHN", "MRN-0001-JOHN", "MRN-0002-JANE", "MRN-0003-EDGAR"]
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "site", "label"])
        writer.writerows([[n, p, "ST-MARYS-HOSPITAL", "tumor" if i % 2 else "normal"]
                          for i, (n, p) in enumerate(zip(names, patients))])
    out = tmp_path / "dataset"
    request = IngestRequest(source=source, labels=manifest, tile_size=32, stride=32)
    from domains import get_domain

    write_dataset(read_samples(request), "histopathology", "classification", out, SplitParams(),
                  reports=get_domain("histopathology").write_ingest_reports)
    forbidden = [*PLANTED, "DOE_JOHN", "ROE_JANE", "POE_EDGAR", "MRN-000", "ST-MARYS", str(source)]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and (out / "deidentification_audit.json").is_file()
    for path in files:
        data = path.read_bytes()
        for value in forbidden:
            assert value.encode() not in data, f"{value!r} found in {path.relative_to(out)}"
    audit = json.loads((out / "deidentification_audit.json").read_text())
    [group] = audit["slide_groups"]  # four slides from one "scanner": one entry listing all four
    assert len(group["slides"]) == 4 and "tiff.ImageDescription" in group["dropped_metadata_keys"]


def test_ingest_reports_write_one_mask_per_slide_and_the_audit(tmp_path):
    from PIL import Image

    source = tmp_path / "slides"
    for name in ("a.tif", "b.tif"):
        _plain_slide(source / name, side=768)  # tissue in the top-left 352 px, glass elsewhere
    batches = _read(source, tile_size=32, stride=32)
    written = write_ingest_reports(batches[-1], tmp_path / "reports")
    masks = [p for p in written if p.suffix == ".png"]
    assert len(masks) == 2 and all(p.parent.name == "tissue_masks" and p.stem.startswith("sl-") for p in masks)
    mask = np.asarray(Image.open(masks[0]))
    assert 0.1 < mask.mean() < 0.4  # the tissue square is about a fifth of the slide
    locations = _all(batches, "locations")
    assert locations.max() < 352 + 32  # no tile from the glass
    audit = json.loads((tmp_path / "reports" / "deidentification_audit.json").read_text())
    assert {s for g in audit["slide_groups"] for s in g["slides"]} == {p.stem for p in masks}


def test_a_copied_slide_is_read_once(example, tmp_path):
    import shutil

    source = tmp_path / "slides"
    shutil.copytree(example["source"], source)
    shutil.copy2(source / "A1.tif", source / "A1-copy.tif")
    batches = _read(source, tile_size=32, stride=32)
    [entry] = batches[-1].quarantine
    assert entry["reason"] == "duplicate_slide" and "A1" not in json.dumps(entry)
    assert batches[-1].provenance["slides_read"] == "4"


def test_two_sources_with_the_same_folder_name_get_different_source_names(example, tmp_path):
    # a/slides and b/slides in one many-source ingest: each source's provenance is kept under its own name.
    import shutil

    names = []
    for parent in ("a", "b"):
        folder = tmp_path / parent / "slides"
        shutil.copytree(example["source"], folder)
        batches = _read(folder)
        names.append({b.source for b in batches})
    assert all(len(found) == 1 for found in names)
    assert names[0] != names[1]
    assert all(name.startswith("slides:") and "slides/" not in name for found in names for name in found)

"""3DHISTECH MIRAX (.mrxs + a folder of Slidedat.ini, Index.dat, Data0000.dat) through OpenSlide and the ingest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest
from domains.histopathology.examples import tissue_texture, write_mrxs
from domains.histopathology.reader import list_slides, read_samples
from domains.histopathology.slide import open_slide
from domains.histopathology.slide_metadata import metadata_audit, pixel_facts
from domains.spec import DomainInputError

PLANTED = {"SLIDE_NAME": "JANE-DOE-1970", "PROJECT_NAME": "MRN 12345678", "SLIDE_CREATIONDATETIME": "20260102030405"}
FIRST_ROW = tuple((column, 0) for column in range(6))  # a row the scanner skipped: bounds start one image down


def slide_pixels(seed: int, height: int = 640, width: int = 768) -> np.ndarray:
    image = np.ones((height, width, 3), np.float32)
    image[32:height - 32, 32:width - 32] = tissue_texture(np.random.default_rng(seed), height - 64, width - 64)
    return (image * 255).round().astype(np.uint8)


def test_openslide_reads_a_mirax_slide_with_its_mpp_levels_bounds_and_label(tmp_path: Path, monkeypatch):
    from openslide import lowlevel

    rgb = slide_pixels(0)
    path = write_mrxs(tmp_path / "slide.mrxs", rgb, 0.25, missing=FIRST_ROW, general=PLANTED,
                      label=np.full((60, 100, 3), 30, np.uint8))
    monkeypatch.setattr(lowlevel, "read_associated_image",
                        lambda *a: pytest.fail("associated image read"))  # the label is never decoded
    with open_slide(path) as slide:
        g = slide.geometry
        assert g.format == "openslide:mirax" and g.mpp_source == "openslide.mpp-x/y"
        assert (g.mpp_x, g.mpp_y) == (pytest.approx(0.25), pytest.approx(0.25))
        assert [(w, h, d) for w, h, d in g.levels] == [(768, 640, 1.0), (384, 320, 2.0), (192, 160, 4.0)]
        assert (g.bounds_x, g.bounds_y, g.bounds_width, g.bounds_height) == (0, 128, 768, 512)
        exact = slide.read_region(136, 200, 256, 0.25)  # across camera images
        halved = slide.read_region(128, 256, 64, 0.5)  # from the concatenated level
        facts, audit = pixel_facts(slide), metadata_audit(slide)
    assert np.abs(exact.astype(float) - rgb[200:456, 136:392]).mean() < 6  # JPEG q90
    box = rgb[256:384, 128:256].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(halved.astype(float) - box).mean() < 6
    # Slidedat.ini values (OpenSlide's mirax.GENERAL.*) and the barcode image stay behind the gate.
    text = json.dumps([facts, audit])
    assert not any(value in text for value in PLANTED.values())
    assert audit["dropped_associated_images"] == ["label"]
    assert "mirax.GENERAL.SLIDE_NAME" in audit["dropped_metadata_keys"]


def test_an_empty_mrxs_opens_from_its_folder_and_a_missing_folder_is_refused(tmp_path: Path):
    path = write_mrxs(tmp_path / "slide.mrxs", slide_pixels(1), 0.5)
    assert path.stat().st_size == 0  # as OpenSlide allows: the data are in the folder beside it
    with open_slide(path) as slide:
        assert slide.geometry.mpp_x == pytest.approx(0.5)
    shutil.rmtree(tmp_path / "slide")
    with pytest.raises(DomainInputError, match="Slidedat.ini"):
        open_slide(path)


def test_ingest_reads_each_mirax_slide_once_with_its_bounds(tmp_path: Path):
    source = tmp_path / "slides"
    write_mrxs(source / "a.mrxs", slide_pixels(2), 0.25, missing=FIRST_ROW, general=PLANTED,
               slide_id="5c1de0f7-0d6a-4d1a-9f4e-00000000000a")
    write_mrxs(source / "b.mrxs", slide_pixels(3), 0.25, slide_id="5c1de0f7-0d6a-4d1a-9f4e-00000000000b")
    shutil.copytree(source / "b", source / "b-copy")
    for stub in ("a.mrxs", "b.mrxs", "b-copy.mrxs"):
        (source / stub).write_bytes(b"\x01MIRAX" * 40)  # the same stub bytes for every slide
    # Only the .mrxs files are slides (the folder files belong to them); equal stubs do not make a copy, an
    # equal folder does.
    assert [p.name for p in list_slides(source)] == ["a.mrxs", "b-copy.mrxs", "b.mrxs"]
    batches = list(read_samples(IngestRequest(source=source, tile_size=32, stride=32, tile_mpp=0.5)))
    [entry] = batches[-1].quarantine
    assert entry["reason"] == "duplicate_slide"
    provenance = batches[-1].provenance
    facts = json.loads(provenance["slide_facts"])
    assert sorted(f["reader"] for f in facts.values()) == ["openslide:mirax"] * 2
    assert sorted(f["bounds_y"] for f in facts.values()) == ["0", "128"]
    assert provenance["slides_read"] == "2"
    assert not any(value in json.dumps(provenance) for value in PLANTED.values())
    images = np.concatenate([b.images for b in batches])
    # 768 x 640 px at 0.25 um/px: 12 x 10 tiles of 16 um per slide (12 x 8 for the one from y = 128).
    assert 100 <= len(images) <= 12 * 10 + 12 * 8 and images.std() > 5
    # The partly scanned slide's tiles are cut from its bounds on (ids are "<slide>/<x>,<y>" in level 0).
    offset_slide = next(key for key, f in facts.items() if f["bounds_y"] == "128")
    rows = [int(i.rsplit(",", 1)[1]) for b in batches for i in b.sample_ids.tolist() if i.startswith(offset_slide)]
    assert rows and min(rows) == 128

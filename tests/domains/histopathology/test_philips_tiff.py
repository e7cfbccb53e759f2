"""Philips TIFF (XML DPUfsImport description, per-level pixel spacings) through OpenSlide and the ingest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest
from domains.histopathology.examples import tissue_texture, write_philips_tiff
from domains.histopathology.reader import read_samples
from domains.histopathology.slide import open_slide
from domains.histopathology.slide_metadata import metadata_audit, pixel_facts


def slide_pixels(seed: int, height: int = 648, width: int = 800) -> np.ndarray:
    image = np.ones((height, width, 3), np.float32)
    image[48:height - 48, 48:width - 48] = tissue_texture(np.random.default_rng(seed), height - 96, width - 96)
    return (image * 255).round().astype(np.uint8)


def test_openslide_reads_a_philips_tiff_with_its_mpp_levels_and_label(tmp_path: Path):
    rgb = slide_pixels(0)
    path = write_philips_tiff(tmp_path / "slide.tiff", rgb, 0.25, barcode="PHILIPS-BC-0099",
                              label=np.full((48, 80, 3), 200, np.uint8))
    with open_slide(path) as slide:
        g = slide.geometry
        assert g.format == "openslide:philips" and (g.mpp_x, g.mpp_y) == (pytest.approx(0.25), pytest.approx(0.25))
        assert [(w, h, d) for w, h, d in g.levels] == [(800, 648, 1.0), (400, 324, 2.0)]
        tile = slide.read_region(128, 128, 64, 0.5)  # from the halved level
        facts, audit = pixel_facts(slide), metadata_audit(slide)
    box = rgb[128:256, 128:256].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(tile.astype(float) - box).mean() < 6
    # The barcode (base64 in the XML, decoded by OpenSlide) and the label stay behind the gate.
    assert "PHILIPS-BC-0099" not in json.dumps([facts, audit]) and audit["dropped_associated_images"] == ["label"]
    assert "openslide.barcode" in audit["dropped_metadata_keys"]


def test_ingest_reads_tiles_from_a_philips_tiff(tmp_path: Path):
    source = tmp_path / "slides"
    write_philips_tiff(source / "slide.tiff", slide_pixels(1), 0.25)
    batches = list(read_samples(IngestRequest(source=source, tile_size=32, stride=32, tile_mpp=0.5)))
    facts = json.loads(batches[-1].provenance["slide_facts"])
    assert [f["reader"] for f in facts.values()] == ["openslide:philips"]
    images = np.concatenate([b.images for b in batches])
    # 800 x 648 px at 0.25 um/px: a 13 x 11 grid of 16 um tiles, less the glass around the tissue.
    assert 60 <= len(images) <= 13 * 11 and images.std() > 5

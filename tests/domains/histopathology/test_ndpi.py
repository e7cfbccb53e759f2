"""Hamamatsu NDPI (one JPEG strip per level, restart intervals as tiles) through OpenSlide and the ingest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest
from domains.spec import DomainInputError
from domains.histopathology.examples import tissue_texture, write_ndpi
from domains.histopathology.reader import read_samples
from domains.histopathology.slide import open_slide
from domains.histopathology.slide_metadata import metadata_audit, pixel_facts

PLANTED = {"Created": "2026/01/02 03:04:05", "Reference": "NDPI-SECRET-4711", "Operator": "Jane Doe"}


def slide_pixels(seed: int, height: int = 768, width: int = 1024) -> np.ndarray:
    image = np.ones((height, width, 3), np.float32)
    image[48:height - 48, 48:width - 48] = tissue_texture(np.random.default_rng(seed), height - 96, width - 96)
    return (image * 255).round().astype(np.uint8)


def test_openslide_reads_an_ndpi_with_its_mpp_levels_and_macro(tmp_path: Path, monkeypatch):
    from openslide import lowlevel

    rgb = slide_pixels(0)
    path = write_ndpi(tmp_path / "slide.ndpi", rgb, 0.25, macro=np.full((64, 160, 3), 90, np.uint8),
                      properties=PLANTED)
    monkeypatch.setattr(lowlevel, "read_associated_image",
                        lambda *a: pytest.fail("associated image read"))  # the macro is never decoded
    with open_slide(path) as slide:
        g = slide.geometry
        assert g.format == "openslide:hamamatsu" and g.mpp_source == "openslide.mpp-x/y"
        assert (g.mpp_x, g.mpp_y) == (pytest.approx(0.25), pytest.approx(0.25))
        # The two written levels; OpenSlide adds the JPEG decoder's 1/4 and 1/8 scalings below them.
        assert [(w, h, d) for w, h, d in g.levels][:2] == [(1024, 768, 1.0), (512, 384, 2.0)]
        exact = slide.read_region(136, 200, 256, 0.25)  # level 0, across restart intervals and MCU rows
        halved = slide.read_region(128, 128, 64, 0.5)  # from the halved level
        facts, audit = pixel_facts(slide), metadata_audit(slide)
    assert np.abs(exact.astype(float) - rgb[200:456, 136:392]).mean() < 6  # JPEG q90
    box = rgb[128:256, 128:256].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(halved.astype(float) - box).mean() < 6
    # Scanner properties (OpenSlide's hamamatsu.*) and the macro photo stay behind the gate.
    text = json.dumps([facts, audit])
    assert not any(value in text for value in PLANTED.values())
    assert audit["dropped_associated_images"] == ["macro"]
    assert "hamamatsu.Reference" in audit["dropped_metadata_keys"]


def test_an_ndpi_without_resolution_is_refused_not_guessed_from_its_lens(tmp_path: Path):
    path = write_ndpi(tmp_path / "bare.ndpi", slide_pixels(2), None, lens=20.0)
    with pytest.raises(DomainInputError, match="--mpp") as refused:
        open_slide(path)
    assert "objective power" in str(refused.value)
    with open_slide(path, mpp=0.46) as slide:
        assert (slide.geometry.mpp_x, slide.geometry.mpp_source) == (0.46, "user --mpp")


def test_ingest_reads_tiles_from_an_ndpi(tmp_path: Path):
    source = tmp_path / "slides"
    write_ndpi(source / "slide.ndpi", slide_pixels(1), 0.25, properties=PLANTED)
    batches = list(read_samples(IngestRequest(source=source, tile_size=32, stride=32, tile_mpp=0.5)))
    facts = json.loads(batches[-1].provenance["slide_facts"])
    assert [f["reader"] for f in facts.values()] == ["openslide:hamamatsu"]
    assert not any(value in json.dumps(batches[-1].provenance) for value in PLANTED.values())
    images = np.concatenate([b.images for b in batches])
    # 1024 x 768 px at 0.25 um/px: a 16 x 12 grid of 16 um tiles, less the glass around the tissue.
    assert 100 <= len(images) <= 16 * 12 and images.std() > 5

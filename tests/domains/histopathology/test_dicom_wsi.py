"""DICOM WSI (VL Whole Slide Microscopy, TILED_FULL, one file per level) through OpenSlide 4 and the ingest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from domains import IngestRequest
from domains.histopathology.examples import tissue_texture, write_dicom_wsi
from domains.histopathology.reader import list_slides, read_samples
from domains.histopathology.slide import open_slide


def slide_pixels(seed: int, height: int = 320, width: int = 416) -> np.ndarray:
    """Tissue on white glass, with a width and height that are not multiples of the frame size."""
    image = np.ones((height, width, 3), np.float32)
    image[24:height - 24, 24:width - 24] = tissue_texture(np.random.default_rng(seed), height - 48, width - 48)
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("compression", [None, "jpeg"])
def test_openslide_opens_a_dicom_wsi_with_its_pyramid_and_the_mpp_from_pixel_spacing(tmp_path: Path, compression):
    import pydicom

    rgb = slide_pixels(0)
    first = write_dicom_wsi(tmp_path / "slide", rgb, mpp=0.25, tile=64, compression=compression)
    assert sorted(p.name for p in (tmp_path / "slide").iterdir()) == ["level-0.dcm", "level-1.dcm"]
    level1 = pydicom.dcmread(tmp_path / "slide" / "level-1.dcm", stop_before_pixels=True)
    spacing_mm = [float(v) for v in level1.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing_mm == [0.0005, 0.0005] and level1.DimensionOrganizationType == "TILED_FULL"
    # OpenSlide finds the whole slide from any of its files.
    for path in (first, tmp_path / "slide" / "level-1.dcm"):
        with open_slide(path) as slide:
            g = slide.geometry
            assert g.format == "openslide:dicom" and g.mpp_source == "DICOM PixelSpacing"
            assert (g.mpp_x, g.mpp_y) == (pytest.approx(0.25), pytest.approx(0.25))
            assert [(w, h) for w, h, _ in g.levels] == [(416, 320), (208, 160)]
            full = slide.read_region(0, 0, 128, 0.25)   # level 0 as stored
            half = slide.read_region(0, 0, 64, 0.5)     # the halved level
    if compression is None:  # uncompressed frames come back exactly
        assert np.array_equal(full, rgb[:128, :128])
    else:
        assert np.abs(full.astype(int) - rgb[:128, :128]).mean() < 6
    box = rgb[:128, :128].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(half.astype(float) - box).mean() < 6


def test_a_dicom_wsi_without_pixel_spacing_needs_the_user_mpp(tmp_path: Path):
    import pydicom

    first = write_dicom_wsi(tmp_path / "slide", slide_pixels(1), mpp=0.5, compression=None)
    for path in (tmp_path / "slide").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.SharedFunctionalGroupsSequence
        ds.save_as(path, enforce_file_format=True)
    from domains.spec import DomainInputError

    with pytest.raises(DomainInputError, match="--mpp"):
        open_slide(first)
    with open_slide(first, mpp=0.5) as slide:
        assert slide.geometry.mpp_source == "user --mpp"


def test_ingest_reads_tiles_from_dicom_slides(tmp_path: Path):
    from tasks.dataset import SplitParams, build_dataset

    source = tmp_path / "slides"
    rows = []
    for index, patient in enumerate(["P-1", "P-2", "P-3"]):
        label = np.full((60, 100, 3), 255, np.uint8) if index == 1 else None
        first = write_dicom_wsi(source / f"case{index}", slide_pixels(10 + index, 648, 800), mpp=0.25, tile=128,
                                compression="jpeg", label=label, seed=index)
        # The manifest may name any file of a DICOM folder (here, for case1, not the first one listed).
        named = first.with_name("level-1.dcm") if index == 1 else first
        rows.append([named.relative_to(source).as_posix(), patient, "tumor" if index % 2 else "normal"])
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["slide", "patient", "label"], *rows])
    assert len(list_slides(source)) == 3  # one entry per DICOM folder, not one per level file
    request = IngestRequest(source=source, labels=manifest, tile_size=32, stride=32, tile_mpp=0.5)
    batches = list(read_samples(request))
    provenance = batches[-1].provenance
    assert provenance["slides_read"] == "3" and batches[-1].quarantine == []
    facts = json.loads(provenance["slide_facts"])
    assert {f["reader"] for f in facts.values()} == {"openslide:dicom"}
    assert {f["mpp_source"] for f in facts.values()} == {"DICOM PixelSpacing"}
    images = np.concatenate([b.images for b in batches])
    # 800 x 648 px at 0.25 um/px is 200 x 162 um: 32 px tiles at 0.5 um/px (16 um) give a grid of 13 x 11
    # per slide (edge tiles included), less the glass around the tissue.
    assert 3 * 60 <= len(images) <= 3 * 13 * 11 and images.shape[1:] == (3, 32, 32), batches[-1].dropped
    assert images.std() > 5  # tissue, not white padding
    info = build_dataset("histopathology", request, tmp_path / "dataset", SplitParams())
    assert sum(info.split_counts.values()) == len(images)

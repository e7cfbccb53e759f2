"""The metadata gate: identifiers planted in a slide's metadata and label never reach the facts or the audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from domains.histopathology.slide import open_slide
from domains.histopathology.slide_metadata import metadata_audit, pixel_facts

PLANTED = ("SS9999-SECRET", "JANE-DOE-1970", "03/04/21", "10:11:12", "jdoe-hospital-0042", "BC-424242",
           "Jane Doe", "MRN 12345678")


def aperio_description(width: int, height: int, extra: str = "") -> str:
    return (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=70"
            f"|AppMag = 20|StripeWidth = 2040|ScanScope ID = {PLANTED[0]}|Filename = {PLANTED[1]}"
            f"|Date = {PLANTED[2]}|Time = {PLANTED[3]}|User = {PLANTED[4]}|MPP = 0.2500|Barcode = {PLANTED[5]}{extra}")


def label_pixels() -> np.ndarray:
    """A label photo: white card with a black 'barcode'."""
    label = np.full((120, 200, 3), 255, np.uint8)
    label[30:90, 20:180:6] = 0
    return label


def write_svs_like(path: Path) -> Path:
    """An Aperio-layout TIFF (OpenSlide reads it as 'aperio'): tiled levels, thumbnail, label and macro."""
    import tifffile

    rng = np.random.default_rng(0)
    level0 = np.clip(rng.normal((220, 140, 190), 12, (768, 1024, 3)), 0, 255).astype(np.uint8)
    plain = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), compression="jpeg", description=aperio_description(1024, 768), **plain)
        tif.write(level0[::4, ::4], compression="jpeg",
                  description=f"Aperio Image Library v12.0.15 \r\n1024x768 -> 256x192 - |ScanScope ID = {PLANTED[0]}",
                  **plain)
        tif.write(level0[::2, ::2], tile=(256, 256), compression="jpeg",
                  description="Aperio Image Library v12.0.15 \r\n1024x768 -> 512x384 JPEG/RGB Q=70|MPP = 0.2500",
                  **plain)
        tif.write(label_pixels(), compression="lzw", subfiletype=1,
                  description=f"Aperio Image Library v12.0.15\r\nlabel 200x120 {PLANTED[5]}", **plain)
        tif.write(level0[::8, ::8], compression="jpeg", subfiletype=9,
                  description="Aperio Image Library v12.0.15\r\nmacro 128x96", **plain)
    return path


def write_ome_with_label(path: Path) -> Path:
    """An OME-TIFF whose metadata carries identifiers and whose second image is a named label photo."""
    import tifffile

    rng = np.random.default_rng(1)
    level0 = np.clip(rng.normal((220, 140, 190), 12, (512, 512, 3)), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(level0, photometric="rgb", tile=(128, 128), compression="zlib", subifds=1,
                  software=PLANTED[6], datetime="2021:03:04 10:11:12",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "Name": PLANTED[1],
                            "Description": f"{PLANTED[7]} {PLANTED[4]}"})
        tif.write(level0[::2, ::2], photometric="rgb", tile=(128, 128), compression="zlib", subfiletype=1)
        tif.write(label_pixels(), photometric="rgb", metadata={"axes": "YXS", "Name": f"{PLANTED[6]} label"})
    return path


def gate_output(path: Path) -> str:
    with open_slide(path) as slide:
        facts = pixel_facts(slide)
        audit = metadata_audit(slide)
        slide.read_region(0, 0, 64, 0.5)
    assert all(isinstance(v, str) for v in facts.values())
    return json.dumps({"facts": facts, "audit": audit})


def _forbid_associated_reads(monkeypatch) -> None:
    """Trip-wire: any read of label/macro/thumbnail pixels through OpenSlide fails the test."""
    import openslide.lowlevel as lowlevel

    def refuse(*args, **kwargs):
        raise AssertionError("an associated image (label/macro) was read")

    monkeypatch.setattr(lowlevel, "read_associated_image", refuse)


def test_svs_identifiers_and_label_never_cross_the_gate(tmp_path: Path, monkeypatch) -> None:
    _forbid_associated_reads(monkeypatch)
    path = write_svs_like(tmp_path / "slide.svs")
    text = gate_output(path)
    for value in PLANTED[:6]:
        assert value.lower() not in text.lower(), value
    with open_slide(path) as slide:
        facts, audit = pixel_facts(slide), metadata_audit(slide)
        assert slide.geometry.format.startswith("openslide:aperio")
    assert facts["mpp_x"] == "0.25" and facts["mpp_source"] == "openslide.mpp-x/y"
    assert facts["levels"] == "1024x768@1;512x384@2" and facts["width"] == "1024"
    # The audit names what was dropped.
    for key in ("aperio.ScanScope ID", "aperio.Filename", "aperio.Date", "aperio.User", "aperio.Barcode",
                "tiff.ImageDescription"):
        assert key in audit["dropped_metadata_keys"]
    assert audit["dropped_associated_images"] == ["label", "macro", "thumbnail"]
    assert set(audit["kept"]) == set(facts)


def test_ome_identifiers_and_free_text_image_names_never_cross_the_gate(tmp_path: Path) -> None:
    path = write_ome_with_label(tmp_path / "slide.ome.tif")
    text = gate_output(path)
    for value in PLANTED[1:2] + PLANTED[4:5] + PLANTED[6:]:
        assert value.lower() not in text.lower(), value
    assert "2021" not in text
    with open_slide(path) as slide:
        audit = metadata_audit(slide)
        assert slide.geometry.mpp_source == "OME PhysicalSizeX"
    assert audit["dropped_associated_images"] == ["associated image 1"]
    assert "ome.xml" in audit["dropped_metadata_keys"] and "tiff.Software" in audit["dropped_metadata_keys"]


def test_pixel_facts_come_from_geometry_alone(tmp_path: Path) -> None:
    path = write_svs_like(tmp_path / "slide.svs")
    with open_slide(path, mpp=0.3) as slide:
        facts = pixel_facts(slide)
    assert facts == {"width": "1024", "height": "768", "mpp_x": "0.3", "mpp_y": "0.3", "mpp_source": "user --mpp",
                     "levels": "1024x768@1;512x384@2", "bounds_x": "0", "bounds_y": "0",
                     "reader": "openslide:aperio (tiles decoded by tifffile)"}


@pytest.mark.parametrize("key,listed", [("aperio.ScanScope ID", True), ("tiff.XResolution", True),
                                        ("aperio.Jane Doe was scanned on 03/04/21 by the night shift", False),
                                        ("12345678", False)])
def test_audit_lists_key_names_only_when_they_look_like_keys(key: str, listed: bool, monkeypatch) -> None:
    from domains.histopathology import slide_metadata

    class KeysOnly:
        def metadata_keys(self):
            return [key]

        def associated_image_names(self):
            return []

    monkeypatch.setattr(slide_metadata, "pixel_facts", lambda slide: {"width": "1"})
    audit = metadata_audit(KeysOnly())
    assert (key in audit["dropped_metadata_keys"]) == listed
    assert audit["dropped_metadata_keys_unnamed"] == (0 if listed else 1)


def test_the_trip_wire_catches_an_associated_image_read(tmp_path: Path, monkeypatch) -> None:
    import openslide

    _forbid_associated_reads(monkeypatch)
    with openslide.OpenSlide(str(write_svs_like(tmp_path / "slide.svs"))) as raw:
        with pytest.raises(AssertionError, match="associated image"):
            raw.associated_images["label"]

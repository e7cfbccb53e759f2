"""Slide reading: the mpp contract, level choice and exact-mpp tiles, region-grouped tiles, broken slides.

Fixtures are real files written here: generic tiled TIFF pyramids (a page per level, resolution in
cm or inch), SubIFD pyramids, OME-TIFF with PhysicalSizeX, a stripped TIFF without resolution, and the
real CC0 Aperio sample bundled with the demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.histopathology.slide import SlideGeometry, open_slide, tile_grid
from domains.histopathology.demo import demo_slide_path
from domains.spec import DomainInputError

SAMPLE = demo_slide_path()  # the real CC0 Aperio slide bundled with the demo


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture (uint8 RGB): resampling errors stay small, misplacement does not."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(30, 226, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize(((width // 32 + 2) * 32, (height // 32 + 2) * 32), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(big)[:height, :width])


def block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).reduce(factor))


def write_pages_pyramid(path: Path, rgb: np.ndarray, mpp: float | None, factors=(1, 2, 4), unit: str = "CENTIMETER",
                        compression: str = "zlib", tile: int = 128) -> Path:
    """Generic tiled TIFF: one page per level (OpenSlide's generic-tiff layout), resolution tags in ``unit``."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for index, factor in enumerate(factors):
            level = rgb if factor == 1 else block_mean(rgb, factor)
            options = {}
            if mpp is not None:
                per_unit = (1e4 if unit == "CENTIMETER" else 25400.0) / (mpp * factor)
                options = {"resolution": (per_unit, per_unit), "resolutionunit": unit}
            tif.write(level, photometric="rgb", tile=(tile, tile), compression=compression, metadata=None,
                      subfiletype=0 if index == 0 else 1, **options)
    return path


def write_subifd_pyramid(path: Path, rgb: np.ndarray, mpp: float, ome: bool = False) -> Path:
    """Pyramid in SubIFDs (levels hidden from OpenSlide's generic reader); OME-XML PhysicalSizeX when ``ome``."""
    import tifffile

    factors = (2, 4)
    with tifffile.TiffWriter(path, ome=ome) as tif:
        if ome:
            tif.write(rgb, photometric="rgb", tile=(128, 128), compression="zlib", subifds=len(factors),
                      metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
        else:
            per_cm = 1e4 / mpp
            tif.write(rgb, photometric="rgb", tile=(128, 128), compression="zlib", subifds=len(factors),
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", metadata=None)
        for factor in factors:
            tif.write(block_mean(rgb, factor), photometric="rgb", tile=(128, 128), compression="zlib",
                      subfiletype=1, metadata=None if not ome else {})
    return path


@pytest.fixture(scope="module")
def content() -> np.ndarray:
    return smooth_rgb(1024, 1536)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, content) -> Path:
    """1536 x 1024 at 0.25 um/px, levels at downsample 1, 2, 4 (0.25, 0.5, 1.0 um/px), lossless."""
    return write_pages_pyramid(tmp_path_factory.mktemp("slides") / "p025.tif", content, 0.25)


# -- the mpp contract ------------------------------------------------------------------------------------

def test_mpp_is_read_from_tiff_resolution_tags_and_its_source_recorded(pyramid: Path, tmp_path: Path, content) -> None:
    with open_slide(pyramid) as slide:
        g = slide.geometry
        assert (g.width, g.height) == (1536, 1024)
        assert (g.mpp_x, g.mpp_y) == pytest.approx((0.25, 0.25))
        assert g.mpp_source == "tiff.XResolution (centimeter)"
        assert [lv[2] for lv in g.levels] == [1.0, 2.0, 4.0]
        assert g.format.startswith("openslide:generic-tiff")
        assert (g.bounds_x, g.bounds_y) == (0, 0)
    inch = write_pages_pyramid(tmp_path / "inch.tif", content, 0.5, factors=(1,), unit="INCH")
    with open_slide(inch) as slide:
        assert slide.geometry.mpp_x == pytest.approx(0.5)
        assert slide.geometry.mpp_source == "tiff.XResolution (inch)"


def test_ome_and_subifd_pyramids_are_read_with_all_their_levels(tmp_path: Path, content) -> None:
    ome = write_subifd_pyramid(tmp_path / "slide.ome.tif", content, 0.25, ome=True)
    with open_slide(ome) as slide:
        g = slide.geometry
        assert g.mpp_source == "OME PhysicalSizeX" and g.mpp_x == pytest.approx(0.25)
        assert g.format == "tifffile:ome" and len(g.levels) == 3
        np.testing.assert_array_equal(slide.read_region(256, 128, 200, 0.25), content[128:328, 256:456])
    subifd = write_subifd_pyramid(tmp_path / "subifd.tif", content, 0.25)
    with open_slide(subifd) as slide:
        assert slide.geometry.format == "tifffile:tiff" and len(slide.geometry.levels) == 3
        assert slide.geometry.mpp_source == "tiff.XResolution (centimeter)"
        # 1.0 um/px comes straight from the downsample-4 level.
        np.testing.assert_array_equal(slide.read_region(0, 0, 64, 1.0), block_mean(content, 4)[:64, :64])


def test_a_slide_without_mpp_is_refused_unless_the_user_gives_it(tmp_path: Path, content) -> None:
    import tifffile

    bare = write_pages_pyramid(tmp_path / "bare.tif", content, None, factors=(1,))
    with pytest.raises(DomainInputError) as refused:
        open_slide(bare)
    assert "bare.tif" in str(refused.value) and "--mpp" in str(refused.value)
    assert "objective power" in str(refused.value)  # says it will not guess from it
    with open_slide(bare, mpp=0.3) as slide:
        assert (slide.geometry.mpp_x, slide.geometry.mpp_source) == (0.3, "user --mpp")
    # A stripped (untiled) TIFF that OpenSlide refuses goes through tifffile, same contract.
    stripped = tmp_path / "stripped.tif"
    tifffile.imwrite(stripped, content, photometric="rgb", rowsperstrip=100, metadata=None)
    with pytest.raises(DomainInputError, match="--mpp"):
        open_slide(stripped)
    with open_slide(stripped, mpp=0.5) as slide:
        assert slide.geometry.format == "tifffile:tiff"
        np.testing.assert_array_equal(slide.read_region(1400, 950, 200, 0.5)[:74, :136], content[950:, 1400:])
        assert (slide.read_region(1400, 950, 200, 0.5)[74:] == 255).all()


def test_the_user_mpp_overrides_metadata_and_is_recorded(pyramid: Path) -> None:
    with open_slide(pyramid, mpp=0.26) as slide:
        assert (slide.geometry.mpp_x, slide.geometry.mpp_source) == (0.26, "user --mpp")


# -- exact-mpp tiles -------------------------------------------------------------------------------------

def test_best_level_is_the_coarsest_at_least_as_fine_as_the_request() -> None:
    g = SlideGeometry(width=4000, height=4000, mpp_x=0.25, mpp_y=0.25, mpp_source="test",
                      levels=((4000, 4000, 1.0), (1000, 1000, 4.0), (250, 250, 16.0)), bounds_x=0, bounds_y=0,
                      format="test")
    assert g.best_level(0.5) == 0  # 1.0 um/px would mean upsampling
    assert g.best_level(1.0) == 1
    assert g.best_level(1.004) == 1 and g.best_level(0.995) == 1  # within 1%: used as is
    assert g.best_level(3.9) == 1 and g.best_level(4.0) == 2 and g.best_level(100.0) == 2
    assert g.best_level(0.1) == 0  # finer than the scan: level 0, upsampled


def test_a_tile_at_half_micron_covers_the_same_tissue_from_a_025_pyramid_and_a_05_slide(
        pyramid: Path, tmp_path: Path, content) -> None:
    half = write_pages_pyramid(tmp_path / "p05.tif", block_mean(content, 2), 0.5, factors=(1, 2))
    with open_slide(pyramid) as fine, open_slide(half) as coarse:
        # Level-0 (448, 224) at 0.25 um/px is (224, 112) at 0.5 um/px: the same 112 um square.
        from_fine = fine.read_region(448, 224, 224, 0.5)
        from_coarse = coarse.read_region(224, 112, 224, 0.5)
        assert from_fine.shape == from_coarse.shape == (224, 224, 3) and from_fine.dtype == np.uint8
        assert np.abs(from_fine.astype(int) - from_coarse).max() <= 1
        # Off by one level-0 pixel of the coarse slide is a visibly different tile.
        shifted = coarse.read_region(226, 112, 224, 0.5)
        assert np.abs(from_fine.astype(int) - shifted).mean() > 3 * np.abs(from_fine.astype(int) - from_coarse).mean()
        # 1.0 um/px from the 0.25 pyramid reads its downsample-4 level unchanged.
        np.testing.assert_array_equal(fine.read_region(0, 0, 128, 1.0), block_mean(content, 4)[:128, :128])


def test_non_integer_scale_and_out_of_slide_parts(pyramid: Path, content) -> None:
    with open_slide(pyramid) as slide:
        # 0.3 um/px: 100 px cover 120 level-0 px, resampled (area average) to exactly 100.
        tile = slide.read_region(300, 200, 100, 0.3)
        assert tile.shape == (100, 100, 3)
        from PIL import Image

        expected = np.asarray(Image.fromarray(content[200:320, 300:420]).resize((100, 100), Image.Resampling.BOX))
        assert np.abs(tile.astype(int) - expected).max() <= 2
        # Straddling the right edge: the outside half is white glass.
        edge = slide.read_region(1536 - 50, 0, 100, 0.25)
        np.testing.assert_array_equal(edge[:, :50], content[:100, -50:])
        assert (edge[:, 50:] == 255).all()
        # Upsampling when the request is finer than the scan.
        assert slide.read_region(0, 0, 64, 0.125).shape == (64, 64, 3)


def test_iter_tiles_matches_per_tile_reads_in_bounded_batches(pyramid: Path) -> None:
    with open_slide(pyramid, workers=2) as slide:
        origins = tile_grid(slide.geometry, 96, 0.5)
        assert len(origins) == 8 * 6  # 1536/(96*2) x 1024/(96*2)
        batches = list(slide.iter_tiles(origins, 96, 0.5, batch=10))
        assert all(len(tiles) <= 10 for tiles, _ in batches)
        tiles = np.concatenate([t for t, _ in batches])
        seen = np.concatenate([o for _, o in batches])
        assert tiles.shape == (len(origins), 96, 96, 3)
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, origins.tolist()))
        for tile, (x, y) in list(zip(tiles, seen))[::7]:
            np.testing.assert_array_equal(tile, slide.read_region(int(x), int(y), 96, 0.5))
        assert list(slide.iter_tiles(np.zeros((0, 2), np.int64), 96, 0.5)) == []


def test_tile_grid_starts_at_the_bounds_offset() -> None:
    g = SlideGeometry(width=1000, height=800, mpp_x=0.5, mpp_y=0.5, mpp_source="test",
                      levels=((1000, 800, 1.0),), bounds_x=100, bounds_y=40, format="test")
    grid = tile_grid(g, 100, 1.0)  # 200 level-0 px per tile
    assert grid[0].tolist() == [100, 40]
    assert sorted(set(grid[:, 0].tolist())) == [100, 300, 500, 700, 900]
    assert sorted(set(grid[:, 1].tolist())) == [40, 240, 440, 640]
    half = tile_grid(g, 100, 1.0, stride=50)
    assert sorted(set(half[:, 0].tolist()))[:3] == [100, 200, 300]


def write_leica_scn(path: Path, rgb: np.ndarray, offset_px: tuple[int, int], mpp: float = 0.5) -> Path:
    """A Leica SCN (BigTIFF + XML): a collection of 10 x 10 mm with one scanned area at ``offset_px``."""
    import tifffile

    nm = mpp * 1000
    height, width = rgb.shape[:2]
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
<collection name="t" uuid="c" sizeX="10000000" sizeY="10000000">
<image name="main" uuid="m"><device model="Leica SCN400" version="1"/>
<pixels sizeX="{width}" sizeY="{height}"><dimension sizeX="{width}" sizeY="{height}" r="0" ifd="0"/>
<dimension sizeX="{width // 2}" sizeY="{height // 2}" r="1" ifd="1"/></pixels>
<view sizeX="{int(width * nm)}" sizeY="{int(height * nm)}" offsetX="{int(offset_px[0] * nm)}" offsetY="{int(offset_px[1] * nm)}"/>
<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings><illuminationSettings>
<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings></image>
<image name="macro" uuid="o"><pixels sizeX="128" sizeY="128"><dimension sizeX="128" sizeY="128" r="0" ifd="2"/></pixels>
<view sizeX="10000000" sizeY="10000000" offsetX="0" offsetY="0"/>
<scanSettings><illuminationSettings><illuminationSource>brightfield</illuminationSource></illuminationSettings>
</scanSettings></image></collection></scn>"""
    per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = {"photometric": "rgb", "tile": (128, 128), "compression": "zlib", "metadata": None}
        tif.write(rgb, description=xml, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", **options)
        tif.write(block_mean(rgb, 2), **options)
        tif.write(np.full((128, 128, 3), 200, np.uint8), **options)
    return path


def test_bounds_of_a_partly_scanned_slide_are_recorded_and_tiled(tmp_path: Path, content) -> None:
    scn = write_leica_scn(tmp_path / "slide.scn", content[:768], offset_px=(4000, 2000))
    with open_slide(scn) as slide:
        g = slide.geometry
        assert g.format == "openslide:leica" and (g.width, g.height) == (20000, 20000)
        assert (g.bounds_x, g.bounds_y, g.bounds_width, g.bounds_height) == (4000, 2000, 1536, 768)
        assert g.mpp_x == pytest.approx(0.5)
        # Tiles cover the scanned area only, starting at its offset.
        grid = tile_grid(g, 128, 1.0)
        assert grid.min(axis=0).tolist() == [4000, 2000] and grid.max(axis=0).tolist() == [5280, 2512]
        np.testing.assert_array_equal(slide.read_region(4010, 2020, 100, 0.5), content[20:120, 10:110])
        left_of_scan = slide.read_region(3990, 2000, 40, 0.5)
        assert (left_of_scan[:, :10] == 255).all()
        np.testing.assert_array_equal(left_of_scan[:, 10:], content[:40, :30])


def test_thumbnail_is_read_from_a_low_level_in_blocks(pyramid: Path, content) -> None:
    with open_slide(pyramid) as slide:
        thumb = slide.thumbnail(2.0)
        assert thumb.shape == (128, 192, 3)
        expected = block_mean(block_mean(content, 4), 2)
        assert np.abs(thumb.astype(int) - expected).max() <= 1


# -- real formats ----------------------------------------------------------------------------------------

def test_real_aperio_slide_mpp_and_tiles_match_openslide() -> None:
    import openslide

    with open_slide(SAMPLE) as slide:
        g = slide.geometry
        assert (g.width, g.height) == (2220, 2967)
        assert g.mpp_x == pytest.approx(0.499) and g.mpp_source == "openslide.mpp-x/y"
        assert g.format.startswith("openslide:aperio")
        with openslide.OpenSlide(str(SAMPLE)) as reference:
            expected = np.asarray(reference.read_region((700, 1100), 0, (300, 200)).convert("RGB"))
        # The tiles decoded directly are OpenSlide's pixels.
        np.testing.assert_array_equal(slide._read_level(0, 700, 1100, 300, 200), expected)
        # 224 px at 0.5 um/px cover 112 um: 224.45 level-0 px of this 0.499 um/px scan.
        tile = slide.read_region(700, 1100, 224, 0.5)
        assert tile.shape == (224, 224, 3)
        assert np.abs(tile[:100, :100].astype(int) - expected[:100, :100]).mean() < 12


def test_tiles_decoded_directly_equal_openslides_render(pyramid: Path, tmp_path: Path, content) -> None:
    import openslide

    jpeg = write_pages_pyramid(tmp_path / "jpeg.tif", content, 0.25, compression="jpeg")
    for path in (pyramid, jpeg):
        with open_slide(path) as slide, openslide.OpenSlide(str(path)) as reference:
            assert "tiles decoded by tifffile" in slide.geometry.format
            for level, (x, y) in ((0, (130, 70)), (1, (300, 100)), (2, (10, 20))):
                downsample = int(reference.level_downsamples[level])
                expected = np.asarray(reference.read_region((x * downsample, y * downsample), level, (150, 90))
                                      .convert("RGB"))
                np.testing.assert_array_equal(slide._read_level(level, x, y, 150, 90), expected)


# -- broken slides ---------------------------------------------------------------------------------------

def test_zero_byte_slide_is_refused_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.svs"
    empty.touch()
    with pytest.raises(DomainInputError, match=r"empty\.svs: empty file \(0 bytes\)"):
        open_slide(empty)


def test_truncated_slide_is_refused(pyramid: Path, tmp_path: Path) -> None:
    data = pyramid.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DomainInputError, match=r"cut\.tif: truncated"):
        open_slide(cut)
    header_only = tmp_path / "header.svs"
    header_only.write_bytes(data[:6])
    with pytest.raises(DomainInputError, match=r"header\.svs: .*(truncated|damaged|unreadable)"):
        open_slide(header_only)


def test_wrong_extension_or_not_a_slide_is_refused(tmp_path: Path, content) -> None:
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.fromarray(content).save(png)
    with pytest.raises(DomainInputError, match=r"photo\.png: extension '\.png' is not a whole-slide image format"):
        open_slide(png)
    fake = tmp_path / "notes.svs"
    fake.write_text("this is not a slide\n")
    with pytest.raises(DomainInputError, match=r"notes\.svs: not a whole-slide image"):
        open_slide(fake)
    with pytest.raises(DomainInputError, match="no such slide file"):
        open_slide(tmp_path / "missing.svs")


def test_a_slide_this_process_may_not_read_is_named_not_an_os_error() -> None:
    """Issue 9: a drop folder holding a slide without read permission made predict print a PermissionError
    traceback ("unexpected PermissionError") instead of one line naming the slide.

    The slide is opened in a child process; as root (which reads any file) the child runs as ``nobody``
    through util-linux's ``setpriv``, so the permission bits mean something wherever the suite runs.
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no way to open the file as a user without read permission")
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if as_root else []
    folder = Path(tempfile.mkdtemp(prefix="vitrail-locked-slide-"))  # under /tmp: reachable by another user
    try:
        folder.chmod(0o755)
        slide = write_pages_pyramid(folder / "locked.tif", smooth_rgb(64, 64), mpp=0.5, factors=(1,), tile=32)
        slide.chmod(0)
        probe = ("import sys\nfrom domains.histopathology.slide import open_slide\nfrom domains.spec import "
                 "DomainInputError\ntry:\n    open_slide(sys.argv[1])\nexcept DomainInputError as error:\n"
                 "    print(error)\n")
        child = subprocess.run([*as_nobody, sys.executable, "-c", probe, str(slide)], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[3], timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    assert "locked.tif: cannot be read: permission denied" in child.stdout, child.stdout


def test_a_header_declaring_a_slide_larger_than_any_glass_is_refused_with_the_numbers(tmp_path: Path) -> None:
    """Issue 9: an 8-bit RGB header of 10^6 x 10^6 px at 0.5 um/px (16 bytes of data) passed open_slide and
    failed later in the tissue mask with a bare ValueError, which predict printed with a traceback."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
    from write_bad_inputs import write_huge_tiff_header

    huge = write_huge_tiff_header(tmp_path / "huge.tif", 10**6, 10**6, 3, bits=8, microns_per_pixel=0.5)
    with pytest.raises(DomainInputError, match=r"huge\.tif: header declares 1000000 x 1000000 px at 0\.5 x 0\.5 "
                                               r"um/px, 500 x 500 mm: larger than any glass slide"):
        open_slide(huge)
    # The same header is a plausible slide at a plausible size (100 mm at 0.5 um/px): opened, not refused.
    plausible = write_huge_tiff_header(tmp_path / "large.tif", 200_000, 50_000, 3, bits=8, microns_per_pixel=0.5)
    with open_slide(plausible) as slide:
        assert (slide.geometry.width, slide.geometry.height) == (200_000, 50_000)

"""Tissue masks: glass and marker ink excluded, morphology sized in micrometres, tile fractions, blank/blur tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domains.histopathology.tissue import (TissueMask, TissueParams, is_background, is_blurry, pen_mask,
                                           tissue_fraction, tissue_mask)

SCENE_UM = 4000.0  # the synthetic slide is 4 mm square


def render_scene(mpp: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A slide thumbnail at ``mpp`` um/px: an H&E-coloured tissue ellipse with a 50 um crack, a dust speck,
    blue and green marker strokes (over glass and over tissue), on slightly noisy glass.

    Every shape is placed in micrometres, so any resolution shows the same scene. Returns the RGB image
    and the truth masks ("tissue", "pen", "speck").
    """
    side = int(round(SCENE_UM / mpp))
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) * mpp  # pixel centres in um
    image = np.clip(rng.normal(242, 3, (side, side, 3)), 0, 255)
    tissue = ((xx - 1800) / 1200) ** 2 + ((yy - 2000) / 1500) ** 2 <= 1.0
    crack = (np.abs(xx - 1800) < 25) & (np.abs(yy - 2000) < 1000)  # a 50 um tear: closing must join it
    tissue_colour = np.where(rng.random((side, side, 1)) < 0.3, [150, 90, 170], [225, 140, 185])
    image = np.where((tissue & ~crack)[..., None], tissue_colour + rng.normal(0, 6, (side, side, 3)), image)
    speck = (xx - 3500) ** 2 + (yy - 500) ** 2 <= 30**2  # 60 um dust: smaller than min_object_um2
    image[speck] = [160, 90, 170]
    blue = (np.abs(yy - 0.35 * xx - 2300) < 60) & (xx > 1000)  # a 120 um wide stroke over tissue and glass
    green = (np.abs(xx - 3300) < 50) & (yy > 1500) & (yy < 3800)
    image[blue] = [40, 70, 200]
    image[green] = [40, 160, 80]
    return {"rgb": np.clip(image, 0, 255).astype(np.uint8), "tissue": tissue, "pen": blue | green,
            "speck": speck, "crack": crack & tissue}


@pytest.mark.parametrize("mpp", [8.0, 16.0])
def test_mask_keeps_tissue_and_drops_glass_pen_and_dust(mpp: float) -> None:
    scene = render_scene(mpp)
    result = tissue_mask(scene["rgb"], mpp)
    mask = result.mask
    assert mask.dtype == bool and mask.shape == scene["tissue"].shape
    pen, tissue = scene["pen"], scene["tissue"]
    assert not (mask & pen).any()  # no ink is tissue
    assert not (mask & ~tissue & ~pen).mean() > 0.002  # glass stays glass (a rim of a pixel at most)
    assert not (mask & scene["speck"]).any()
    # Tissue away from the ink margin (and from the outline, drawn to the pixel) is kept, and the 50 um
    # crack is closed (40 um closing radius).
    far_from_pen = tissue & ~_grow(pen | ~tissue, int(np.ceil(60 / mpp)))
    assert mask[far_from_pen].mean() > 0.97
    assert mask[scene["crack"] & far_from_pen].mean() > 0.9
    assert 0.02 < result.pen_fraction < 0.2
    assert result.tissue_fraction == pytest.approx(mask.mean())
    assert result.mpp == mpp


def test_sizes_are_micrometres_so_resolution_does_not_change_the_mask() -> None:
    fractions = [tissue_mask(render_scene(mpp)["rgb"], mpp).tissue_fraction for mpp in (8.0, 16.0, 32.0)]
    assert max(fractions) - min(fractions) < 0.02
    # The same pixel kernel at a coarser mpp would be a wider one in um: a 600 um closing joins glass.
    wide = tissue_mask(render_scene(16.0)["rgb"], 16.0, TissueParams(closing_um=600.0)).tissue_fraction
    assert wide > fractions[1] + 0.01


def test_pen_filter_can_be_turned_off() -> None:
    scene = render_scene(16.0)
    with_ink = tissue_mask(scene["rgb"], 16.0, TissueParams(pen_filter=False))
    assert with_ink.pen_fraction == 0.0 and (with_ink.mask & scene["pen"]).mean() > 0.01


def test_pen_mask_leaves_h_and_e_colours_alone() -> None:
    he = np.array([[[150, 90, 170], [225, 140, 185], [90, 60, 140], [200, 120, 160], [60, 40, 110]]], np.uint8)
    ink = np.array([[[40, 70, 200], [40, 160, 80], [200, 30, 40], [20, 40, 150]]], np.uint8)
    assert not pen_mask(he).any()
    assert pen_mask(ink).all()


def test_tissue_fraction_of_tiles_maps_level0_onto_the_mask() -> None:
    grid = np.zeros((10, 10), bool)
    grid[:, :5] = True  # left half tissue
    mask = TissueMask(mask=grid, mpp=8.0, pen_fraction=0.0, tissue_fraction=0.5)
    # Level-0 at 0.5 um/px: a mask pixel is 16 level-0 px; tiles of 32 level-0 px cover 2x2 mask pixels.
    origins = np.array([[0, 0], [64, 0], [96, 32], [144, 144], [72, 0], [1000, 1000]])
    fractions = tissue_fraction(mask, origins, 32.0, 0.5)
    assert fractions.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    # A tile half outside the mask counts its outside part as glass.
    assert tissue_fraction(mask, np.array([[-16, 0]]), 32.0, 0.5).tolist() == pytest.approx([0.5])
    # A tile smaller than one mask pixel reads the pixel it falls in.
    assert tissue_fraction(mask, np.array([[10, 10], [100, 10]]), 4.0, 0.5).tolist() == [1.0, 0.0]


def test_mask_png_round_trip(tmp_path: Path) -> None:
    from PIL import Image

    scene = render_scene(32.0)
    result = tissue_mask(scene["rgb"], 32.0)
    path = result.to_png(tmp_path / "masks" / "slide.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)).astype(bool), result.mask)


def test_blank_and_blurry_tiles() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(1)
    sharp = np.where(rng.random((64, 64, 1)) < 0.3, [150, 90, 170], [225, 140, 185]).astype(np.uint8)
    blurred = ndimage.gaussian_filter(sharp.astype(float), sigma=(3, 3, 0)).round().astype(np.uint8)
    glass = np.full((64, 64, 3), 243, np.uint8)
    black = np.zeros((64, 64, 3), np.uint8)
    ink = np.zeros((64, 64, 3), np.uint8)
    ink[:] = (40, 70, 200)
    tiles = np.stack([sharp, blurred, glass, black, ink])
    assert is_background(tiles).tolist() == [False, False, True, True, True]
    assert is_blurry(tiles[:2]).tolist() == [False, True]


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=max(pixels, 1))

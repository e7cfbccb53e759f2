"""A small synthetic cohort cut from one real H&E slide: pyramidal TIFFs, QuPath regions, a manifest.

The only real thing is the tissue: OpenSlide's public CMU-1-Small-Region (CC0), bundled in
``demo_data/``. Everything else is made up by a fixed seed: the patients, which slides hold "tumour",
where it is, and the tumour itself (see :func:`plant_tumour`).
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import numpy as np

from domains.histopathology.examples import region_feature, write_geojson, write_pyramid_tiff
from domains.spec import DomainInputError

# With the project's pseudonym salt, this seed's tumour patients fall in every split of the default patient
# split (seed 0: 4 of 8 test patients, 3 of 6 validation patients), so every split has both classes and a
# slide-level AUROC is defined on validation and test.
DEMO_SEED = 3
DEMO_PATIENTS = 40
DEMO_SECOND_SLIDE = 4
"""The first this-many patients get a second slide (so a patient's slides must share a split)."""
DEMO_SLIDE_SIDE = 320
DEMO_TUMOUR_RATE = 0.6
DEMO_CLASSES = ("normal", "tumor")
SAMPLE_NAME = "CMU-1-Small-Region.svs"
# H&E optical-density direction of haematoxylin (Ruifrok & Johnston 2001): the planted tumour is
# hyperchromatic, its tissue carries more of it.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)


def demo_slide_path() -> Path:
    """The bundled real slide (``demo_data/``), or the shared sample beside the repository.

    Raises:
        DomainInputError: neither is there.
    """
    bundled = Path(__file__).parent / "demo_data" / SAMPLE_NAME
    if bundled.is_file():
        return bundled
    shared = Path(__file__).resolve().parents[3] / "shared" / "samples" / "histopathology" / SAMPLE_NAME
    if shared.is_file():
        return shared
    raise DomainInputError(bundled, f"the demo's real slide is missing; restore {SAMPLE_NAME} (CC0, OpenSlide's "
                                    "CMU-1-Small-Region test slide) into domains/histopathology/demo_data/")


@cache
def read_demo_tissue() -> tuple[np.ndarray, float]:
    """The bundled slide's pixels at its own resolution (2967 x 2220 x 3 uint8, read-only) and its mpp."""
    from domains.histopathology.slide import open_slide

    with open_slide(demo_slide_path()) as slide:
        mpp = slide.geometry.mpp_x
        pixels = slide.thumbnail(mpp)
    pixels.setflags(write=False)  # cached and shared: nobody may paint on it
    return pixels, mpp


def tissue_indicator(rgb: np.ndarray) -> np.ndarray:
    """Rough tissue pixels for placing crops and tumours: coloured and not glass (the reader uses its own mask)."""
    r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))  # per-channel planes: fast elementwise ops
    saturation = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return (saturation > 25) & (r + g + b < 3 * 225)


def reader_tissue_fraction(crop: np.ndarray, mpp: float) -> float:
    """Share of ``crop`` that the reader's own tissue mask keeps (at the reader's finest mask resolution)."""
    from PIL import Image

    from domains.histopathology.reader import MASK_MIN_MPP
    from domains.histopathology.tissue import tissue_mask

    side = max(1, round(crop.shape[0] * mpp / MASK_MIN_MPP))
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((side, side), Image.Resampling.BOX))
    return float(tissue_mask(small, MASK_MIN_MPP).mask.mean())


def _crop(rng: np.random.Generator, image: np.ndarray, tissue: np.ndarray, side: int, mpp: float) -> np.ndarray:
    """A random ``side`` square, randomly rotated/flipped, that is mostly tissue to the eye and to the reader.

    Tissue pieces smaller than the reader's minimum object (square tens of microns) vanish from its mask,
    so a small crop of fragmented tissue could be all "background"; such crops are passed over.
    """
    h, w = tissue.shape
    best, best_score = None, -1.0
    for _ in range(200):
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        score = float(tissue[y:y + side, x:x + side].mean())
        if score >= 0.55:
            score = min(score, reader_tissue_fraction(image[y:y + side, x:x + side], mpp) + 0.05)
        if score > best_score:
            best, best_score = (y, x), score
        if score >= 0.55:
            break
    y, x = best
    crop = image[y:y + side, x:x + side]
    crop = np.rot90(crop, int(rng.integers(4)))
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def _blob(rng: np.random.Generator, centre: tuple[float, float], radius: float, points: int = 24) -> np.ndarray:
    """A closed star-shaped polygon (x, y) around ``centre``: a lumpy disc."""
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    wobble = 1 + 0.22 * np.sin(3 * angles + rng.uniform(0, 2 * np.pi)) + 0.1 * np.sin(5 * angles + rng.uniform(0, 6))
    ring = np.stack([centre[0] + radius * wobble * np.cos(angles), centre[1] + radius * wobble * np.sin(angles)], 1)
    return np.vstack([ring, ring[:1]])


def _inside(ring: np.ndarray, side: int) -> np.ndarray:
    """Pixels of a ``side`` square whose area the polygon ``ring`` (x, y) covers (rasterised by Pillow)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (side, side), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in ring.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def plant_tumour(base: np.ndarray, donor: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Inside ``region``, replace tissue by a denser, hyperchromatic version of the ``donor`` tissue.

    The donor crop is shrunk to half its size and tiled twice over (structures half as large, four times
    as many per area, like crowded nuclei) and gets 35 % more haematoxylin optical density. Glass inside
    the region stays glass, so the tumour keeps the tissue's outline.
    """
    from PIL import Image

    side = base.shape[0]
    half = np.asarray(Image.fromarray(donor).resize((side // 2, side // 2), Image.Resampling.BOX))
    dense = np.tile(half, (2, 2, 1))[:side, :side].astype(np.float32)
    od = -np.log((dense + 1.0) / 256.0)
    stained = od + 0.35 * (od @ HAEMATOXYLIN_OD)[..., None] * HAEMATOXYLIN_OD
    dense = np.clip(256.0 * np.exp(-stained) - 1.0, 0, 255).astype(np.uint8)
    where = region & tissue_indicator(base) & tissue_indicator(dense)
    out = base.copy()
    out[where] = dense[where]
    return out


def write_demo_cohort(folder: Path, patients: int = DEMO_PATIENTS, side: int = DEMO_SLIDE_SIDE,
                      seed: int = DEMO_SEED) -> tuple[Path, Path]:
    """Write the synthetic cohort: slides (pyramidal TIFFs), one GeoJSON per slide and the manifest.

    Returns:
        The slides folder and the manifest CSV.
    """
    folder = Path(folder)
    slides = folder / "slides"
    regions = folder / "annotations"
    slides.mkdir(parents=True, exist_ok=True)
    regions.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image, mpp = read_demo_tissue()
    tissue = tissue_indicator(image)
    rows = []
    # Exactly this share of patients, drawn at random, so a small cohort still has both kinds.
    tumour_patients = set(rng.permutation(patients)[:round(DEMO_TUMOUR_RATE * patients)].tolist())
    for p in range(patients):
        patient = f"SYNTHETIC-PATIENT-{p + 1:02d}"
        has_tumour = p in tumour_patients
        for s in range(2 if p < DEMO_SECOND_SLIDE else 1):
            name = f"synthetic-{p + 1:02d}-{s + 1}"
            base = _crop(rng, image, tissue, side, mpp)
            features = [region_feature("normal", [[0, 0], [side, 0], [side, side], [0, side], [0, 0]])]
            if has_tumour:
                donor = _crop(rng, image, tissue, side, mpp)
                for _ in range(int(rng.integers(2, 5))):
                    ys, xs = np.nonzero(tissue_indicator(base))
                    pick = int(rng.integers(len(ys)))
                    ring = _blob(rng, (float(xs[pick]), float(ys[pick])), float(rng.uniform(0.16, 0.26) * side))
                    base = plant_tumour(base, donor, _inside(ring, side))
                    features.append(region_feature("tumor", ring.round(1).tolist()))
            write_pyramid_tiff(slides / f"{name}.tif", base, mpp, tile=128, min_level_side=64)
            write_geojson(regions / f"{name}.geojson", features)
            rows.append([f"{name}.tif", patient, f"SITE-{'AB'[p % 2]}", "tumor" if has_tumour else "normal",
                         f"annotations/{name}.geojson"])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "site", "label", "annotations"])
        writer.writerows(rows)
    (slides / "README.txt").write_text(
        "SYNTHETIC COHORT, NOT PATIENT DATA. Cut by domains/histopathology/demo.py (seed "
        f"{seed}) from one real CC0 slide (CMU-1-Small-Region); patients, tumours and labels are made up.\n")
    return slides, manifest


def prepare_demo(folder: Path) -> dict[str, Path]:
    """Write the demo cohort into ``folder``; returns ``{"source": <slides folder>, "labels": <manifest CSV>}``."""
    slides, manifest = write_demo_cohort(Path(folder))
    return {"source": slides, "labels": manifest}


DEMO_NOTES = (
    f"A synthetic cohort cut from one real H&E slide (OpenSlide's CMU-1-Small-Region, skin, 0.499 um/px, CC0, "
    f"bundled): {DEMO_PATIENTS} made-up patients ({DEMO_SECOND_SLIDE} with two slides), each slide a random, "
    f"rotated {DEMO_SLIDE_SIDE} x {DEMO_SLIDE_SIDE} px crop of the real tissue written as a pyramidal tiled TIFF "
    "(JPEG, resolution tags at the source's 0.499 um/px). About "
    f"{int(DEMO_TUMOUR_RATE * 100)} % of patients are 'tumor' patients: their slides get two to four lumpy "
    "regions where the tissue is replaced by a denser (half-scale, tiled) and hyperchromatic (+35 % haematoxylin "
    "optical density) copy of other tissue from the same slide. QuPath GeoJSON annotations outline each "
    "slide ('normal') and each planted region ('tumor'); the manifest's slide label says whether a slide has "
    "any. The demo learns from the slide labels alone: attention MIL over bags of each slide's tiles (the "
    "region annotations are there for tile classification, which the same dataset also supports: run the "
    "pipeline without --set bags.enabled=true)."
)

DEMO_SETTINGS = {
    # Slide-level learning: 2 bags of 24 tiles per training slide per epoch, 48 tiles per slide to validate;
    # a 6-block encoder, so that the demo trains in minutes on 2 CPU cores.
    "bags": {"enabled": True, "bag_size": 24, "bags_per_slide": 2, "eval_bag_size": 48},
    "train": {"batch_size": 4},
    "backbone": {"depth": 6},
}

"""H&E stain normalisation (Macenko, Reinhard) against a reference fitted on training tiles, never crashing.

Both methods are fitted once on the training slides' tiles; the reference is then part of the model's
input contract (saved with it as :meth:`StainReference.to_dict`). Tiles that cannot be normalised
sensibly are returned unchanged and flagged instead of raising or producing garbage colours: glass
(too little stained tissue), black tiles, marker-ink tiles, and single-stain tiles (eosin only or
hematoxylin only: Macenko's two-stain decomposition is degenerate there, a known crash of common
implementations on white or eosin-only tiles, and Reinhard would shift their colour to look like H&E).

References: Macenko et al., "A method for normalizing histology slides for quantitative analysis",
ISBI 2009; Reinhard et al., "Color transfer between images", IEEE CG&A 2001; Ruifrok & Johnston,
"Quantification of histochemical staining by color deconvolution", 2001 (standard H&E vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

StainMethod = Literal["macenko", "reinhard"]
METHODS = ("macenko", "reinhard")

# Transmitted light intensity of the glass (Macenko's Io): brighter pixels have zero optical density.
LIGHT = 240.0
# Optical density (length of the OD vector) under which a pixel is glass (Macenko's beta).
OD_MIN = 0.15
# Percentile of the angle / concentration distributions taken as the robust extreme (Macenko's alpha).
ALPHA = 1.0
# A tile needs at least this share of stained pixels to be normalised.
MIN_TISSUE = 0.05
# More than this share of near-black pixels: a black tile (scanner border, out-of-slide, fold).
MAX_BLACK = 0.5
# More than this share of the stained pixels in marker ink: a pen tile.
MAX_PEN = 0.3
# The weaker stain's robust maximum under this share of the stronger: a single-stain tile.
MIN_STAIN_RATIO = 0.25
# H and E vectors of a reference closer than this (degrees) are one stain seen twice.
MIN_STAIN_ANGLE = 10.0
# A tile's fitted stain vector further than this (degrees) from the reference's is not that stain.
MAX_VECTOR_ANGLE = 60.0
# Ruifrok & Johnston's H and E optical-density directions: the single-stain screen before a reference exists.
RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
# Per-tile statistics (screen, stain vectors, Lab mean/std) use every STATS_STEP-th pixel: 12,544 of a
# 224 px tile keep the percentiles and means stable at a quarter of the cost; every pixel is transformed.
STATS_STEP = 4
# Stained pixels pooled to fit a reference (a fixed-seed sample; enough for stable percentiles).
FIT_PIXELS = 2_000_000


@dataclass(frozen=True)
class StainReference:
    """The target colour of normalised tiles, fitted on training tiles.

    Attributes:
        method: "macenko" or "reinhard".
        stain_matrix: H and E optical-density unit vectors of the training tiles (Macenko's estimate),
            ((h_r, h_g, h_b), (e_r, e_g, e_b)); both methods keep it, to recognise single-stain tiles.
        max_concentrations: robust maximum concentration of H and of E on those vectors.
        lab_mean, lab_std: Reinhard's per-channel CIELAB mean and standard deviation of stained pixels.
        tiles: how many tiles the reference was fitted on.
    """

    method: StainMethod
    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    max_concentrations: tuple[float, float] | None = None
    lab_mean: tuple[float, float, float] | None = None
    lab_std: tuple[float, float, float] | None = None
    tiles: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown stain normalisation method {self.method!r}; known: {', '.join(METHODS)}")
        needs = ("stain_matrix", "max_concentrations") + (("lab_mean", "lab_std") if self.method == "reinhard" else ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.method} stain reference needs {', '.join(missing)}")

    def to_dict(self) -> dict:
        """JSON-safe form (plain lists and floats)."""
        out: dict = {"method": self.method, "tiles": int(self.tiles)}
        for name in ("stain_matrix", "max_concentrations", "lab_mean", "lab_std"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value, dtype=float).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "StainReference":
        def as_tuple(value):
            if value is None:
                return None
            array = np.asarray(value, dtype=float)
            return tuple(tuple(map(float, row)) for row in array) if array.ndim == 2 else tuple(map(float, array))

        return cls(method=data["method"], stain_matrix=as_tuple(data.get("stain_matrix")),
                   max_concentrations=as_tuple(data.get("max_concentrations")),
                   lab_mean=as_tuple(data.get("lab_mean")), lab_std=as_tuple(data.get("lab_std")),
                   tiles=int(data.get("tiles", 0)))


# -- colour spaces ------------------------------------------------------------------------------------------

def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer-Lambert optical density (..., 3) float32 of uint8 RGB, zero at or above the glass intensity."""
    return np.maximum(-np.log((rgb.astype(np.float32) + 1.0) / LIGHT), 0.0)


def _from_density(density: np.ndarray) -> np.ndarray:
    return np.clip(LIGHT * np.exp(-density), 0, 255).round().astype(np.uint8)


# sRGB (D65) to CIE XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.950456, 1.0, 1.088754])


_LEVELS = np.arange(256) / 255.0
# sRGB decoding of each uint8 level, looked up instead of computed per pixel.
_LINEAR = np.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) float64 of uint8 sRGB (D65)."""
    linear = _LINEAR[rgb]
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """uint8 sRGB of CIELAB (..., 3) (out-of-gamut colours clipped)."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > 0.206893, f ** 3, (f - 16.0 / 116.0) / 7.787) * _WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    c = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(c * 255.0, 0, 255).round().astype(np.uint8)


# -- screening: which tiles can be normalised -------------------------------------------------------------

def _stained(density: np.ndarray) -> np.ndarray:
    """Pixels (bool) whose optical density (vector length) exceeds OD_MIN: stained tissue, not glass.

    Macenko's original test asks every channel to exceed it, which drops pale eosin (red light passes
    eosin almost unabsorbed) and so biases the fit towards hematoxylin; the vector length keeps it.
    """
    return np.einsum("...c,...c->...", density, density) > OD_MIN * OD_MIN


def screen_tile(rgb: np.ndarray, reference: StainReference | None = None) -> str | None:
    """Why one tile cannot be stain-normalised ("glass", "black", "pen", "single stain"), or None if it can.

    Single-stain: on the reference's H and E vectors (Ruifrok's standard ones without a reference) the
    weaker stain's robust maximum concentration is under ``MIN_STAIN_RATIO`` of the stronger's.
    """
    from domains.histopathology.tissue import pen_mask

    pixels = rgb.reshape(-1, 3)[::STATS_STEP]
    if (pixels.max(axis=1) < 30).mean() > MAX_BLACK:
        return "black"
    density = optical_density(pixels)
    stained = _stained(density)
    if stained.mean() < MIN_TISSUE:
        return "glass"
    if pen_mask(pixels[stained]).mean() > MAX_PEN:
        return "pen"
    vectors = RUIFROK_HE if reference is None else np.asarray(reference.stain_matrix)
    concentrations = _concentrations(density[stained].astype(np.float64), vectors)
    h_max, e_max = np.percentile(concentrations, 100 - ALPHA, axis=0)
    if min(h_max, e_max) <= MIN_STAIN_RATIO * max(h_max, e_max, 1e-6):
        return "single stain"
    return None


# -- Macenko ---------------------------------------------------------------------------------------------

def _macenko_vectors(density: np.ndarray) -> np.ndarray:
    """H and E unit optical-density vectors (2, 3) of stained pixels (n, 3), H first."""
    covariance = np.cov(density, rowvar=False)
    _, vectors = np.linalg.eigh(covariance)
    plane = vectors[:, 1:3]  # the two largest eigenvectors span the stain plane
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive density
    projected = density @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [ALPHA, 100 - ALPHA])
    v_low = plane @ np.array([np.cos(low), np.sin(low)])
    v_high = plane @ np.array([np.cos(high), np.sin(high)])
    # Hematoxylin absorbs more red than eosin does.
    pair = np.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low])
    return pair / np.linalg.norm(pair, axis=1, keepdims=True)


def _concentrations(density: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (n, 2) of optical densities (n, 3) on H and E vectors (2, 3)."""
    # The pseudo-inverse of the 2 x 3 stain matrix solves every pixel's least squares at once (lstsq with
    # one right-hand side per pixel is ~30x slower).
    return density @ np.linalg.pinv(vectors)


def _angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    cosine = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _plausible_pair(vectors: np.ndarray, target: np.ndarray) -> bool:
    """Whether a tile's fitted vectors are two distinct stains, each within reach of the reference's.

    Labs and scanners move the stain vectors by tens of degrees (and Macenko's per-tile estimate of H
    leans towards E where nuclei are scarce), so the test catches degenerate fits, not variation: one
    stain seen twice, ink, noise.
    """
    if not np.isfinite(vectors).all() or _angle_degrees(vectors[0], vectors[1]) < MIN_STAIN_ANGLE:
        return False
    return all(_angle_degrees(v, t) <= MAX_VECTOR_ANGLE for v, t in zip(vectors, target))


def _macenko_tile(rgb: np.ndarray, reference: StainReference) -> np.ndarray | None:
    shape = rgb.shape
    density = optical_density(rgb.reshape(-1, 3)).astype(np.float64)
    sample = density[::STATS_STEP]
    stained = sample[_stained(sample)]
    vectors = _macenko_vectors(stained)
    target = np.asarray(reference.stain_matrix)
    if not _plausible_pair(vectors, target):
        return None
    source_max = np.percentile(_concentrations(stained, vectors), 100 - ALPHA, axis=0)
    if not np.isfinite(source_max).all() or (source_max <= 1e-6).any():
        return None
    concentrations = _concentrations(density, vectors) * (np.asarray(reference.max_concentrations) / source_max)
    return _from_density(concentrations @ target).reshape(shape)


# -- Reinhard --------------------------------------------------------------------------------------------

def _reinhard_tile(rgb: np.ndarray, reference: StainReference) -> np.ndarray | None:
    shape = rgb.shape
    pixels = rgb.reshape(-1, 3)
    stained = _stained(optical_density(pixels))
    lab = rgb_to_lab(pixels)
    mean = lab[stained][::STATS_STEP].mean(axis=0)
    std = lab[stained][::STATS_STEP].std(axis=0)
    if not np.isfinite(std).all() or (std < 1e-3).any():
        return None
    out = lab.copy()
    # Only stained pixels move: glass stays glass instead of taking on the tissue's colour shift.
    out[stained] = (lab[stained] - mean) / std * np.asarray(reference.lab_std) + np.asarray(reference.lab_mean)
    return lab_to_rgb(out).reshape(shape)


# -- public API ------------------------------------------------------------------------------------------

def _as_batch(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    if tiles.ndim != 4 or tiles.shape[-1] < 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 RGB (n, H, W, 3), got {tiles.dtype} {tiles.shape}")
    return tiles[..., :3]


def fit_stain_reference(tiles: np.ndarray, method: StainMethod, seed: int = 0) -> StainReference:
    """Fit the target colour from training tiles (uint8 (n, H, W, 3)); tiles that fail the screen are skipped.

    Raises:
        ValueError: unknown method, or no tile with both stains to fit on.
    """
    if method not in METHODS:
        raise ValueError(f"unknown stain normalisation method {method!r}; known: {', '.join(METHODS)}")
    tiles = _as_batch(tiles)
    # Single-stain tiles are real tissue and are pooled; whether the pool holds both stains is checked
    # on the fitted vectors below (Ruifrok's generic vectors misjudge some scanners' tiles).
    usable = [tile for tile in tiles if screen_tile(tile) in (None, "single stain")]
    problem = (f"none of the {len(tiles)} tiles has both H and E stained tissue to fit a {method} stain reference "
               "on (glass, black, ink or single-stain tiles only)")
    if not usable:
        raise ValueError(problem)
    pixels = np.concatenate([tile.reshape(-1, 3) for tile in usable])
    pixels = pixels[_stained(optical_density(pixels))]
    if len(pixels) > FIT_PIXELS:
        pixels = pixels[np.random.default_rng(seed).choice(len(pixels), FIT_PIXELS, replace=False)]
    density = optical_density(pixels).astype(np.float64)
    vectors = _macenko_vectors(density)
    max_c = np.percentile(_concentrations(density, vectors), 100 - ALPHA, axis=0)
    if (not np.isfinite(vectors).all() or _angle_degrees(vectors[0], vectors[1]) < MIN_STAIN_ANGLE
            or min(max_c) <= MIN_STAIN_RATIO * max(max_c)):
        raise ValueError(problem)
    fitted = dict(method=method, stain_matrix=tuple(tuple(map(float, v)) for v in vectors),
                  max_concentrations=tuple(map(float, max_c)), tiles=len(usable))
    if method == "reinhard":
        lab = rgb_to_lab(pixels)
        fitted.update(lab_mean=tuple(map(float, lab.mean(axis=0))), lab_std=tuple(map(float, lab.std(axis=0))))
    return StainReference(**fitted)


def normalize_stain(tiles: np.ndarray, reference: StainReference) -> tuple[np.ndarray, np.ndarray]:
    """Normalise tiles (uint8 (n, H, W, 3)) to ``reference``; returns (tiles, fell_back bool (n,)).

    Never raises on a tile's content: glass, black, ink-only and single-stain tiles, and any tile whose
    decomposition fails, are returned unchanged with ``fell_back`` set, so callers can count them.
    """
    tiles = _as_batch(tiles)
    out = tiles.copy()
    fell_back = np.zeros(len(tiles), bool)
    normalise = _macenko_tile if reference.method == "macenko" else _reinhard_tile
    for index, tile in enumerate(tiles):
        result = None
        if screen_tile(tile, reference) is None:
            try:
                result = normalise(tile, reference)
            except (np.linalg.LinAlgError, ValueError, FloatingPointError):
                result = None
        if result is None:
            fell_back[index] = True
        else:
            out[index] = result
    return out, fell_back


# -- as a model input normalisation (the domain's fit/apply hooks) -----------------------------------------

def _tiles_uint8(images: np.ndarray) -> np.ndarray:
    """Physical tiles (N, 3, H, W) in [0, 1] as the scanner's uint8 RGB (N, H, W, 3)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def fit_model_normalisation(method: str, images: np.ndarray) -> dict:
    """A stain reference fitted on physical training tiles (N, 3, H, W), as plain data kept with the model."""
    reference = fit_stain_reference(_tiles_uint8(images), method)
    _, fell_back = normalize_stain(_tiles_uint8(images[:256]), reference)
    return {**reference.to_dict(), "fallback_share_on_fit_tiles": round(float(fell_back.mean()), 4)}


def apply_model_normalisation(reference: dict, images: np.ndarray) -> np.ndarray:
    """Physical tiles (N, 3, H, W) normalised to ``reference``; tiles it cannot normalise come back as they were."""
    fitted = StainReference.from_dict(reference)
    normalised, _ = normalize_stain(_tiles_uint8(images), fitted)
    return normalised.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

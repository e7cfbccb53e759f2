"""Synthetic imaging-spectrometer captures with injected methane plumes (training data without downloads).

Real labelled plume data cannot be fetched here, so, as in HyperspectralViTs (Růžička et al. 2025) and
earlier simulation studies, plumes are injected into background radiance with Beer-Lambert absorption.

Background radiance (µW cm⁻² sr⁻¹ nm⁻¹, the unit of EMIT and AVIRIS-NG L1B)
    ``L(λ) = E0(λ) cos(θs) / π · ρ(λ) · T(λ) + P(λ)`` per pixel, where

    * ``E0`` is a 5778 K black-body solar irradiance scaled to 186 µW cm⁻² nm⁻¹ at 550 nm;
    * ``ρ`` is a per-pixel mixture of six surface spectra (green vegetation with its red edge and leaf
      water bands, dry grass, soil with a 2.2 µm clay feature, bright sand, concrete, water), with
      abundances from smooth random fields (fields, patches, rivers) and 3 % pixel texture;
    * ``T`` is two-way atmospheric transmittance: Rayleigh + aerosol optical depth, O2 (760 nm), CO2
      (1575/1605/2010/2060 nm), the H2O bands (720 ... 2700 nm) scaled per pixel by a smooth water-vapour
      field (±25 %), and background CH4 (8000 ppm·m through the same absorption as the plumes);
    * ``P`` is a small Rayleigh-like path radiance;
    * noise is Gaussian with variance ``(1e-3)² + 1e-6 · L`` (read + shot noise; SNR ~300 at 2.3 µm).

Plumes
    Each plume is a 2-D enhancement map ΔX (ppm·m) of one of two shapes, peak-normalised and scaled to
    its strength: a **Gaussian plume** (crosswind spread ``σ_y = 0.4 · x^0.85`` downwind of the source,
    exponential downwind decay, multiplied by a smooth log-normal turbulence field) or a **random-walk**
    plume (2000 particles released at the source drifting downwind with Gaussian steps, accumulated and
    blurred). The radiance then becomes ``L · exp(−k(λ) · ΔX · AMF)`` with ``k = −a`` the CH4 unit
    absorption of :mod:`domains.hyperspectral.methane` and AMF the air-mass factor relative to the
    look-up table's geometry (1 by default). Labels mark plume pixels where ΔX ≥ :data:`LABEL_THRESHOLD_PPMM`.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domains.hyperspectral.envi import write_envi, write_envi_rows
from domains.hyperspectral.methane import unit_absorption_spectrum

LABEL_THRESHOLD_PPMM = 500.0
BACKGROUND_CH4_PPMM = 8000.0
# A UTM grid for the synthetic captures so predictions carry a real CRS (EMIT pixels are ~60 m).
SYNTHETIC_EPSG = 32613
SYNTHETIC_ORIGIN = (500000.0, 3600000.0)
SYNTHETIC_PIXEL_M = 60.0


@dataclass(frozen=True)
class Sensor:
    """Band table of an imaging spectrometer: centres and FWHMs in nm, bad-band flags."""

    name: str
    wavelengths_nm: np.ndarray
    fwhm_nm: np.ndarray
    bad_bands: np.ndarray


def spectrometer(name: str, bands: int, first_nm: float = 381.0, last_nm: float = 2493.0,
                 fwhm_factor: float = 1.15) -> Sensor:
    """A regularly sampled VSWIR spectrometer; bands inside the 1.4 and 1.9 µm water bands are flagged bad."""
    centres = np.linspace(first_nm, last_nm, bands)
    step = (last_nm - first_nm) / max(bands - 1, 1)
    bad = ((centres > 1330) & (centres < 1440)) | ((centres > 1780) & (centres < 1960))
    return Sensor(name, centres, np.full(bands, step * fwhm_factor), bad)


EMIT_LIKE = spectrometer("emit-like", 285)  # EMIT: 285 bands, 381-2493 nm, ~7.4 nm sampling, ~8.5 nm FWHM
COARSE_VSWIR = spectrometer("coarse-vswir", 120)  # PRISMA/EnMAP-class sampling (~18 nm)


def _bump(w: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((w - centre) / width) ** 2)


def _sigmoid(w: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(w - centre) / width))


def surface_spectra(w: np.ndarray) -> np.ndarray:
    """Reflectance (6, B) of vegetation, dry grass, soil, sand, concrete and water at wavelengths ``w`` (nm)."""
    vegetation = (0.03 + 0.05 * _bump(w, 550, 35) + 0.42 * _sigmoid(w, 715, 15)
                  - 0.12 * _sigmoid(w, 1300, 80) - 0.17 * _bump(w, 1450, 60) - 0.2 * _bump(w, 1940, 70)
                  - 0.10 * _sigmoid(w, 2000, 100))
    grass = 0.08 + 0.25 * _sigmoid(w, 680, 60) - 0.06 * _bump(w, 1450, 60) - 0.08 * _bump(w, 1940, 60) \
        - 0.04 * _bump(w, 2100, 40)
    soil = 0.08 + 0.25 * _sigmoid(w, 900, 400) - 0.04 * _bump(w, 2200, 25) - 0.03 * _bump(w, 1420, 40)
    sand = 0.22 + 0.30 * _sigmoid(w, 700, 200) - 0.05 * _bump(w, 2200, 30) - 0.03 * _bump(w, 1930, 50)
    concrete = 0.24 + 0.04 * (w - 400) / 2100 - 0.03 * _bump(w, 2340, 30)
    water = 0.06 * np.exp(-(w - 400) / 150) + 0.004
    return np.clip(np.stack([vegetation, grass, soil, sand, concrete, water]), 0.003, 0.9)


def solar_irradiance(w: np.ndarray) -> np.ndarray:
    """Top-of-atmosphere solar irradiance (µW cm⁻² nm⁻¹), black body at 5778 K scaled to 186 at 550 nm."""
    def planck(nm):
        m = nm * 1e-9
        return 1.0 / (m**5 * (np.exp(1.4388e-2 / (m * 5778.0)) - 1.0))

    return 186.0 * planck(w) / planck(np.array(550.0))


def water_depth(w: np.ndarray) -> np.ndarray:
    """Two-way H2O optical depth at the reference column (scaled per pixel)."""
    bands = ((720, 8, 0.08), (820, 12, 0.15), (940, 25, 1.2), (1135, 30, 1.0), (1380, 55, 7.0),
             (1870, 70, 7.0), (2700, 110, 6.0))
    return sum(depth * _bump(w, centre, width) for centre, width, depth in bands)


def fixed_transmittance(w: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    """Two-way transmittance of everything but H2O: scattering, O2, CO2 and background CH4."""
    tau = 0.18 * (w / 550.0) ** -4 + 0.12 * (w / 550.0) ** -1.3
    tau = tau + 2.0 * _bump(w, 762, 5) + 0.06 * _bump(w, 1575, 8) + 0.06 * _bump(w, 1605, 8)
    tau = tau + 0.7 * _bump(w, 2010, 10) + 0.7 * _bump(w, 2060, 10)
    return np.exp(-tau) * np.exp(unit_absorption_spectrum(w, fwhm) * BACKGROUND_CH4_PPMM)


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, scale: float, count: int = 1) -> np.ndarray:
    """``count`` smooth standard-normal-ish random fields of correlation length ``scale`` px, (count, H, W)."""
    from scipy.ndimage import gaussian_filter, zoom

    coarse = (max(2, int(np.ceil(shape[0] / scale)) + 2), max(2, int(np.ceil(shape[1] / scale)) + 2))
    noise = rng.standard_normal((count, *coarse))
    noise = gaussian_filter(noise, sigma=(0, 0.8, 0.8))
    fields = zoom(noise, (1, shape[0] / (coarse[0] - 2), shape[1] / (coarse[1] - 2)), order=1)[:, : shape[0], : shape[1]]
    fields = fields - fields.mean(axis=(1, 2), keepdims=True)
    return (fields / (fields.std(axis=(1, 2), keepdims=True) + 1e-9)).astype(np.float32)


@dataclass(frozen=True)
class Plume:
    """One injected plume: source pixel, downwind angle, length (px), peak enhancement (ppm·m), shape."""

    row: float
    col: float
    angle_deg: float
    length_px: float
    peak_ppmm: float
    shape: str = "gaussian"  # or "random-walk"
    seed: int = 0


def plume_footprint(plume: Plume, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Peak-normalised enhancement (0..1) of ``plume`` over its bounding box, and that box."""
    from scipy.ndimage import gaussian_filter

    reach = int(np.ceil(plume.length_px * 1.6)) + 4
    r0, r1 = max(0, int(plume.row) - reach), min(shape[0], int(plume.row) + reach + 1)
    c0, c1 = max(0, int(plume.col) - reach), min(shape[1], int(plume.col) + reach + 1)
    rng = np.random.default_rng(plume.seed)
    theta = np.deg2rad(plume.angle_deg)
    h, w = r1 - r0, c1 - c0
    if plume.shape == "gaussian":
        rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        dr, dc = rows - plume.row, cols - plume.col
        along = dc * np.cos(theta) - dr * np.sin(theta)
        across = dc * np.sin(theta) + dr * np.cos(theta)
        downwind = np.maximum(along, 0.0) + 0.7
        sigma = 0.4 * downwind**0.85 + 0.8
        field = np.exp(-0.5 * (across / sigma) ** 2) / sigma * np.exp(-downwind / plume.length_px)
        field *= np.exp(0.35 * smooth_field((h, w), rng, scale=6.0)[0])
        field[along < -1.5] = 0.0
    elif plume.shape == "random-walk":
        particles, steps = 2000, max(8, int(plume.length_px))
        drift = np.array([-np.sin(theta), np.cos(theta)])
        moves = rng.standard_normal((particles, steps, 2)) * 0.9 + drift * 0.8
        # Particles leave the source at random times, so the plume is continuous from the source on.
        alive = np.arange(steps)[None, :] < rng.integers(1, steps + 1, size=particles)[:, None]
        paths = np.cumsum(moves * alive[:, :, None], axis=1)[:, -1, :] + [plume.row - r0, plume.col - c0]
        field = np.zeros((h, w))
        inside = (paths[:, 0] >= 0) & (paths[:, 0] < h) & (paths[:, 1] >= 0) & (paths[:, 1] < w)
        np.add.at(field, (paths[inside, 0].astype(int), paths[inside, 1].astype(int)), 1.0)
        field = gaussian_filter(field, 1.2)
    else:
        raise ValueError(f"unknown plume shape {plume.shape!r} (gaussian, random-walk)")
    peak = field.max()
    return (field / peak if peak > 0 else field).astype(np.float32), (slice(r0, r1), slice(c0, c1))


def enhancement_map(plumes: list[Plume], shape: tuple[int, int]) -> np.ndarray:
    """ΔX (ppm·m) of all ``plumes`` on a grid of ``shape`` (overlapping plumes add)."""
    total = np.zeros(shape, dtype=np.float32)
    for plume in plumes:
        footprint, box = plume_footprint(plume, shape)
        total[box] += plume.peak_ppmm * footprint
    return total


def random_plumes(shape: tuple[int, int], count: int, rng: np.random.Generator,
                  peak_ppmm: tuple[float, float] = (800.0, 4000.0),
                  length_px: tuple[float, float] = (10.0, 40.0), margin: int = 4) -> list[Plume]:
    """``count`` plumes with sources uniform over the grid, strengths and lengths log-uniform, mixed shapes."""
    plumes = []
    for i in range(count):
        plumes.append(Plume(
            row=float(rng.uniform(margin, shape[0] - margin)), col=float(rng.uniform(margin, shape[1] - margin)),
            angle_deg=float(rng.uniform(0, 360)),
            length_px=float(np.exp(rng.uniform(np.log(length_px[0]), np.log(length_px[1])))),
            peak_ppmm=float(np.exp(rng.uniform(np.log(peak_ppmm[0]), np.log(peak_ppmm[1])))),
            shape="gaussian" if i % 2 == 0 else "random-walk", seed=int(rng.integers(2**31)),
        ))
    return plumes


def inject_plume(radiance: np.ndarray, absorption: np.ndarray, enhancement_ppmm: np.ndarray,
                 air_mass_factor: float = 1.0) -> np.ndarray:
    """Beer-Lambert injection: ``radiance (B, H, W) · exp(a(λ) · ΔX · AMF)`` with ``a`` the unit absorption (≤ 0)."""
    return (radiance * np.exp(absorption[:, None, None] * (enhancement_ppmm[None] * air_mass_factor))).astype(radiance.dtype)


@dataclass
class Scene:
    """Per-pixel ingredients of a synthetic capture (kept 2-D so a large capture is rendered strip by strip)."""

    sensor: Sensor
    abundances: np.ndarray  # (6, H, W) surface mixture weights summing to 1
    texture: np.ndarray  # (H, W) brightness texture around 1
    vapour: np.ndarray  # (H, W) water-vapour scale around 1
    enhancement: np.ndarray  # (H, W) CH4 ΔX, ppm·m
    seed: int
    air_mass_factor: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.enhancement.shape


def make_scene(sensor: Sensor, shape: tuple[int, int], plumes: list[Plume], seed: int,
               air_mass_factor: float = 1.0) -> Scene:
    """Draw the surface mixture, texture and water vapour of a capture and place ``plumes`` on it."""
    rng = np.random.default_rng(seed)
    scale = max(6.0, min(shape) / 6.0)
    logits = smooth_field(shape, rng, scale=scale, count=6) * 2.2
    logits[5] -= 2.0  # water is rarer than land
    logits[0] += 0.5  # and vegetation commoner
    weights = np.exp(logits - logits.max(axis=0))
    weights /= weights.sum(axis=0)
    texture = 1.0 + 0.03 * rng.standard_normal(shape).astype(np.float32)
    vapour = 1.0 + 0.25 * np.tanh(smooth_field(shape, rng, scale=scale * 1.5)[0] / 2)
    return Scene(sensor, weights.astype(np.float32), texture, vapour.astype(np.float32),
                 enhancement_map(plumes, shape), seed, air_mass_factor)


def render_rows(scene: Scene, rows: slice, rng: np.random.Generator) -> np.ndarray:
    """Radiance (B, rows, W) float32 of ``scene`` over ``rows``, plumes and noise included."""
    sensor = scene.sensor
    w = sensor.wavelengths_nm
    gain = (solar_irradiance(w) * np.cos(np.deg2rad(35.0)) / np.pi * fixed_transmittance(w, sensor.fwhm_nm)).astype(np.float32)
    path = (0.015 * solar_irradiance(w) / np.pi * (w / 500.0) ** -4).astype(np.float32)
    h2o = water_depth(w).astype(np.float32)
    absorption = unit_absorption_spectrum(w, sensor.fwhm_nm).astype(np.float32)
    spectra = surface_spectra(w).astype(np.float32)  # (6, B)
    mix = scene.abundances[:, rows]
    reflectance = np.einsum("kb,khw->bhw", spectra, mix) * scene.texture[rows][None]
    # Water vapour and plume CH4 both act through exp(-depth): fold them into one exponent.
    exponent = -h2o[:, None, None] * scene.vapour[rows][None]
    exponent += absorption[:, None, None] * (scene.enhancement[rows][None] * scene.air_mass_factor)
    radiance = gain[:, None, None] * reflectance * np.exp(exponent) + path[:, None, None]
    noise = rng.standard_normal(radiance.shape, dtype=np.float32)
    radiance += noise * np.sqrt(np.float32(1e-6) + np.float32(1e-6) * radiance)
    return np.maximum(radiance, 0.0).astype(np.float32)


def synthetic_map_info(shape: tuple[int, int]) -> str:
    """ENVI ``map info`` of the synthetic UTM grid (zone 13 N, WGS-84, 60 m pixels)."""
    x, y = SYNTHETIC_ORIGIN
    return (f"{{UTM, 1, 1, {x:.1f}, {y:.1f}, {SYNTHETIC_PIXEL_M:g}, {SYNTHETIC_PIXEL_M:g}, 13, North, WGS-84, "
            "units=Meters}")


def write_capture(path: Path | str, scene: Scene, interleave: str = "bil", strip_rows: int = 64,
                  ignore_value: float | None = -9999.0, georeferenced: bool = True) -> Path:
    """Render ``scene`` into an ENVI cube at ``path`` strip by strip (memory: one strip of radiance)."""
    sensor = scene.sensor
    height, width = scene.shape
    data_path = write_envi(path, None, sensor.wavelengths_nm, sensor.fwhm_nm, interleave=interleave,
                           ignore_value=ignore_value, bad_bands=sensor.bad_bands,
                           shape=(len(sensor.wavelengths_nm), height, width),
                           description=f"Vitrail synthetic {sensor.name} capture, seed {scene.seed}",
                           map_info=synthetic_map_info(scene.shape) if georeferenced else None)
    rng = np.random.default_rng(scene.seed + 1)
    for first in range(0, height, strip_rows):
        rows = slice(first, min(height, first + strip_rows))
        write_envi_rows(data_path, render_rows(scene, rows, rng), first)
    return data_path


def plume_labels(scene: Scene, threshold_ppmm: float = LABEL_THRESHOLD_PPMM) -> np.ndarray:
    """uint8 (H, W) plume mask: 1 where the injected ΔX reaches ``threshold_ppmm``."""
    return (scene.enhancement >= threshold_ppmm).astype(np.uint8)


def write_mask(path: Path | str, mask: np.ndarray, georeferenced: bool = True) -> Path:
    """Write a uint8 plume mask GeoTIFF (0 background, 1 plume, 255 unlabelled) on the synthetic grid."""
    import rasterio
    from affine import Affine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", height=mask.shape[0], width=mask.shape[1], count=1, dtype="uint8", nodata=255,
                   compress="deflate")
    if georeferenced:
        profile.update(crs=f"EPSG:{SYNTHETIC_EPSG}",
                       transform=Affine(SYNTHETIC_PIXEL_M, 0.0, SYNTHETIC_ORIGIN[0], 0.0, -SYNTHETIC_PIXEL_M, SYNTHETIC_ORIGIN[1]))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(mask.astype(np.uint8), 1)
        ds.set_band_description(1, "plume_mask")
    return path

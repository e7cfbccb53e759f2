"""Methane absorption on a sensor's bands, and the classical detectors built on it (MF/CEM, ACE, Mag1c-SAS).

Unit absorption spectrum
    The look-up table shipped by ``onboard-methane-detection`` (inherited from ``mag1c``, Foote et al.
    2020) holds top-of-atmosphere radiance at 0.01-0.02 nm resolution over 1400-2522 nm for seven CH4
    enhancements (0 ... 16000 ppm·m). Each table spectrum is convolved with a Gaussian spectral
    response (sigma = FWHM / 2.3548) for every band, and the slope of log-radiance against enhancement,
    fitted by least squares over the seven levels, is the band's unit absorption ``a(λ)`` (negative,
    per ppm·m). Beer-Lambert then reads ``L(λ, ΔX) = L0(λ) · exp(a(λ) · ΔX)``.

Detectors (all over the pixels of one tile or column group, vectorised with numpy)
    With background mean ``μ``, covariance ``Σ`` and target ``t = a ∘ μ`` (the first-order change of
    radiance per ppm·m):

    * matched filter / CEM: ``α = (x - μ)ᵀ Σ⁻¹ t / (tᵀ Σ⁻¹ t)``, in ppm·m;
    * ACE: ``(x - μ)ᵀ Σ⁻¹ t / sqrt(tᵀ Σ⁻¹ t · (x - μ)ᵀ Σ⁻¹ (x - μ))``, a unitless cosine in [-1, 1];
    * Mag1c-SAS (Foote et al. 2020; Herec et al. 2025 "sampled" variant): the albedo-corrected,
      sparsity-regularised matched filter. Statistics are fitted on a regular 1 % sample of the pixels
      with reweighted-l1 iterations that remove each pixel's estimated plume signal before re-estimating
      ``μ`` and ``Σ``; then every pixel gets ``α = max(0, α0 - w/(R·n))`` with ``α0 = max(0, (x-μ)ᵀΣ⁻¹t/(R·n))``,
      ``R = xᵀμ / μᵀμ`` (albedo), ``n = tᵀΣ⁻¹t`` and ``w = 1 / (R (α + 1e-4))`` refreshed three times.

Pixels flagged invalid (ignore value, NaN) never enter the statistics and get 0. Saturated or very
bright pixels (albedo over :data:`BRIGHT_ALBEDO` times the median, or at the integer type's ceiling)
are kept out of the statistics too, so one glint cannot skew the covariance. A small ridge
(:data:`RIDGE`, relative to the mean band variance) keeps ``Σ`` invertible on tiny tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

LUT_ENHANCEMENTS_PPMM = np.array([0.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0])
# mag1c's default window: strong CH4 absorption, away from the 1.9 µm water band.
DEFAULT_WINDOW_NM = (2122.0, 2488.0)
RIDGE = 1e-6
BRIGHT_ALBEDO = 4.0
SAS_SAMPLE_FRACTION = 0.01
SAS_FIT_ITERATIONS = 30
SAS_APPLY_ITERATIONS = 3
L1_EPSILON = 1e-4
METHODS = ("mag1c_sas", "mf", "ace")


def lut_folder() -> Path:
    """Folder of the CH4 radiance look-up table (``wv.npy``, ``rads.npy``) of ``onboard-methane-detection``."""
    try:
        import onboard_methane_detection
    except ImportError as error:  # pragma: no cover - it is a project dependency
        raise RuntimeError("the CH4 look-up table comes with the 'onboard-methane-detection' package; "
                           "install it (pip install onboard-methane-detection)") from error
    return Path(onboard_methane_detection.__file__).parent / "onground"


@lru_cache(maxsize=1)
def _lut() -> tuple[np.ndarray, np.ndarray]:
    folder = lut_folder()
    return np.load(folder / "wv.npy"), np.load(folder / "rads.npy")


def unit_absorption_spectrum(wavelengths_nm: np.ndarray, fwhm_nm: np.ndarray) -> np.ndarray:
    """CH4 unit absorption per band (d ln L / d ΔX, per ppm·m; 0 outside the table's 1400-2522 nm).

    Args:
        wavelengths_nm: band centres; fwhm_nm: band full widths at half maximum (same length).

    Raises:
        ValueError: lengths differ or values are not finite and positive.
    """
    centres = np.asarray(wavelengths_nm, dtype=np.float64)
    widths = np.asarray(fwhm_nm, dtype=np.float64)
    if centres.shape != widths.shape:
        raise ValueError(f"{len(centres)} band centres but {len(widths)} FWHM values")
    if not (np.isfinite(centres).all() and np.isfinite(widths).all() and (widths > 0).all()):
        raise ValueError("band centres and FWHMs must be finite and FWHMs positive")
    grid, radiance = _lut()
    sigma = widths / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    lo = np.searchsorted(grid, centres - 4 * sigma)
    hi = np.searchsorted(grid, centres + 4 * sigma)
    conc = LUT_ENHANCEMENTS_PPMM - LUT_ENHANCEMENTS_PPMM.mean()
    out = np.zeros(len(centres))
    for band, (a, b) in enumerate(zip(lo, hi)):
        if b - a < 2:
            continue  # band outside the table (or narrower than its sampling): no CH4 sensitivity modelled
        weights = np.exp(-0.5 * ((grid[a:b] - centres[band]) / sigma[band]) ** 2)
        band_radiance = radiance[:, a:b] @ (weights / weights.sum())
        log_radiance = np.log(np.maximum(band_radiance, 1e-30))
        out[band] = conc @ (log_radiance - log_radiance.mean()) / (conc @ conc)
    return out


def ch4_transmittance(wavelengths_nm: np.ndarray, fwhm_nm: np.ndarray, enhancement_ppmm: float = 1000.0) -> np.ndarray:
    """Band transmittance of a CH4 enhancement, ``exp(a(λ) ΔX)`` (1 where CH4 does not absorb)."""
    return np.exp(unit_absorption_spectrum(wavelengths_nm, fwhm_nm) * enhancement_ppmm)


def sas_sample(trusted: int, bands: int, fraction: float = SAS_SAMPLE_FRACTION) -> np.ndarray:
    """Positions, among ``trusted`` pixels in reading order, that Mag1c-SAS fits its statistics on."""
    # At least a few samples per band, or the covariance is singular on small tiles.
    return _sample_indices(trusted, fraction, minimum=min(trusted, 8 * bands))


def _sample_indices(n: int, fraction: float, minimum: int) -> np.ndarray:
    """Every k-th pixel so that about ``fraction`` of ``n`` (at least ``minimum``) are used."""
    count = min(n, max(minimum, int(round(fraction * n))))
    step = max(1, n // max(count, 1))
    return np.arange(0, n, step)[:count]


def ridge_covariance(scatter: np.ndarray, count: int) -> np.ndarray:
    """Sample covariance from a centred scatter matrix ``Σ (x-μ)(x-μ)ᵀ`` of ``count`` pixels, plus the ridge."""
    cov = scatter / max(count - 1, 1)
    ridge = RIDGE * float(np.trace(cov)) / len(cov) + 1e-12
    cov[np.diag_indices_from(cov)] += ridge
    return cov


def trusted_pixels(brightness: np.ndarray, saturated: np.ndarray | None, bands: int) -> np.ndarray:
    """Mask of pixels trusted for statistics from their mean radiance and saturation flags.

    Pixels brighter than :data:`BRIGHT_ALBEDO` times the median, or saturated, are left out, unless that
    leaves no more pixels than bands (then all are used, or the covariance would be singular).
    """
    median = float(np.median(brightness)) if len(brightness) else 0.0
    keep = brightness <= BRIGHT_ALBEDO * max(median, 1e-12)
    if saturated is not None:
        keep &= ~saturated
    return keep if keep.sum() > bands else np.ones(len(brightness), dtype=bool)


def saturated_pixels(x: np.ndarray, saturation: float | None) -> np.ndarray | None:
    """Pixels of ``x`` (N, B) with any band at the integer ceiling, or None for float data."""
    return None if saturation is None else (x >= saturation).any(axis=1)


def _statistics_pixels(x: np.ndarray, saturation: float | None) -> np.ndarray:
    """Row mask of pixels trusted for statistics: not saturated, not extreme in albedo."""
    return trusted_pixels(x.mean(axis=1), saturated_pixels(x, saturation), x.shape[1])


@dataclass(frozen=True)
class FilterStatistics:
    """Background statistics of one detector window, enough to score any of its pixels.

    ``mu`` is the background mean, ``cit`` is Σ⁻¹t, ``norm`` is tᵀΣ⁻¹t; ACE also keeps the Cholesky
    factor of Σ and the target ``t``.
    """

    method: str
    mu: np.ndarray
    cit: np.ndarray
    norm: float
    chol: np.ndarray | None = None
    target: np.ndarray | None = None


def fit_gaussian_statistics(method: str, count: int, mean: np.ndarray, scatter: np.ndarray,
                            absorption: np.ndarray) -> FilterStatistics:
    """Matched-filter or ACE statistics from the mean and centred scatter of the trusted pixels."""
    target = absorption * mean
    cov = ridge_covariance(scatter, count)
    if method == "ace":
        chol = np.linalg.cholesky(cov)
        return FilterStatistics(method, mean, np.zeros_like(mean), 0.0, chol=chol, target=target)
    cit = np.linalg.solve(cov, target)
    return FilterStatistics(method, mean, cit, float(target @ cit))


def apply_statistics(x: np.ndarray, stats: FilterStatistics) -> np.ndarray:
    """Enhancement of pixels ``x`` (N, B) float32 with a window's fitted statistics (any method)."""
    if stats.method == "mag1c_sas":
        return apply_sparse_filter(x, stats.mu, stats.cit, stats.norm)
    x64 = x.astype(np.float64, copy=False)
    if stats.method == "mf":
        return ((x64 - stats.mu) @ stats.cit / stats.norm).astype(np.float32)
    # Whitening with the Cholesky factor: z = L⁻¹ (x - μ), so zᵀz = (x-μ)ᵀ Σ⁻¹ (x-μ).
    from scipy.linalg import solve_triangular

    white_t = solve_triangular(stats.chol, stats.target, lower=True)
    white_x = solve_triangular(stats.chol, (x64 - stats.mu).T, lower=True)
    numerator = white_t @ white_x
    denominator = np.sqrt((white_t @ white_t) * np.einsum("bn,bn->n", white_x, white_x)) + 1e-30
    return (numerator / denominator).astype(np.float32)


def _gaussian_filter(x: np.ndarray, absorption: np.ndarray, method: str, saturation: float | None) -> np.ndarray:
    x64 = x.astype(np.float64, copy=False)
    stats = x64[_statistics_pixels(x64, saturation)]
    mu = stats.mean(axis=0)
    centred = stats - mu
    return apply_statistics(x, fit_gaussian_statistics(method, len(stats), mu, centred.T @ centred, absorption))


def matched_filter(x: np.ndarray, absorption: np.ndarray, saturation: float | None = None) -> np.ndarray:
    """Classical matched filter (CEM with mean removal) of pixels ``x`` (N, B); ppm·m per pixel."""
    return _gaussian_filter(x, absorption, "mf", saturation)


def ace(x: np.ndarray, absorption: np.ndarray, saturation: float | None = None) -> np.ndarray:
    """Adaptive coherence estimator of pixels ``x`` (N, B): signed cosine to the CH4 target in whitened space."""
    return _gaussian_filter(x, absorption, "ace", saturation)


def fit_sparse_statistics(sample: np.ndarray, absorption: np.ndarray,
                          iterations: int = SAS_FIT_ITERATIONS) -> tuple[np.ndarray, np.ndarray, float]:
    """Reweighted-l1 background statistics on sampled pixels (N, B): returns (μ, Σ⁻¹t, tᵀΣ⁻¹t).

    Each iteration estimates every sampled pixel's enhancement, removes its plume signal
    (``x - R α t``) and refits mean and covariance, so plume pixels stop inflating the background.
    The cleaned pixels differ from ``x`` by a rank-one term, so their scatter is ``x``'s, computed once,
    plus rank-one corrections: ``Σ (x̃ᵢ - dᵢt)(x̃ᵢ - dᵢt)ᵀ = S - vtᵀ - tvᵀ + (dᵀd)ttᵀ`` with ``x̃ = x - x̄``,
    ``d`` the centred ``R α`` and ``v = x̃ᵀd``: one N x B² product instead of one per iteration (most of
    an on-board capture's product time).
    """
    x = sample.astype(np.float64, copy=False)
    count = len(x)
    mean = x.mean(axis=0)
    centred = x - mean
    scatter = centred.T @ centred
    albedo = x @ mean / (mean @ mean)
    mu, target = mean, absorption * mean
    cit = np.linalg.solve(ridge_covariance(scatter, count), target)
    norm = float(target @ cit)
    alpha = np.maximum((x @ cit - mu @ cit) / (albedo * norm), 0.0)
    for step in range(iterations):
        weight = 1.0 / (albedo * (alpha + L1_EPSILON))
        removed = albedo * alpha  # cleaned = x - removed ⊗ target
        shift = removed.mean()
        d = removed - shift
        v = centred.T @ d
        cleaned_scatter = scatter - np.outer(v, target) - np.outer(target, v) + float(d @ d) * np.outer(target, target)
        mu = mean - shift * target
        target = absorption * mu
        cit = np.linalg.solve(ridge_covariance(cleaned_scatter, count), target)
        norm = max(float(target @ cit), 1e-12)
        if step + 1 < iterations:
            alpha = np.maximum((x @ cit - mu @ cit - weight) / (albedo * norm), 0.0)
    return mu, cit, norm


def apply_sparse_filter(x: np.ndarray, mu: np.ndarray, cit: np.ndarray, norm: float,
                        iterations: int = SAS_APPLY_ITERATIONS) -> np.ndarray:
    """Albedo-corrected, l1-shrunk enhancement (ppm·m) of pixels ``x`` (N, B) with fitted statistics."""
    mu32 = mu.astype(np.float32)
    albedo = np.maximum(x @ mu32 / np.float32(mu @ mu), np.float32(1e-6))
    denominator = albedo * np.float32(norm)
    first = np.maximum((x @ cit.astype(np.float32) - np.float32(mu @ cit)) / denominator, 0.0)
    alpha = first
    for _ in range(iterations):
        alpha = np.maximum(first - 1.0 / (albedo * (alpha + np.float32(L1_EPSILON))) / denominator, 0.0)
    return alpha.astype(np.float32)


def mag1c_sas(x: np.ndarray, absorption: np.ndarray, saturation: float | None = None,
              sample_fraction: float = SAS_SAMPLE_FRACTION) -> np.ndarray:
    """Mag1c-SAS enhancement (ppm·m, ≥ 0) of pixels ``x`` (N, B): sampled statistics, then all pixels."""
    trusted = np.flatnonzero(_statistics_pixels(x, saturation))
    picked = trusted[sas_sample(len(trusted), x.shape[1], sample_fraction)]
    mu, cit, norm = fit_sparse_statistics(x[picked], absorption)
    return apply_sparse_filter(x, mu, cit, norm)


def enhancement(x: np.ndarray, absorption: np.ndarray, method: str = "mag1c_sas",
                saturation: float | None = None) -> np.ndarray:
    """Run detector ``method`` (one of :data:`METHODS`) on pixels ``x`` (N, B) float32."""
    if method == "mag1c_sas":
        return mag1c_sas(x, absorption, saturation)
    if method == "mf":
        return matched_filter(x, absorption, saturation)
    if method == "ace":
        return ace(x, absorption, saturation)
    raise ValueError(f"unknown methane detector {method!r}; known: {', '.join(METHODS)}")

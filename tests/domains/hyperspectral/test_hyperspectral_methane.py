"""CH4 absorption, detectors, plume injection round trip, and wavelength-aware band selection."""

from __future__ import annotations

import numpy as np
import pytest

from domains.hyperspectral import synthesis
from domains.hyperspectral.bands import locate_channels, select_channels
from domains.hyperspectral.cube import open_cube
from domains.hyperspectral.methane import ace, mag1c_sas, matched_filter, unit_absorption_spectrum
from domains.hyperspectral.stack import compute_stack
from domains.spec import Channel, DomainInputError


def test_unit_absorption_peaks_in_the_ch4_bands_and_vanishes_in_the_visible():
    w = synthesis.EMIT_LIKE.wavelengths_nm
    a = unit_absorption_spectrum(w, synthesis.EMIT_LIKE.fwhm_nm)
    assert (a <= 1e-9).all()
    assert 2200 < w[np.argmin(a)] < 2400  # strongest CH4 band of the 2.3 µm system
    assert np.abs(a[w < 1300]).max() == 0.0 and a.min() < -1e-5
    # Wider bands smear the lines: the deepest band gets shallower.
    assert unit_absorption_spectrum(w, synthesis.EMIT_LIKE.fwhm_nm * 3).min() > a.min()


@pytest.fixture(scope="module")
def plume_capture(tmp_path_factory):
    """A 64 x 64 EMIT-like capture with one plume, written and read back through ENVI."""
    plume = synthesis.Plume(row=40.0, col=20.0, angle_deg=10.0, length_px=18.0, peak_ppmm=3000.0, seed=3)
    scene = synthesis.make_scene(synthesis.EMIT_LIKE, (64, 64), [plume], seed=7)
    path = synthesis.write_capture(tmp_path_factory.mktemp("plume") / "cap.bsq", scene, interleave="bsq")
    return open_cube(path), scene


@pytest.mark.parametrize("product", ["ch4_mag1c", "ch4_mf", "ch4_ace"])
def test_injected_plume_is_found_at_its_location(plume_capture, product):
    cube, scene = plume_capture
    stack, _ = compute_stack(cube, select_channels(cube, (product,)))
    product_map = stack[0]
    truth = synthesis.plume_labels(scene).astype(bool)
    assert truth.sum() > 20
    assert product_map[truth].mean() > product_map[~truth].mean() + 3 * product_map[~truth].std()
    # The strongest response lies on the plume, within a few pixels of the source.
    peak = np.unravel_index(np.argmax(product_map), product_map.shape)
    assert abs(peak[0] - 40) <= 8 and abs(peak[1] - 20) <= 12


def test_detectors_agree_on_units_and_are_robust_to_saturated_pixels():
    rng = np.random.default_rng(0)
    w = np.linspace(2122, 2488, 50)
    a = unit_absorption_spectrum(w, np.full(50, 8.5))
    base = 1.0 + 0.2 * np.sin(w / 60.0)
    pixels = base * (1 + 0.01 * rng.standard_normal((4000, 1))) + 0.003 * rng.standard_normal((4000, 50))
    truth = np.zeros(4000)
    truth[:200] = 1500.0
    pixels = (pixels * np.exp(a * truth[:, None])).astype(np.float32)
    mf = matched_filter(pixels, a)
    assert mf[:200].mean() == pytest.approx(1500.0, rel=0.2) and abs(mf[200:].mean()) < 100
    sas = mag1c_sas(pixels, a)
    assert (sas >= 0).all() and sas[:200].mean() > 5 * sas[200:].mean()
    assert ace(pixels, a)[:200].mean() > 0.3 > abs(ace(pixels, a)[200:].mean())
    glinty = pixels.copy()
    glinty[300:310] = 60.0  # saturated glint: kept out of the statistics
    assert matched_filter(glinty, a, saturation=60.0)[:200].mean() == pytest.approx(mf[:200].mean(), rel=0.05)


def test_beer_lambert_injection_is_exact():
    radiance = np.full((3, 2, 2), 2.0, dtype=np.float32)
    absorption = np.array([0.0, -1e-5, -2e-5])
    enhancement = np.array([[0.0, 1000.0], [2000.0, 0.0]], dtype=np.float32)
    out = synthesis.inject_plume(radiance, absorption, enhancement, air_mass_factor=2.0)
    np.testing.assert_allclose(out[:, 0, 1], 2.0 * np.exp(absorption * 2000.0), rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], 2.0)


def test_plumes_are_reproducible_and_shapes_differ():
    rng = lambda: np.random.default_rng(4)  # noqa: E731
    first = synthesis.random_plumes((100, 100), 4, rng())
    assert first == synthesis.random_plumes((100, 100), 4, rng())
    a = synthesis.enhancement_map(first, (100, 100))
    np.testing.assert_array_equal(a, synthesis.enhancement_map(first, (100, 100)))
    assert {p.shape for p in first} == {"gaussian", "random-walk"} and a.max() > 500


def test_band_selection_by_range_strategy_rgb_and_name(example):
    cube = open_cube(example["source"])
    rgb = select_channels(cube, ("rgb",))
    assert [s.channel.name for s in rgb] == ["red", "green", "blue"]
    assert all(abs(cube.wavelengths_nm[s.band] - s.channel.wavelength_nm) <= 10 for s in rgb)
    ranged = select_channels(cube, ("2100-2450nm",))
    assert all(2100 <= s.channel.wavelength_nm <= 2450 for s in ranged) and len(ranged) == 20
    for strategy in ("highest-transmittance", "highest-variance", "evenly-spaced"):
        chosen = select_channels(cube, (f"{strategy}:6",))
        assert len({s.band for s in chosen}) == 6
    assert select_channels(cube, ("highest-variance:4",))[0].band == rgb[0].band  # starts from red
    assert select_channels(cube, ("band_010",))[0].band == 9
    with pytest.raises(DomainInputError, match="neither a band name"):
        select_channels(cube, ("thermal",))
    with pytest.raises(DomainInputError, match="more than once"):
        select_channels(cube, ("rgb", "red"))


def test_mapping_channels_across_sensors(example):
    cube = open_cube(example["source"])  # 120 bands, ~18 nm sampling
    emit_channel = Channel("2301.4nm", 2301.4)
    (source,) = locate_channels(cube, (emit_channel,))
    assert abs(cube.wavelengths_nm[source.band] - 2301.4) <= cube.fwhm_nm[source.band]
    with pytest.raises(DomainInputError, match="3000.0 nm has no band within .* cannot be mapped"):
        locate_channels(cube, (Channel("3000.0nm", 3000.0),))
    with pytest.raises(DomainInputError, match=r"1380\.0 nm has no band"):  # inside a flagged water band
        locate_channels(cube, (Channel("1380.0nm", 1380.0),))


def test_sparse_statistics_equal_a_full_refit_of_the_cleaned_pixels_every_iteration(plume_capture):
    """The rank-one update of the scatter gives what recomputing it from the cleaned pixels gives."""
    from domains.hyperspectral.methane import L1_EPSILON, fit_sparse_statistics, ridge_covariance

    cube, _ = plume_capture
    w = cube.require_wavelengths()
    bands = np.flatnonzero((w > 2100) & (w < 2450))
    x = cube.read(bands, slice(0, cube.grid[0]), slice(0, cube.grid[1])).reshape(len(bands), -1).T.astype(np.float64)
    absorption = unit_absorption_spectrum(w, synthesis.EMIT_LIKE.fwhm_nm)[bands]

    def refit(iterations: int):  # the textbook loop: clean the pixels, then their mean and covariance
        mu = x.mean(axis=0)
        albedo = x @ mu / (mu @ mu)
        target = absorption * mu
        centred = x - mu
        cit = np.linalg.solve(ridge_covariance(centred.T @ centred, len(x)), target)
        norm = float(target @ cit)
        alpha = np.maximum((x - mu) @ cit / (albedo * norm), 0.0)
        for step in range(iterations):
            weight = 1.0 / (albedo * (alpha + L1_EPSILON))
            cleaned = x - (albedo * alpha)[:, None] * target
            mu = cleaned.mean(axis=0)
            target = absorption * mu
            centred = cleaned - mu
            cit = np.linalg.solve(ridge_covariance(centred.T @ centred, len(x)), target)
            norm = max(float(target @ cit), 1e-12)
            if step + 1 < iterations:
                alpha = np.maximum(((x - mu) @ cit - weight) / (albedo * norm), 0.0)
        return mu, cit, norm

    for iterations in (1, 5):
        fast, slow = fit_sparse_statistics(x, absorption, iterations), refit(iterations)
        np.testing.assert_allclose(fast[0], slow[0], rtol=1e-10)
        np.testing.assert_allclose(fast[1], slow[1], rtol=1e-7, atol=1e-12 * np.abs(slow[1]).max())
        assert fast[2] == pytest.approx(slow[2], rel=1e-9)

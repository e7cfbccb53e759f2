"""Wavelength-aware channel selection: what a model's input channels are, and where a cube holds them.

A channel request is a tuple of items, expanded in order (``IngestRequest.channels``):

* ``"rgb"`` or ``"red"``/``"green"``/``"blue"``: the bands nearest 640/550/460 nm (as in the on-board
  pipeline of Herec et al.);
* ``"2100-2450nm"``: every band (not flagged bad) whose centre lies in the range;
* ``"1650nm"`` or ``"1650.5"``: the band nearest that wavelength;
* ``"<strategy>:<N>"``: N bands picked by one of the transmittance-based strategies of Herec et al.,
  "Optimizing Methane Detection On Board Satellites" (2025): ``highest-transmittance`` (the N bands where
  CH4 absorbs most, within 1570-2490 nm outside 1700-2000 nm), ``highest-variance`` (start from the red
  band, then greedily add the band whose CH4 absorption differs most from those already chosen) and
  ``evenly-spaced`` (N bands evenly spread over 2122-2488 nm);
* ``"ch4_mag1c"``, ``"ch4_mf"``, ``"ch4_ace"``: a methane enhancement product (see
  :mod:`domains.hyperspectral.methane`), computed from the cube, with no wavelength;
* anything else: a band name of the file (ENVI ``band names`` or GeoTIFF descriptions).

Channels are stored by wavelength, so a model trained on one sensor finds its channels in another's
cube through :func:`locate_channels` (nearest band within the band's FWHM), or gets a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from domains.hyperspectral.cube import Cube
from domains.spec import Channel, DomainInputError

RGB_NM = {"red": 640.0, "green": 550.0, "blue": 460.0}
RGB_TOLERANCE_NM = 30.0
PRODUCTS = {"ch4_mag1c": "mag1c_sas", "ch4_mf": "mf", "ch4_ace": "ace"}
DEFAULT_REQUEST = ("rgb", "ch4_mag1c")
STRATEGIES = ("highest-transmittance", "highest-variance", "evenly-spaced")
EVENLY_SPACED_NM = (2122.0, 2488.0)

_RANGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*nm\s*$", re.IGNORECASE)
_SINGLE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(nm)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ChannelSource:
    """Where a channel comes from in one cube: a band index, or a product name (band is then -1)."""

    channel: Channel
    band: int = -1
    product: str | None = None


def band_channel(cube: Cube, band: int) -> Channel:
    """The channel naming band ``band`` of ``cube`` by its wavelength (``"2301.4nm"``)."""
    wave = float(cube.require_wavelengths()[band])
    return Channel(f"{wave:.1f}nm", round(wave, 3))


def good_bands(cube: Cube) -> np.ndarray:
    """Boolean per band: not flagged bad by the file."""
    if cube.bad_bands is None:
        return np.ones(cube.bands, dtype=bool)
    return ~np.asarray(cube.bad_bands, dtype=bool)


def nearest_band(cube: Cube, wavelength: float, tolerance: float | None, what: str) -> int:
    """Index of the good band nearest ``wavelength``; error if none lies within ``tolerance`` nm."""
    centres = cube.require_wavelengths()
    usable = good_bands(cube)
    distance = np.where(usable, np.abs(centres - wavelength), np.inf)
    band = int(np.argmin(distance))
    widths = cube.band_widths()
    limit = tolerance if tolerance is not None else max(float(widths[band]), 5.0)
    if not np.isfinite(distance[band]) or distance[band] > limit:
        raise DomainInputError(
            cube.path,
            f"{what} at {wavelength:.1f} nm has no band within {limit:.1f} nm in this cube (nearest good band "
            f"{centres[band]:.1f} nm; the cube covers {centres.min():.0f}-{centres.max():.0f} nm with "
            f"{int(usable.sum())} good bands): the model's bands cannot be mapped onto this sensor",
        )
    return band


def strategy_bands(cube: Cube, strategy: str, count: int) -> list[int]:
    """Band indices chosen by a Herec et al. transmittance strategy (see module docstring)."""
    from domains.hyperspectral.methane import unit_absorption_spectrum

    centres = cube.require_wavelengths()
    usable = good_bands(cube)
    absorption = np.abs(unit_absorption_spectrum(centres, cube.band_widths()))
    # The methane-sensitive windows used by the strategies (STARCOP band mask).
    window = usable & (centres >= 1570) & (centres <= 2490) & ~((centres > 1700) & (centres < 2000))
    if strategy == "highest-transmittance":
        pool = np.flatnonzero(window)
        chosen = pool[np.argsort(-absorption[pool], kind="stable")[:count]].tolist()
    elif strategy == "evenly-spaced":
        pool = np.flatnonzero(usable & (centres >= EVENLY_SPACED_NM[0]) & (centres <= EVENLY_SPACED_NM[1]))
        if len(pool) < count:
            chosen = []
        else:
            chosen = pool[np.linspace(0, len(pool) - 1, count).round().astype(int)].tolist()
    elif strategy == "highest-variance":
        pool = np.flatnonzero(window).tolist()
        red = nearest_band(cube, RGB_NM["red"], RGB_TOLERANCE_NM, "red band") if centres.min() <= 800 else None
        chosen = [red] if red is not None else [pool.pop(int(np.argmax(absorption[pool])))]
        pool = [b for b in pool if b not in chosen]
        while len(chosen) < count and pool:
            gaps = [min(abs(absorption[b] - absorption[c]) for c in chosen) for b in pool]
            chosen.append(pool.pop(int(np.argmax(gaps))))
    else:
        raise DomainInputError(cube.path, f"unknown band strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if len(chosen) < count:
        raise DomainInputError(cube.path, f"strategy {strategy} needs {count} bands but this cube offers only "
                                          f"{len(chosen)} in its methane windows")
    return sorted(chosen) if strategy != "highest-variance" else chosen


def select_channels(cube: Cube, request: tuple[str, ...] | None) -> list[ChannelSource]:
    """Expand a channel request (see module docstring; None means RGB + Mag1c-SAS) against ``cube``.

    Raises:
        DomainInputError: an item names nothing in this cube, or the cube lacks what it needs.
    """
    items = list(request) if request else list(DEFAULT_REQUEST)
    sources: list[ChannelSource] = []
    for raw in items:
        item = raw.strip()
        key = item.lower()
        if key == "rgb":
            sources += [ChannelSource(Channel(n, w), nearest_band(cube, w, RGB_TOLERANCE_NM, f"{n} band"))
                        for n, w in RGB_NM.items()]
        elif key in RGB_NM:
            sources.append(ChannelSource(Channel(key, RGB_NM[key]),
                                         nearest_band(cube, RGB_NM[key], RGB_TOLERANCE_NM, f"{key} band")))
        elif key in PRODUCTS:
            cube.require_wavelengths()
            sources.append(ChannelSource(Channel(key), product=PRODUCTS[key]))
        elif (match := _RANGE.match(item)) is not None:
            lo, hi = sorted((float(match.group(1)), float(match.group(2))))
            centres = cube.require_wavelengths()
            picked = np.flatnonzero(good_bands(cube) & (centres >= lo) & (centres <= hi))
            if not len(picked):
                raise DomainInputError(cube.path, f"no good band lies in {lo:g}-{hi:g} nm (the cube covers "
                                                  f"{centres.min():.0f}-{centres.max():.0f} nm)")
            sources += [ChannelSource(band_channel(cube, int(b)), int(b)) for b in picked]
        elif (match := _SINGLE.match(item)) is not None:
            band = nearest_band(cube, float(match.group(1)), None, f"requested channel {item!r}")
            sources.append(ChannelSource(band_channel(cube, band), band))
        elif ":" in item and item.split(":", 1)[0].lower() in STRATEGIES:
            strategy, count = item.split(":", 1)
            if not count.strip().isdigit() or int(count) < 1:
                raise DomainInputError(cube.path, f"strategy item {item!r} must end with a positive band count")
            sources += [ChannelSource(band_channel(cube, b), b) for b in strategy_bands(cube, strategy.lower(), int(count))]
        elif item in cube.band_names:
            band = cube.band_names.index(item)
            channel = band_channel(cube, band) if cube.wavelengths_nm else Channel(item)
            sources.append(ChannelSource(channel, band))
        else:
            raise DomainInputError(
                cube.path,
                f"channel {item!r} is neither a band name of this cube nor a known selection (rgb, red/green/blue, "
                f"'<lo>-<hi>nm', '<wavelength>nm', {', '.join(s + ':N' for s in STRATEGIES)}, {', '.join(PRODUCTS)})",
            )
    names = [s.channel.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DomainInputError(cube.path, f"channel request selects {', '.join(duplicates)} more than once")
    return sources


def locate_channels(cube: Cube, channels: tuple[Channel, ...]) -> list[ChannelSource]:
    """Find a model's channels (as recorded at training) in ``cube``, mapping across sensors by wavelength.

    Raises:
        DomainInputError: a channel has no band within its tolerance, or is unknown.
    """
    sources = []
    for channel in channels:
        if channel.name in PRODUCTS:
            cube.require_wavelengths()
            sources.append(ChannelSource(channel, product=PRODUCTS[channel.name]))
        elif channel.name in RGB_NM:
            sources.append(ChannelSource(channel, nearest_band(cube, channel.wavelength_nm or RGB_NM[channel.name],
                                                               RGB_TOLERANCE_NM, f"model channel {channel.name}")))
        elif channel.wavelength_nm is not None:
            sources.append(ChannelSource(channel, nearest_band(cube, channel.wavelength_nm, None,
                                                               f"model channel {channel.name}")))
        elif channel.name in cube.band_names:
            sources.append(ChannelSource(channel, cube.band_names.index(channel.name)))
        else:
            raise DomainInputError(cube.path, f"model channel {channel.name!r} has no wavelength and no band of that "
                                              "name exists in this cube")
    return sources

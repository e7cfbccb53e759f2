"""Several dates of one area read as one scene: every date's bands stacked as channels ``t0:B04``, ``t1:B04``...

A time-series source is a folder whose children are dated scenes (band folders, SAFE products, GeoTIFFs or
STAC item files with a ``YYYYMMDD`` date in their names), or a static STAC catalogue holding several items.
Dates are ordered in time and must share one grid (CRS, transform and shape): a date on another grid is
refused, naming it. A sample then holds a location at every date, so splits by spatial block keep a
location's dates together by construction. Channels are time-major (all bands of ``t0``, then ``t1``...),
so a model that takes a time dimension (Prithvi-style ``(C, T, H, W)``) reshapes ``T x C`` channels.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from domains.spec import DomainInputError

_DATE = re.compile(r"(?<!\d)((?:19|20)\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?!\d)")
_TIME_PREFIX = re.compile(r"^t(\d+):(.+)$")


def scene_date(path: Path) -> str | None:
    """The acquisition date a scene's name (or STAC item) shows, as ``YYYY-MM-DD``; None if none."""
    if path.suffix.lower() == ".json" and path.is_file():
        from domains.satellite.stac import _read_item

        item = _read_item(path)
        if item.datetime is not None:
            return item.datetime.date().isoformat()
    match = _DATE.search(path.name)
    return f"{match[1]}-{match[2]}-{match[3]}" if match else None


def time_series_members(folder: Path) -> list[tuple[str, Path]]:
    """``(date, scene)`` of each dated scene of ``folder``, in time order (empty if it is not a time series)."""
    from domains.satellite.sensors import is_band_folder, raster_files, recognise_band_file

    if (folder / "catalog.json").is_file():
        from domains.satellite.stac import catalog_items

        items = catalog_items(folder)
        members = [(scene_date(p), p) for p in items]
    else:
        try:
            if any(recognise_band_file(p) is not None for p in raster_files(folder)):
                return []  # a band folder is one scene
        except DomainInputError:
            return []
        children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        scenes = [c for c in children if (c.is_dir() and is_band_folder(c))
                  or c.suffix.lower() in (".tif", ".tiff", ".json")]
        members = [(scene_date(c), c) for c in scenes]
    # Two dates at least, each once: two files of one date (a band folder and its multi-band copy) are one scene.
    dates = [date for date, _ in members]
    if len(members) < 2 or None in dates or len(set(dates)) != len(dates):
        return []
    return sorted(members)


def is_time_series(folder: Path) -> bool:
    """True for a folder of two or more dated scenes, or a STAC catalogue of two or more items."""
    return len(time_series_members(folder)) >= 2


def inspect_time_series(folder: Path, wanted: tuple[str, ...] | None, table: Any, scaling: Any):
    """Check every date's headers and lay the dates out as one scene (see the module docstring).

    ``wanted`` names plain bands (read at every date) or time-indexed ones (``t1:B04``, a model's channels).

    Raises:
        DomainInputError: a date is on another grid or of another sensor than the first, or a time index
            is beyond the dates found.
    """
    from domains.satellite.scene import inspect_scene

    members = time_series_members(folder)
    indexed = [(_TIME_PREFIX.match(name) if wanted else None) for name in (wanted or ())]
    if wanted and all(indexed):
        plain = tuple(dict.fromkeys(m[2] for m in indexed))
        steps = max(int(m[1]) for m in indexed) + 1
        if steps > len(members):
            raise DomainInputError(folder, f"channels need {steps} dates (t0..t{steps - 1}); the folder holds "
                                           f"{len(members)}: {', '.join(d for d, _ in members)}")
    elif wanted and any(indexed):
        raise DomainInputError(folder, f"channels {', '.join(wanted)} mix time-indexed (t0:B04) and plain names")
    else:
        plain = wanted
    sensor = table.name if table is not None else None
    layouts = [inspect_scene(path, plain, sensor, scaling) for _, path in members]
    first, first_date = layouts[0], members[0][0]
    for (date, path), layout in zip(members[1:], layouts[1:]):
        if layout.sensor.name != first.sensor.name:
            raise DomainInputError(path, f"date {date} is {layout.sensor.title}, date {first_date} is "
                                         f"{first.sensor.title}: a time series is one sensor")
        if layout.crs != first.crs or layout.shape != first.shape or not layout.transform.almost_equals(
                first.transform):
            raise DomainInputError(
                path, f"date {date} is on another grid than date {first_date} (CRS {layout.crs.to_string()} vs "
                      f"{first.crs.to_string()}, shape {layout.shape} vs {first.shape}, origin "
                      f"({layout.transform.c:g}, {layout.transform.f:g}) vs ({first.transform.c:g}, "
                      f"{first.transform.f:g})): resample the dates onto one grid first")
    stacked = [replace(band, time=t) for t, layout in enumerate(layouts) for band in layout.bands]
    if wanted and all(indexed):
        by_name = {f"t{b.time}:{b.name}".upper(): b for b in stacked}
        stacked = [by_name[f"t{m[1]}:{first.sensor.channel(m[2]).name}".upper()] for m in indexed]
    levels = {layout.level for layout in layouts}
    return replace(first, path=folder, bands=tuple(stacked), level=levels.pop() if len(levels) == 1 else "",
                   quality=None, dates=tuple(d for d, _ in members))

"""The slide manifest (CSV: slide file, patient, optional site, slide label, annotations) and QuPath GeoJSON regions.

Manifest columns (header names are case-insensitive; the aliases in brackets are accepted too):

- ``slide`` [slide_file, file, filename, path]: the slide file, relative to the source folder (or absolute).
- ``patient`` [patient_id, case, case_id]: the patient; every slide of a patient lands in one split.
- ``site`` [center, centre] (optional): the hospital or scanner site.
- ``label`` [slide_label] (optional): a slide-level class name.
- ``annotations`` [annotation, geojson] (optional): a QuPath GeoJSON export of the slide's regions,
  relative to the manifest's folder (or absolute).

Patient ids, sites and file names are identifying: they are read here and turned into keyed pseudonyms by
the reader; they never reach a sample, a provenance or a log.

Annotations are polygons in QuPath's image coordinates: level-0 pixels counted from the top-left of the
image QuPath shows. For slides whose scanned area does not start at (0, 0) (OpenSlide's
``openslide.bounds-x/y``, e.g. MIRAX, some Hamamatsu and Leica files), QuPath shows only the bounded area,
so a QuPath coordinate plus the bounds offset is the level-0 coordinate of the file.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domains.spec import DomainInputError

COLUMN_ALIASES = {
    "slide": ("slide", "slide_file", "file", "filename", "path"),
    "patient": ("patient", "patient_id", "case", "case_id"),
    "site": ("site", "center", "centre"),
    "label": ("label", "slide_label"),
    "annotations": ("annotations", "annotation", "geojson"),
}
REQUIRED_COLUMNS = ("slide", "patient")


@dataclass(frozen=True)
class SlideEntry:
    """One manifest row: a slide and what is known about it (identifying values stay inside the reader)."""

    path: Path
    key: str
    """The slide's path relative to the source, posix form: what its pseudonym is computed from."""
    patient: str
    row: int
    """Line number of the row in the CSV (the header is line 1)."""
    site: str | None = None
    label: str | None = None
    annotations: Path | None = None


@dataclass(frozen=True)
class Manifest:
    """A read manifest: its rows, and which optional columns it has."""

    path: Path
    entries: tuple[SlideEntry, ...]
    has_labels: bool
    has_annotations: bool
    has_sites: bool

    def entry_for(self, key: str) -> SlideEntry | None:
        return next((e for e in self.entries if e.key == key), None)


def _columns(header: list[str], where: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for index, name in enumerate(header):
        clean = name.strip().lower().replace(" ", "_")
        for column, aliases in COLUMN_ALIASES.items():
            if clean in aliases:
                if column in found:
                    raise DomainInputError(where, f"columns {header[found[column]]!r} and {name!r} both give the "
                                                  f"{column}; keep one")
                found[column] = index
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    if missing:
        raise DomainInputError(where, f"the manifest needs columns {', '.join(REQUIRED_COLUMNS)} (found "
                                      f"{', '.join(h.strip() for h in header) or 'no header'}); missing: "
                                      f"{', '.join(missing)}")
    return found


def slide_key(path: Path, source: Path) -> str:
    """The text a slide's pseudonym is computed from: its path relative to the source folder, posix form.

    A slide outside the source folder (an absolute path in the manifest) is keyed by its absolute path.
    Links are not followed: a linked slide is keyed by where it is listed (and a link loop still has a key).
    """
    absolute = Path(os.path.normpath(Path(path).absolute()))
    try:
        return absolute.relative_to(os.path.normpath(Path(source).absolute())).as_posix()
    except ValueError:
        return absolute.as_posix()


def read_manifest(path: Path | str, source: Path | str) -> Manifest:
    """Read a slide manifest CSV (see the module docstring for its columns).

    Args:
        path: the manifest CSV.
        source: the folder holding the slides (a single slide file: its folder); relative slide paths are
            resolved against it.

    Raises:
        DomainInputError: unreadable CSV, missing columns, an empty slide or patient cell, a slide listed
            twice, a slide or annotation file that does not exist (the message gives the line number).
    """
    path = Path(path)
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DomainInputError(path, f"cannot read the manifest CSV ({exc.__class__.__name__}: {exc})") from None
    if not rows:
        raise DomainInputError(path, "the manifest CSV is empty; it needs a header with slide and patient columns")
    columns = _columns(rows[0], path)
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue

        def cell(column: str) -> str:
            index = columns.get(column)
            return row[index].strip() if index is not None and index < len(row) else ""

        slide, patient = cell("slide"), cell("patient")
        if not slide:
            raise DomainInputError(path, f"line {line}: the slide cell is empty")
        if not patient:
            raise DomainInputError(path, f"line {line}: the patient cell is empty (every slide needs its patient, "
                                         "so that a patient's slides share a split)")
        slide_path = Path(slide) if Path(slide).is_absolute() else folder / slide
        if not slide_path.exists():
            raise DomainInputError(path, f"line {line}: slide file {slide!r} not found under {folder}")
        key = slide_key(slide_path, folder)
        if key in seen:
            raise DomainInputError(path, f"line {line}: slide {slide!r} is already listed on line {seen[key]}")
        seen[key] = line
        annotations = None
        if cell("annotations"):
            annotations = Path(cell("annotations"))
            annotations = annotations if annotations.is_absolute() else path.parent / annotations
            if not annotations.is_file():
                raise DomainInputError(path, f"line {line}: annotation file {cell('annotations')!r} not found "
                                             f"next to the manifest")
        entries.append(SlideEntry(path=slide_path, key=key, patient=patient, row=line, site=cell("site") or None,
                                  label=cell("label") or None, annotations=annotations))
    if not entries:
        raise DomainInputError(path, "the manifest lists no slides")
    return Manifest(path=path, entries=tuple(entries), has_labels="label" in columns,
                    has_annotations="annotations" in columns, has_sites="site" in columns)


# ---------------------------------------------------------------------------------------------------------
# Region annotations (QuPath GeoJSON)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One annotated polygon: its class name, outer ring and holes, in QuPath image coordinates (x, y)."""

    name: str
    outer: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    @property
    def area(self) -> float:
        return _ring_area(self.outer) - sum(_ring_area(h) for h in self.holes)


@dataclass
class Annotations:
    """The classified polygons of one GeoJSON file, and what was skipped in it (counts by reason)."""

    regions: list[Region]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def class_names(self) -> set[str]:
        return {r.name for r in self.regions}


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def _ring(coordinates, where: Path, index: int) -> np.ndarray:
    ring = np.asarray(coordinates, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3 or not np.isfinite(ring[:, :2]).all():
        raise DomainInputError(where, f"feature {index}: a polygon ring needs at least 3 finite (x, y) points")
    return ring[:, :2]


def _class_name(feature: dict) -> str | None:
    properties = feature.get("properties") or {}
    classification = properties.get("classification")
    if isinstance(classification, dict):
        name = classification.get("name") or (classification.get("names") or [None])[0]
    else:
        name = classification
    return str(name).strip() if name else None


def _features(payload, where: Path) -> list[dict]:
    # QuPath writes a FeatureCollection, a bare list of features (older versions), or one feature.
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict) and payload.get("type") == "FeatureCollection":
        return list(payload.get("features") or [])
    if isinstance(payload, dict) and payload.get("type") == "Feature":
        return [payload]
    raise DomainInputError(where, "not a GeoJSON FeatureCollection, feature list or feature")


def read_annotations(path: Path | str) -> Annotations:
    """Read the classified polygons of a QuPath GeoJSON export.

    A feature's class is ``properties.classification.name`` (QuPath 0.2+; a plain string is accepted).
    Polygons and multipolygons are kept (holes too); unclassified features and other geometries (points,
    lines) are skipped and counted in :attr:`Annotations.skipped`.

    Raises:
        DomainInputError: unreadable JSON, not GeoJSON, or a malformed polygon (the feature index is named).
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DomainInputError(path, f"cannot read the GeoJSON ({exc.__class__.__name__}: {exc})") from None
    annotations = Annotations(regions=[])

    def skip(reason: str) -> None:
        annotations.skipped[reason] = annotations.skipped.get(reason, 0) + 1

    def add(geometry: dict, name: str, index: int) -> None:
        kind = geometry.get("type")
        if kind == "GeometryCollection":
            for part in geometry.get("geometries") or []:
                add(part, name, index)
            return
        if kind not in ("Polygon", "MultiPolygon"):
            skip("not_a_polygon")
            return
        polygons = [geometry.get("coordinates")] if kind == "Polygon" else geometry.get("coordinates")
        for polygon in polygons or []:
            if not polygon:
                raise DomainInputError(path, f"feature {index}: an empty polygon")
            rings = [_ring(r, path, index) for r in polygon]
            annotations.regions.append(Region(name=name, outer=rings[0], holes=tuple(rings[1:])))

    for index, feature in enumerate(_features(payload, path)):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            skip("no_geometry")
            continue
        name = _class_name(feature)
        if name is None:
            skip("unclassified")
            continue
        add(feature["geometry"], name, index)
    return annotations


def points_in_ring(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even-odd test: which of ``points`` (n, 2) lie inside the closed ``ring`` (m, 2) (x, y)."""
    inside = np.zeros(len(points), dtype=bool)
    if len(points) == 0:
        return inside
    low, high = ring.min(axis=0), ring.max(axis=0)
    near = np.flatnonzero((points[:, 0] >= low[0]) & (points[:, 0] <= high[0])
                          & (points[:, 1] >= low[1]) & (points[:, 1] <= high[1]))
    if len(near) == 0:
        return inside
    x, y = points[near, 0][:, None], points[near, 1][:, None]
    start, end = ring, np.roll(ring, -1, axis=0)
    result = np.zeros(len(near), dtype=bool)
    step = max(1, 2_000_000 // len(near))  # bounds the (points x edges) scratch for long rings
    for first in range(0, len(ring), step):
        x0, y0 = start[first:first + step, 0][None], start[first:first + step, 1][None]
        x1, y1 = end[first:first + step, 0][None], end[first:first + step, 1][None]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        result ^= (np.count_nonzero(crosses & (x < at_x), axis=1) % 2).astype(bool)
    inside[near] = result
    return inside


def label_points(regions: list[Region], points: np.ndarray, class_index: dict[str, int],
                 bounds: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Class id of the region covering each point (level-0 pixel (x, y)), -1 where none does.

    ``bounds`` is the slide's level-0 offset of the scanned area (OpenSlide ``bounds-x/y``): QuPath
    coordinates are relative to it. Where regions overlap, the smallest one wins (a tumour outlined
    inside a tissue outline labels its own area).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2) - np.asarray(bounds, dtype=np.float64)
    labels = np.full(len(points), -1, dtype=np.int64)
    for region in sorted(regions, key=lambda r: -r.area):
        inside = points_in_ring(points, region.outer)
        for hole in region.holes:
            inside &= ~points_in_ring(points, hole)
        labels[inside] = class_index[region.name]
    return labels

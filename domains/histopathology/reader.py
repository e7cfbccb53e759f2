"""Slides to tile samples: tissue mask, tile grid at an exact mpp, quality filters, labels, patient groups.

The source is a slide file or a folder of slides; the labels are a slide manifest CSV (see
:mod:`domains.histopathology.manifest`), which names each slide's patient and, optionally, its site,
slide-level label and QuPath region annotations. Slides are read one at a time, region by region, so
memory is one batch of tiles plus the reader's buffers, whatever the size of the slides.

What crosses the de-identification gate: tile pixels, each slide's resolution facts, keyed pseudonyms of
patients and slides (never file names, patient ids, sites or slide metadata values), and an audit that
names (without values) the metadata properties and associated images (label, macro) left behind.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from domains.histopathology.manifest import Annotations, Manifest, SlideEntry, label_points, read_annotations, \
    read_manifest, slide_key
from domains.input_guards import describe_failure
from domains.pseudonyms import deidentification_salt, pseudonym
from domains.spec import Channel, DomainInputError, IngestRequest, SampleSet, printable_path

CHANNELS = (Channel("R"), Channel("G"), Channel("B"))
UINT8_SCALING = ((1 / 255, 0.0),) * 3
"""Tiles are stored as the scanner's 8-bit RGB; physical values are in [0, 1]."""
DEFAULT_TILE_MPP = 0.5
"""Microns per pixel tiles are cut at unless asked otherwise: the usual "20x" of pathology models."""
DEFAULT_CLASS_NAMES = ("normal", "tumor")
# The tissue mask's resolution: a few mask pixels per tile side, and never more than this many pixels on
# the long side (a 100k px slide at 0.25 um/px gives a ~2000 px mask, a few MB of work).
MASK_PIXELS_PER_TILE = 4
MASK_MAX_SIDE = 2048
# No finer than this: morphology kernels are tens of microns, and their cost grows with the square of
# their radius in pixels; 4 um/px keeps them ~10 px while resolving tissue edges well below a tile.
MASK_MIN_MPP = 4.0
MASKS_PROVENANCE_KEY = "tissue_masks"
SLIDE_TILES_PROVENANCE_KEY = "slide_tiles"
"""Per slide pseudonym: its tissue fraction (share of the mask) and the tiles kept from it."""
AUDIT_PROVENANCE_KEY = "deidentification_audit"
AUDIT_FILE_NAME = "deidentification_audit.json"
MASK_FOLDER = "tissue_masks"
LABEL_KINDS = ("regions", "slide", "none")
GROUP_BY = ("patient", "site")
"""What a tile's leakage group can be: its patient (default) or its site (hospital/scanner), so that a model
can be tested on sites it never saw."""


def slide_pseudonym(key: str) -> str:
    """The slide's keyed pseudonym (from its path relative to the source: names often carry identity)."""
    return pseudonym("slide", key)


def list_slides(source: Path) -> list[Path]:
    """The slide files of a source: itself if a file, else every slide file under the folder (sorted).

    Hidden files are skipped, and so are the files inside an MRXS slide's companion folder (they belong
    to the ``.mrxs`` beside it); a DICOM WSI folder counts once (OpenSlide opens it by any of its files).
    """
    from domains.histopathology.slide import SLIDE_EXTENSIONS

    source = Path(source)
    if not source.is_dir():
        return [source]
    found, dicom_folders = [], set()
    mrxs_folders = {p.with_suffix("") for p in source.rglob("*.mrxs")}
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or not (path.is_file() or path.is_symlink()):
            continue
        if path.suffix.lower() not in SLIDE_EXTENSIONS or any(parent in mrxs_folders for parent in path.parents):
            continue
        if path.suffix.lower() == ".dcm":
            if path.parent in dicom_folders:
                continue
            dicom_folders.add(path.parent)
        found.append(path)
    return found


def mask_mpp(geometry, tile_um: float) -> float:
    """Resolution of the tissue mask: about :data:`MASK_PIXELS_PER_TILE` pixels per tile, bounded both ways."""
    longest_um = max(geometry.width * geometry.mpp_x, geometry.height * geometry.mpp_y)
    return max(tile_um / MASK_PIXELS_PER_TILE, longest_um / MASK_MAX_SIDE, MASK_MIN_MPP, geometry.mpp_x, geometry.mpp_y)


@dataclass
class SlideTiles:
    """The tiles of one slide that pass the tissue and quality filters, streamed in batches."""

    origins: np.ndarray
    """Level-0 (x, y) of every tissue tile before the pixel-level quality filters."""
    size_level0: float
    mask: object
    dropped: Counter = field(default_factory=Counter)


def plan_slide_tiles(slide, size: int, tile_mpp: float, stride: int, max_nodata_fraction: float) -> SlideTiles:
    """Tissue mask of ``slide`` and the grid tiles holding enough tissue (more than ``1 - max_nodata_fraction``)."""
    from domains.histopathology.slide import tile_grid
    from domains.histopathology.tissue import tissue_fraction, tissue_mask

    geometry = slide.geometry
    thumb_mpp = mask_mpp(geometry, size * tile_mpp)
    mask = tissue_mask(slide.thumbnail(thumb_mpp), thumb_mpp)
    grid = tile_grid(geometry, size, tile_mpp, stride)
    size_level0 = size * tile_mpp / geometry.mpp_x
    fraction = tissue_fraction(mask, grid, size_level0, (geometry.mpp_x, geometry.mpp_y))
    keep = fraction >= 1.0 - max_nodata_fraction
    plan = SlideTiles(origins=grid[keep], size_level0=size_level0, mask=mask)
    plan.dropped["background"] = int((~keep).sum())
    return plan


def quality_filtered(tiles: np.ndarray, dropped: Counter) -> np.ndarray:
    """Boolean (n,) of tiles that are neither blank (glass, ink-only) nor out of focus; counts the others."""
    from domains.histopathology.tissue import is_background, is_blurry

    blank = np.asarray(is_background(tiles), dtype=bool)
    blurry = np.asarray(is_blurry(tiles), dtype=bool) & ~blank
    dropped["blank"] += int(blank.sum())
    dropped["blurry"] += int(blurry.sum())
    return ~(blank | blurry)


def _mask_png(mask: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).convert("1").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def _audit(slide) -> dict:
    from domains.histopathology.slide_metadata import metadata_audit

    return metadata_audit(slide)


def _pixel_facts(slide) -> dict[str, str]:
    from domains.histopathology.slide_metadata import pixel_facts

    return pixel_facts(slide)


def scrub(text: str, path: Path, replacement: str) -> str:
    """``text`` with the slide's path and file name replaced by its pseudonym (library errors quote them)."""
    try:
        resolved = str(path.resolve())
    except (OSError, RuntimeError):  # a link loop
        resolved = str(path.absolute())
    for value in (resolved, str(path.absolute()), str(path), path.name):
        text = text.replace(value, replacement)
    return text


@dataclass
class _Plan:
    """What the reader settled before reading pixels: slides, label kind, classes, regions."""

    slides: list[tuple[Path, str, SlideEntry | None]]
    label_kind: str
    class_names: tuple[str, ...]
    regions: dict[str, Annotations]
    quarantine: list[dict[str, str]]
    manifest: Manifest | None
    group_by: str = "patient"


def _class_names(found: set[str], requested: tuple[str, ...] | None, where: Path) -> tuple[str, ...]:
    if requested:
        missing = sorted(found - set(requested))
        if missing:
            raise DomainInputError(where, f"class names {missing} appear in the labels but not in the class names "
                                          f"given ({', '.join(requested)})")
        return tuple(requested)
    if found and found <= set(DEFAULT_CLASS_NAMES):
        return DEFAULT_CLASS_NAMES
    names = tuple(sorted(found))
    if len(names) < 2:
        raise DomainInputError(where, f"the labels name {len(names)} class ({', '.join(names) or 'none'}); a "
                                      "classifier needs at least two")
    return names


FINGERPRINT_BLOCK = 1 << 16


def slide_fingerprint(path: Path) -> str | None:
    """A cheap content key: the size and three 64 KiB blocks (start, middle, end); None if unreadable.

    Hashing a whole slide would read gigabytes; two different scans differ in their first block already
    (TIFF directories and the scanner's description), while a copied file matches in all of them.
    """
    import hashlib

    if path.suffix.lower() == ".mrxs":
        # A MIRAX slide's .mrxs is a stub (often the same bytes for every slide); its content is the folder
        # beside it, whose Slidedat.ini names the slide's id and layout and Index.dat where every image is.
        parts = [fingerprint for name in ("Slidedat.ini", "Index.dat")
                 if (fingerprint := slide_fingerprint(path.with_suffix("") / name)) is not None]
        return hashlib.sha256("".join(parts).encode()).hexdigest() if len(parts) == 2 else None
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as handle:
            for offset in (0, max(0, size // 2 - FINGERPRINT_BLOCK // 2), max(0, size - FINGERPRINT_BLOCK)):
                handle.seek(offset)
                digest.update(handle.read(FINGERPRINT_BLOCK))
    except OSError:
        return None  # the reader names the problem when it opens the slide
    return digest.hexdigest() if size else None


def without_duplicates(slides: list, quarantine: list[dict[str, str]]) -> list:
    """The slides minus later copies of an earlier one (a copy under another name or patient leaks across
    splits); each copy is quarantined as ``duplicate_slide``."""
    seen: dict[str, str] = {}
    kept = []
    for item in slides:
        path, key = item[0], item[1]
        fingerprint = slide_fingerprint(path)
        if fingerprint is not None and fingerprint in seen:
            quarantine.append({"item": slide_pseudonym(key), "reason": "duplicate_slide",
                               "problem": f"same content as slide {seen[fingerprint]}; read once"})
            continue
        if fingerprint is not None:
            seen[fingerprint] = slide_pseudonym(key)
        kept.append(item)
    return kept


def check_site_groups(manifest: Manifest) -> None:
    """Refuse site grouping when a site is missing or a patient was seen at two sites.

    With sites as leakage groups a patient at two sites would put the same patient in two splits (the
    dataset writer only sees the groups), so this is checked here, before any pixel is read. Errors name
    pseudonyms and manifest lines, never the patient id or site name.
    """
    if not manifest.has_sites:
        raise DomainInputError(manifest.path, "grouping by site needs a site column (site, center or centre) in "
                                              "the manifest; add one or group by patient")
    missing = [e.row for e in manifest.entries if not e.site]
    if missing:
        lines = ", ".join(str(n) for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DomainInputError(manifest.path, f"grouping by site: the site cell is empty on line(s) {lines}; every "
                                              "slide needs its site")
    first_seen: dict[str, SlideEntry] = {}
    for entry in manifest.entries:
        earlier = first_seen.setdefault(entry.patient, entry)
        if earlier.site != entry.site:
            raise DomainInputError(manifest.path, (
                f"grouping by site: patient {pseudonym('patient', entry.patient)} has slides at two sites, "
                f"{pseudonym('site', earlier.site)} (line {earlier.row}) and {pseudonym('site', entry.site)} "
                f"(line {entry.row}); the patient would be in two splits. Group by patient, or drop one "
                "site's slides of this patient"))


def _group_by(request: IngestRequest) -> str:
    group_by = request.group_by or "patient"
    if group_by not in GROUP_BY:
        raise DomainInputError("group_by", f"{group_by!r} is not a histopathology leakage group; use "
                                           f"{' or '.join(GROUP_BY)}")
    return group_by


def plan_read(request: IngestRequest) -> _Plan:
    """Check the request and the manifest, list the slides and fix the classes (no pixels are read)."""
    source = Path(request.source)
    if not source.exists():
        raise DomainInputError(source, "no such slide file or folder")
    group_by = _group_by(request)
    if request.tile_size < 8:
        raise DomainInputError("tile_size", f"{request.tile_size} is too small; use at least 8 pixels")
    if request.batch_samples < 1:
        raise DomainInputError("batch_samples", f"{request.batch_samples} must be at least 1")
    root = source if source.is_dir() else source.parent
    found = list_slides(source)
    quarantine: list[dict[str, str]] = []
    if request.labels is None:
        if group_by == "site":
            raise DomainInputError(source, "grouping by site needs a slide manifest with a site column (labels)")
        slides = [(p, slide_key(p, root), None) for p in found]
        if not slides:
            raise DomainInputError(source, "no slide files here (looked for " + ", ".join(_extensions()) + ")")
        slides = without_duplicates(slides, quarantine)
        return _Plan(slides, "none", tuple(request.class_names or DEFAULT_CLASS_NAMES), {}, quarantine, None)
    manifest = read_manifest(request.labels, source)
    if group_by == "site":
        check_site_groups(manifest)
    listed = {e.key for e in manifest.entries}
    # A DICOM WSI is a folder of files (one per level, label...) that OpenSlide opens by any of them: the
    # manifest may name whichever, so a folder it names through one file is listed whole.
    dicom_folders = {Path(e.key).parent for e in manifest.entries if Path(e.key).suffix.lower() == ".dcm"}
    for path in found:
        key = slide_key(path, root)
        if key not in listed and not (path.suffix.lower() == ".dcm" and Path(key).parent in dicom_folders):
            quarantine.append({"item": slide_pseudonym(key), "reason": "not_in_manifest",
                               "problem": "a slide file in the source that the manifest does not list; not read"})
    slides = without_duplicates([(e.path, e.key, e) for e in manifest.entries], quarantine)
    regions: dict[str, Annotations] = {}
    if manifest.has_annotations:
        kind = "regions"
        for entry in manifest.entries:
            if entry.annotations is not None:
                regions[entry.key] = read_annotations(entry.annotations)
        names = set().union(*(a.class_names for a in regions.values())) if regions else set()
    elif manifest.has_labels:
        kind = "slide"
        names = {e.label for e in manifest.entries if e.label}
    else:
        kind, names = "none", set()
    class_names = _class_names(names, request.class_names, Path(request.labels)) if kind != "none" else \
        tuple(request.class_names or DEFAULT_CLASS_NAMES)
    return _Plan(slides, kind, class_names, regions, quarantine, manifest, group_by)


def _extensions() -> tuple[str, ...]:
    from domains.histopathology.slide import SLIDE_EXTENSIONS

    return SLIDE_EXTENSIONS


@dataclass
class _Chunk:
    images: np.ndarray
    labels: np.ndarray
    groups: list[str]
    locations: np.ndarray
    ids: list[str]
    slide: str


class _Pending:
    """Tiles waiting to be cut into batches; the tail of one slide can be taken back if that slide fails."""

    def __init__(self) -> None:
        self.chunks: list[_Chunk] = []

    def __len__(self) -> int:
        return sum(len(c.images) for c in self.chunks)

    def add(self, chunk: _Chunk) -> None:
        if len(chunk.images):
            self.chunks.append(chunk)

    def drop_slide(self, slide: str) -> int:
        """Forget the pending tiles of ``slide``; returns how many."""
        kept = [c for c in self.chunks if c.slide != slide]
        removed = len(self) - sum(len(c.images) for c in kept)
        self.chunks = kept
        return removed

    def cut(self, count: int) -> _Chunk:
        images = np.concatenate([c.images for c in self.chunks])
        labels = np.concatenate([c.labels for c in self.chunks])
        locations = np.concatenate([c.locations for c in self.chunks])
        groups = [g for c in self.chunks for g in c.groups]
        ids = [i for c in self.chunks for i in c.ids]
        taken = _Chunk(images[:count], labels[:count], groups[:count], locations[:count], ids[:count], "")
        rest = _Chunk(images[count:], labels[count:], groups[count:], locations[count:], ids[count:],
                      self.chunks[-1].slide)
        self.chunks = [rest] if len(rest.images) else []
        return taken


def read_samples(request: IngestRequest) -> Iterator[SampleSet]:
    """Read slides into uint8 RGB tile samples (N, 3, T, T) for tile classification, grouped by patient or site.

    ``request.source`` is a slide file or a folder of slides; ``request.labels`` the slide manifest CSV
    (without one, every slide is unlabelled and is its own group). For each slide, one at a time:

    1. open it under the mpp contract (``request.mpp`` for slides whose metadata has no resolution);
    2. build a tissue mask on a low-resolution rendering (pen ink excluded) and keep the grid tiles of
       ``tile_size`` px at ``request.tile_mpp`` (default :data:`DEFAULT_TILE_MPP`) um/px, moved by
       ``stride`` px, whose tissue fraction is at least ``1 - max_nodata_fraction``;
    3. read those tiles region by region at exactly that mpp and drop blank and out-of-focus ones;
    4. label each tile: with region annotations, by the polygon covering its centre (smallest wins;
       tiles outside every region are dropped as ``unannotated``); with only a slide-label column, by
       its slide's label (weak labels); with neither, -1.

    Groups are keyed patient pseudonyms, or site pseudonyms with ``request.group_by == "site"`` (refused
    when a slide has no site or a patient was seen at two sites; the choice is the provenance's
    ``leakage_group``), sample ids ``<slide pseudonym>/<x>,<y>`` and locations the
    level-0 (row, col) of each tile's top-left corner. A slide that cannot be read is quarantined
    (``{"item": slide pseudonym, "reason", "problem"}``; tiles it had not yet handed over are dropped)
    and the rest go on. The last batch carries the provenance: per-slide resolution facts, the tissue
    masks (PNG, written beside the dataset by :func:`write_ingest_reports`), the metadata audit and the
    slide labels and patients by pseudonym (what slide-level learning needs).

    Raises:
        DomainInputError: bad request, manifest, annotations or site grouping (checked before any pixel is
            read); no slide could be read at all.
    """
    plan = plan_read(request)
    return _stream(request, plan)


def _stream(request: IngestRequest, plan: _Plan) -> Iterator[SampleSet]:
    from domains.histopathology.slide import open_slide

    size, stride = request.tile_size, request.stride
    tile_mpp = request.tile_mpp or DEFAULT_TILE_MPP
    class_index = {name: i for i, name in enumerate(plan.class_names)}
    # Keyed by the folder's resolved path, not its name: two sources named alike (a/slides, b/slides) in
    # one ingest must not share a name, or the second's provenance would overwrite the first's.
    source_tag = "slides:" + pseudonym("source", str(Path(request.source).resolve())).split("-", 1)[1]
    dropped: Counter = Counter()
    quarantine = list(plan.quarantine)
    pending = _Pending()
    held: SampleSet | None = None
    masks: dict[str, str] = {}
    slide_tiles: dict[str, dict] = {}
    facts: dict[str, dict] = {}
    audits: dict[str, dict] = {}
    slide_labels: dict[str, str] = {}
    slide_patients: dict[str, str] = {}
    skipped_regions: Counter = Counter()
    read_ok = 0

    def batch(chunk: _Chunk) -> SampleSet:
        return SampleSet(images=chunk.images, labels=chunk.labels, groups=np.array(chunk.groups),
                         locations=chunk.locations, source=source_tag, channels=CHANNELS,
                         class_names=plan.class_names, task="classification", sample_ids=np.array(chunk.ids),
                         scaling=UINT8_SCALING)

    for path, key, entry in plan.slides:
        name = slide_pseudonym(key)
        patient = pseudonym("patient", entry.patient) if entry is not None else pseudonym("patient", "slide:" + key)
        group = pseudonym("site", entry.site) if plan.group_by == "site" else patient
        added = 0
        try:
            with open_slide(path, mpp=request.mpp) as slide:
                geometry = slide.geometry
                audits[name] = _audit(slide)
                facts[name] = _pixel_facts(slide)
                tiles_plan = plan_slide_tiles(slide, size, tile_mpp, stride, request.max_nodata_fraction)
                masks[name] = _mask_png(tiles_plan.mask.mask)
                origins = tiles_plan.origins
                labels_all = np.full(len(origins), -1, dtype=np.int64)
                if plan.label_kind == "regions":
                    annotations = plan.regions.get(key)
                    if annotations is not None:
                        skipped_regions.update(annotations.skipped)
                        centres = origins + tiles_plan.size_level0 / 2.0
                        labels_all = label_points(annotations.regions, centres, class_index,
                                                  (geometry.bounds_x, geometry.bounds_y))
                    inside = labels_all >= 0
                    tiles_plan.dropped["unannotated"] += int((~inside).sum())
                    origins, labels_all = origins[inside], labels_all[inside]
                elif plan.label_kind == "slide" and entry is not None and entry.label:
                    labels_all[:] = class_index[entry.label]
                label_of = {(int(x), int(y)): int(v) for (x, y), v in zip(origins, labels_all)}
                for tiles, tile_origins in slide.iter_tiles(origins, size, tile_mpp, batch=min(request.batch_samples, 512)):
                    good = quality_filtered(tiles, tiles_plan.dropped)
                    tiles, tile_origins = tiles[good], tile_origins[good]
                    added += len(tiles)
                    pending.add(_Chunk(
                        images=np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)),
                        labels=np.array([label_of[(int(x), int(y))] for x, y in tile_origins], dtype=np.int64),
                        groups=[group] * len(tiles),
                        locations=tile_origins[:, ::-1].astype(np.int64),
                        ids=[f"{name}/{int(x)},{int(y)}" for x, y in tile_origins], slide=name))
                    while len(pending) >= request.batch_samples:
                        if held is not None:
                            yield held
                        held = batch(pending.cut(request.batch_samples))
                dropped.update(tiles_plan.dropped)
                read_ok += 1
                slide_patients[name] = patient
                slide_tiles[name] = {"tissue_fraction": round(tiles_plan.mask.tissue_fraction, 4),
                                     "kept_tiles": added}
                if entry is not None and entry.label:
                    slide_labels[name] = entry.label
        except MemoryError:
            raise
        except Exception as exc:  # one bad slide must not cost the others
            lost = pending.drop_slide(name)
            kept = added - lost
            problem = exc.problem if isinstance(exc, DomainInputError) else describe_failure(exc)
            problem = scrub(printable_path(problem), path, name)
            if kept:
                problem += f" ({kept} tiles read before the failure were kept)"
            reason = "unreadable_slide" if isinstance(exc, DomainInputError) else "unusable_slide"
            quarantine.append({"item": name, "reason": reason, "problem": problem})
            dropped["quarantined_slide_tiles"] += lost
            facts.pop(name, None)
            masks.pop(name, None)
    if read_ok == 0:
        problems = "; ".join(f"{q['item']}: {q['problem']}" for q in quarantine[:5])
        raise DomainInputError(request.source, f"no slide could be read ({problems or 'no slides listed'})")
    last = batch(pending.cut(len(pending))) if len(pending) else None
    if held is not None:
        if last is None:
            last = held
        else:
            yield held
    if last is None:
        last = batch(_Chunk(np.zeros((0, 3, size, size), np.uint8), np.zeros(0, np.int64), [],
                            np.zeros((0, 2), np.int64), [], ""))
    _, salt_kind = deidentification_salt()
    last.provenance = {
        "slides_read": str(read_ok),
        "slides_quarantined": str(sum(q["reason"] != "not_in_manifest" for q in quarantine)),
        "tile_size": str(size),
        "tile_mpp": str(tile_mpp),
        "tile_stride": str(stride),
        "label_kind": plan.label_kind,
        "leakage_group": plan.group_by,
        "stain_normalisation": "none",
        "pseudonym_salt": salt_kind,
        "slide_facts": json.dumps(facts, sort_keys=True),
        "slide_patients": json.dumps(slide_patients, sort_keys=True),
        "slide_labels": json.dumps(slide_labels, sort_keys=True),
        "bag_labels": json.dumps(slide_labels, sort_keys=True),  # tiles are named <slide>/<x>,<y>: slide bags
        "annotation_features_skipped": json.dumps(dict(skipped_regions), sort_keys=True),
        MASKS_PROVENANCE_KEY: json.dumps(masks, sort_keys=True),
        SLIDE_TILES_PROVENANCE_KEY: json.dumps(slide_tiles, sort_keys=True),
        AUDIT_PROVENANCE_KEY: json.dumps(_grouped_audits(audits), sort_keys=True, separators=(",", ":")),
    }
    last.dropped = {k: int(v) for k, v in dropped.items() if v}
    last.quarantine = quarantine
    yield last


def _grouped_audits(audits: dict[str, dict]) -> list[dict]:
    """Slides whose metadata audit is the same, listed together (a cohort from one scanner is one entry)."""
    groups: dict[str, dict] = {}
    for name, audit in sorted(audits.items()):
        signature = json.dumps(audit, sort_keys=True)
        groups.setdefault(signature, {**audit, "slides": []})["slides"].append(name)
    return list(groups.values())


def write_ingest_reports(samples: SampleSet, out_dir: Path) -> list[Path]:
    """Beside the dataset: each slide's tissue mask as ``tissue_masks/<slide pseudonym>.png`` and the audit.

    ``deidentification_audit.json`` lists per slide pseudonym the metadata property names and associated
    images (label, macro...) that did not cross the gate, never a value.
    """
    out_dir = Path(out_dir)
    written = []
    masks = json.loads(samples.provenance.get(MASKS_PROVENANCE_KEY, "{}"))
    if masks:
        (out_dir / MASK_FOLDER).mkdir(parents=True, exist_ok=True)
    for name, encoded in sorted(masks.items()):
        path = out_dir / MASK_FOLDER / f"{name}.png"
        path.write_bytes(base64.b64decode(encoded))
        written.append(path)
    audit = {"gate": "only tile pixels and resolution facts cross; names of what was left behind are listed",
             "slide_groups": json.loads(samples.provenance.get(AUDIT_PROVENANCE_KEY, "[]"))}
    path = out_dir / AUDIT_FILE_NAME
    path.write_text(json.dumps(audit, indent=2, sort_keys=True))
    written.append(path)
    return written


def ingest_table(provenance: dict[str, str]) -> list[dict]:
    """One row per slide read, by pseudonym: tissue fraction, tiles kept and its mask PNG.

    ``mask_png`` is relative to the folder :func:`write_ingest_reports` wrote into (a slide whose mask was
    not kept has none); no name or identifier of the source appears.
    """
    masks = json.loads(provenance.get(MASKS_PROVENANCE_KEY, "{}"))
    slides = json.loads(provenance.get(SLIDE_TILES_PROVENANCE_KEY, "{}"))
    return [{"slide": name, "tissue_fraction": row["tissue_fraction"], "kept_tiles": row["kept_tiles"],
             "mask_png": f"{MASK_FOLDER}/{name}.png" if name in masks else ""}
            for name, row in sorted(slides.items())]

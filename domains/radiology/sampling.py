"""Turning read series into samples: one image or slice each, resampled, with channels and findings."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from domains.radiology.deidentify import AUDIT_PROVENANCE_KEY, audit_payload
from domains.input_guards import describe_failure
from domains.radiology.intensity import (AIR_HU, HU_VIEW, ChannelMismatch, ChannelRecipe, FieldOfViewError,
                                        channels_of, fit_labels_to_square, fit_to_square, parse_channels,
                                        stored_recipes, view_volume)
from domains.radiology.labels import FindingsTable, read_findings_csv, unmatched_rows
from domains.radiology.masks import MaskTable, is_mask_labels, read_mask, read_mask_table, segmentation_class_names
from domains.radiology.series import Series
from domains.radiology.source import SourceRead, read_planned_series, scan_source
from domains.spec import DomainInputError, IngestRequest, SampleSet, WindowChannel

DEFAULT_FINDINGS = ("nodule", "effusion", "cardiomegaly")
CHANNEL_RULE = ("channels are <view>[@<slice offset>]: view 'image' (CT mediastinum window, MR percentiles "
                "1-99, radiograph VOI) or a CT window (lung, mediastinum, soft_tissue, bone, brain); offsets "
                "stack neighbouring slices (2.5D); CT windows are stored as int16 HU planes and applied by the model")
HU_DTYPE = np.int16
"""HU are stored rounded to int16 with scaling (1, 0): the resampled float HU lose at most 0.5 HU."""
HU_SCALING = (1.0, 0.0)


def is_hu(recipes: tuple[ChannelRecipe, ...]) -> bool:
    """Whether ``recipes`` are HU planes (stored as int16, windowed by the model)."""
    return bool(recipes) and all(r.view == HU_VIEW for r in recipes)


@dataclass
class SeriesSamples:
    """Model-ready images of one series: (S, C, T, T) float32, one per slice or image.

    Views in [0, 1], or HU rounded to integers (``hu`` channels); ``rounding_error`` is the largest change
    that rounding made (HU).
    """

    series: Series
    images: np.ndarray
    rounding_error: float = 0.0


def series_images(series: Series, recipes: tuple[ChannelRecipe, ...], size: int) -> SeriesSamples:
    """Make each slice (or 2D image) of ``series`` into a ``size`` x ``size`` sample with the recipes' channels.

    A volume is normalised as a whole (one CT window or one pair of MR percentiles for all its slices) and
    a channel with offset ``d`` takes slice ``i + d`` (clamped at the ends). 2D images are normalised one
    by one and are their own neighbours.

    Raises:
        ChannelMismatch: a CT window channel on a non-CT series; FieldOfViewError: an image without a usable
            field of view.
    """
    views = sorted({r.view for r in recipes})
    count = len(series.frames)
    out = np.empty((count, len(recipes), size, size), dtype=np.float32)
    fill = {v: AIR_HU if v == HU_VIEW else 0.0 for v in views}
    if series.is_volume:
        stack = np.stack([f.pixels for f in series.frames])
        resampled = {v: fit_to_square(view_volume(stack, series.modality, v), series.spacing[1:], size, fill[v])
                     for v in views}
        for c, recipe in enumerate(recipes):
            index = np.clip(np.arange(count) + recipe.offset, 0, count - 1)
            out[:, c] = resampled[recipe.view][index]
    else:
        for i, frame in enumerate(series.frames):
            spacing = frame.spacing_yx or (1.0, 1.0)
            for view in views:
                image = fit_to_square(view_volume(frame.pixels[None], series.modality, view), spacing, size,
                                      fill[view])[0]
                for c, recipe in enumerate(recipes):
                    if recipe.view == view:
                        out[i, c] = image
    if not is_hu(recipes):
        return SeriesSamples(series, out)
    # HU are resampled in float and stored as int16 (what ingest writes and predict hands the model alike).
    limits = np.iinfo(HU_DTYPE)
    rounded = np.clip(np.rint(out), limits.min, limits.max)
    error = float(np.abs(rounded - out).max()) if out.size else 0.0
    return SeriesSamples(series, rounded.astype(np.float32) + np.float32(0.0), error)  # + 0: no -0.0


def parse_request_channels(names: tuple[str, ...] | None, where: str) -> tuple[ChannelRecipe, ...]:
    try:
        return parse_channels(names)
    except ValueError as exc:
        raise DomainInputError(where, str(exc)) from None


def sample_series(read: SourceRead, series: Series, recipes: tuple[ChannelRecipe, ...], size: int) -> SeriesSamples | None:
    """Samples of one series, or None with the series quarantined when it cannot be made into samples.

    Reasons: ``channel_mismatch`` (a CT window on MR), ``degenerate_field_of_view`` (zero or non-finite
    pixel spacing, empty image) and ``unusable_series`` for any other failure of this one series.
    """
    try:
        return series_images(series, recipes, size)
    except ChannelMismatch as exc:
        read.reject(series.series, "channel_mismatch", str(exc), images=len(series.frames))
    except FieldOfViewError as exc:
        read.reject(series.series, "degenerate_field_of_view", str(exc), images=len(series.frames))
    except MemoryError:
        raise
    except Exception as exc:  # one odd series must not cost the others (issue 9: one bad file kills a batch)
        read.reject(series.series, "unusable_series", f"cannot be made into samples ({describe_failure(exc)})",
                    images=len(series.frames))
    return None


def samples_of(read: SourceRead, recipes: tuple[ChannelRecipe, ...], size: int) -> list[SeriesSamples]:
    """Samples of every series read (see :func:`sample_series`); ``read.series`` keeps those that made samples."""
    made = [m for m in (sample_series(read, series, recipes, size) for series in read.series) if m is not None]
    read.series = [m.series for m in made]
    return made


def sample_id(series: Series, index: int) -> str:
    """Non-identifying sample name: pseudonymous patient/study/series keys and the slice index."""
    return f"{series.patient}/{series.study}/{series.series}/{index:04d}"


def series_spacing_yx(series: Series) -> tuple[float, float]:
    """Pixel spacing (row, column) used to fit a series' slices to the square (as :func:`series_images` does)."""
    if series.is_volume:
        return series.spacing[1], series.spacing[2]
    return series.frames[0].spacing_yx or (1.0, 1.0)


@dataclass
class _MaskLabelling:
    """Masks of a segmentation ingest: which labels which series, and the class names fixed before streaming."""

    table: MaskTable
    class_names: tuple[str, ...]
    values: set[int]
    single_used: bool = False


def _plan_masks(table: MaskTable, read: SourceRead, request: IngestRequest) -> _MaskLabelling:
    """Class names from the values of every mask that labels a planned series (read one mask at a time).

    Batches of one source share their class names, so they are fixed before any series is decoded; the
    full checks of each mask against its image (grid, integer values) come with its series.
    """
    import nibabel as nib

    masks = [table.single] if table.single is not None else [m for m in map(table.mask_for, read.plans) if m]
    table.used.clear()  # matched again, series by series, as they are read
    values: set[int] = set()
    for path, _ in dict.fromkeys(masks):
        try:
            data = np.asanyarray(nib.load(str(path)).dataobj)
            found = np.unique(data[np.isfinite(data)]) if data.dtype.kind == "f" else np.unique(data)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - read_mask names the problem when its series comes
            continue
        values |= {int(v) for v in found if float(v) == int(v) and v >= 0}
    return _MaskLabelling(table, segmentation_class_names(values, request.class_names, str(request.labels)), set())


def _series_mask_labels(item: SeriesSamples, masks: _MaskLabelling, request: IngestRequest) -> np.ndarray:
    """Per-pixel labels (S, T, T) int16 of one series from its mask; all -1 without one."""
    size, table = request.tile_size, masks.table
    if table.single is not None:
        if masks.single_used:
            raise DomainInputError(request.labels, "a single mask file labels a source with one series; this source "
                                   "has more (give a folder or a CSV of masks)")
        masks.single_used = True
        table.masks[item.series.series] = table.single
    found = table.mask_for(item.series)
    if found is None:
        return np.full((len(item.images), size, size), -1, dtype=np.int16)
    path, name = found
    raw = read_mask(path, name, item.series)
    seen = {int(v) for v in np.unique(raw)}
    segmentation_class_names(seen, request.class_names, f"{name} of series {item.series.series}")
    masks.values |= seen
    return fit_labels_to_square(raw, series_spacing_yx(item.series), size)


def _series_findings(item: SeriesSamples, table: FindingsTable | None, k: int) -> np.ndarray:
    rows = []
    series = item.series
    for frame in series.frames:
        labels = None
        if table is not None:
            labels, _ = table.labels_for([frame.file_key, series.series, series.study, series.patient])
        rows.append(labels if labels is not None else np.full(k, -1, dtype=np.int8))
    return np.stack(rows).astype(np.int8) if rows else np.zeros((0, k), dtype=np.int8)


@dataclass
class _Pending:
    """Samples waiting to be cut into batches (at most one series plus one batch)."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    groups: list[str]
    locations: list[tuple[int, int]]
    ids: list[str]

    def __len__(self) -> int:
        return sum(len(x) for x in self.images)


def read_samples(request: IngestRequest) -> Iterator[SampleSet]:
    """Read a folder or file of DICOM/NIfTI (or a DICOMDIR) into findings (multilabel) or segmentation samples.

    Every DICOM object is de-identified as it is parsed (see :mod:`domains.radiology.deidentify`). Each
    2D image, and each slice of a volume, becomes one sample resampled to ``request.tile_size`` square
    (aspect kept, padded); ``stride``, ``block_size`` and ``max_nodata_fraction`` do not apply to whole
    images and are ignored. ``request.channels`` picks the channels (:func:`parse_channels`): by default
    the single modality-appropriate ``image`` view. Groups are pseudonymous patient keys, so splits are by
    patient; ``locations`` are (slice index in its series, 0).

    With ``request.labels`` (a findings CSV, see :mod:`domains.radiology.labels`) samples get 0/1 per
    finding; without, every sample is unlabelled (-1). With masks instead (a NIfTI file, a folder of NIfTI
    masks or a CSV with a ``mask`` column, see :mod:`domains.radiology.masks`) the task is segmentation:
    labels are (N, T, T) int16 class ids, resampled by nearest neighbour exactly where the image's pixels
    go, -1 on the padding and on series without a mask. Bad files and series are recorded in ``dropped``
    (counts of images by reason) and ``provenance['quarantine']`` (pseudonymous key, reason, problem).

    The cohort is streamed: this call checks the request and reads every file's header (grouping files
    into series, de-identifying, quarantining what headers condemn); the returned iterator then decodes
    one series at a time and yields float32 batches of at most ``request.batch_samples`` samples, so
    memory is one series plus a batch or two. The last batch carries the totals: ``dropped``, the whole
    ``quarantine``, and the provenance with the de-identification audit of every file.

    Raises:
        DomainInputError: no usable image at all; bad channel names; a bad CSV; CSV rows naming patients,
            studies, series or files that the source does not contain (the message gives row numbers); a
            mask off its image's voxel grid, with values that have no class name, or labelling nothing.
            Errors that depend on decoded pixels are raised while iterating.
    """
    recipes, windows = stored_recipes(parse_request_channels(request.channels, "channels"))
    if request.tile_size < 8:
        raise DomainInputError("tile_size", f"{request.tile_size} is too small; use at least 8 pixels")
    if request.batch_samples < 1:
        raise DomainInputError("batch_samples", f"{request.batch_samples} must be at least 1")
    segmentation = bool(request.labels) and is_mask_labels(Path(request.labels))
    table = read_findings_csv(request.labels, request.class_names) if request.labels and not segmentation else None
    masks_table = read_mask_table(Path(request.labels)) if segmentation else None
    read = scan_source(Path(request.source))
    masks = _plan_masks(masks_table, read, request) if masks_table is not None else None
    if masks is not None:
        class_names = masks.class_names
    elif table is not None:
        class_names = table.class_names
    else:
        class_names = tuple(request.class_names) if request.class_names else DEFAULT_FINDINGS
    return _stream_series(request, read, recipes, table, masks, tuple(class_names), windows)


def _stream_series(request: IngestRequest, read: SourceRead, recipes: tuple[ChannelRecipe, ...],
                   table: FindingsTable | None, masks: _MaskLabelling | None,
                   class_names: tuple[str, ...], windows: tuple[WindowChannel, ...] | None) -> Iterator[SampleSet]:
    size, limit = request.tile_size, request.batch_samples
    channels = channels_of(recipes)
    hu = is_hu(recipes)
    image_dtype = HU_DTYPE if hu else np.float32
    scaling = tuple(HU_SCALING for _ in recipes) if hu else None
    rounding_error = 0.0
    task = "segmentation" if masks is not None else "multilabel"
    pending = _Pending([], [], [], [], [])
    labelled = 0
    total = 0
    held: SampleSet | None = None

    def take(pieces: list[np.ndarray], count: int, empty: np.ndarray) -> np.ndarray:
        """The first ``count`` samples of ``pieces`` as one new array; the pieces keep the rest."""
        taken, needed = [], count
        while needed:
            piece = pieces[0]
            taken.append(piece[:needed])
            if len(piece) > needed:
                pieces[0] = piece[needed:]  # a view: the series array lives until its samples are all taken
                needed = 0
            else:
                pieces.pop(0)
                needed -= len(piece)
        return np.concatenate(taken) if taken else empty

    def cut(count: int) -> SampleSet:
        label_shape = (0, size, size) if masks is not None else (0, len(class_names))
        batch = SampleSet(images=take(pending.images, count, np.zeros((0, len(channels), size, size), image_dtype)),
                          labels=take(pending.labels, count, np.zeros(label_shape, np.int16 if masks else np.int8)),
                          groups=np.array(pending.groups[:count]),
                          locations=np.array(pending.locations[:count], dtype=np.int64).reshape(-1, 2),
                          source=read.tag, channels=channels, class_names=class_names, task=task,
                          sample_ids=np.array(pending.ids[:count]), scaling=scaling, windows=windows)
        del pending.groups[:count], pending.locations[:count], pending.ids[:count]
        return batch

    for plan in read.plans:
        series = read_planned_series(read, plan)
        made = sample_series(read, series, recipes, size) if series is not None else None
        del series
        if made is None:
            continue
        read.series.append(made.series)
        if masks is not None:
            labels = _series_mask_labels(made, masks, request)
        else:
            labels = _series_findings(made, table, len(class_names))
        labelled += int((labels.reshape(len(labels), -1) >= 0).any(axis=1).sum())
        total += len(made.images)
        count = len(made.series.frames)
        rounding_error = max(rounding_error, made.rounding_error)
        pending.images.append(made.images.astype(HU_DTYPE) if hu else made.images)
        pending.labels.append(labels)
        pending.groups.extend([made.series.patient] * count)
        pending.locations.extend((i, 0) for i in range(count))
        pending.ids.extend(sample_id(made.series, i) for i in range(count))
        # Frames are no longer needed once the series is samples; dropping them frees the decoded pixels.
        made.series.frames = [replace(f, pixels=_NO_PIXELS) for f in made.series.frames]
        del made, labels
        while len(pending) >= limit:
            batch = cut(limit)
            if held is not None:
                yield held
            held = batch
    if not read.series:
        if not read.assembled:
            raise DomainInputError(read.tag, f"no usable images in {len(read.files)} file(s): "
                                   + ("; ".join(f"{q['item']}: {q['problem']}" for q in read.quarantine[:10])
                                      or "no image objects"))
        raise DomainInputError(read.tag, "no series fits the requested channels: "
                               + "; ".join(q["problem"] for q in read.quarantine[:5]))
    last = cut(len(pending)) if len(pending) else held
    if last is not held and held is not None:
        yield held
    last.provenance = _final_provenance(request, read, table, masks, total, labelled)
    if hu:  # what storing HU as int16 cost, as a float16 store would record its loss
        last.provenance.update({"stored_units": "HU (int16, scaling 1, 0)",
                                "hu_rounding_max_error": f"{rounding_error:.4f}"})
    last.dropped = dict(read.dropped)
    last.quarantine = list(read.quarantine)
    yield last


_NO_PIXELS = np.zeros((0, 0), dtype=np.float32)


def _final_provenance(request: IngestRequest, read: SourceRead, table: FindingsTable | None,
                      masks: _MaskLabelling | None, total: int, labelled: int) -> dict[str, str]:
    """The whole source's provenance, once every series has been read; checks labels that matched nothing."""
    provenance = read.summary()
    if masks is not None:
        unused = masks.table.unused()
        if unused and not read.quarantine:
            raise DomainInputError(request.labels, f"{len(unused)} mask(s) label nothing in the source: "
                                   f"{', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}")
        provenance.update({"label_kind": "masks", "masks_used": str(len(masks.table.used)),
                           "masks_unmatched": str(len(unused)), "mask_values": ",".join(map(str, sorted(masks.values)))})
    elif table is not None:
        unknown = unmatched_rows(table, read.seen_keys)
        if unknown and not read.quarantine:
            shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
            raise DomainInputError(request.labels, f"{len(unknown)} row(s) name patients, studies, series or files "
                                   f"that are not in the source (rows {shown}); remove them or fix the keys")
        # With unreadable files in the source, a row may name exactly what was dropped: keep going, say so.
        provenance["labels_unmatched_rows"] = json.dumps(unknown)
    provenance.update({
        "images": str(total),
        "channels_rule": CHANNEL_RULE,
        "labelled_images": str(labelled),
        AUDIT_PROVENANCE_KEY: audit_payload(read.audits),
    })
    return provenance

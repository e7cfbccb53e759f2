"""Turning read series into samples: one image or slice each, resampled, with channels and findings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domains.radiology.deidentify import AUDIT_PROVENANCE_KEY, audit_payload
from domains.input_guards import describe_failure
from domains.radiology.intensity import (ChannelMismatch, ChannelRecipe, FieldOfViewError, channels_of,
                                        fit_labels_to_square, fit_to_square, parse_channels, view_volume)
from domains.radiology.labels import FindingsTable, read_findings_csv, unmatched_rows
from domains.radiology.masks import MaskTable, is_mask_labels, read_mask, read_mask_table, segmentation_class_names
from domains.radiology.series import Series
from domains.radiology.source import SourceRead, read_source
from domains.spec import DomainInputError, IngestRequest, SampleSet

DEFAULT_FINDINGS = ("nodule", "effusion", "cardiomegaly")
CHANNEL_RULE = ("channels are <view>[@<slice offset>]: view 'image' (CT mediastinum window, MR percentiles "
                "1-99, radiograph VOI) or a CT window (lung, mediastinum, soft_tissue, bone, brain); offsets "
                "stack neighbouring slices (2.5D)")


@dataclass
class SeriesSamples:
    """Model-ready images of one series: (S, C, T, T) float32 in [0, 1], one per slice or image."""

    series: Series
    images: np.ndarray


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
    if series.is_volume:
        stack = np.stack([f.pixels for f in series.frames])
        resampled = {v: fit_to_square(view_volume(stack, series.modality, v), series.spacing[1:], size) for v in views}
        for c, recipe in enumerate(recipes):
            index = np.clip(np.arange(count) + recipe.offset, 0, count - 1)
            out[:, c] = resampled[recipe.view][index]
        return SeriesSamples(series, out)
    for i, frame in enumerate(series.frames):
        spacing = frame.spacing_yx or (1.0, 1.0)
        for view in views:
            image = fit_to_square(view_volume(frame.pixels[None], series.modality, view), spacing, size)[0]
            for c, recipe in enumerate(recipes):
                if recipe.view == view:
                    out[i, c] = image
    return SeriesSamples(series, out)


def parse_request_channels(names: tuple[str, ...] | None, where: str) -> tuple[ChannelRecipe, ...]:
    try:
        return parse_channels(names)
    except ValueError as exc:
        raise DomainInputError(where, str(exc)) from None


def samples_of(read: SourceRead, recipes: tuple[ChannelRecipe, ...], size: int) -> list[SeriesSamples]:
    """Samples of every series read; a series that cannot be made into samples is quarantined, the rest kept.

    Reasons: ``channel_mismatch`` (a CT window on MR), ``degenerate_field_of_view`` (zero or non-finite
    pixel spacing, empty image) and ``unusable_series`` for any other failure of this one series.
    """
    made = []
    for series in read.series:
        try:
            made.append(series_images(series, recipes, size))
        except ChannelMismatch as exc:
            read.reject(series.series, "channel_mismatch", str(exc), images=len(series.frames))
        except FieldOfViewError as exc:
            read.reject(series.series, "degenerate_field_of_view", str(exc), images=len(series.frames))
        except MemoryError:
            raise
        except Exception as exc:  # one odd series must not cost the others (issue 9: one bad file kills a batch)
            read.reject(series.series, "unusable_series", f"cannot be made into samples ({describe_failure(exc)})",
                        images=len(series.frames))
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


def _mask_labels(made: list[SeriesSamples], table: MaskTable, request: IngestRequest,
                 read: SourceRead) -> tuple[np.ndarray, tuple[str, ...], dict[str, str]]:
    """Per-pixel labels (N, T, T) int16 from the masks of ``table``; series without a mask are all -1."""
    size = request.tile_size
    if table.single is not None:
        if len(made) != 1:
            raise DomainInputError(request.labels, f"a single mask file labels a source with one series; this source has "
                                   f"{len(made)} (give a folder or a CSV of masks)")
        table.masks[made[0].series.series] = table.single
    stacks, values = [], set()
    for item in made:
        found = table.mask_for(item.series)
        if found is None:
            stacks.append(np.full((len(item.images), size, size), -1, dtype=np.int16))
            continue
        path, name = found
        raw = read_mask(path, name, item.series)
        seen = {int(v) for v in np.unique(raw)}
        segmentation_class_names(seen, request.class_names, f"{name} of series {item.series.series}")
        values |= seen
        stacks.append(fit_labels_to_square(raw, series_spacing_yx(item.series), size))
    unused = table.unused()
    if unused and not read.quarantine:
        raise DomainInputError(request.labels, f"{len(unused)} mask(s) label nothing in the source: "
                               f"{', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}")
    class_names = segmentation_class_names(values, request.class_names, str(request.labels))
    facts = {"label_kind": "masks", "masks_used": str(len(table.used)), "masks_unmatched": str(len(unused)),
             "mask_values": ",".join(map(str, sorted(values)))}
    return np.concatenate(stacks), class_names, facts


def _labels(made: list[SeriesSamples], table: FindingsTable | None, k: int) -> np.ndarray:
    rows = []
    for item in made:
        series = item.series
        for frame in series.frames:
            labels = None
            if table is not None:
                labels, _ = table.labels_for([frame.file_key, series.series, series.study, series.patient])
            rows.append(labels if labels is not None else np.full(k, -1, dtype=np.int8))
    return np.stack(rows).astype(np.int8) if rows else np.zeros((0, k), dtype=np.int8)


def read_samples(request: IngestRequest) -> SampleSet:
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

    Raises:
        DomainInputError: no usable image at all; bad channel names; a bad CSV; CSV rows naming patients,
            studies, series or files that the source does not contain (the message gives row numbers); a
            mask off its image's voxel grid, with values that have no class name, or labelling nothing.
    """
    tag_source = Path(request.source)
    recipes = parse_request_channels(request.channels, "channels")
    if request.tile_size < 8:
        raise DomainInputError("tile_size", f"{request.tile_size} is too small; use at least 8 pixels")
    segmentation = bool(request.labels) and is_mask_labels(Path(request.labels))
    masks = read_mask_table(Path(request.labels)) if segmentation else None
    table = read_findings_csv(request.labels, request.class_names) if request.labels and not segmentation else None
    read = read_source(tag_source)
    made = samples_of(read, recipes, request.tile_size)
    if not made:
        raise DomainInputError(read.tag, "no series fits the requested channels: "
                               + "; ".join(q["problem"] for q in read.quarantine[:5]))
    provenance = read.summary()
    if masks is not None:
        labels, class_names, facts = _mask_labels(made, masks, request, read)
        provenance.update(facts)
    else:
        if table is not None:
            unknown = unmatched_rows(table, read.seen_keys)
            if unknown and not read.quarantine:
                shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
                raise DomainInputError(request.labels, f"{len(unknown)} row(s) name patients, studies, series or files "
                                       f"that are not in the source (rows {shown}); remove them or fix the keys")
            # With unreadable files in the source, a row may name exactly what was dropped: keep going, say so.
            provenance["labels_unmatched_rows"] = json.dumps(unknown)
            class_names = table.class_names
        else:
            class_names = tuple(request.class_names) if request.class_names else DEFAULT_FINDINGS
        labels = _labels(made, table, len(class_names))
    images = np.concatenate([m.images for m in made])
    groups = np.array([m.series.patient for m in made for _ in m.series.frames])
    locations = np.array([(i, 0) for m in made for i in range(len(m.series.frames))], dtype=np.int64)
    ids = np.array([sample_id(m.series, i) for m in made for i in range(len(m.series.frames))])
    labelled = (labels.reshape(len(labels), -1) >= 0).any(axis=1)
    provenance.update({
        "images": str(len(images)),
        "channels_rule": CHANNEL_RULE,
        "labelled_images": str(int(labelled.sum())),
        AUDIT_PROVENANCE_KEY: audit_payload(read.audits),
    })
    return SampleSet(
        images=images, labels=labels, groups=groups, locations=locations, source=read.tag,
        channels=channels_of(recipes), class_names=tuple(class_names), dropped=dict(read.dropped),
        provenance=provenance, task="segmentation" if masks is not None else "multilabel", sample_ids=ids,
        quarantine=list(read.quarantine),
    )

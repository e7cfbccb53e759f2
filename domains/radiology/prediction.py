"""Per-study findings reports: scores aggregated over a study's images, written as JSON and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from domains.confinement import confined_path
from domains.radiology.geometry import series_grid, write_grid_mask
from domains.radiology.intensity import unfit_from_square
from domains.radiology.nifti_reader import is_nifti
from domains.radiology.sampling import parse_request_channels, samples_of, series_spacing_yx
from domains.radiology.source import discover_files, read_source
from domains.spec import PredictionRequest, PredictionSummary, convert_units

REPORT_FORMAT = "vitrail-radiology-findings/1"
SEGMENTATION_FORMAT = "vitrail-radiology-segmentation/1"
MASK_SUFFIX = ".nii.gz"
AGGREGATION = "max"
"""A study's score for a finding is the highest score of any of its images or slices ("is it anywhere"),
the usual multiple-instance reading of findings labelled per study; the mean is reported beside it."""
POSITIVE_THRESHOLD = 0.5


def _scores(values: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    return {name: round(float(v), 6) for name, v in zip(names, values)}


def _model_units(request: PredictionRequest, images: np.ndarray) -> np.ndarray:
    """Images as read, in the model's input units.

    The reader turns each series into modality units first (DICOM rescale slope and intercept, which vary per
    series, give HU for CT; NIfTI scl_slope/scl_inter likewise) and then into the channels the model takes:
    for a CT-window model its ``hu`` planes (HU rounded to integers, as the dataset stores them: the model
    windows them itself), else the [0, 1] views (MR percentiles, radiograph VOI) that are physical values.
    Both are physical, so this is the model's ``input_scaling`` applied to physical values: the identity for
    the (1, 0) of HU and for None.
    """
    return convert_units(images, None, request.input_scaling)


def _infer(request: PredictionRequest, images: np.ndarray) -> np.ndarray:
    outputs = []
    for start in range(0, len(images), request.batch_size):
        batch = _model_units(request, images[start:start + request.batch_size])
        probabilities = np.asarray(request.infer(batch), dtype=np.float32)
        if probabilities.shape != (min(request.batch_size, len(images) - start), len(request.class_names)):
            raise ValueError(f"infer returned shape {probabilities.shape}; expected (batch, {len(request.class_names)})")
        if not np.isfinite(probabilities).all():
            raise ValueError("infer returned non-finite scores")
        outputs.append(probabilities)
    return np.concatenate(outputs)


def _infer_maps(request: PredictionRequest, images: np.ndarray) -> np.ndarray:
    k, size = len(request.class_names), images.shape[-1]
    outputs = []
    for start in range(0, len(images), request.batch_size):
        batch = _model_units(request, images[start:start + request.batch_size])
        probabilities = np.asarray(request.infer(batch), dtype=np.float32)
        if probabilities.shape != (len(batch), k, size, size):
            raise ValueError(f"infer returned shape {probabilities.shape}; expected (batch, {k}, {size}, {size})")
        if not np.isfinite(probabilities).all():
            raise ValueError("infer returned non-finite scores")
        outputs.append(probabilities)
    return np.concatenate(outputs)


def _series_classes(request: PredictionRequest, item) -> np.ndarray | list[np.ndarray]:
    """Class per pixel of a series' slices in their own size: (S, H, W) uint8, or a list for 2D images of mixed sizes."""
    maps = _infer_maps(request, item.images)
    series = item.series
    if series.is_volume or len(series.frames) == 1:
        height, width = series.frames[0].pixels.shape
        return unfit_from_square(maps, height, width, series_spacing_yx(series)).argmax(axis=1).astype(np.uint8)
    return [unfit_from_square(maps[i:i + 1], *frame.pixels.shape, frame.spacing_yx or (1.0, 1.0)).argmax(axis=1)[0].astype(np.uint8)
            for i, frame in enumerate(series.frames)]


def predict_segmentation(request: PredictionRequest) -> PredictionSummary:
    """Segment every series of one study and write a NIfTI mask per series plus a JSON summary.

    Per-pixel probabilities are computed on the model's square grid, the padding is cut off, the maps are
    resampled (linear) back to each slice's own rows and columns and the class is their argmax. The mask
    (uint8, class id per voxel) is written in the input's geometry: for a NIfTI input the file's own voxel
    order, shape and affine; for a DICOM volume or single image its voxel grid (columns, rows, slices along
    the sorted positions) with the matching RAS affine. It lies beside ``request.output`` as
    ``<stem>.nii.gz`` (several series: ``<stem>_<series key>.nii.gz``). Several separate 2D images in one
    series (radiographs) have no common grid: they get counts in the summary but no mask file.

    The JSON at ``request.output`` (format :data:`SEGMENTATION_FORMAT`) gives per study and per series the
    voxels and volume (mm3) of each class, and the mask file names; only pseudonymous keys appear.

    Returns:
        Receipt: images segmented, and voxels per class over the whole input.
    """
    names = tuple(request.class_names)
    recipes = parse_request_channels(tuple(c.name for c in request.channels), "channels")
    read = read_source(request.input)
    made = samples_of(read, recipes, request.tile_size)
    output = Path(request.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    with_grid = sum(series_grid(m.series) is not None for m in made)
    studies: dict[str, dict] = {}
    totals = np.zeros(len(names), dtype=np.int64)
    images = 0
    for item in made:
        series = item.series
        classes = _series_classes(request, item)
        images += len(item.images)
        flat = np.concatenate([c.ravel() for c in classes]) if isinstance(classes, list) else classes.ravel()
        counts = np.bincount(flat, minlength=len(names))[:len(names)]
        grid = series_grid(series)
        entry = {"series": series.series, "modality": series.modality, "images": len(item.images),
                 "volume": series.is_volume, "mask": None, "shape": None, "voxel_volume_mm3": None}
        if grid is not None:
            mask_path = confined_path(output.parent, stem if with_grid == 1 else f"{stem}_{series.series}", MASK_SUFFIX)
            mask_name = mask_path.name
            shape, affine = write_grid_mask(classes, grid, mask_path)
            voxel = grid.voxel_volume_mm3
            entry.update(mask=mask_name, shape=list(shape), affine=np.round(affine, 6).tolist(), voxel_volume_mm3=round(voxel, 6))
            volumes = counts * voxel
        else:
            spacing = [f.spacing_yx or (1.0, 1.0) for f in series.frames]
            areas = [np.bincount(c.ravel(), minlength=len(names))[:len(names)] * sy * sx for c, (sy, sx) in zip(classes, spacing)]
            volumes = np.sum(areas, axis=0)  # 2D images: area in mm2 times an assumed 1 mm thickness
        entry["voxels"] = {n: int(c) for n, c in zip(names, counts)}
        entry["volume_mm3"] = {n: round(float(v), 3) for n, v in zip(names, volumes)}
        totals += counts
        study = studies.setdefault(series.study, {"study": series.study, "patient": series.patient, "images": 0,
                                                  "_voxels": np.zeros(len(names), np.int64),
                                                  "_volumes": np.zeros(len(names)), "series": []})
        study["images"] += len(item.images)
        study["_voxels"] += counts
        study["_volumes"] += volumes
        study["series"].append(entry)
    report_studies = []
    for study in studies.values():
        voxels, volumes = study.pop("_voxels"), study.pop("_volumes")
        report_studies.append({**{k: study[k] for k in ("study", "patient", "images")},
                               "voxels": {n: int(c) for n, c in zip(names, voxels)},
                               "volume_mm3": {n: round(float(v), 3) for n, v in zip(names, volumes)},
                               "present": [n for n, c in zip(names[1:], voxels[1:]) if c > 0],
                               "series": study["series"]})
    report = {
        "format": SEGMENTATION_FORMAT, "source": read.tag, "task": request.task, "classes": list(names),
        "background": names[0] if names else None, "channels": [c.name for c in request.channels],
        "input_size": request.tile_size, "images_segmented": images, "dropped": dict(read.dropped),
        "quarantine": read.quarantine, "studies": report_studies,
    }
    output.write_text(json.dumps(report, indent=2))
    return PredictionSummary(input=read.tag, output=str(output), samples=images,
                             class_counts={n: int(c) for n, c in zip(names, totals)})


def predict_study(request: PredictionRequest) -> PredictionSummary:
    """Score every image of one study (folder, file or DICOMDIR) and write a findings report.

    The input is read exactly as at ingest (de-identified, same channels and resampling). Scores are
    aggregated per series and per study with :data:`AGGREGATION` (max; mean also given). The JSON at
    ``request.output`` holds, per study, its pseudonymous key, study-level scores, the findings at or above
    0.5, and per series the per-slice scores; a CSV beside it (same stem, ``.csv``) has one row per study,
    series and slice (column ``level``). Only pseudonymous keys appear: no names, IDs, UIDs or file names.
    A folder holding several studies gets one report listing each.

    Returns:
        Receipt: images scored, and per finding the number of studies at or above 0.5.

    A segmentation model (``request.task == "segmentation"``) writes masks instead: see
    :func:`predict_segmentation`.

    Raises:
        DomainInputError: no usable image in the input.
        ValueError: ``infer`` returned the wrong shape or non-finite values.
    """
    if request.task == "segmentation":
        return predict_segmentation(request)
    names = tuple(request.class_names)
    recipes = parse_request_channels(tuple(c.name for c in request.channels), "channels")
    read = read_source(request.input)
    made = samples_of(read, recipes, request.tile_size)
    studies: dict[str, dict] = {}
    csv_rows: list[list] = []
    total = 0
    for item in made:
        series = item.series
        scores = _infer(request, item.images)
        total += len(scores)
        study = studies.setdefault(series.study, {"study": series.study, "patient": series.patient,
                                                  "series": [], "_scores": []})
        study["_scores"].append(scores)
        study["series"].append({
            "series": series.series, "modality": series.modality, "images": len(scores),
            "volume": series.is_volume, "scores": _scores(scores.max(axis=0), names),
            "slices": [{"slice": i, "scores": _scores(s, names)} for i, s in enumerate(scores)],
        })
        csv_rows.append(["series", series.study, series.series, "", *np.round(scores.max(axis=0), 6)])
        csv_rows.extend(["slice", series.study, series.series, i, *np.round(s, 6)] for i, s in enumerate(scores))
    report_studies = []
    counts = {name: 0 for name in names}
    for study in studies.values():
        stacked = np.concatenate(study.pop("_scores"))
        top, mean = stacked.max(axis=0), stacked.mean(axis=0)
        positive = [n for n, v in zip(names, top) if v >= POSITIVE_THRESHOLD]
        for name in positive:
            counts[name] += 1
        report_studies.append({"study": study["study"], "patient": study["patient"], "images": len(stacked),
                               "scores": _scores(top, names), "scores_mean": _scores(mean, names),
                               "positive": positive, "series": study["series"]})
        csv_rows.insert(0, ["study", study["study"], "", "", *np.round(top, 6)])
    report = {
        "format": REPORT_FORMAT, "source": read.tag, "task": request.task, "findings": list(names),
        "aggregation": AGGREGATION, "threshold": POSITIVE_THRESHOLD,
        "channels": [c.name for c in request.channels], "input_size": request.tile_size,
        "images_scored": total, "dropped": dict(read.dropped), "quarantine": read.quarantine,
        "studies": report_studies,
    }
    output = Path(request.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    with output.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["level", "study", "series", "slice", *names])
        writer.writerows(sorted(csv_rows, key=lambda r: ("study", "series", "slice").index(r[0])))
    return PredictionSummary(input=read.tag, output=str(output), samples=total, class_counts=counts)


def _has_images(path: Path) -> bool:
    try:
        discover_files(path)
    except Exception:
        return False
    return True


def _study_uids(folder: Path) -> set[str]:
    """StudyInstanceUIDs of the DICOM files under ``folder`` (headers only; used to decide grouping)."""
    import pydicom

    uids = set()
    _, files = discover_files(folder)
    for path in files:
        if is_nifti(path):
            uids.add("nifti:" + str(path))
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            uids.add(str(header.get("StudyInstanceUID", "")))
        except Exception:
            continue
    return uids


def list_prediction_inputs(path: Path | str) -> list[Path]:
    """One entry per study: a file or a one-study folder is itself; a drop folder gives its children.

    A folder whose DICOM and NIfTI files all belong to one study (one StudyInstanceUID, or a single NIfTI
    file) is one input, however its series are laid out in sub-folders. Otherwise each child (sub-folder
    with images, or loose NIfTI/DICOM file) is an input, in name order.
    """
    path = Path(path)
    if path.is_file() or len(_study_uids(path)) <= 1:
        return [path]
    children = []
    for child in sorted(path.iterdir()):
        if child.name.startswith(".") or child.name.upper() == "DICOMDIR":
            continue
        if child.is_dir() and _has_images(child):
            children.append(child)
        elif child.is_file() and (is_nifti(child) or _has_images(child)) and child.suffix.lower() not in (".csv", ".json", ".txt", ".md"):
            children.append(child)
    return children or [path]


def prediction_name(path: Path) -> str:
    """Output name of one study: ``study-<keyed hash>``, since study folders are often named after patients."""
    from domains.radiology.source import source_tag

    return "study-" + source_tag(path).split(":", 1)[1]

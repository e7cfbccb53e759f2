"""Per-study findings reports: scores aggregated over a study's images, written as JSON and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from domains.radiology.nifti_reader import is_nifti
from domains.radiology.sampling import parse_request_channels, samples_of
from domains.radiology.source import discover_files, read_source
from domains.spec import PredictionRequest, PredictionSummary

REPORT_FORMAT = "vitrail-radiology-findings/1"
AGGREGATION = "max"
"""A study's score for a finding is the highest score of any of its images or slices ("is it anywhere"),
the usual multiple-instance reading of findings labelled per study; the mean is reported beside it."""
POSITIVE_THRESHOLD = 0.5


def _scores(values: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    return {name: round(float(v), 6) for name, v in zip(names, values)}


def _infer(request: PredictionRequest, images: np.ndarray) -> np.ndarray:
    outputs = []
    for start in range(0, len(images), request.batch_size):
        probabilities = np.asarray(request.infer(images[start:start + request.batch_size]), dtype=np.float32)
        if probabilities.shape != (min(request.batch_size, len(images) - start), len(request.class_names)):
            raise ValueError(f"infer returned shape {probabilities.shape}; expected (batch, {len(request.class_names)})")
        if not np.isfinite(probabilities).all():
            raise ValueError("infer returned non-finite scores")
        outputs.append(probabilities)
    return np.concatenate(outputs)


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

    Raises:
        DomainInputError: no usable image in the input.
        ValueError: ``infer`` returned the wrong shape or non-finite values.
    """
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

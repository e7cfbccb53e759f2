"""Tiny real-format radiology example: DICOM CT, MR and DX series and a NIfTI volume, with fake identifiers.

Everything is synthetic (pixel data from a seeded generator, UIDs from hashed entropy). The fake
identifiers (:data:`~domains.radiology.dicom_writer.PLANTED_TEXT`, private tags, and "PLANTED" in the
patient folder names, file names and the labels CSV) exist so tests can prove none reaches an output.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from domains.radiology.dicom_writer import ImageGeometry, synthetic_uid, write_dicom_image

EXAMPLE_PATIENTS = ("PLANTED-ID-101", "PLANTED-ID-102", "PLANTED-ID-103", "PLANTED-ID-104")
EXAMPLE_FINDINGS = ("nodule", "effusion", "cardiomegaly")
EXAMPLE_LABELS = {  # per patient, in the order of EXAMPLE_FINDINGS
    "PLANTED-ID-101": (1, 0, 0),
    "PLANTED-ID-102": (0, 1, 0),
    "PLANTED-ID-103": (0, 0, 1),
    "PLANTED-ID-104": (1, 1, 0),
}


def write_volume_series(folder: Path, rng: np.random.Generator, *, seed: int, patient_id: str, modality: str,
                        slices: int = 3, size: int = 16, gap: float = 2.5, planted: bool = True) -> list[Path]:
    """Write a small axial series whose file names run against the slice order (name order != position)."""
    study = synthetic_uid("example-study", seed, patient_id)
    series = synthetic_uid("example-series", seed, patient_id, modality)
    paths = []
    for index in range(slices):
        if modality == "CT":  # stored = HU + 1024, as many scanners do
            hu = rng.normal(40.0, 20.0, (size, size))
            hu[:2] = -1000.0
            hu[size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2] = 400.0 + 100 * index
            pixels, rescale = np.clip(hu + 1024, 0, 4095).astype(np.uint16), (1.0, -1024.0)
        else:
            pixels = (rng.random((size, size)) * 500 + 100 * index).astype(np.uint16)
            rescale = None
        name = f"IM_{slices - index:04d}_{patient_id}.dcm"  # planted identity in the file name too
        paths.append(write_dicom_image(
            folder / name, pixels, modality=modality, patient_id=patient_id, study_uid=study, series_uid=series,
            sop_uid=synthetic_uid("example-sop", seed, patient_id, modality, index), instance=slices - index,
            geometry=ImageGeometry(position=(-20.0, -20.0, 10.0 + gap * index), spacing=(1.5, 1.5), thickness=gap),
            rescale=rescale, patient_name="FAKE^PLANTED^NAME", planted=planted))
    return paths


def write_radiograph(folder: Path, rng: np.random.Generator, *, seed: int, patient_id: str, size: int = 20,
                     planted: bool = True) -> Path:
    """Write one MONOCHROME1 DX image with a VOI window (bright = dense after the reader inverts it)."""
    pixels = (4095 - rng.random((size, size + 4)) * 3000).astype(np.uint16)
    return write_dicom_image(
        folder / f"DX_{patient_id}.dcm", pixels, modality="DX", patient_id=patient_id,
        study_uid=synthetic_uid("example-study", seed, patient_id), series_uid=synthetic_uid("example-series", seed, patient_id),
        sop_uid=synthetic_uid("example-sop", seed, patient_id), geometry=ImageGeometry(spacing=(0.2, 0.2)),
        window=(2048.0, 4096.0), photometric="MONOCHROME1", patient_name="FAKE^PLANTED^NAME", planted=planted)


def write_nifti_volume(path: Path, rng: np.random.Generator, shape: tuple[int, int, int] = (16, 14, 3)) -> Path:
    """Write a small CT-like NIfTI volume in HU (LPS-ish affine, so reading must reorient it)."""
    import nibabel as nib

    data = rng.normal(30.0, 30.0, shape).astype(np.float32)
    data[:, :2] = -1000.0
    affine = np.diag([-1.2, -1.2, 3.0, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_example(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Write the example under ``directory``: ``source/`` (4 patients) and ``labels.csv`` (by patient_id).

    Patients: a 3-slice CT series, a 3-slice MR series, one DX radiograph (MONOCHROME1), and a 3-slice
    NIfTI CT volume; each DICOM carries the planted fake identifiers. Patient folders are named after the
    (fake) patient ID, as many exports do.

    Returns:
        ``{"source": folder, "labels": CSV}``.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    source = directory / "source"
    ct, mr, dx, nifti = EXAMPLE_PATIENTS
    write_volume_series(source / f"{ct}_FAKE^PLANTED^NAME", rng, seed=seed, patient_id=ct, modality="CT")
    write_volume_series(source / mr, rng, seed=seed, patient_id=mr, modality="MR")
    write_radiograph(source / dx, rng, seed=seed, patient_id=dx)
    write_nifti_volume(source / nifti / "ct.nii.gz", rng)
    labels = directory / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", *EXAMPLE_FINDINGS])
        for patient in EXAMPLE_PATIENTS:
            writer.writerow([patient, *EXAMPLE_LABELS[patient]])
    return {"source": source, "labels": labels}


def write_segmentation_pair(image_path: Path, mask_path: Path, rng: np.random.Generator, *,
                            shape: tuple[int, int, int] = (20, 16, 6), spacing: tuple[float, float, float] = (1.0, 1.25, 2.0),
                            centre: tuple[float, float, float] | None = None, radius_mm: float = 5.0,
                            affine: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write a synthetic CT-like NIfTI volume with a bright sphere (a "lesion") and its mask (0/1 uint8).

    The volume is soft tissue (~40 HU, noisy) with a 300 HU sphere of ``radius_mm`` at voxel ``centre``
    (default: a random point away from the edges); the mask is 1 inside the sphere. Both files share
    ``affine`` (default LPS-like: x and y axes flipped, so readers must reorient).

    Returns:
        ``(image_path, mask_path)``.
    """
    import nibabel as nib

    if affine is None:
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[:3, 3] = (30.0, 20.0, -10.0)
    if centre is None:
        centre = tuple(rng.uniform(0.3, 0.7) * (n - 1) for n in shape)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    distance = np.sqrt(sum(((g - c) * z) ** 2 for g, c, z in zip(grid, centre, zooms)))
    mask = (distance <= radius_mm).astype(np.uint8)
    data = rng.normal(40.0, 15.0, shape).astype(np.float32)
    data[:, :1] = -1000.0  # a strip of air, so the volume reads as CT
    data[mask == 1] = 300.0 + rng.normal(0.0, 10.0, int(mask.sum()))
    for path, array in ((image_path, data), (mask_path, mask)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(path))
    return image_path, mask_path


def write_ct_cohort(directory: Path, patients: int = 5, seed: int = 0) -> dict[str, Path]:
    """Write a CT-only cohort: ``patients`` - 1 DICOM CT series (stored = HU + 1024) and one NIfTI CT volume.

    For CT window channels (``--channels lung,mediastinum,bone``), which drop MR and radiographs. Findings
    by patient_id alternate so that every finding has positives and negatives.

    Returns:
        ``{"source": folder, "labels": CSV}``.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    source = directory / "source"
    names = [f"CT-PATIENT-{i:02d}" for i in range(patients)]
    for name in names[:-1]:
        write_volume_series(source / name, rng, seed=seed, patient_id=name, modality="CT", slices=3, size=20)
    write_nifti_volume(source / names[-1] / "ct.nii.gz", rng)
    labels = directory / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", *EXAMPLE_FINDINGS])
        for i, name in enumerate(names):
            writer.writerow([name, i % 2, (i // 2) % 2, int(i % 3 == 0)])
    return {"source": source, "labels": labels}

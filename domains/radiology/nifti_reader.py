"""Reading NIfTI volumes (.nii, .nii.gz), reoriented to RAS, as axial slices in radiological display."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np

from domains.input_guards import check_source_size
from domains.radiology.deidentify import pseudonym
from domains.radiology.dicom_reader import FileReadError
from domains.radiology.series import Frame, Series
from domains.spec import DomainInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# NIfTI has no modality attribute. Air is about -1000 HU, and no MR magnitude image is negative, so a
# volume whose minimum is at or below this value is read as CT in HU; anything else as MR-like.
CT_MINIMUM_HU = -500.0
_BIDS_SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_patient_id(relative: PurePosixPath) -> str:
    """The patient a NIfTI file belongs to, from its path relative to the source root.

    A BIDS ``sub-<label>`` folder names the patient; otherwise the first folder under the root does; a
    file lying directly in the root is its own patient, named by its file name without the suffix.
    The labels CSV's ``patient_id`` column matches this value.
    """
    for part in relative.parts[:-1]:
        if _BIDS_SUBJECT.match(part):
            return part
    if len(relative.parts) > 1:
        return relative.parts[0]
    name = relative.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def nifti_series_key(relative: PurePosixPath) -> str:
    """Pseudonymous series key of a NIfTI file (one file, one series), from its path under the source root."""
    return pseudonym("series", "nifti:" + relative.as_posix())


def read_nifti_series(path: Path, relative: PurePosixPath, file_key: str) -> tuple[Series, dict[str, str]]:
    """Read a NIfTI volume as one series of axial slices.

    The image is reoriented to the closest canonical (RAS+) frame with nibabel, and each axial slice is
    shown as a radiologist would read it (anterior at the top, patient's right on the image's left), the
    same way as a DICOM axial slice. A 4D image contributes its first volume only (a time series or
    multi-echo acquisition would otherwise repeat near-identical slices); the provenance says so.

    Raises:
        FileReadError: unreadable file, fewer than 2 or more than 4 dimensions, or NaN/inf voxels.
    """
    import nibabel as nib

    notes: dict[str, str] = {}
    try:
        original = nib.load(str(path))
    except Exception as exc:
        raise FileReadError(file_key, "unreadable", f"damaged or truncated NIfTI ({type(exc).__name__})") from None
    try:
        # The header's shape, before reorienting or reading allocates it.
        check_source_size(f"file {file_key}", tuple(original.shape), "voxels per axis")
    except DomainInputError as exc:
        raise FileReadError(file_key, "too_large", exc.problem) from None
    try:
        image = nib.as_closest_canonical(original)
        data = np.asanyarray(image.dataobj, dtype=np.float32) if image.ndim <= 4 else None
    except Exception as exc:
        raise FileReadError(file_key, "unreadable", f"damaged or truncated NIfTI ({type(exc).__name__})") from None
    if data is None or data.ndim < 2:
        raise FileReadError(file_key, "unsupported", f"NIfTI with {image.ndim} dimensions; expected 2, 3 or 4")
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 4:
        notes["nifti_4d"] = "first volume of each 4D image used"
        data = data[..., 0]
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise FileReadError(file_key, "non_finite", f"{bad} of {data.size} voxels are NaN or infinite")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3]) + (1.0,) * max(0, 3 - len(image.header.get_zooms()))
    modality = "CT" if float(data.min()) <= CT_MINIMUM_HU else "MR"
    patient = pseudonym("patient", nifti_patient_id(relative))
    study = pseudonym("study", "nifti:" + relative.as_posix())
    series = nifti_series_key(relative)
    # In RAS+ voxel order i grows towards the patient's right and j towards anterior. Reversing both puts
    # the patient's right in column 0 and anterior in row 0 (radiological display), as DICOM axial slices
    # are stored (row direction +x = patient left, column direction +y = posterior, PS3.3 C.7.6.2.1.1).
    slices = data[::-1, ::-1, :].transpose(2, 1, 0)
    frames = [Frame(np.ascontiguousarray(slices[k]), file_key, patient, study, series, modality,
                    spacing_yx=(zooms[1], zooms[0]), position=(0.0, 0.0, k * zooms[2]),
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), instance=k)
              for k in range(slices.shape[0])]
    is_volume = len(frames) > 1
    result = Series(patient, study, series, modality, frames, is_volume,
                    (zooms[2] if is_volume else 0.0, zooms[1], zooms[0]), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), kind="nifti",
                    nifti_affine=np.asarray(original.affine, dtype=np.float64),
                    nifti_shape=tuple(int(n) for n in original.shape[:3]),
                    canonical_affine=np.asarray(image.affine, dtype=np.float64))
    return result, notes

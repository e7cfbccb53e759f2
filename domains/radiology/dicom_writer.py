"""Writing small synthetic DICOM images (fixtures, demo), optionally carrying planted fake identifiers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Fake identifiers planted in fixtures, so tests can prove none survives reading. Every one contains
# "PLANTED" (or is the birth date below), which no legitimate output ever contains.
PLANTED_BIRTH_DATE = "19010203"
PLANTED_TEXT = {
    "PatientName": "FAKE^PLANTED^NAME",
    "PatientBirthDate": PLANTED_BIRTH_DATE,
    "PatientAddress": "1 PLANTED STREET, PLANTEDTOWN",
    "InstitutionName": "PLANTED GENERAL HOSPITAL",
    "InstitutionAddress": "2 PLANTED AVENUE",
    "ReferringPhysicianName": "PLANTED^REFERRER",
    "PerformingPhysicianName": "PLANTED^PERFORMER",
    "OperatorsName": "PLANTED^OPERATOR",
    "AccessionNumber": "PLANTEDACC1",
    "StudyID": "PLANTEDSTUDY",
    "StudyDescription": "PLANTED STUDY DESCRIPTION",
    "SeriesDescription": "PLANTED SERIES DESCRIPTION",
    "ImageComments": "PLANTED IMAGE COMMENT",
    "PatientComments": "PLANTED PATIENT COMMENT",
    "StationName": "PLANTEDSTATION",
}
PLANTED_PRIVATE_CREATOR = "PLANTED PRIVATE CREATOR"
PLANTED_PRIVATE_VALUE = "PLANTED PRIVATE VALUE"


@dataclass(frozen=True)
class ImageGeometry:
    """Where a slice lies: position of its first pixel, row/column directions, pixel spacing (mm)."""

    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    spacing: tuple[float, float] = (1.0, 1.0)
    thickness: float | None = None


def synthetic_uid(*parts: object) -> str:
    """A deterministic ``2.25`` UID (PS3.5 B.2) from a hash of ``parts``: same parts, same UID."""
    import hashlib

    digest = hashlib.sha256("\x00".join(repr(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def write_dicom_image(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance: int = 1,
    geometry: ImageGeometry = ImageGeometry(),
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    patient_name: str = "SYNTHETIC^PHANTOM",
    planted: bool = False,
    burned_in: str | None = None,
) -> Path:
    """Write one single-frame uncompressed DICOM image (Explicit VR Little Endian).

    Args:
        pixels: (H, W) integer stored values (uint16 or int16).
        rescale: (slope, intercept) for CT-like modality units.
        window: (centre, width) VOI window, for radiographs.
        planted: add the fake identifiers of :data:`PLANTED_TEXT` and a private tag.
        burned_in: value of BurnedInAnnotation (``YES``/``NO``), or None to leave it out.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                 "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}.get(
        modality, "1.2.840.10008.5.1.4.1.1.7")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = UID(sop_class), UID(sop_uid)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = UID(study_uid), UID(series_uid)
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.InstanceNumber = instance
    ds.SeriesNumber = 1
    if planted:
        for keyword, value in PLANTED_TEXT.items():
            setattr(ds, keyword, value)
        block = ds.private_block(0x0011, PLANTED_PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", PLANTED_PRIVATE_VALUE)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if geometry.position is not None:
        ds.ImagePositionPatient = [float(v) for v in geometry.position]
        ds.ImageOrientationPatient = [float(v) for v in geometry.orientation]
        ds.FrameOfReferenceUID = UID(synthetic_uid("frame-of-reference", series_uid))
    if modality in ("CR", "DX"):
        ds.ImagerPixelSpacing = [float(v) for v in geometry.spacing]
    else:
        ds.PixelSpacing = [float(v) for v in geometry.spacing]
    if geometry.thickness is not None:
        ds.SliceThickness = geometry.thickness
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    signed = pixels.dtype.kind == "i"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16 if signed else np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path

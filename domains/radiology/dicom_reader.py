"""Reading one DICOM file into de-identified, decoded frames (single- and multi-frame, any transfer syntax)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from domains.input_guards import check_source_size
from domains.radiology.deidentify import DeidentifiedKeys, FileAudit, burned_in_allowed, deidentify_dataset
from domains.radiology.intensity import RADIOGRAPH_MODALITIES
from domains.radiology.series import Frame
from domains.spec import DomainInputError

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Values above this size are left on disk by the header pass (pydicom's defer_size): in practice the pixels.
HEADER_DEFER_BYTES = 4096

# What to install when pydicom has no working decoder for a transfer syntax (PS3.5 Table A-1 UIDs).
_CODEC_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg and pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg and pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg (or pillow)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg (or pillow)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg and pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.4.202": "pylibjpeg and pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.4.203": "pylibjpeg and pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or numpy, which pydicom's own RLE decoder needs)",
}


class QuarantinedFile(Exception):
    """A readable file kept out of the dataset by policy (e.g. burned-in annotation)."""

    def __init__(self, file_key: str, reason: str, message: str, audit: FileAudit):
        self.file_key, self.reason, self.audit = file_key, reason, audit
        super().__init__(f"file {file_key}: {message}")


class NotAnImage(Exception):
    """A valid DICOM object without an image to learn from (DICOMDIR, SR, RT plan, ...)."""


class FileReadError(DomainInputError):
    """A bad DICOM or NIfTI file, with a short reason code for the ``dropped`` counts."""

    def __init__(self, file_key: str, reason: str, problem: str):
        self.reason = reason
        super().__init__(f"file {file_key}", problem)


def check_codec(transfer_syntax: str, file_key: str) -> None:
    """Raise :class:`FileReadError` naming the package to install if pydicom cannot decode this syntax."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise FileReadError(file_key, "missing_codec",
                            f"pixel data uses {uid.name} ({uid}), which no installed pydicom decoder supports "
                            "(video and other formats need conversion to a still-image syntax first)") from None
    if not decoder.is_available:
        package = _CODEC_PACKAGES.get(str(uid), "the decoder packages listed by pydicom.pixels.get_decoder")
        raise FileReadError(file_key, "missing_codec",
                            f"pixel data uses {uid.name} ({uid}) and no decoder for it is installed: "
                            f"pip install {package}")


def _first(sequence_owner, keyword: str):
    value = sequence_owner.get(keyword)
    return value[0] if value else None


def _frame_group(ds, index: int, keyword: str):
    """Item of a functional group for frame ``index``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        item = _first(per_frame[index], keyword)
        if item is not None:
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    return _first(shared[0], keyword) if shared else None


def _floats(value, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _geometry(ds, index: int, multi_frame: bool):
    if multi_frame and ("PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds):
        position = _frame_group(ds, index, "PlanePositionSequence")
        orientation = _frame_group(ds, index, "PlaneOrientationSequence")
        measures = _frame_group(ds, index, "PixelMeasuresSequence")
        return (_floats(position.get("ImagePositionPatient") if position else None, 3),
                _floats(orientation.get("ImageOrientationPatient") if orientation else None, 6),
                _floats(measures.get("PixelSpacing") if measures else None, 2))
    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    if multi_frame:  # legacy multi-frame: one position for the whole object, frames have none of their own
        return None, None, spacing
    return _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6), spacing


def _rescale(ds, index: int, multi_frame: bool) -> tuple[float, float] | None:
    if multi_frame:
        item = _frame_group(ds, index, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item:
            return float(item.RescaleSlope), float(item.get("RescaleIntercept", 0.0))
    return None


def _to_modality_units(ds, frames: np.ndarray, multi_frame: bool, modality: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = np.empty(frames.shape, dtype=np.float32)
    for i, frame in enumerate(frames):
        rescale = _rescale(ds, i, multi_frame)
        if rescale is not None:
            values = frame.astype(np.float64) * rescale[0] + rescale[1]
        else:
            values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
        if modality in RADIOGRAPH_MODALITIES and ("WindowCenter" in ds or "VOILUTSequence" in ds):
            # Radiographs carry the reading window chosen by the modality (VOI LUT, PS3.3 C.11.2).
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        out[i] = values
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" and modality != "CT":
        # MONOCHROME1 shows low values white; invert so bright always means dense (HU keep their meaning).
        out = out.max() + out.min() - out
    return out


class _DropTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


@contextmanager
def _decoder_failures_without_tracebacks() -> Iterator[None]:
    """pydicom logs a full traceback for every decoder plugin that fails before it tries the next one.

    The reason a file could not be decoded is already recorded in its quarantine entry, so a folder
    with a few undecodable files would otherwise print a stack dump per file and plugin. The one-line
    messages stay.
    """
    logger = logging.getLogger("pydicom.pixels.decoders.base")  # the decoders' own logger, not its parent
    quiet = _DropTraceback()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _parse_and_check(path: Path, file_key: str, header_only: bool):
    """Parse one DICOM file, de-identify it at once, and apply every check its header allows.

    ``header_only`` defers large values (pixel data) instead of reading them: the file's pixel data is
    noted and then dropped from the dataset, so nothing below touches it.

    Returns:
        ``(dataset, keys, audit, transfer syntax, modality)``; the modality is read before de-identification.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size=HEADER_DEFER_BYTES if header_only else None)
    except InvalidDicomError:
        raise FileReadError(file_key, "unreadable", "not a DICOM file (no DICM preamble or file meta)") from None
    except Exception as exc:  # pydicom raises EOFError, OSError, ValueError... on damaged files
        raise FileReadError(file_key, "unreadable", f"damaged or truncated DICOM ({type(exc).__name__})") from None
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or "")
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise NotAnImage("DICOMDIR")
    modality = str(ds.get("Modality", "") or "OT").upper()
    has_pixels = any(k in ds for k in PIXEL_KEYWORDS)
    if header_only:
        for keyword in PIXEL_KEYWORDS:  # deleting a deferred element does not read it
            if keyword in ds:
                del ds[keyword]
    keys, audit = deidentify_dataset(ds, file_key)
    if modality in ("SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "ECG"):
        raise NotAnImage(modality)
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not burned_in_allowed():
        audit.quarantined = "burned_in_annotation"
        raise QuarantinedFile(file_key, "burned_in_annotation",
                              "BurnedInAnnotation is YES (text in the pixels may identify the patient); "
                              "set VITRAIL_ALLOW_BURNED_IN=1 once such images have been checked", audit)
    if not has_pixels:
        raise FileReadError(file_key, "no_pixel_data", "the object has no pixel data")
    transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2"))
    check_codec(transfer_syntax, file_key)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        raise FileReadError(file_key, "unsupported", "PALETTE COLOR images are not supported")
    declared = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0),
                int(ds.get("SamplesPerPixel", 1) or 1))
    try:
        # From the header, before pixel_array allocates what it declares.
        check_source_size(f"file {file_key}", declared, "frames x rows x columns x samples per pixel")
    except DomainInputError as exc:
        raise FileReadError(file_key, "too_large", exc.problem) from None
    return ds, keys, audit, transfer_syntax, modality


def read_dicom_header(path: Path, file_key: str) -> tuple[DeidentifiedKeys, FileAudit]:
    """Read one DICOM file's header without its pixels: de-identified keys and audit, after every header check.

    This is the first pass of a streaming read: it groups files into series and quarantines what the
    header already condemns, so that pixels are decoded later one series at a time.

    Raises:
        NotAnImage, QuarantinedFile, FileReadError: as :func:`read_dicom_frames`, except for failures that
            only decoding reveals (corrupt pixel data, non-finite values).
    """
    _, keys, audit, _, _ = _parse_and_check(path, file_key, header_only=True)
    return keys, audit


def read_dicom_frames(path: Path, file_key: str) -> tuple[list[Frame], FileAudit, bool]:
    """Read, de-identify and decode one DICOM file.

    The dataset is passed through :func:`deidentify_dataset` right after parsing: the keys and audit come
    from the gate, and nothing below reads an identifying attribute.

    Returns:
        The frames (modality units: HU for CT, VOI-transformed for radiographs), the audit, and whether the
        patient ID was missing.

    Raises:
        NotAnImage: a valid DICOM object without image pixels meant for training (DICOMDIR, SR, SEG...).
        QuarantinedFile: burned-in annotation without the user's permission.
        FileReadError: unreadable, truncated, no pixel data, no codec, unsupported photometric, or more
            pixels declared than the configured limit.
    """
    ds, keys, audit, transfer_syntax, modality = _parse_and_check(path, file_key, header_only=False)
    try:
        with _decoder_failures_without_tracebacks():
            pixels = ds.pixel_array
    except Exception as exc:
        from pydicom.uid import UID

        raise FileReadError(file_key, "unreadable",
                            f"{UID(transfer_syntax).name} pixel data cannot be decoded ({type(exc).__name__}): "
                            "truncated, corrupt, or a variant the installed decoders do not support") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:  # colour (secondary captures, ultrasound): luminance, ITU-R BT.601 weights
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise FileReadError(file_key, "unreadable", f"decoded pixel array has unexpected shape {pixels.shape}")
    multi_frame = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    values = _to_modality_units(ds, pixels, multi_frame, modality)
    if not np.isfinite(values).all():
        raise FileReadError(file_key, "non_finite", "pixel values are not finite after rescaling")
    frames = []
    instance = int(ds.get("InstanceNumber", 0) or 0)
    for index in range(n_frames):
        position, orientation, spacing = _geometry(ds, index, multi_frame)
        frames.append(Frame(values[index], file_key, keys.patient, keys.study, keys.series, modality,
                            spacing_yx=spacing, position=position, orientation=orientation,
                            instance=instance, frame=index))
    return frames, audit, keys.patient_id_missing

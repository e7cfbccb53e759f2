"""De-identification gate for DICOM: PS3.15 basic confidentiality profile, enforced by an allowlist.

Every DICOM dataset the radiology domain reads goes through :func:`deidentify_dataset` before any other
code looks at it. Instead of deleting the attributes the basic profile lists (Table E.1-1, a denylist
that cannot know about vendor or future attributes), the gate keeps only the attributes needed to
decode and place pixels (pixel module, modality/VOI LUTs, geometry, a few coded view terms) and removes
everything else: names, IDs, dates, addresses, institution and physician fields, free text, private
tags and overlays all go, which covers every X/Z/D action of the basic profile. The UIDs that remain
are remapped (profile action U) with a keyed hash, so one input UID always gives the same output UID.

Pseudonyms (patient, study, series, file keys) come from :mod:`domains.pseudonyms`: HMAC-SHA256 of the original value keyed with a salt.
The salt is the environment variable ``VITRAIL_DEID_SALT`` when set, else a fixed project salt. The
fixed salt makes keys stable across machines and runs (two ingests of the same study agree), but anyone
with this code can recompute the key of a guessed patient ID (MRNs are short and guessable), so a site
that shares datasets outside its walls should set its own secret salt. The salt kind is recorded in the
provenance, never the salt itself.

Images whose BurnedInAnnotation is ``YES`` may show names in the pixels: they are quarantined unless
``VITRAIL_ALLOW_BURNED_IN=1`` says the user has checked them (e.g. the text lies outside the field
kept, or has been masked).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from domains.pseudonyms import PROJECT_SALT, SALT_ENV, deidentification_salt, pseudonym  # noqa: F401 - re-exported
from domains.pseudonyms import keyed_digest as _digest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom.dataset import Dataset

ALLOW_BURNED_IN_ENV = "VITRAIL_ALLOW_BURNED_IN"
PROFILE = "DICOM PS3.15 E.1 basic confidentiality profile (allowlist form), UIDs remapped by keyed hash"
AUDIT_FILE_NAME = "deidentification_audit.json"
AUDIT_PROVENANCE_KEY = "deidentification_audit"

# Attributes kept (at any nesting level). Everything else, including every private tag, is removed.
KEPT_KEYWORDS = frozenset({
    # identity of the object (UIDs are remapped) and coded, non-free-text descriptors
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "ImageType", "BodyPartExamined", "ViewPosition", "Laterality",
    "ImageLaterality", "PatientOrientation", "PatientPosition", "InstanceNumber", "AcquisitionNumber",
    "SeriesNumber", "BurnedInAnnotation", "RecognizableVisualFeatures", "MRAcquisitionType",
    # image pixel module
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
    "FrameIncrementPointer", "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths", "PixelPaddingValue", "PixelPaddingRangeLimit", "LossyImageCompression",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    # modality and VOI LUTs
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "LUTDescriptor", "LUTData",
    "ModalityLUTType", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "PresentationLUTShape",
    # geometry
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "SliceLocation",
    # enhanced multi-frame functional groups (their items are filtered by this same list)
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PlanePositionSequence",
    "PlaneOrientationSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence",
    "FrameVOILUTSequence", "FrameContentSequence", "InStackPositionNumber", "StackID",
    "TemporalPositionIndex", "DimensionIndexValues",
})
KEPT_META_KEYWORDS = frozenset({
    "FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID", "TransferSyntaxUID",
})
# UIDs that name a class or a transfer syntax, not an instance: public, so kept as they are.
_UNMAPPED_UID_KEYWORDS = frozenset({"SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID"})


def burned_in_allowed() -> bool:
    """Whether the user allowed images flagged with burned-in annotation (``VITRAIL_ALLOW_BURNED_IN=1``)."""
    return os.environ.get(ALLOW_BURNED_IN_ENV, "").strip().lower() in ("1", "yes", "true")


def remap_uid(uid: str) -> str:
    """Replace an instance UID with a keyed-hash UID under the ``2.25`` root (PS3.5 B.2).

    The same input always gives the same output for a given salt, so references between objects
    (series, frame of reference) survive de-identification.
    """
    return "2.25." + str(int.from_bytes(_digest("uid", uid.strip())[:16], "big"))


@dataclass
class FileAudit:
    """What the gate did to one file: attribute keywords (or tags) only, never their values."""

    file: str
    removed: list[str] = field(default_factory=list)
    remapped_uids: list[str] = field(default_factory=list)
    private_tags_removed: int = 0
    quarantined: str | None = None


@dataclass(frozen=True)
class DeidentifiedKeys:
    """Pseudonymous keys computed from the identifying values before they were removed."""

    patient: str
    study: str
    series: str
    patient_id_missing: bool


def _element_name(element) -> str:
    return element.keyword or f"({element.tag.group:04X},{element.tag.element:04X})"


def _filter(dataset: "Dataset", kept: frozenset[str], audit: FileAudit, path: str = "") -> None:
    from pydicom.uid import UID

    for element in list(dataset):
        name = _element_name(element)
        if element.tag.is_private:
            audit.private_tags_removed += 1
            del dataset[element.tag]
            continue
        if element.keyword not in kept:
            audit.removed.append(path + name)
            del dataset[element.tag]
            continue
        if element.VR == "SQ":
            for item in element.value:
                _filter(item, kept, audit, f"{path}{name}>")
        elif element.VR == "UI" and element.value and element.keyword not in _UNMAPPED_UID_KEYWORDS:
            values = element.value if element.VM > 1 else [element.value]
            # A registered UID (a class, a transfer syntax, a coding scheme) identifies nobody.
            remapped = [str(v) if UID(str(v)).is_valid and UID(str(v)).name != str(v) else remap_uid(str(v))
                        for v in values]
            element.value = remapped if element.VM > 1 else remapped[0]
            audit.remapped_uids.append(path + name)


def deidentify_dataset(dataset: "Dataset", file_key: str) -> tuple[DeidentifiedKeys, FileAudit]:
    """Strip ``dataset`` in place down to pixels and geometry; return its pseudonymous keys and the audit.

    Args:
        dataset: a dataset just read by pydicom (its file meta is filtered too).
        file_key: pseudonymous key of the file, used in the audit instead of its name.

    Returns:
        The patient/study/series keys (computed from PatientID, StudyInstanceUID and SeriesInstanceUID
        before they are removed or remapped) and the per-file audit.
    """
    audit = FileAudit(file=file_key)
    patient_id = str(dataset.get("PatientID", "") or "").strip()
    study_uid = str(dataset.get("StudyInstanceUID", "") or "").strip()
    series_uid = str(dataset.get("SeriesInstanceUID", "") or "").strip()
    # Without a patient ID the study stands in for the patient (the provenance counts these cases,
    # because two studies of one unnamed patient would then become two groups).
    keys = DeidentifiedKeys(
        patient=pseudonym("patient", patient_id) if patient_id else pseudonym("patient", "study:" + study_uid),
        study=pseudonym("study", study_uid or "file:" + file_key),
        series=pseudonym("series", series_uid or "file:" + file_key),
        patient_id_missing=not patient_id,
    )
    _filter(dataset, KEPT_KEYWORDS, audit)
    if getattr(dataset, "file_meta", None) is not None:
        _filter(dataset.file_meta, KEPT_META_KEYWORDS, audit, "meta>")
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = "Vitrail allowlist (PS3.15 basic profile)"
    return keys, audit


def summarise_audits(audits: list[FileAudit]) -> dict[str, str]:
    """Counts for the provenance: files, attributes removed, UIDs remapped, private tags, quarantines."""
    quarantined = Counter(a.quarantined for a in audits if a.quarantined)
    _, salt_kind = deidentification_salt()
    return {
        "deid_profile": PROFILE,
        "deid_salt": salt_kind,
        "deid_files": str(len(audits)),
        "deid_attributes_removed": str(sum(len(a.removed) for a in audits)),
        "deid_uids_remapped": str(sum(len(a.remapped_uids) for a in audits)),
        "deid_private_tags_removed": str(sum(a.private_tags_removed for a in audits)),
        "deid_files_quarantined": str(sum(quarantined.values())),
        "deid_burned_in_quarantined": str(quarantined.get("burned_in_annotation", 0)),
    }


def audit_payload(audits: list[FileAudit]) -> str:
    """The full audit as compact JSON: files sharing one set of actions are listed together.

    Grouping keeps it small (a series' files usually get identical treatment), so it can travel in the
    sample set's provenance to wherever the dataset is written.
    """
    groups: dict[str, dict] = {}
    for audit in audits:
        actions = {"removed": sorted(set(audit.removed)), "remapped_uids": sorted(set(audit.remapped_uids)),
                   "private_tags_removed": audit.private_tags_removed, "quarantined": audit.quarantined}
        signature = json.dumps(actions, sort_keys=True)
        groups.setdefault(signature, {**actions, "files": []})["files"].append(audit.file)
    return json.dumps({"profile": PROFILE, "actions": list(groups.values())}, sort_keys=True, separators=(",", ":"))


def write_deidentification_audit(provenance: dict[str, str], out_dir: Path | str) -> Path:
    """Write the audit carried in a sample set's provenance to ``<out_dir>/deidentification_audit.json``.

    The ingest stage calls this with ``samples.provenance`` and the dataset folder, so the audit lies
    beside ``dataset.json``. It lists per file (by pseudonymous key) which attributes were removed and
    which UIDs remapped, never a value.

    Raises:
        KeyError: the provenance carries no audit (it was not produced by the radiology reader).
    """
    payload = json.loads(provenance[AUDIT_PROVENANCE_KEY])
    payload["summary"] = {k: v for k, v in provenance.items() if k.startswith("deid_")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / AUDIT_FILE_NAME
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def write_ingest_reports(samples, out_dir: Path) -> list[Path]:
    """The radiology ingest report: the de-identification audit beside the dataset (see above)."""
    return [write_deidentification_audit(samples.provenance, out_dir)]

"""Finding the DICOM and NIfTI files of a source (folder, file, DICOMDIR) and reading them into series."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from domains.radiology.deidentify import FileAudit, pseudonym, summarise_audits
from domains.radiology.dicom_reader import (FileReadError, NotAnImage, QuarantinedFile, read_dicom_frames,
                                           read_dicom_header)
from domains.radiology.nifti_reader import is_nifti, read_nifti_series
from domains.radiology.series import Frame, Series, assemble_series
from domains.spec import DomainInputError

# Files that are never image data (labels, notes, exports' side files) are skipped without comment.
_SKIPPED_SUFFIXES = frozenset({".csv", ".json", ".txt", ".md", ".xml", ".html", ".pdf", ".png", ".jpg",
                               ".jpeg", ".zip", ".py", ".log", ".ini", ".cfg", ".yaml", ".yml", ".tsv"})


def source_tag(source: Path | str) -> str:
    """Non-identifying name of a source: ``radiology:<keyed hash of its resolved path>``.

    Folder names often carry patient names or IDs, so the path itself is never stored; the hash is keyed
    like the other pseudonyms, so a guessed path cannot be checked against it without the salt.
    """
    return "radiology:" + pseudonym("source", str(Path(source).resolve())).split("-", 1)[1]


@dataclass(frozen=True)
class SourceFile:
    """One candidate file: its path, its path relative to the source root, and its pseudonymous key."""

    path: Path
    relative: PurePosixPath
    key: str


@dataclass
class SourceRead:
    """Everything read from a source: good series, and what was dropped, by file or series key."""

    tag: str
    series: list[Series] = field(default_factory=list)
    files: list[SourceFile] = field(default_factory=list)
    audits: list[FileAudit] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    notes: dict[str, str] = field(default_factory=dict)
    patients_without_id: set[str] = field(default_factory=set)
    seen_keys: set[str] = field(default_factory=set)
    """Pseudonymous keys of every patient, study, series and file met, kept or not (for label matching)."""
    plans: list["SeriesPlan"] = field(default_factory=list)
    """Series found by the header pass (:func:`scan_source`), to be decoded one at a time."""
    assembled: int = 0
    """Series decoded and assembled so far (before any was turned into samples)."""

    def reject(self, key: str, reason: str, problem: str, images: int = 1) -> None:
        self.quarantine.append({"item": key, "reason": reason, "problem": problem})
        self.dropped[reason] += images

    def summary(self) -> dict[str, str]:
        """Small non-identifying facts for the provenance."""
        facts = {
            "modalities": ",".join(sorted({s.modality for s in self.series})),
            "patients": str(len({s.patient for s in self.series})),
            "studies": str(len({s.study for s in self.series})),
            "series": str(len(self.series)),
            "files_read": str(len(self.files)),
            "files_quarantined": str(len(self.quarantine)),
            "patients_without_id": str(len(self.patients_without_id)),
            "quarantine": json.dumps(self.quarantine, sort_keys=True, separators=(",", ":")),
            **summarise_audits(self.audits),
            **self.notes,
        }
        return facts


def _dicomdir_files(path: Path) -> list[Path]:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DomainInputError("DICOMDIR", f"cannot read the DICOMDIR ({type(exc).__name__})") from None
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        if "ReferencedFileID" in record:
            parts = record.ReferencedFileID
            parts = [parts] if isinstance(parts, str) else list(parts)
            files.append(path.parent.joinpath(*parts))
    return files


def _is_dicomdir(path: Path) -> bool:
    return path.name.upper() == "DICOMDIR"


def discover_files(source: Path) -> tuple[Path, list[Path]]:
    """The source root and its candidate image files (sorted; order does not matter for reading).

    A folder is searched recursively (hidden files and obvious non-image suffixes skipped, a DICOMDIR
    inside it skipped since the files it lists are found anyway); a DICOMDIR file expands to the files
    its records reference; any other file is itself.

    Raises:
        DomainInputError: the source does not exist or holds no candidate file.
    """
    tag = source_tag(source)
    if not source.exists():
        raise DomainInputError(tag, "the source does not exist")
    if source.is_file():
        root = source.parent
        files = _dicomdir_files(source) if _is_dicomdir(source) else [source]
    else:
        root = source
        # Dangling or looping links are kept as candidates so that they are reported, not silently skipped.
        files = [p for p in sorted(source.rglob("*"))
                 if (p.is_file() or (p.is_symlink() and not p.exists()))
                 and not any(part.startswith(".") for part in p.relative_to(source).parts)
                 and p.suffix.lower() not in _SKIPPED_SUFFIXES and not _is_dicomdir(p)]
    if not files:
        raise DomainInputError(tag, "no DICOM or NIfTI files found")
    return root, files


def _first_with_same_content(path: Path, key: str, seen: dict[tuple[int, str], str]) -> str | None:
    """Key of an earlier file with exactly these bytes (a copy would put every slice twice), else None."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    fingerprint = (path.stat().st_size, digest.hexdigest())
    earlier = seen.get(fingerprint)
    if earlier is None:
        seen[fingerprint] = key
    return earlier


@dataclass
class SeriesPlan:
    """A series found by the header pass: its pseudonymous keys and files, nothing decoded yet.

    It answers ``file_keys`` and ``series`` like a :class:`Series`, so masks can be matched to it.
    """

    series: str
    kind: str
    files: list[SourceFile] = field(default_factory=list)

    @property
    def file_keys(self) -> list[str]:
        return [f.key for f in self.files]


def _nifti_header_plan(item: SourceFile) -> SeriesPlan:
    """Check a NIfTI file from its header (readable, size guard) and plan it as its own series."""
    import nibabel as nib

    from domains.input_guards import check_source_size
    from domains.radiology.nifti_reader import nifti_series_key

    try:
        image = nib.load(str(item.path))
        shape = tuple(image.shape)
    except Exception as exc:
        raise FileReadError(item.key, "unreadable", f"damaged or truncated NIfTI ({type(exc).__name__})") from None
    try:
        check_source_size(f"file {item.key}", shape, "voxels per axis")
    except DomainInputError as exc:
        raise FileReadError(item.key, "too_large", exc.problem) from None
    return SeriesPlan(nifti_series_key(item.relative), "nifti", [item])


def scan_source(source: Path | str) -> SourceRead:
    """First pass of a streaming read: every file's header, grouped into series plans; no pixel decoded.

    DICOM headers are de-identified as they are parsed (the audits are kept); links, missing files,
    duplicates, DICOMDIRs, non-image objects and everything a header condemns (burned-in annotation, no
    pixel data, missing codec, size guard) are quarantined here, exactly as a full read would. Series
    come NIfTI files first, then DICOM series in the order their first file was met.

    Raises:
        DomainInputError: the source has no file, or no file that could hold an image.
    """
    source = Path(source)
    root, paths = discover_files(source)
    result = SourceRead(tag=source_tag(source))
    dicom_plans: dict[str, SeriesPlan] = {}
    nifti_plans: list[SeriesPlan] = []
    contents: dict[tuple[int, str], str] = {}
    for path in paths:
        try:
            relative = PurePosixPath(path.relative_to(root).as_posix())
        except ValueError:  # a DICOMDIR may point outside its folder via ".."
            relative = PurePosixPath(path.name)
        item = SourceFile(path, relative, pseudonym("file", relative.as_posix()))
        result.files.append(item)
        result.seen_keys.add(item.key)
        if path.is_symlink() and not path.exists():
            result.reject(item.key, "broken_link", "a symbolic link that loops or points to nothing")
            continue
        if not path.is_file():
            result.reject(item.key, "missing_file", "a file listed in the DICOMDIR does not exist")
            continue
        try:
            duplicate_of = _first_with_same_content(path, item.key, contents)
            if duplicate_of is not None:
                result.reject(item.key, "duplicate_file", f"same bytes as file {duplicate_of} (read once)")
                continue
            if is_nifti(path):
                nifti_plans.append(_nifti_header_plan(item))
                continue
            keys, audit = read_dicom_header(path, item.key)
        except NotAnImage as kind:
            result.notes[f"skipped_{kind}"] = str(int(result.notes.get(f"skipped_{kind}", "0")) + 1)
            continue
        except QuarantinedFile as exc:
            result.audits.append(exc.audit)
            result.reject(item.key, exc.reason, str(exc))
            continue
        except FileReadError as exc:
            result.reject(item.key, exc.reason, exc.problem)
            continue
        except PermissionError:
            result.reject(item.key, "unreadable", "permission denied")
            continue
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one file quarantines that file only
            # Only the exception's type: library messages may quote attribute values (names, IDs).
            result.reject(item.key, "unreadable", f"reading failed unexpectedly ({type(exc).__name__})")
            continue
        result.audits.append(audit)
        dicom_plans.setdefault(keys.series, SeriesPlan(keys.series, "dicom")).files.append(item)
    result.plans = [*nifti_plans, *dicom_plans.values()]
    if not result.plans:
        raise DomainInputError(result.tag, _nothing_usable(result, len(paths)))
    return result


def _nothing_usable(result: SourceRead, files: int) -> str:
    problems = "; ".join(f"{q['item']}: {q['problem']}" for q in result.quarantine[:10]) or "no image objects"
    return f"no usable images in {files} file(s): {problems}"


def read_planned_series(result: SourceRead, plan: SeriesPlan) -> Series | None:
    """Second pass for one series: decode its files and assemble it; None when none of it is usable.

    A file that fails to decode is quarantined (and its audit withdrawn, since it contributes nothing);
    an irregular series is quarantined whole. Keys of what was read join ``result.seen_keys``.
    """
    if plan.kind == "nifti":
        item = plan.files[0]
        try:
            series, notes = read_nifti_series(item.path, item.relative, item.key)
        except FileReadError as exc:
            result.reject(item.key, exc.reason, exc.problem)
            return None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one file quarantines that file only
            result.reject(item.key, "unreadable", f"reading failed unexpectedly ({type(exc).__name__})")
            return None
        result.seen_keys.update((series.patient, series.study, series.series))
        result.notes.update(notes)
        result.assembled += 1
        return series
    frames: list[Frame] = []
    failed: set[str] = set()
    for item in plan.files:
        try:
            file_frames, _, no_patient_id = read_dicom_frames(item.path, item.key)
        except (NotAnImage, QuarantinedFile):  # the header pass already sorted these out; a changed file
            failed.add(item.key)
            result.reject(item.key, "unreadable", "the file changed between its header and its pixels being read")
            continue
        except FileReadError as exc:
            failed.add(item.key)
            result.reject(item.key, exc.reason, exc.problem)
            continue
        except PermissionError:
            failed.add(item.key)
            result.reject(item.key, "unreadable", "permission denied")
            continue
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one file quarantines that file only
            failed.add(item.key)
            result.reject(item.key, "unreadable", f"reading failed unexpectedly ({type(exc).__name__})")
            continue
        if no_patient_id:
            result.patients_without_id.add(file_frames[0].patient)
        result.seen_keys.update((file_frames[0].patient, file_frames[0].study, file_frames[0].series))
        frames.extend(file_frames)
    if failed:
        result.audits = [a for a in result.audits if a.file not in failed or a.quarantined]
    if not frames:
        return None
    try:
        series = assemble_series(frames)
    except DomainInputError as exc:
        result.reject(plan.series, "inconsistent_series", exc.problem, images=len(frames))
        return None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one odd series must not cost the others
        result.reject(plan.series, "inconsistent_series", f"cannot be assembled ({type(exc).__name__})",
                      images=len(frames))
        return None
    result.assembled += 1
    return series


def read_source(source: Path | str) -> SourceRead:
    """Read every DICOM and NIfTI file of ``source`` into ordered, de-identified series (all in memory).

    The header pass (:func:`scan_source`) then every series decoded (:func:`read_planned_series`); the
    streaming ingest does the same one series at a time instead. Bad files and irregular series are
    recorded (by pseudonymous key, reason and problem) in ``quarantine`` and counted in ``dropped``; the
    rest is kept.

    Raises:
        DomainInputError: nothing usable was found; the message lists the problems by key.
    """
    result = scan_source(source)
    for plan in result.plans:
        series = read_planned_series(result, plan)
        if series is not None:
            result.series.append(series)
    if not result.series:
        raise DomainInputError(result.tag, _nothing_usable(result, len(result.files)))
    return result

"""Segmentation masks for a source: which mask labels which series, read in the image's voxel grid.

``--labels`` for a segmentation dataset is one of:

* a **NIfTI file** (``.nii``/``.nii.gz``): the mask of the source's only volume (the source must hold exactly
  one series);
* a **folder** of NIfTI masks laid out like the source: the mask of source file ``A/B/ct.nii.gz`` is
  ``MASKS/A/B/ct.nii.gz`` (``.nii`` and ``.nii.gz`` are interchangeable);
* a **CSV** with a ``mask`` column (path of a NIfTI mask, relative to the CSV's folder) and one key per row:
  ``file`` (path relative to the source folder, ``/`` separators; for a DICOM series any one of its files)
  or ``series_uid`` (the original SeriesInstanceUID of a DICOM series).

A mask is an integer NIfTI on the voxels of the image it labels: same voxel size and field of view, in any
axis order (it is permuted/flipped onto the image's grid exactly, never interpolated); voxel value = class
id, 0 = background. Series without a mask stay unlabelled. Mask paths are hashed as soon as they are read,
like every other key: errors name the mask by ``f-<keyed hash>`` (and CSV row), never by its path.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from domains.radiology.deidentify import pseudonym
from domains.radiology.geometry import VoxelGrid, onto_grid, same_grid, series_grid
from domains.radiology.nifti_reader import NIFTI_SUFFIXES, is_nifti
from domains.radiology.series import Series
from domains.spec import DomainInputError

MASK_COLUMN = "mask"
MASK_KEY_COLUMNS = {"file": "file", "series_uid": "series"}
DEFAULT_SEGMENTATION_CLASSES = ("background", "lesion")
MAX_DEFAULT_CLASSES = 16
"""Without ``--class-names`` mask values must be 0..15 (a value like 255 is almost always a mistake)."""


@dataclass
class MaskTable:
    """Mask files by the pseudonymous key of what they label (file key or series key)."""

    masks: dict[str, tuple[Path, str]] = field(default_factory=dict)
    """key -> (mask path, how to name it in messages: ``mask f-<hash>`` plus the CSV row if any)."""
    single: tuple[Path, str] | None = None
    """A lone mask file: it labels the source's only series."""
    used: set[str] = field(default_factory=set)

    def mask_for(self, series: Series) -> tuple[Path, str] | None:
        for key in [*series.file_keys, series.series]:
            if key in self.masks:
                self.used.add(self.masks[key][1])
                return self.masks[key]
        return None

    def unused(self) -> list[str]:
        """Names of masks (``mask f-<hash>``) that labelled no series."""
        return sorted({name for _, name in self.masks.values()} - self.used)


def _mask_name(relative: str) -> str:
    return "mask " + pseudonym("file", "mask:" + relative)


def is_mask_labels(path: Path) -> bool:
    """Whether ``--labels`` names masks (a NIfTI file, a folder, a CSV with a ``mask`` column), not findings."""
    path = Path(path)
    if path.is_dir() or is_nifti(path):
        return True
    if path.is_file() and path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
        return MASK_COLUMN in {h.strip() for h in header}
    return False


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_mask_table(labels: Path) -> MaskTable:
    """Index the masks of ``labels`` (file, folder or CSV; see the module docstring) by pseudonymous key.

    Raises:
        DomainInputError: a missing file, a CSV without a key column, a row without exactly one key or
            naming a missing mask, a repeated key, an empty folder or CSV.
    """
    labels = Path(labels)
    if not labels.exists():
        raise DomainInputError(labels, "masks not found")
    if labels.is_file() and is_nifti(labels):
        return MaskTable(single=(labels, _mask_name(labels.name)))
    table = MaskTable()
    if labels.is_dir():
        for path in sorted(labels.rglob("*")):
            relative = PurePosixPath(path.relative_to(labels).as_posix())
            if not path.is_file() or not is_nifti(path) or any(p.startswith(".") for p in relative.parts):
                continue
            stem = relative.parent / _strip_nifti(relative.name)
            for suffix in NIFTI_SUFFIXES:  # ct.nii labels ct.nii.gz and the reverse
                table.masks.setdefault(pseudonym("file", f"{stem.as_posix()}{suffix}"), (path, _mask_name(relative.as_posix())))
        if not table.masks:
            raise DomainInputError(labels, "no NIfTI mask (.nii, .nii.gz) in the masks folder")
        return table
    with labels.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    keys = [h for h in header if h in MASK_KEY_COLUMNS]
    if MASK_COLUMN not in header or not keys:
        raise DomainInputError(labels, f"a masks CSV needs a {MASK_COLUMN!r} column and one of {', '.join(MASK_KEY_COLUMNS)}")
    rows_of: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        filled = [k for k in keys if row.get(k)]
        if len(filled) != 1 or not row.get(MASK_COLUMN):
            raise DomainInputError(labels, f"row {number} must fill {MASK_COLUMN!r} and exactly one of {keys}")
        column, value = filled[0], row[filled[0]]
        key = pseudonym(MASK_KEY_COLUMNS[column], value.replace("\\", "/") if column == "file" else value)
        if key in rows_of:
            raise DomainInputError(labels, f"row {number} repeats the {column} of row {rows_of[key]}")
        mask = Path(row[MASK_COLUMN])
        mask = mask if mask.is_absolute() else labels.parent / mask
        name = f"{_mask_name(row[MASK_COLUMN])} (row {number})"
        if not mask.is_file() or not is_nifti(mask):
            raise DomainInputError(labels, f"row {number}: the mask is not a NIfTI file that exists")
        rows_of[key] = number
        table.masks[key] = (mask, name)
    if not table.masks:
        raise DomainInputError(labels, "the masks CSV has no rows")
    return table


def read_mask(path: Path, name: str, series: Series) -> np.ndarray:
    """The mask of ``series`` as (S, H, W) int16 class ids aligned with its slices.

    Raises:
        DomainInputError: naming the mask (``mask f-<hash>``) and the image (``series se-<hash>``): an
            unreadable mask, a series without a voxel grid, a different shape or affine (voxel size,
            position, orientation), non-integer, negative or non-finite values.
    """
    import nibabel as nib

    where = f"{name} of series {series.series}"
    grid: VoxelGrid | None = series_grid(series)
    if grid is None:
        raise DomainInputError(where, "masks label volumes or single images; this series is several separate 2D images")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        raise DomainInputError(where, f"unreadable NIfTI mask ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise DomainInputError(where, f"the mask has shape {data.shape}; expected a 3D volume")
    if not np.isfinite(data).all() or (data != np.round(data)).any():
        raise DomainInputError(where, "mask values must be integer class ids (0 = background)")
    try:
        aligned, aligned_affine = onto_grid(data, affine, grid)
    except Exception as exc:
        raise DomainInputError(where, f"the mask's affine cannot be oriented ({type(exc).__name__})") from None
    if aligned.shape != grid.shape or not same_grid(aligned_affine, grid.affine):
        raise DomainInputError(where, (
            f"the mask is not on the image's voxel grid: mask {tuple(data.shape)} voxels, "
            f"affine {np.round(affine, 3).tolist()}; image {grid.file_shape or grid.shape} voxels, affine "
            f"{np.round(grid.file_affine if grid.file_affine is not None else grid.affine, 3).tolist()} "
            "(draw or resample the mask on the image it labels)"))
    if aligned.min() < 0:
        raise DomainInputError(where, f"negative mask value {int(aligned.min())}; class ids start at 0 (background)")
    return np.ascontiguousarray(aligned.transpose(2, 1, 0)).astype(np.int16)


def segmentation_class_names(values: set[int], requested: tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    """Class names for the mask values seen: the requested ones, else background/lesion or label_<v>.

    Raises:
        DomainInputError: a value without a name (requested names too few, or above the default limit).
    """
    top = max(values, default=0)
    if requested:
        if top >= len(requested):
            unknown = sorted(v for v in values if v >= len(requested))
            raise DomainInputError(where, f"mask values {unknown} have no class name; --class-names gives "
                                          f"{len(requested)} names for values 0..{len(requested) - 1}")
        return tuple(requested)
    if top >= MAX_DEFAULT_CLASSES:
        raise DomainInputError(where, f"mask value {top} is above {MAX_DEFAULT_CLASSES - 1}; values are class ids "
                                      "0..K-1: remap the masks or give --class-names for every value")
    if top <= 1:
        return DEFAULT_SEGMENTATION_CLASSES
    return ("background", *(f"label_{v}" for v in range(1, top + 1)))

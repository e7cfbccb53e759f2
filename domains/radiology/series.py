"""Image series: frames of one SeriesInstanceUID (or one NIfTI volume) ordered along the slice normal."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from domains.spec import DomainInputError

# Relative tolerance on slice gaps and pixel spacings before a series counts as irregular.
SPACING_TOLERANCE = 0.1
ORIENTATION_TOLERANCE = 1e-3


@dataclass
class Frame:
    """One decoded 2D frame with its geometry, in modality units (HU for CT), float32 (H, W)."""

    pixels: np.ndarray
    file_key: str
    patient: str
    study: str
    series: str
    modality: str
    spacing_yx: tuple[float, float] | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    instance: int = 0
    frame: int = 0


@dataclass
class Series:
    """Frames of one series, in reading order.

    ``is_volume`` series were ordered by position along the slice normal and have one shape and spacing;
    other series (radiographs, frames without a position) are independent 2D images in instance order.
    ``spacing`` is (between slices, row, column) in mm, the first 0 for 2D images.
    """

    patient: str
    study: str
    series: str
    modality: str
    frames: list[Frame]
    is_volume: bool
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...] | None
    kind: str = "dicom"
    nifti_affine: np.ndarray | None = None
    """NIfTI series only: the file's own affine (4x4, RAS mm) and spatial shape, to write masks back in them."""
    nifti_shape: tuple[int, ...] | None = None
    canonical_affine: np.ndarray | None = None
    """NIfTI series only: the affine of the volume after reorientation to RAS (what the slices were cut from)."""

    @property
    def file_keys(self) -> list[str]:
        return [f.file_key for f in self.frames]


def _slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    return np.cross(row, col)


def _spacing_yx(frames: list[Frame]) -> tuple[float, float]:
    known = [f.spacing_yx for f in frames if f.spacing_yx]
    return known[0] if known else (1.0, 1.0)


def assemble_series(frames: list[Frame]) -> Series:
    """Build one series from its frames: order them and check that they form a regular volume.

    Frames that all carry a position and orientation are sorted by ``position . normal`` (normal = row x
    column direction of ImageOrientationPatient), never by file name or instance number, which scanners
    and exporters do not keep consistent. Such a series must share one orientation, image shape and pixel
    spacing and have evenly spaced, distinct slice positions. Frames without geometry, or in several
    orientations (localizers), stay separate 2D images ordered by instance and frame number.

    Raises:
        DomainInputError: named after the pseudonymous series key, when a volume is irregular.
    """
    first = frames[0]
    name = f"series {first.series}"
    with_geometry = all(f.position is not None and f.orientation is not None for f in frames)
    if with_geometry:
        orientations = np.array([f.orientation for f in frames], float)
        # Several orientations in one series is a localizer/scout (three planes): separate 2D images.
        with_geometry = np.abs(orientations - orientations[0]).max() <= ORIENTATION_TOLERANCE
    if not with_geometry or len(frames) == 1:
        ordered = sorted(frames, key=lambda f: (f.instance, f.frame))
        spacing_yx = _spacing_yx(ordered)
        return Series(first.patient, first.study, first.series, first.modality, ordered, False,
                      (0.0, *spacing_yx), first.orientation)
    shapes = Counter(f.pixels.shape for f in frames)
    if len(shapes) > 1:
        raise DomainInputError(name, f"its slices have mixed shapes {sorted(shapes)}")
    spacings = np.array([f.spacing_yx or (1.0, 1.0) for f in frames], float)
    if np.abs(spacings - spacings[0]).max() > SPACING_TOLERANCE * spacings[0].min():
        raise DomainInputError(name, f"its slices have mixed pixel spacings {sorted({tuple(s) for s in spacings.tolist()})}")
    normal = _slice_normal(first.orientation)
    depth = np.array([np.dot(f.position, normal) for f in frames])
    order = np.lexsort(([f.frame for f in frames], [f.instance for f in frames], depth))
    ordered = [frames[i] for i in order]
    gaps = np.diff(depth[order])
    if (gaps < 1e-3).any():
        raise DomainInputError(name, f"{int((gaps < 1e-3).sum())} slices share a position with another "
                                     "(several acquisitions or echoes in one series?)")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        raise DomainInputError(name, f"its slice gaps are uneven ({gaps.min():.3g} to {gaps.max():.3g} mm): "
                                     "missing slices or mixed spacings")
    return Series(first.patient, first.study, first.series, first.modality, ordered, True,
                  (median, float(spacings[0][0]), float(spacings[0][1])), first.orientation)

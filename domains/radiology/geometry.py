"""Voxel geometry of a series, so masks can be read in an image's grid and predicted masks written back in it.

A series' samples are its slices stacked as ``(S, H, W)`` (slice, row, column). The same voxels seen as a
NIfTI array are ``stack.transpose(2, 1, 0)`` (column, row, slice); :func:`series_grid` gives the RAS affine
of that array. Masks (NIfTI, in any orientation) are brought onto that grid by an exact axis permutation and
flip (no interpolation), and predicted masks go back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from domains.radiology.series import Series

AFFINE_TOLERANCE_MM = 0.01
"""Largest difference between two affines' entries (mm) still counted as the same voxel grid."""
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class VoxelGrid:
    """The ``(W, H, S)`` voxel array of a series and its RAS affine; for NIfTI also the file's own grid."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    file_affine: np.ndarray | None = None
    file_shape: tuple[int, ...] | None = None

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def series_grid(series: Series) -> VoxelGrid | None:
    """The voxel grid of a NIfTI series, a regular DICOM volume or a single DICOM image; None otherwise.

    NIfTI slices were cut from the RAS-canonical volume with columns and rows reversed (radiological
    display), so the grid's affine is the canonical affine composed with that flip. A DICOM volume's affine
    follows PS3.3 C.7.6.2.1.1 (first slice position, row/column direction cosines times the column/row
    spacings, slice step along the sorted positions), converted from LPS to RAS. A single DICOM image
    without thickness is given 1 mm along its normal; one without geometry a diagonal affine of its spacing.
    Several independent 2D images (radiographs, localizers) have no common grid.
    """
    height, width = series.frames[0].pixels.shape
    shape = (width, height, len(series.frames))
    if series.kind == "nifti" and series.canonical_affine is not None:
        flip = np.array([[-1.0, 0, 0, width - 1], [0, -1.0, 0, height - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
        return VoxelGrid(series.canonical_affine @ flip, shape, series.nifti_affine, series.nifti_shape)
    if not series.is_volume and len(series.frames) != 1:
        return None
    first, last = series.frames[0], series.frames[-1]
    spacing_y, spacing_x = first.spacing_yx or (1.0, 1.0)
    if first.position is None or first.orientation is None:
        return VoxelGrid(np.diag([spacing_x, spacing_y, 1.0, 1.0]), shape)
    row_direction = np.asarray(first.orientation[:3], float)
    column_direction = np.asarray(first.orientation[3:6], float)
    if len(series.frames) > 1:
        step = (np.asarray(last.position, float) - np.asarray(first.position, float)) / (len(series.frames) - 1)
    else:
        step = np.cross(row_direction, column_direction)
    lps = np.eye(4)
    lps[:3, 0] = row_direction * spacing_x
    lps[:3, 1] = column_direction * spacing_y
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return VoxelGrid(_LPS_TO_RAS @ lps, shape)


def _orientation_change(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    from nibabel.orientations import io_orientation, ornt_transform

    return ornt_transform(io_orientation(start), io_orientation(end))


def same_grid(affine: np.ndarray, other: np.ndarray) -> bool:
    return bool(np.allclose(affine, other, rtol=0.0, atol=AFFINE_TOLERANCE_MM))


def onto_grid(data: np.ndarray, affine: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip a 3D array with ``affine`` into the grid's axis order; returns (data, its new affine).

    The caller compares the returned shape and affine with the grid's (a different field of view or
    voxel size is not resampled: masks must be drawn on the image they label).
    """
    import nibabel as nib

    image = nib.Nifti1Image(data, affine).as_reoriented(_orientation_change(affine, grid.affine))
    return np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


def write_grid_mask(classes: np.ndarray, grid: VoxelGrid, path) -> tuple[tuple[int, ...], np.ndarray]:
    """Write a ``(S, H, W)`` class stack as a uint8 NIfTI in the input's own voxel grid.

    For a NIfTI input that is the input file's voxel order, shape and affine; for DICOM, the series' grid
    (columns, rows, slices along the sorted positions) with its RAS affine. Returns (shape, affine) written.
    """
    import nibabel as nib

    data = np.ascontiguousarray(classes.transpose(2, 1, 0)).astype(np.uint8)
    affine = grid.affine
    if grid.file_affine is not None:
        data, affine = onto_grid(data, grid.affine, VoxelGrid(grid.file_affine, grid.shape))
        if grid.file_shape is not None and len(grid.file_shape) == 2:
            data = data[:, :, 0] if data.shape[2] == 1 else data
        if same_grid(affine, grid.file_affine):
            affine = grid.file_affine  # exactly the input's, not a recomputed copy
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_data_dtype(np.uint8)
    nib.save(image, str(path))
    return tuple(int(n) for n in data.shape), affine

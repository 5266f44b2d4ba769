"""Checks of a study's geometry before anything is computed from it.

* `check_affine`: a voxel-to-world affine must be finite and invertible (else nibabel's
  orientation code fails with `LinAlgError: SVD did not converge` or an IndexError).
* `obliquity_warning`: voxel axes more than `OBLIQUE_WARN_DEG` from the scanner axes are a row
  warning with the angle: the models' slices follow the voxel axis nearest superior-inferior,
  never resampled, so past 45 degrees of tilt the axis that is sliced is not the acquisition's
  (the warning says which axis is sliced).
* `check_slice_positions`: a DICOM series' slices must share one orientation and be evenly
  spaced along its normal (a gap, a duplicate, a slice turned round is an error naming the
  positions and files), since the volume puts slice k at k x spacing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from pipeline.errors import DataError

__all__ = [
    "OBLIQUE_WARN_DEG",
    "ORIENTATION_TOLERANCE",
    "SLICE_STEP_TOLERANCE",
    "check_affine",
    "check_slice_positions",
    "obliquity_deg",
    "obliquity_warning",
]

OBLIQUE_WARN_DEG = 5.0  # beyond a few degrees the slices are no longer the axial ones a reader expects
SLICE_STEP_TOLERANCE = 0.01  # relative: steps may differ from the median step by 1 % (rounded positions)
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of two slices of one series


def check_affine(affine: np.ndarray, files: Sequence[str | os.PathLike], what: str = "volume") -> np.ndarray:
    """`affine` as float64 4x4 when it is finite with independent voxel axes; DataError otherwise."""
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"{what} affine must be 4x4, got {affine.shape}", files)
    if not np.isfinite(affine).all():
        raise DataError(f"{what} affine holds NaN or infinite values: no voxel-to-world geometry", files)
    columns = affine[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    # the determinant of the unit columns: 1 for orthogonal axes, 0 when two coincide or one is 0
    unit = columns / np.where(norms > 0, norms, 1.0)
    if norms.min() <= 0 or abs(float(np.linalg.det(unit))) < 1e-6:
        raise DataError(
            f"{what} affine is singular (voxel sizes {np.round(norms, 6).tolist()} mm, voxel axes not "
            "independent): no voxel-to-world geometry",
            files,
        )
    return affine


def obliquity_deg(affine: np.ndarray) -> float:
    """The largest angle in degrees between a voxel axis and its nearest world axis."""
    import nibabel as nib

    return float(np.degrees(np.max(np.abs(nib.affines.obliquity(np.asarray(affine, np.float64))))))


def obliquity_warning(affine: np.ndarray, slice_axis: int) -> str | None:
    """A row warning for an oblique acquisition (above `OBLIQUE_WARN_DEG`), else None: the angle,
    the voxel axis the models slice along and how far it is from superior-inferior."""
    angle = obliquity_deg(affine)
    if angle <= OBLIQUE_WARN_DEG:
        return None
    column = np.asarray(affine, np.float64)[:3, slice_axis]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(column[2]) / np.linalg.norm(column)))))
    stored = "" if slice_axis == 2 else " (the file stacks its slices along axis 2)"
    return (
        f"oblique acquisition: voxel axes up to {angle:.1f} degrees from the scanner axes; the models "
        f"see slices along voxel axis {slice_axis}{stored}, {tilt:.1f} degrees from superior-inferior, "
        "not resampled"
    )


def _mm(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.6g}" for v in values)


def _names(files: Sequence[str | os.PathLike]) -> str:
    """File names for the first line of a message (a row shows only that line)."""
    return ", ".join(os.path.basename(os.fspath(f)) for f in files)


def check_slice_positions(
    positions: np.ndarray, orientations: np.ndarray, files: Sequence[str | os.PathLike],
    what: str = "DICOM series",
) -> np.ndarray:
    """The order of a series' slices along their normal, after checking they form one even stack.

    positions: (N, 3) ImagePositionPatient; orientations: (N, 6) ImageOrientationPatient.
    Returns the indices sorting the slices by position along the first slice's normal. Raises
    DataError naming the files for a slice of another orientation (tilted or turned round), two
    slices at one position, or uneven steps (a gap: missing slices).
    """
    positions, orientations = np.asarray(positions, np.float64), np.asarray(orientations, np.float64)
    off = np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE)
    if off.size:
        raise DataError(
            f"{what}: {off.size} slice(s) with another orientation than the first (row/column "
            f"directions {_mm(orientations[off[0]])} against {_mm(orientations[0])}: "
            f"{_names([files[i] for i in off[:5]])}): tilted or turned round",
            [files[i] for i in off[:5]],
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, named = along[order], [files[i] for i in order]
    steps = np.diff(along)
    if steps.size == 0:
        return order
    step = float(np.median(steps))
    same = np.flatnonzero(steps <= max(1e-3, SLICE_STEP_TOLERANCE * step))
    if same.size:
        i = int(same[0])
        raise DataError(f"{what}: two slices at one position ({along[i]:.6g} mm along the normal: "
                        f"{_names([named[i], named[i + 1]])})",
                        [named[i], named[i + 1]])
    uneven = np.flatnonzero(np.abs(steps - step) > SLICE_STEP_TOLERANCE * step)
    if uneven.size:
        pairs = "; ".join(f"{along[i]:.6g} -> {along[i + 1]:.6g} mm ({_names([named[i], named[i + 1]])})"
                          for i in uneven[:5])
        raise DataError(
            f"{what}: slice positions are not evenly spaced (steps of {step:.6g} mm, but {pairs} "
            f"along the normal; positions {_mm(along)}): missing or misplaced slices",
            [f for i in uneven[:5] for f in (named[i], named[i + 1])],
        )
    return order

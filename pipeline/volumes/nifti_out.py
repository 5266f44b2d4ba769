"""Masks back to a viewer: the predicted mask as a NIfTI on the input's grid, and what it measures.

`write_mask_nifti` writes uint8 0/1 voxels in the input's own voxel order with the input's
affine (as both sform and qform, code 1 "scanner"), so 3D Slicer, ITK-SNAP or nibabel lay it
over the scan it was predicted on; `.nii.gz` is gzip-compressed. Written atomically.

`measure_study` reports on that input grid: tumour voxels, millilitres (voxels x the product of
the voxel spacing in mm / 1000; None for inputs without geometry), the range of input slice
indices holding tumour along the slice axis and the 3D bounding box in input voxel indices,
both with exclusive ends (`mask[i0:i1, j0:j1, k0:k1]` holds the tumour).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.io_utils import atomic_write_bytes
from pipeline.volumes.volume import Volume

__all__ = ["StudyMeasures", "mask_image", "measure_study", "write_mask_nifti"]


@dataclass(frozen=True)
class StudyMeasures:
    """A study's predicted tumour on the input grid (module docstring)."""

    voxels: int
    volume_ml: float | None
    slice_range: tuple[int, int] | None  # [first, last + 1) along the input's slice axis
    bbox: tuple[int, int, int, int, int, int] | None  # (i0, j0, k0, i1, j1, k1), ends exclusive

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("slice_range", "bbox"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


def measure_study(mask: np.ndarray, volume: Volume) -> StudyMeasures:
    """Measure a mask (X, Y, Z) on `volume`'s grid."""
    mask = np.asarray(mask) > 0
    voxels = int(mask.sum())
    volume_ml = None if volume.nominal_geometry else round(voxels * volume.voxel_volume_ml, 4)
    if not voxels:
        return StudyMeasures(voxels=0, volume_ml=volume_ml, slice_range=None, bbox=None)
    starts, ends = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        starts.append(int(present[0]))
        ends.append(int(present[-1]) + 1)
    axis = volume.slice_axis
    return StudyMeasures(
        voxels=voxels,
        volume_ml=volume_ml,
        slice_range=(starts[axis], ends[axis]),
        bbox=(*starts, *ends),
    )


def mask_image(mask: np.ndarray, volume: Volume):
    """A nibabel Nifti1Image of `mask` (uint8 0/1, the input's shape) with `volume`'s affine."""
    import nibabel as nib

    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} is not the input grid {volume.shape}")
    image = nib.Nifti1Image(mask, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"lgg-pipeline predicted tumour mask (0/1)"
    return image


def write_mask_nifti(path: str | os.PathLike, mask: np.ndarray, volume: Volume) -> None:
    """Write `mask` as a NIfTI at `path` (`.nii` or `.nii.gz`) on `volume`'s grid, atomically."""
    data = mask_image(mask, volume).to_bytes()
    if str(path).lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)

"""The one volume type: a patient's co-registered three-channel study with its geometry.

A `Volume` holds what the models need and what a viewer needs to put a mask back over the scan:

* `data`: (X, Y, Z, 3), the voxels in the input's own array order (the file's voxel axes), the
  three channels the models expect last, in `CHANNELS` order (pre-contrast, FLAIR,
  post-contrast). Any numeric dtype; `pipeline.volumes.domain` maps it to the models' 8 bits.
* `affine`: 4x4, voxel index (i, j, k) -> world millimetres in RAS+ (the NIfTI convention:
  +x right, +y anterior, +z superior). DICOM geometry (LPS) is converted on reading.
* `slice_axis`: the voxel axis closest to superior-inferior (derived from the affine); the models
  see one slice per index along it.
* `spacing`: millimetres per voxel along each axis (the affine's column lengths).
* `nominal_geometry`: True when the input carried no geometry (Kaggle TIFF slices): the affine is
  a 1 mm stand-in in the models' orientation, and no volume in millilitres is reported.
* `notes`: what the reader noticed and the rows should say (outliers left out of the intensity
  scale); `warnings` adds what the geometry says (an oblique acquisition).
* `skipped`: files of the study's folders that were left out, each with why (a FIFO named
  `.dcm`, an unreadable file): each becomes its own error row.

Readers convert each channel to the models' 8 bits as soon as it is read
(`pipeline.volumes.intensity`), so `data` is uint8 from every built-in reader and a study never
holds more than one channel in its stored dtype (`MAX_CHANNEL_BYTES`).

Every reader checks the same limits here (`check_shape`, `check_finite`, `from_channels`), so a
bad study is a `DataError` naming its files whatever its format.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.preprocessing import CHANNELS
from pipeline.volumes.geometry import check_affine, obliquity_warning

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CHANNELS",
    "MAX_CHANNEL_BYTES",
    "MAX_IN_PLANE",
    "MAX_SLICES",
    "MAX_VOXELS",
    "Volume",
    "check_bytes",
    "check_finite",
    "check_shape",
    "from_channels",
    "slice_axis_of",
]

MAX_SLICES = 1024  # more slices along one axis is not one MRI study
MAX_IN_PLANE = 2048  # an in-plane side above this is not an MRI slice
MAX_VOXELS = 512 * 512 * 512  # per channel: ~0.5 GB as float32, x3 channels, before any work
# The decompressed size of one channel as read (stored dtype, or float64 when the file scales it):
# 512^3 float64. A study's peak is about one channel at this size plus the three channels in
# uint8 (3 x 128 MiB at 512^3) and its model slices (256 x 256 x 3 bytes each).
MAX_CHANNEL_BYTES = 1 << 30
AFFINE_TOLERANCE_MM = 1e-3  # channels whose voxel-to-world maps differ more are not co-registered


@dataclass(frozen=True, eq=False)
class Volume:
    """A co-registered study: `data` (X, Y, Z, 3) in channel order `CHANNELS`, `affine` voxel -> RAS mm."""

    data: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    study_id: str
    files: tuple[Path, ...] = ()
    format: str = ""
    nominal_geometry: bool = False
    notes: tuple[str, ...] = ()
    skipped: tuple[tuple[Path, str], ...] = ()

    def __post_init__(self) -> None:
        if self.data.ndim != 4 or self.data.shape[-1] != len(CHANNELS):
            raise ValueError(f"Volume data must be (X, Y, Z, {len(CHANNELS)}), got {self.data.shape}")
        affine = np.asarray(self.affine, np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got {affine.shape}")
        object.__setattr__(self, "affine", check_affine(affine, self.files[:1], self.format or "volume"))

    @property
    def warnings(self) -> tuple[str, ...]:
        """The reader's `notes`, then an obliquity warning (`geometry.obliquity_warning`)."""
        oblique = None if self.nominal_geometry else obliquity_warning(self.affine, self.slice_axis)
        return (*self.notes, *([oblique] if oblique else []))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z) of the input grid."""
        return tuple(int(n) for n in self.data.shape[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each voxel axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        """Millilitres per voxel: product of the spacing in mm / 1000."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def slice_axis(self) -> int:
        """The voxel axis closest to superior-inferior."""
        return slice_axis_of(self.affine)

    @property
    def source(self) -> Path | None:
        """The first file or folder the study was read from (the FLAIR source for a trio)."""
        return self.files[0] if self.files else None


def slice_axis_of(affine: np.ndarray, files: Sequence[str | os.PathLike] = ()) -> int:
    """The voxel axis of `affine` nearest the world's superior-inferior axis (DataError naming
    `files` for an affine that is not finite and invertible)."""
    import nibabel as nib

    affine = check_affine(affine, files)
    ornt = nib.orientations.io_orientation(np.asarray(affine, np.float64))
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def check_shape(
    shape: Sequence[int],
    files: Sequence[str | os.PathLike],
    what: str = "volume",
    slice_axis: int | None = None,
) -> None:
    """Refuse a 2D image and a volume above the named caps (`MAX_IN_PLANE` per side,
    `MAX_SLICES` along `slice_axis`, `MAX_VOXELS` per channel), before its voxels are read."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3 or sum(1 for n in shape[:3] if n > 1) < 2:
        raise DataError(f"{what} is 2D (shape {shape}); a study needs three spatial axes", files)
    spatial = shape[:3]
    if min(spatial) < 1:
        raise DataError(f"{what} is empty (shape {shape})", files)
    if max(spatial) > MAX_IN_PLANE:
        raise DataError(f"{what} too large (shape {shape}; at most {MAX_IN_PLANE} voxels a side)", files)
    if slice_axis is not None and spatial[slice_axis] > MAX_SLICES:
        raise DataError(f"{what} too large ({spatial[slice_axis]} slices; at most {MAX_SLICES})", files)
    voxels = int(np.prod(spatial, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise DataError(f"{what} too large ({voxels:,} voxels per channel; at most {MAX_VOXELS:,})", files)


def check_bytes(
    shape: Sequence[int], itemsize: int, files: Sequence[str | os.PathLike], what: str = "volume"
) -> None:
    """Refuse a channel whose decompressed size (voxels x `itemsize`) exceeds `MAX_CHANNEL_BYTES`,
    before its voxels are read (the header says both)."""
    size = int(np.prod([int(n) for n in shape[:3]], dtype=np.int64)) * int(itemsize)
    if size > MAX_CHANNEL_BYTES:
        raise DataError(
            f"{what} too large ({size / 2**30:.2f} GiB per channel decompressed, {itemsize} bytes a voxel; "
            f"at most {MAX_CHANNEL_BYTES / 2**30:.0f} GiB)",
            files,
        )


def check_finite(data: np.ndarray, files: Sequence[str | os.PathLike], what: str = "volume") -> None:
    """DataError when `data` holds NaN or infinite voxels (says how many)."""
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise DataError(f"{what} has {bad:,} NaN or infinite voxels", files)


def from_channels(
    channels: dict[str, tuple[np.ndarray, np.ndarray, Path]],
    study_id: str,
    format: str,
    tolerance_mm: float = AFFINE_TOLERANCE_MM,
) -> Volume:
    """Stack three co-registered channel volumes into a Volume.

    channels: channel name (each of `CHANNELS`) -> (3D array, 4x4 RAS affine, its file or folder).
    Raises DataError naming the files for a missing channel, or channels of different shapes or
    affines (more than `tolerance_mm` apart in any element: not co-registered).
    """
    missing = [name for name in CHANNELS if name not in channels]
    files = [channels[name][2] for name in CHANNELS if name in channels]
    if missing:
        raise DataError(f"missing channel {', '.join(missing)}: a study needs {', '.join(CHANNELS)}", files)
    arrays = [np.asarray(channels[name][0]) for name in CHANNELS]
    affines = [np.asarray(channels[name][1], np.float64) for name in CHANNELS]
    shapes = {name: a.shape for name, a in zip(CHANNELS, arrays, strict=True)}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DataError(f"channels have different shapes ({listed}): not co-registered", files)
    for name, affine in zip(CHANNELS, affines, strict=True):
        gap = float(np.abs(affine - affines[1]).max())
        if gap > tolerance_mm:
            raise DataError(
                f"{name} and FLAIR have different affines (up to {gap:.3g} mm apart, tolerance "
                f"{tolerance_mm} mm): not co-registered",
                files,
            )
    dtype = np.result_type(*arrays)
    data = np.stack([a.astype(dtype, copy=False) for a in arrays], axis=-1)
    flair_file = channels["FLAIR"][2]
    ordered = (flair_file, *(f for f in files if f != flair_file))
    return Volume(data=data, affine=affines[1], study_id=study_id, files=ordered, format=format)

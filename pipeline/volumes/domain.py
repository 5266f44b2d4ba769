"""From a `Volume` to the models' domain (256x256 uint8 axial slices) and from their masks back.

Three steps, each undone exactly for the masks (`ModelGrid.mask_to_input`):

1. **Orientation.** The voxel axes are permuted and flipped (no interpolation) to `MODEL_AXCODES`
   = (P, L, S), the dataset's layout: rows run anterior -> posterior, columns patient right ->
   left (radiological view), slices inferior -> superior (Kaggle slice 1 is the most inferior).
   Axes are matched to the nearest world axis (nibabel `io_orientation`); an oblique
   acquisition is not resampled. The slice axis is the superior-inferior one, one model slice
   per input slice.
2. **In-plane grid.** Each slice is scaled so that its longer side *in millimetres* spans
   `MODEL_SIZE` pixels (aspect kept, also for anisotropic pixels; bicubic, as the dataset was
   resized) and zero-padded, centred, to `MODEL_SIZE` x `MODEL_SIZE`: the dataset's slices are
   256x256 with a zero background. A slice already 256x256 with square pixels is not touched.
   Masks go back by cutting the padding and nearest-neighbour resizing (`INTER_NEAREST_EXACT`).
3. **Intensity** (`pipeline.volumes.intensity`), per volume and per channel: a uint8 channel is
   used as stored (the models' own range, so a Kaggle study stacked into a uint8 NIfTI gives
   exactly its slices); any other dtype is mapped linearly from its minimum..maximum to 0..255,
   outliers far beyond the channel's typical range left out (clipped, with a warning), which is
   what the dataset's 8-bit volumes show (minimum 0, maximum reached by a single voxel). The
   readers do it channel by channel as they read; `model_volume` does it for any other Volume.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.volumes.intensity import intensity_scale, to_uint8
from pipeline.volumes.volume import CHANNELS, Volume

__all__ = [
    "MODEL_AXCODES",
    "MODEL_SIZE",
    "ModelGrid",
    "apply_range",
    "intensity_range",
    "model_grid",
    "model_volume",
    "to_8bit",
    "to_model_slices",
]

MODEL_AXCODES = ("P", "L", "S")
MODEL_SIZE = 256


def intensity_range(channel: np.ndarray) -> tuple[float, float] | None:
    """The linear map of `to_8bit` for one channel volume: None for uint8 (as stored), else
    (low, high) mapped to 0..255 (`intensity.intensity_scale`: outliers left out)."""
    scale = intensity_scale(channel)
    return None if scale.low is None else (scale.low, scale.high)


def apply_range(values: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """`values` (any part of a channel) -> float32 0..255 with the channel's `intensity_range`."""
    from pipeline.volumes.intensity import IntensityScale

    return IntensityScale(*(bounds or (None, None))).apply(values)


def to_8bit(channel: np.ndarray) -> np.ndarray:
    """One channel volume -> float32 in 0..255, unrounded (module docstring, step 3).

    uint8: unchanged. bool: 0/255. Any other dtype: (x - low) / (high - low) * 255 with the
    channel's robust `intensity_range`, clipped to 0..255; a constant channel becomes 0.
    """
    return apply_range(channel, intensity_range(channel))


def model_volume(volume: Volume) -> Volume:
    """`volume` with uint8 data in the models' range (itself when it is uint8 already), channel by
    channel; outliers left out of a channel's scale are added to its `notes`."""
    if volume.data.dtype == np.uint8:
        return volume
    data = np.empty(volume.data.shape, np.uint8)
    notes = list(volume.notes)
    for c, name in enumerate(CHANNELS):
        channel = volume.data[..., c]
        scale = intensity_scale(channel, volume.files[:1], name)
        to_uint8(channel, scale, data[..., c])
        warning = scale.warning(name)
        notes += [warning] if warning else []
    return replace(volume, data=data, notes=tuple(notes))


@dataclass(frozen=True)
class ModelGrid:
    """How one input grid maps to the models' slices: orientation, scaling, padding.

    input_shape: (X, Y, Z) of the input voxels.
    input_ornt: the input axes' orientation (nibabel `io_orientation` of its affine).
    to_model: nibabel orientation transform, input axes -> `MODEL_AXCODES`.
    oriented_shape: (rows, cols, slices) after reorientation.
    scaled: (rows, cols) of a slice after in-plane scaling (one of them `size`).
    offset: (top, left) of the scaled slice inside the padded `size` x `size` slice.
    """

    input_shape: tuple[int, int, int]
    input_ornt: np.ndarray
    to_model: np.ndarray
    oriented_shape: tuple[int, int, int]
    scaled: tuple[int, int]
    offset: tuple[int, int]
    size: int = MODEL_SIZE

    @property
    def n_slices(self) -> int:
        return self.oriented_shape[2]

    @property
    def resized(self) -> bool:
        return self.scaled != self.oriented_shape[:2]

    def input_slice(self, k: int) -> int:
        """The input's index along its slice axis of model slice `k`."""
        axis = int(np.flatnonzero(self.to_model[:, 0] == 2)[0])
        flipped = self.to_model[axis, 1] < 0
        return self.input_shape[axis] - 1 - k if flipped else k

    def orient(self, array: np.ndarray) -> np.ndarray:
        """Input voxel order -> model orientation (trailing axes, e.g. channels, kept)."""
        import nibabel as nib

        return nib.orientations.apply_orientation(array, self.to_model)

    def unorient(self, array: np.ndarray) -> np.ndarray:
        """Model orientation -> input voxel order."""
        import nibabel as nib

        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(MODEL_AXCODES), self.input_ornt)
        return nib.orientations.apply_orientation(array, back)

    def to_slice(self, oriented_slice: np.ndarray) -> np.ndarray:
        """One reoriented slice (rows, cols[, C]) float -> the padded model slice (size, size[, C])."""
        import cv2

        image = oriented_slice
        if self.resized:
            h, w = self.scaled
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
            if image.ndim < oriented_slice.ndim:
                image = image[..., None]
        out = np.zeros((self.size, self.size, *oriented_slice.shape[2:]), np.float32)
        top, left = self.offset
        out[top : top + image.shape[0], left : left + image.shape[1]] = image
        return out

    def mask_to_input(self, masks: np.ndarray) -> np.ndarray:
        """Model masks (slices, size, size) -> uint8 mask (X, Y, Z) on the input grid (nearest neighbour)."""
        import cv2

        masks = np.asarray(masks)
        if masks.shape != (self.n_slices, self.size, self.size):
            raise ValueError(f"masks must be {(self.n_slices, self.size, self.size)}, got {masks.shape}")
        top, left = self.offset
        h, w = self.scaled
        rows, cols, n = self.oriented_shape
        oriented = np.zeros((rows, cols, n), np.uint8)
        for k in range(n):
            crop = np.ascontiguousarray(masks[k, top : top + h, left : left + w].astype(np.uint8))
            if self.resized:
                crop = cv2.resize(crop, (cols, rows), interpolation=cv2.INTER_NEAREST_EXACT)
            oriented[:, :, k] = crop
        return np.ascontiguousarray(self.unorient(oriented))


def model_grid(volume: Volume, size: int = MODEL_SIZE) -> ModelGrid:
    """The `ModelGrid` of `volume`: its reorientation, in-plane scaling and padding."""
    import nibabel as nib

    current = nib.orientations.io_orientation(volume.affine)
    to_model = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(MODEL_AXCODES))
    shape = volume.shape
    oriented = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for a, (target, _) in enumerate(to_model):
        oriented[int(target)] = shape[a]
        spacing[int(target)] = volume.spacing[a]
    rows, cols = oriented[0], oriented[1]
    extent_r, extent_c = rows * spacing[0], cols * spacing[1]
    if rows == size and cols == size and np.isclose(spacing[0], spacing[1]):
        scaled = (rows, cols)
    else:
        per_mm = size / max(extent_r, extent_c)
        scaled = (
            min(size, max(1, int(round(extent_r * per_mm)))),
            min(size, max(1, int(round(extent_c * per_mm)))),
        )
    offset = ((size - scaled[0]) // 2, (size - scaled[1]) // 2)
    return ModelGrid(
        input_shape=shape,
        input_ornt=current,
        to_model=to_model,
        oriented_shape=tuple(oriented),
        scaled=scaled,
        offset=offset,
        size=size,
    )


def to_model_slices(volume: Volume, grid: ModelGrid | None = None) -> tuple[list[np.ndarray], ModelGrid]:
    """`volume` -> (model slices uint8 (size, size, 3) inferior to superior, its ModelGrid).

    Intensity per channel over the whole volume (`model_volume`, a no-op for what the readers
    return), then reorientation, then each slice scaled and padded; values clipped to 0..255 and
    rounded.
    """
    volume = model_volume(volume)
    grid = grid or model_grid(volume)
    oriented = grid.orient(volume.data)  # flips and transposes: a view, not a copy
    slices = []
    for k in range(grid.n_slices):
        image = grid.to_slice(oriented[:, :, k, :].astype(np.float32))
        slices.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return slices, grid

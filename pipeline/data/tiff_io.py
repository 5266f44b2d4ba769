"""The dataset's strict checks on top of the slice readers: an LGG image is uint8 (H, W, 3), a mask 0/255.

Decoding is `pipeline.data.readers.read_array` (the one TIFF reader, `TiffReader`, shared with
inference); this module only validates what the training index and the array cache accept.
Inference reads user files with the tolerant `pipeline.inference.image_loading.load_slice`
(greyscale, alpha, other bit depths converted) through the same readers. Images come back in
*file* channel order (pre-contrast, FLAIR, post-contrast): `tifffile` does not reorder channels
(unlike `cv2.imread`, which returns BGR).
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.data.readers import TiffReader, read_array
from pipeline.errors import DataError
from pipeline.preprocessing import MASK_THRESHOLD, binarize_mask

__all__ = ["read_image", "read_mask", "read_pair", "tiff_shape"]


def _check_uint8(array: np.ndarray, path: str | os.PathLike, what: str) -> None:
    if array.dtype != np.uint8:
        raise DataError(f"wrong dtype for {what}: {array.dtype} (expected uint8)", [path])


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one MRI slice TIFF -> uint8 array (H, W, 3) in file channel order.

    Raises DataError naming `path` for unreadable, truncated or zero-byte files, a shape other
    than (H, W, 3), or a dtype other than uint8.
    """
    image = read_array(path)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"wrong shape for image: {image.shape} (expected H x W x 3)", [path])
    _check_uint8(image, path, "image")
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read one mask TIFF -> uint8 array (H, W) of 0/1 (values > 127 are tumour).

    Accepts (H, W), (H, W, 1) or (H, W, 3) with identical channels. Raises DataError naming
    `path` for unreadable files, other shapes, differing channels, a dtype other than uint8,
    or a mask whose non-zero values all lie in 1..127 (e.g. 0/1 labels), which binarising
    would silently turn into an empty mask.
    """
    mask = read_array(path)
    if mask.ndim == 3 and mask.shape[-1] in (1, 3):
        if mask.shape[-1] == 3 and not (
            np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])
        ):
            raise DataError(f"mask has {mask.shape[-1]} channels that differ (expected one)", [path])
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise DataError(f"wrong shape for mask: {mask.shape} (expected H x W)", [path])
    _check_uint8(mask, path, "mask")
    peak = int(mask.max())
    if 0 < peak <= MASK_THRESHOLD:
        raise DataError(
            f"mask values go up to {peak} only; expected 0/255 (values > {MASK_THRESHOLD} are tumour)",
            [path],
        )
    return binarize_mask(mask)


def read_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its mask -> (uint8 (H, W, 3), uint8 (H, W) 0/1); DataError if their sizes differ."""
    image = read_image(image_path)
    mask = read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"image is {image.shape[0]}x{image.shape[1]} but its mask is {mask.shape[0]}x{mask.shape[1]}",
            [image_path, mask_path],
        )
    return image, mask


def tiff_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of a TIFF's first page read from its header only (no pixel decoding)."""
    return TiffReader().shape(path)

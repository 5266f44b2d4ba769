"""Reading the dataset's TIFF slices and masks with validation; the one reader training and inference share.

Images come back in *file* channel order (pre-contrast, FLAIR, post-contrast) because
`tifffile` does not reorder channels (unlike `cv2.imread`, which returns BGR).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tifffile

from pipeline.errors import DataError
from pipeline.preprocessing import MASK_THRESHOLD, binarize_mask

__all__ = ["read_image", "read_mask", "read_pair", "tiff_shape"]


def _decode(path: str | os.PathLike) -> np.ndarray:
    """Decode the first page of a TIFF; any failure becomes a DataError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot open TIFF ({exc.strerror or exc})", [path]) from exc
    if size == 0:
        raise DataError("empty (zero-byte) TIFF file", [path])
    # tifffile logs (rather than raises) some structural problems; they surface below as
    # decode errors or empty arrays, so keep its logger quiet during the read.
    tiff_logger = logging.getLogger("tifffile")
    level = tiff_logger.level
    tiff_logger.setLevel(logging.CRITICAL)
    try:
        array = tifffile.imread(path)
    except Exception as exc:  # tifffile/zlib raise many types for damaged files
        raise DataError(f"unreadable or truncated TIFF ({type(exc).__name__}: {exc})", [path]) from exc
    finally:
        tiff_logger.setLevel(level)
    if array.size == 0:
        raise DataError("unreadable or truncated TIFF (no pixel data)", [path])
    return array


def _check_uint8(array: np.ndarray, path: str | os.PathLike, what: str) -> None:
    if array.dtype != np.uint8:
        raise DataError(f"wrong dtype for {what}: {array.dtype} (expected uint8)", [path])


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one MRI slice TIFF -> uint8 array (H, W, 3) in file channel order.

    Raises DataError naming `path` for unreadable, truncated or zero-byte files, a shape other
    than (H, W, 3), or a dtype other than uint8.
    """
    image = _decode(path)
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
    mask = _decode(path)
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
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.pages[0].shape)
    except Exception as exc:
        raise DataError(f"unreadable TIFF header ({type(exc).__name__}: {exc})", [path]) from exc

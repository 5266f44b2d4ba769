"""Reading user-supplied slices (TIFF, PNG, JPEG) into the dataset's format, and finding them.

`load_slice` returns what the models expect: uint8 (H, W, 3), channels in *file* order
(pre-contrast, FLAIR, post-contrast for the dataset's TIFFs). The file is decoded by its
registered reader (`pipeline.data.readers`: TIFF with `tifffile`, PNG/JPEG with Pillow, both of
which keep the file's channel order; OpenCV would give BGR), the same readers the training
index uses; this module converts what they return.

Conversions, applied in this order:
* greyscale (H, W) or (H, W, 1) -> the one channel replicated three times;
* an alpha channel (RGBA, grey + alpha) is dropped; palette/CMYK/YCbCr images become RGB;
* channels-first TIFFs (3, H, W) are moved to channels-last;
* any dtype other than uint8 (16-bit, 32-bit, float, bool) is rescaled linearly with the
  *image's own* min..max to 0..255 (a constant image becomes 0). Per-image scaling rather than
  `>> 8` because 16-bit MRI exports rarely use the full 0..65535 range: a slice stored as
  0..3000 would otherwise come out almost black.

Anything else (missing, zero-byte, truncated, not an image, a multi-page TIFF, a side below
MIN_SIDE or above MAX_SIDE pixels, non-finite values) raises `DataError` naming the file.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.data.readers import (
    MAX_SIDE,
    is_mask_file,
    patient_id_from_name,
    read_array,
    reader_for,
)
from pipeline.errors import DataError
from pipeline.paths import safe_resolve

__all__ = [
    "MAX_SIDE",
    "MIN_SIDE",
    "expand_inputs",
    "is_mask_file",
    "load_slice",
    "natural_key",
    "patient_id_from_name",
]

MIN_SIDE = 8  # smaller than this is not an MRI slice (and cannot pass the ResUNet's pooling)
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------- reading one slice


def _check_size(height: int, width: int, path: Path) -> None:
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
        raise DataError(
            f"absurd image size {height}x{width} (each side must be {MIN_SIDE}..{MAX_SIDE} pixels)", [path]
        )


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Rescale a non-uint8 array with its own min..max to 0..255 (see the module docstring)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError("image has non-finite pixel values (NaN or infinity)", [path])
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_three_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W), (H, W, 1..4) or channels-first (1..4, H, W) -> (H, W, 3)."""
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (channels-first) TIFF
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"unsupported image shape {array.shape} (expected H x W, H x W x 1..4)", [path])
    channels = array.shape[-1]
    if channels in (2, 4):  # grey + alpha, RGBA: drop the alpha channel
        array = array[..., : channels - 1]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def load_slice(path: str | os.PathLike) -> np.ndarray:
    """Read one slice (TIFF, PNG or JPEG) -> uint8 (H, W, 3), channels in file order.

    Greyscale is replicated, alpha dropped, other bit depths rescaled per image (module
    docstring). Raises DataError naming `path` for a missing, zero-byte, truncated or
    unsupported file, something that is not an image, or an absurd size.
    """
    path = Path(path)
    array = read_array(path)  # missing, zero bytes, unsupported, unreadable: DataError naming it
    image = _to_three_channels(array, path)
    _check_size(image.shape[0], image.shape[1], path)
    return _to_uint8(image, path)


# --------------------------------------------------------------------------- finding inputs


def natural_key(path: str | os.PathLike) -> list:
    """Sort key comparing digit runs as numbers, so `slice_10` comes after `slice_9`."""
    parts = re.split(r"(\d+)", str(path))
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(parts)]


def _is_image_name(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    try:
        reader_for(path)
    except DataError:
        return False
    return True


def _walk(folder: Path) -> Iterable[Path]:
    """Image files under `folder`, recursively, skipping hidden files and folders (`.cache`, `._x.tif`)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            candidate = Path(dirpath) / name
            if _is_image_name(candidate):
                yield candidate


def _is_within(path: Path, folders: Sequence[Path]) -> bool:
    resolved = safe_resolve(path)
    return any(resolved == f or resolved.is_relative_to(f) for f in folders)


def expand_inputs(
    items: Sequence[str | os.PathLike],
    include_masks: bool = False,
    exclude: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Expand files, folders (recursive) and glob patterns into a sorted list of absolute file paths.

    items: paths of files or folders, or glob patterns (`**` recurses). A file named explicitly
        is kept whatever its extension (so an unsupported one is reported, not ignored); from
        folders and globs only TIFF/PNG/JPEG files are taken, hidden files and folders skipped.
    include_masks: keep the dataset's `*_mask.*` files (skipped by default, also when named
        explicitly, since a shell glob like `case/*.tif` names them too).
    exclude: folders whose contents are never returned (the diagnosis output folder).

    Returns absolute paths, each file once, in natural order (`_10` after `_9`).
    Raises DataError listing every item that is neither an existing path nor a matching glob.
    """
    excluded = [safe_resolve(e) for e in exclude]
    found: dict[Path, Path] = {}  # resolved -> as found (absolute, symlinks kept)
    missing: list[str] = []

    def add(path: Path, explicit: bool) -> None:
        if not explicit and not _is_image_name(path):
            return
        if not include_masks and is_mask_file(path):
            return
        if excluded and _is_within(path, excluded):
            return
        found.setdefault(safe_resolve(path), path.absolute())  # a symlink loop is kept, and fails to load

    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            for candidate in _walk(path):
                add(candidate, explicit=False)
        elif path.is_file() or path.exists():  # a FIFO or /dev/zero named explicitly: its error row
            add(path, explicit=True)
        elif _GLOB_CHARS.search(str(item)):
            matches = sorted(glob.glob(os.path.expanduser(str(item)), recursive=True))
            if not matches:
                missing.append(str(item))
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    for candidate in _walk(match_path):
                        add(candidate, explicit=False)
                elif match_path.is_file():
                    add(match_path, explicit=False)
        else:
            missing.append(str(item))
    if missing:
        raise DataError("input not found (no such file or folder, or the pattern matches nothing)", missing)
    return sorted(found.values(), key=natural_key)

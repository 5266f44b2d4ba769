"""Reading slices from files: one registry of reader classes, and the dataset's naming rules.

Every image file the package reads - the training index, the array cache, `make diagnose`,
the notebook - goes through `read_array(path)`, which picks the reader by file suffix from
`READERS`. Each reader is a `SliceReader` subclass that says which files it takes
(`suffixes`, `verify_suffix`) and returns the file's pixels *as stored*: channels in file order
(pre-contrast, FLAIR, post-contrast for the dataset's TIFFs; `tifffile` and Pillow never reorder
channels, unlike OpenCV's BGR), dtype and shape untouched. Callers then validate (the dataset's
strict `pipeline.data.tiff_io`) or convert (inference's tolerant
`pipeline.inference.image_loading.load_slice`). Today: `TiffReader` (.tif, .tiff) and
`PillowReader` (.png, .jpg, .jpeg). Whole studies (NIfTI, DICOM series, Kaggle folders) have
their own registry of the same shape, `pipeline.volumes.readers`.

Naming rules, the one home of each:
* `patient_id(name)`: `TCGA_<inst>_<patient>`, the first three `_`-separated parts of a name
  from its `TCGA_` on (`TCGA_CS_4941_19960909_12.tif` -> `TCGA_CS_4941`); None without one.
* `MASK_SUFFIX`: a ground-truth mask is the image's stem plus `_mask` (`X_12.tif` <-> `X_12_mask.tif`).
* `SLICE_PATTERN`: a slice file stem ends in `_<n>` (numeric slice order, `_10` after `_9`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from pipeline.errors import DataError

__all__ = [
    "MASK_SUFFIX",
    "MAX_SIDE",
    "PATIENT_PATTERN",
    "READERS",
    "SLICE_PATTERN",
    "PillowReader",
    "SliceReader",
    "TiffReader",
    "image_suffixes",
    "is_mask_file",
    "not_regular",
    "patient_id",
    "patient_id_from_name",
    "read_array",
    "reader_for",
    "register_reader",
    "slice_name",
]

MASK_SUFFIX = "_mask"  # the dataset's ground-truth masks: TCGA_..._12_mask.tif
PATIENT_PATTERN = re.compile(r"TCGA_[A-Za-z0-9]+_[A-Za-z0-9]+")
SLICE_PATTERN = re.compile(rf"^(?P<stem>.+_(?P<slice>\d+))(?P<mask>{MASK_SUFFIX})?$")
MAX_SIDE = 8192  # a larger side is not an MRI slice, and would take gigabytes to decode


# --------------------------------------------------------------------------- naming rules


def patient_id(name: str) -> str | None:
    """The patient id in `name` (a file or folder name): `TCGA_<inst>_<patient>`, else None."""
    match = PATIENT_PATTERN.search(str(name))
    return match.group(0) if match else None


def patient_id_from_name(path: str | os.PathLike) -> str | None:
    """`patient_id` of the file name or, failing that, of its folder's name."""
    path = Path(path)
    return patient_id(path.name) or patient_id(path.parent.name)


class SliceName(NamedTuple):
    """A slice file stem read by `SLICE_PATTERN`: its study, its slice number, whether it is a mask."""

    study: str
    number: int
    is_mask: bool


def slice_name(stem: str) -> SliceName | None:
    """The one study-from-slice-name rule: `<study>_<n>[_mask]` -> SliceName, else None."""
    match = SLICE_PATTERN.match(stem)
    if match is None:
        return None
    return SliceName(match["stem"][: -len(match["slice"]) - 1], int(match["slice"]), bool(match["mask"]))


def is_mask_file(path: str | os.PathLike) -> bool:
    """True for the dataset's ground-truth masks (`..._mask.tif` and the like)."""
    return Path(path).stem.lower().endswith(MASK_SUFFIX)


# --------------------------------------------------------------------------- readers


def _check_max_size(height: int, width: int, path: Path) -> None:
    """Refuse, before decoding, an image too large to be a slice (a decompression bomb)."""
    if max(height, width) > MAX_SIDE:
        raise DataError(f"absurd image size {height}x{width} (a side above {MAX_SIDE} pixels)", [path])


class SliceReader:
    """A reader of one family of files. Subclasses set `name` and `suffixes` and implement `read`."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def verify_suffix(cls, path: str | os.PathLike) -> bool:
        """True when this reader takes `path` (by its suffix, case-insensitive)."""
        return Path(path).suffix.lower() in cls.suffixes

    def read(self, path: Path) -> np.ndarray:
        """The file's pixels as stored (channels in file order). DataError naming `path` otherwise."""
        raise NotImplementedError


class TiffReader(SliceReader):
    """TIFF slices with `tifffile`: exactly one page; palette images mapped to RGB."""

    name = "TIFF"
    suffixes = (".tif", ".tiff")

    def read(self, path: Path) -> np.ndarray:
        import tifffile

        # tifffile logs (rather than raises) some structural problems; they surface as errors below.
        tiff_logger = logging.getLogger("tifffile")
        level = tiff_logger.level
        tiff_logger.setLevel(logging.CRITICAL)
        try:
            with tifffile.TiffFile(path) as tif:
                pages = len(tif.pages)
                if pages == 0:
                    raise DataError("unreadable or truncated TIFF: it holds no image (0 pages)", [path])
                if pages > 1:
                    raise DataError(f"multi-page TIFF ({pages} pages); expected one slice per file", [path])
                page = tif.pages[0]
                _check_max_size(int(page.imagelength), int(page.imagewidth), path)
                array = page.asarray()
                if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                    # colormap is (3, N) uint16; map the indices to RGB and back to 8 bits
                    array = (page.colormap.T[array].astype(np.float64) / 257.0).round().astype(np.uint8)
        except DataError:
            raise
        except Exception as exc:  # tifffile/zlib raise many types for damaged files
            raise DataError(
                f"unreadable, truncated or not a TIFF ({type(exc).__name__}: {exc})", [path]
            ) from exc
        finally:
            tiff_logger.setLevel(level)
        return array

    def shape(self, path: str | os.PathLike) -> tuple[int, ...]:
        """Shape of the first page from the header only (no pixel decoding)."""
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                return tuple(tif.pages[0].shape)
        except Exception as exc:
            raise DataError(f"unreadable TIFF header ({type(exc).__name__}: {exc})", [path]) from exc


class PillowReader(SliceReader):
    """PNG and JPEG with Pillow (RGB order kept); palette/CMYK/YCbCr/... converted to RGB(A)."""

    name = "PNG/JPEG"
    suffixes = (".png", ".jpg", ".jpeg")

    def read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                _check_max_size(image.height, image.width, path)
                image.load()  # decodes now, so a truncated file fails here
                mode = image.mode
                if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
                    image = image.convert("RGBA" if "A" in mode or "a" in mode else "RGB")
                elif mode == "1":
                    image = image.convert("L")
                return np.array(image)
        except DataError:
            raise
        except Image.DecompressionBombError as exc:
            raise DataError(f"absurd image size ({exc})", [path]) from exc
        except UnidentifiedImageError as exc:
            raise DataError("not an image (Pillow cannot identify the file)", [path]) from exc
        except Exception as exc:  # OSError "image file is truncated", SyntaxError for broken headers, ...
            raise DataError(f"unreadable or truncated image ({type(exc).__name__}: {exc})", [path]) from exc


READERS: list[SliceReader] = [TiffReader(), PillowReader()]


def register_reader(reader: SliceReader) -> None:
    """Add `reader` to the registry, ahead of the built-in ones (so it may take over a suffix)."""
    READERS.insert(0, reader)


def image_suffixes() -> tuple[str, ...]:
    """Every suffix some registered reader takes, lower case with the dot (`.tif`, `.png`, ...)."""
    return tuple(dict.fromkeys(s for reader in READERS for s in reader.suffixes))


def reader_for(path: str | os.PathLike) -> SliceReader:
    """The registered reader that takes `path`; DataError naming the supported suffixes otherwise."""
    for reader in READERS:
        if reader.verify_suffix(path):
            return reader
    suffix = Path(path).suffix
    raise DataError(
        f"unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(image_suffixes())}",
        [path],
    )


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def not_regular(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a file (links followed): "not a regular file (a FIFO)",
    "cannot open (...)"; None for a regular file. Never opens it (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot open ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind})"


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read the pixels of one image file with its registered reader -> array as stored.

    Raises DataError naming `path` for a missing or non-regular file, zero bytes, an
    unsupported suffix, anything the reader refuses, and an empty pixel array.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot open image ({exc.strerror or exc})", [path]) from exc
    why = not_regular(path)
    if why is not None:  # /dev/zero has size 0 but is no empty file
        raise DataError(why, [path])
    if size == 0:
        raise DataError("empty file (zero bytes)", [path])
    array = reader_for(path).read(path)
    if array.size == 0:
        raise DataError("unreadable or truncated image (no pixel data)", [path])
    return array

"""Decode-once cache: every slice and mask of an index frame as uint8 `.npy` arrays, memory-mapped.

Decoding ~3,000 deflate TIFFs takes seconds each epoch; reading a memory-mapped array takes
microseconds. The cache lives in `<cache_dir>/arrays-<hash>/{images,masks}.npy`, keyed on the
ordered file list with sizes and mtimes, and is built in a temporary folder that is renamed
into place only when complete, so an interrupted build is simply rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.errors import DataError
from pipeline.paths import resolve_cache_dir, resolve_data_dir

from .index import index_dataset
from .tiff_io import read_pair, tiff_shape

__all__ = ["SliceArrays", "arrays_key", "dataset_images", "load_arrays"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class SliceArrays:
    """Decoded slices aligned with the rows of the index frame they were built from.

    images: uint8 (N, H, W, 3), file channel order. masks: uint8 (N, H, W) with values 0/1.
    Both are read-only memory maps when loaded from the cache.
    """

    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) shared by every slice."""
        return int(self.images.shape[1]), int(self.images.shape[2])


def arrays_key(df: pd.DataFrame) -> str:
    """Hash of the ordered (image, mask) paths with their sizes and mtimes: the cache folder's name."""
    digest = hashlib.sha256(f"arrays-v{CACHE_VERSION}\n".encode())
    missing = []
    for image_path, mask_path in zip(df["image_path"], df["mask_path"], strict=True):
        for path in (image_path, mask_path):
            try:
                st = os.stat(path)
            except OSError:
                missing.append(path)
                continue
            digest.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    if missing:
        raise DataError("files listed in the index no longer exist (re-run indexing)", missing)
    return digest.hexdigest()[:20]


def _common_size(df: pd.DataFrame) -> tuple[int, int]:
    """Read only TIFF headers and check that every slice has one (H, W); DataError names the odd ones."""
    sizes = [tuple(tiff_shape(p)[:2]) for p in df["image_path"]]
    counts = Counter(sizes)
    size, _ = counts.most_common(1)[0]
    odd = [f"{p} ({s[0]}x{s[1]})" for p, s in zip(df["image_path"], sizes, strict=True) if s != size]
    if odd:
        raise DataError(
            f"all slices must share one size to be cached together; most are {size[0]}x{size[1]}, "
            f"{len(odd)} differ",
            odd,
        )
    return size  # type: ignore[return-value]


def _open(folder: Path, n: int) -> SliceArrays | None:
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        masks = np.load(folder / "masks.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("ignoring damaged array cache %s (%s)", folder, exc)
        return None
    if images.shape[0] != n or masks.shape[0] != n or images.shape[:3] != masks.shape:
        log.warning(
            "ignoring array cache %s with unexpected shapes %s, %s", folder, images.shape, masks.shape
        )
        return None
    return SliceArrays(images=images, masks=masks)


def _build(df: pd.DataFrame, folder: Path, progress: bool = True) -> None:
    """Decode every slice into `.npy` files in a temp folder, then rename the folder to `folder`."""
    height, width = _common_size(df)
    n = len(df)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        images = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, height, width, 3)
        )
        masks = np.lib.format.open_memmap(
            tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, height, width)
        )
        rows = zip(df["image_path"], df["mask_path"], strict=True)
        for i, (image_path, mask_path) in enumerate(
            tqdm(rows, total=n, desc="caching slices", unit="slice", delay=2.0, mininterval=1.0,
                 leave=False, disable=not progress)
        ):
            images[i], masks[i] = read_pair(image_path, mask_path)
        images.flush()
        masks.flush()
        del images, masks  # close the memory maps before the rename
        (tmp / "meta.json").write_text(json.dumps({"slices": n, "size": [height, width]}) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "masks.npy").exists():  # not a concurrent build that won the race
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def load_arrays(
    df: pd.DataFrame, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> SliceArrays:
    """Index frame (rows with `image_path`, `mask_path`) -> SliceArrays aligned with `df`'s row order.

    The first call decodes every TIFF once into `<cache_dir>/arrays-<hash>/` (default cache dir:
    `resolve_cache_dir()`); later calls with the same files reopen the `.npy` files with
    `np.load(mmap_mode="r")`. Raises DataError if slices differ in size (naming them) or a file
    is missing or unreadable. `progress=False` hides the progress bar of the first decoding.
    """
    if len(df) == 0:
        raise DataError("cannot cache an empty index")
    folder = resolve_cache_dir(cache_dir) / f"arrays-{arrays_key(df)}"
    if folder.is_dir():
        arrays = _open(folder, len(df))
        if arrays is not None:
            return arrays
        shutil.rmtree(folder, ignore_errors=True)
    log.info("decoding %d slices into %s", len(df), folder)
    _build(df, folder, progress)
    arrays = _open(folder, len(df))
    if arrays is None:
        raise DataError("array cache could not be reopened after building it", [folder])
    return arrays


def dataset_images(data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(index frame of the data root `data_dir` (`resolve_data_dir`), its decoded images aligned
    with it): both through the caches under `cache_dir`, without progress bars."""
    cache = resolve_cache_dir(cache_dir)
    index_df = index_dataset(resolve_data_dir(data_dir), cache_dir=cache, progress=False)
    return index_df, load_arrays(index_df, cache, progress=False).images

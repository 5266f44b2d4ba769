"""Indexing a Kaggle-layout LGG root into one DataFrame row per slice, validated and cached.

Layout (Buda et al., "lgg-mri-segmentation")::

    <root>/TCGA_<inst>_<patient>_<date>/TCGA_<inst>_<patient>_<date>_<n>.tif
    <root>/TCGA_<inst>_<patient>_<date>/TCGA_<inst>_<patient>_<date>_<n>_mask.tif

Images and masks are paired by file stem (`X.tif` <-> `X_mask.tif`), never by sorting two
lists, and slices are sorted numerically (`_10` after `_9`). Every problem found is reported
at once in one DataError; `skip_bad=True` warns and keeps the good slices instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline.errors import DataError
from pipeline.io_utils import atomic_save, atomic_write_json
from pipeline.paths import resolve_cache_dir

from .readers import MASK_SUFFIX, PATIENT_PATTERN, SLICE_PATTERN
from .readers import patient_id as patient_id_of
from .tiff_io import read_pair

__all__ = ["COLUMNS", "index_dataset", "summarize", "patient_id_of", "problems_error"]

log = logging.getLogger(__name__)

COLUMNS = ["patient_id", "case", "slice", "image_path", "mask_path", "has_tumor", "tumor_pixels"]
CASE_PATTERN = re.compile(rf"^{PATIENT_PATTERN.pattern}(_.+)?$")  # TCGA_<inst>_<patient>_<date>
INDEX_VERSION = 1  # bump when the cached frame's content or meaning changes


@dataclass(frozen=True)
class Problem:
    """One offending file (or folder) and what is wrong with it."""

    path: str
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "problem": self.problem}


def problems_error(header: str, problems: list[Problem], footer: str = "") -> DataError:
    """One DataError whose message lists every `path: problem` and whose `.files` lists every path."""
    lines = "\n".join(f"  - {p.path}: {p.problem}" for p in problems)
    error = DataError(f"{header} ({len(problems)} problem(s)):\n{lines}" + (f"\n{footer}" if footer else ""))
    error.files = [p.path for p in problems]
    return error


def _is_tif(name: str) -> bool:
    return name.lower().endswith(".tif") and not name.startswith(".")


def _scan(root: Path) -> tuple[dict[str, list[os.DirEntry]], list[Problem]]:
    """List case folders and their .tif entries; report layout problems (not yet file contents)."""
    if not root.exists():
        raise DataError("data root does not exist (set --data-dir or $LGG_DATA_DIR)", [root])
    if not root.is_dir():
        raise DataError("data root is not a directory", [root])
    cases: dict[str, list[os.DirEntry]] = {}
    problems: list[Problem] = []
    stray: list[Problem] = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                with os.scandir(entry.path) as inner:
                    tifs = sorted((e for e in inner if e.is_file() and _is_tif(e.name)), key=lambda e: e.name)
                if CASE_PATTERN.match(entry.name):
                    cases[entry.name] = tifs
                elif tifs:
                    stray.append(
                        Problem(entry.path, "folder holds .tif files but is not a TCGA_* case folder")
                    )
            elif _is_tif(entry.name):
                stray.append(Problem(entry.path, "TIFF outside any case folder"))
    if not any(cases.values()):
        hint = _layout_hint(root)
        raise DataError(
            "not a Kaggle lgg-mri-segmentation layout: no TCGA_<inst>_<patient>_<date> folders "
            f"holding .tif slices{hint}",
            [root],
        )
    for case, tifs in cases.items():
        if not tifs:
            problems.append(Problem(str(root / case), "empty case folder (no .tif files)"))
    return cases, problems + stray


def _layout_hint(root: Path) -> str:
    """Point at a nested kaggle_3m-style folder when the user gave its parent (the Kaggle zip nests it)."""
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            if any(CASE_PATTERN.match(p.name) and p.is_dir() for p in sub.iterdir()):
                return f"; did you mean {sub}?"
        except OSError:
            continue
    return ""


def _pair(root: Path, cases: dict[str, list[os.DirEntry]]) -> tuple[list[dict], list[Problem]]:
    """Pair images with masks by stem inside each case folder -> slice records (unread) and problems."""
    records: list[dict] = []
    problems: list[Problem] = []
    for case, tifs in cases.items():
        images: dict[str, str] = {}
        masks: dict[str, str] = {}
        numbers: dict[int, str] = {}
        for entry in tifs:
            stem = entry.name[: -len(".tif")]
            match = SLICE_PATTERN.match(stem)
            if match is None:
                problems.append(
                    Problem(entry.path, "file name does not end in _<slice>.tif or _<slice>_mask.tif")
                )
                continue
            (masks if match["mask"] else images)[match["stem"]] = entry.path
        for stem in sorted(masks.keys() - images.keys()):
            problems.append(Problem(masks[stem], f"mask without image (expected {stem}.tif)"))
        for stem, image_path in images.items():
            if stem not in masks:
                problems.append(Problem(image_path, f"image without mask (expected {stem}{MASK_SUFFIX}.tif)"))
                continue
            number = int(SLICE_PATTERN.match(stem)["slice"])
            if number in numbers:
                problems.append(
                    Problem(image_path, f"duplicate slice number {number} (also {numbers[number]})")
                )
                continue
            numbers[number] = image_path
            records.append(
                {
                    "patient_id": patient_id_of(case),
                    "case": case,
                    "slice": number,
                    "image_path": image_path,
                    "mask_path": masks[stem],
                }
            )
    return records, problems


def _fingerprint(root: Path, cases: dict[str, list[os.DirEntry]]) -> str:
    """Hash of the root, the sorted relative file list, sizes and mtimes: changes when any file does."""
    digest = hashlib.sha256(f"v{INDEX_VERSION}\n{root}\n".encode())
    for case in sorted(cases):
        digest.update(f"{case}/\n".encode())
        for entry in cases[case]:
            st = entry.stat()
            digest.update(f"{entry.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _read_slices(records: list[dict], progress: bool = True) -> tuple[list[dict], list[Problem]]:
    """Decode every image and mask once: validate them and count tumour pixels."""
    good: list[dict] = []
    problems: list[Problem] = []
    bar = tqdm(records, desc="indexing slices", unit="slice", delay=2.0, leave=False, disable=not progress)
    for record in bar:
        try:
            _, mask = read_pair(record["image_path"], record["mask_path"])
        except DataError as exc:
            reason = str(exc).split("\n", 1)[0]
            problems.extend(Problem(f, reason) for f in exc.files)
            continue
        pixels = int(mask.sum())
        good.append({**record, "has_tumor": pixels > 0, "tumor_pixels": pixels})
    return good, problems


def _to_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df = df.astype({"slice": "int64", "tumor_pixels": "int64", "has_tumor": "bool"})
    return df.sort_values(["case", "slice"], kind="stable").reset_index(drop=True)


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"index-{key}.parquet", cache_dir / f"index-{key}.json"


def _load_cached(cache_dir: Path, key: str) -> tuple[pd.DataFrame, list[Problem]] | None:
    frame_path, meta_path = _cache_paths(cache_dir, key)
    # The JSON is written last, so its presence means the parquet beside it is complete.
    if not (meta_path.is_file() and frame_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        df = pd.read_parquet(frame_path)
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable index cache %s (%s)", frame_path, exc)
        return None
    if list(df.columns) != COLUMNS or len(df) != meta.get("slices"):
        return None
    return df, [Problem(**p) for p in meta.get("problems", [])]


def _save_cached(cache_dir: Path, key: str, root: Path, df: pd.DataFrame, problems: list[Problem]) -> None:
    frame_path, meta_path = _cache_paths(cache_dir, key)
    try:
        atomic_save(frame_path, lambda tmp: df.to_parquet(tmp, index=False))
        atomic_write_json(
            meta_path,
            {"root": str(root), "slices": len(df), "problems": [p.as_dict() for p in problems]},
        )
    except OSError as exc:  # a read-only cache dir must not stop indexing
        log.warning("could not write index cache in %s: %s", cache_dir, exc)


def index_dataset(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Index a Kaggle-layout root -> DataFrame with one row per slice, sorted by case then slice.

    Columns: `patient_id` (str), `case` (folder name), `slice` (int), `image_path`, `mask_path`
    (str, absolute as given by `root`), `has_tumor` (bool), `tumor_pixels` (int). Every image and
    mask is decoded once to validate it and count tumour pixels; the result is cached in
    `cache_dir` (default `resolve_cache_dir()`) under a hash of the file list, sizes and mtimes,
    so an unchanged root is not re-read.

    Raises DataError listing every offending file (missing/non-directory root, not a Kaggle
    layout, empty case folder, image without mask, mask without image, unreadable/truncated
    TIFF, wrong shape/dtype, image/mask size mismatch). With `skip_bad=True` the problems are
    logged and warned about instead, the good slices are returned, and
    `df.attrs["skipped"]` lists them as `{"path", "problem"}` dicts. `progress=False` hides the
    progress bar of the first (uncached) read.
    """
    root = Path(root).expanduser().absolute()
    cases, problems = _scan(root)
    cache = resolve_cache_dir(cache_dir)
    key = _fingerprint(root, cases)
    cached = _load_cached(cache, key)
    if cached is not None:
        df, problems = cached
        log.info("index of %s loaded from cache %s", root, cache)
    else:
        records, pair_problems = _pair(root, cases)
        good, read_problems = _read_slices(records, progress)
        problems = problems + pair_problems + read_problems
        df = _to_frame(good)
        _save_cached(cache, key, root, df, problems)
    if problems:
        if not skip_bad:
            raise problems_error(
                f"bad input under {root}",
                problems,
                "Fix or remove these files, or leave them out with skip_bad=True: the --skip-bad option "
                "of `index` and `evaluate` (`train`: --set data.skip_bad=true).",
            )
        log.warning("%s", problems_error(f"skipping bad input under {root}", problems))
        warnings.warn(f"skipping {len(problems)} bad file(s) under {root}: see the log", stacklevel=2)
    if df.empty:
        raise DataError("no usable slices found", [root])
    df.attrs["root"] = str(root)
    df.attrs["skipped"] = [p.as_dict() for p in problems]
    return df


def summarize(df: pd.DataFrame) -> dict[str, int]:
    """Index frame -> counts: `patients`, `slices`, `tumor_slices`, `tumor_patients`."""
    tumor = df[df["has_tumor"]]
    return {
        "patients": int(df["patient_id"].nunique()),
        "slices": int(len(df)),
        "tumor_slices": int(len(tumor)),
        "tumor_patients": int(tumor["patient_id"].nunique()),
    }

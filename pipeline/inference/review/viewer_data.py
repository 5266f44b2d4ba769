"""The 3D view's data: one small script per study holding its FLAIR and mask as base64 NIfTI.

A page opened from file:// cannot fetch a volume by URL, but it can add a classic
`<script src>`: `review/<name>.volumes.js` sets `window.LGG_VOLUMES[<name>] = {flair, mask,
center}` (gzipped NIfTI, base64) and is loaded only when that study's card is opened. Both
volumes are stored reoriented to the closest RAS voxel order, the FLAIR as uint8 (the models'
8-bit mapping, `pipeline.volumes.domain.to_8bit`), the mask as uint8 0/1, so NiiVue draws them
on one grid; `center` is the mask's centre voxel (where the crosshair starts).

Sources: a volume study (NIfTI, DICOM) is read again from its input (`StudyInput.load`) with
the mask NIfTI diagnose wrote; a Kaggle patient folder (`<study>_<n>.tif` slices) is stacked in
slice order with its PNG masks, rows to posterior, columns to left, slices to superior, at a
nominal KAGGLE_SPACING (the slices carry no spacing). A file is rewritten only when what it
was made from changed (its first line records a digest of the inputs' signatures and masks).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference.outputs import signature
from pipeline.io_utils import atomic_write_bytes

log = logging.getLogger(__name__)

REVIEW_DIR = "review"
KAGGLE_SPACING = (1.0, 1.0, 4.0)  # nominal (mm) for display only: Kaggle slices carry no geometry
_DIGEST_PREFIX = "// lgg-review "


def _nifti_base64(array: np.ndarray, affine: np.ndarray) -> str:
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array, dtype=np.uint8), affine)
    image.header.set_data_dtype(np.uint8)
    image.header["cal_min"], image.header["cal_max"] = 0, float(array.max()) if array.size else 0.0
    raw = image.to_bytes()
    return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def canonical(
    flair: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FLAIR and mask (same grid) reoriented to the closest RAS voxel order, with the new affine."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    flip = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    new_affine = affine @ nib.orientations.inv_ornt_aff(flip, flair.shape)
    return (
        nib.orientations.apply_orientation(flair, flip),
        nib.orientations.apply_orientation(mask, flip),
        new_affine,
    )


def volumes_script(key: str, flair: np.ndarray, mask: np.ndarray, affine: np.ndarray, digest: str) -> bytes:
    """The `<name>.volumes.js` text of one study (module docstring)."""
    flair, mask, affine = canonical(np.asarray(flair, np.uint8), np.asarray(mask, np.uint8), affine)
    where = np.argwhere(mask > 0)
    center = (where.mean(axis=0) if len(where) else (np.array(mask.shape) - 1) / 2).round().astype(int)
    payload = {
        "flair": _nifti_base64(flair, affine),
        "mask": _nifti_base64((mask > 0).astype(np.uint8), affine),
        "center": [int(c) for c in center],
        "mask_voxels": int((mask > 0).sum()),
    }
    return (
        f"{_DIGEST_PREFIX}{digest}\nwindow.LGG_VOLUMES = window.LGG_VOLUMES || {{}};\n"
        f"window.LGG_VOLUMES[{json.dumps(key)}] = {json.dumps(payload)};\n"
    ).encode("ascii")


def _current(path: Path, digest: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.readline().decode("ascii", "replace").strip() == f"{_DIGEST_PREFIX}{digest}".strip()
    except OSError:
        return False


def digest_of(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def write_study_volumes(out: Path, key: str, study: Any, record: dict[str, Any]) -> Path | None:
    """`review/<key>.volumes.js` of a diagnosed volume study (`StudyInput`), or None if it has no mask."""
    import nibabel as nib

    from pipeline.volumes.domain import to_8bit

    if record.get("error") or not record.get("mask_nifti"):
        return None
    mask_path = out / record["mask_nifti"]
    target = out / REVIEW_DIR / f"{key}.volumes.js"
    digest = digest_of(study.signature(), mask_path.stat().st_mtime_ns, mask_path.stat().st_size)
    if _current(target, digest):
        return target
    volume = study.load()
    flair = np.round(to_8bit(volume.data[..., 1])).astype(np.uint8)
    mask = np.asarray(nib.load(str(mask_path)).dataobj, dtype=np.uint8)
    if mask.shape != flair.shape:
        log.warning("%s: mask %s and FLAIR %s differ in shape; no 3D view", key, mask.shape, flair.shape)
        return None
    atomic_write_bytes(target, volumes_script(key, flair, mask, np.asarray(volume.affine, float), digest))
    return target


def kaggle_affine(spacing: Sequence[float] = KAGGLE_SPACING) -> np.ndarray:
    """RAS affine of stacked Kaggle slices: rows -> posterior, columns -> left, slices -> superior."""
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0, -spacing[0], 0)
    affine[:3, 1] = (-spacing[1], 0, 0)
    affine[:3, 2] = (0, 0, spacing[2])
    affine[3, 3] = 1
    return affine


def write_stack_volumes(
    out: Path, key: str, paths: Sequence[Path], rows: Sequence[dict[str, Any]]
) -> Path | None:
    """`review/<key>.volumes.js` of a Kaggle patient folder: its slices (`paths`, in slice order,
    `rows` their report rows) stacked with their PNG masks; None when they do not stack."""
    from PIL import Image

    from pipeline.inference.image_loading import load_slice

    target = out / REVIEW_DIR / f"{key}.volumes.js"
    masks = [out / r["mask_path"] if r.get("mask_path") else None for r in rows]
    digest = digest_of(
        [signature(p) for p in paths],
        [(r.get("area_px"), r.get("mask_path"), r.get("error")) for r in rows],
        [m.stat().st_mtime_ns if m is not None and m.is_file() else None for m in masks],
    )
    if _current(target, digest):
        return target
    flair, mask = [], []
    for path, mask_path in zip(paths, masks, strict=True):
        try:
            image = load_slice(path)
        except Exception:  # noqa: BLE001 - an unreadable slice (its row says why): no 3D view
            return None
        flair.append(image[..., 1])
        if mask_path is not None and mask_path.is_file():
            mask.append((np.asarray(Image.open(mask_path)) > 0).astype(np.uint8))
        else:
            mask.append(np.zeros(image.shape[:2], np.uint8))
    if len({a.shape for a in flair + mask}) != 1:
        return None
    atomic_write_bytes(
        target, volumes_script(key, np.stack(flair, -1), np.stack(mask, -1), kaggle_affine(), digest)
    )
    return target

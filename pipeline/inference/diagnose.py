"""Batch diagnosis: run the two-stage pipeline over many slices and write reports a person can read.

Inputs are files, folders (recursive) and glob patterns (`image_loading.expand_inputs`), and
volume studies (`pipeline.volumes`): a NIfTI file (X, Y, Z, 3), a folder of channel-named NIfTI
files or DICOM series (`..._pre`, `..._flair`, `..._post`), found also inside the folders given
(`pipeline.volumes.readers.find_studies`), or one study given channel by channel
(`pre=`, `flair=`, `post=`: 3D NIfTI files or DICOM series folders, `FOLDER@<SeriesInstanceUID>`
to pick one series of several).
Everything is written inside the output folder OUT:

    index.html                the review page: summary, a card per study or patient with its
                              3D view, the sortable table of slices (`pipeline.inference.review`)
    report.csv, report.json   one row per input slice (COLUMNS); report.json also holds the
                              settings and, under "studies", one record per volume study
    patients.csv              per patient: slices, flagged slices, tumour volume in pixels,
                              the slice with the largest tumour area; for a volume study also
                              its tumour voxels and millilitres on the input grid, the slice
                              range and 3D bounding box, its mask NIfTI (PATIENT_COLUMNS)
    masks/<name>_mask.png     predicted mask (0/255) of every tumour-positive slice
    overlays/<name>_overlay.png   the prediction's contour (red) on the FLAIR channel
    gradcam/<name>_gradcam.png    with `explain`: Grad-CAM of the classifier on flagged slices
    volumes/<name>_mask.nii.gz    per volume study: the predicted mask (uint8 0/1) on the
                              input's own grid with its affine, to open over the scan
    .progress.jsonl           the resume journal (below)

`<name>` is `<stem>__<8 hex digits of a hash of the input's absolute path>` (the stem with
characters other than letters, digits, `.`, `-` and `_` replaced by `_`), so outputs of different
inputs never overwrite each other, also across runs into the same OUT: a row kept from the
journal of an earlier run still points at its own mask.

Volumes: inputs that form a study - files of one folder named `<study>_<n>.<ext>` (the
Kaggle layout), at least `MIN_VOLUME_SLICES` of them - are diagnosed together, in slice
order, by `TumorPipeline.predict_volume` (the volume-aware gate and 3D components, as the
evaluation measures it). Any other input is diagnosed as a single slice, as before;
`volumes=False` turns the grouping off.

Volume studies are read into a `pipeline.volumes.Volume`, mapped to the models' domain
(`pipeline.volumes.domain`: reoriented to axial, each slice scaled to 256x256 and padded,
intensities to 8 bits per channel), diagnosed with `predict_volume` (`predict` with
`volumes=False`), and the masks are put back on the input grid (nearest neighbour). Their
report rows are the model slices, one per input slice (`slice`: its index along the input's
slice axis; `height`, `width`, areas and boxes on the 256x256 model slice, as the PNGs show
it); the study record (`STUDY_KEYS`) measures the mask on the input grid
(`pipeline.volumes.nifti_out.measure_study`). A study that cannot be read or diagnosed
(missing channel, channels not co-registered, several DICOM series, 2D, NaN voxels, too large,
unknown format) gets one error row and an error in its study record; the batch goes on.

Robustness:
* a bad input (unreadable, truncated, zero bytes, not an image, absurd size, a symlink loop,
  an output that cannot be written) gets a row with its error and the batch goes on;
  `DiagnosisResult.exit_code` is 0 when every input was diagnosed, 1 when any failed;
* every file is written atomically (temp file + rename), so an interruption never leaves a
  half-written report or image;
* resumable: after each batch its rows are appended to `.progress.jsonl` and fsynced; a
  re-run with the same models and settings skips the inputs recorded there (unless the file
  changed: size and modification time are recorded) and the final reports include them.
  Changed settings, or `resume=False`, start the journal afresh. The journal is read
  tolerantly: a damaged line (cut short, not JSON, not a row of this version) is skipped with
  a warning and its input diagnosed again, a damaged header starts afresh;
* reports always get written: text that cannot be encoded (file names with non-UTF-8 bytes)
  is escaped (`\xff`), and terminal escape sequences are stripped from error messages;
* OUT must be a folder that can be created and written, and no input may lie inside OUT
  (refused with DataError); files
  under OUT found through folders or globs are ignored (they are earlier outputs). Each
  output path is checked to lie inside OUT and not to be an input before it is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.inference.image_loading import expand_inputs, load_slice, patient_id_from_name
from pipeline.inference.outputs import (  # noqa: F401 - re-exported: the names diagnose has always had
    FLAGGED_EMPTY,
    MIN_VOLUME_SLICES,
    NO_TUMOUR,
    TUMOUR,
    OutputWriter,
    decision,
    group_volumes,
    output_name,
    output_names,
    safe_stem,
    text,
    within,
)
from pipeline.inference.outputs import signature as _signature
from pipeline.inference.overlays import PREDICTION_COLOR, heatmap_overlay, overlay
from pipeline.io_utils import atomic_write, atomic_write_json
from pipeline.paths import resolve_pair, safe_resolve

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "PATIENT_COLUMNS",
    "STUDY_KEYS",
    "DiagnosisResult",
    "StudyInput",
    "output_name",
    "output_names",
    "patient_summary",
    "run_diagnosis",
    "study_patient_row",
    "text",
]

REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PATIENTS_CSV = "patients.csv"
JOURNAL = ".progress.jsonl"
MASK_DIR, OVERLAY_DIR, GRADCAM_DIR, VOLUME_DIR = "masks", "overlays", "gradcam", "volumes"
JOURNAL_VERSION = 2  # 2: the `slice` column and study records
# the decision: what the pipeline found, not only what the classifier flagged
FLAGGED = (TUMOUR, FLAGGED_EMPTY)

COLUMNS = (
    "path",  # absolute path of the input (bytes that are not UTF-8 escaped as \xNN)
    "patient_id",  # TCGA_XX_NNNN from the file or folder name, else empty (a study: its name)
    "slice",  # volume studies: the slice's index along the input's slice axis; else empty
    "height",
    "width",
    "probability",  # classifier tumour probability
    "decision",  # "tumour" (mask not empty) / "flagged, nothing outlined" / "no tumour"; empty if failed
    "area_px",  # predicted tumour pixels
    "area_fraction",  # area_px / brain pixels (SliceResult.area_fraction_brain)
    "area_fraction_slice",  # area_px / slice pixels
    "bbox",  # [y0, x0, y1, x1], ends exclusive
    "centroid",  # [y, x]
    "components",  # connected tumour regions
    "mask_path",
    "overlay_path",
    "gradcam_path",  # relative to OUT
    "error",  # why the input could not be diagnosed
)

INTEGER_COLUMNS = ("slice", "height", "width", "area_px", "components")
# a volume study's record in report.json "studies" (and its patients.csv columns)
STUDY_KEYS = (
    "study_id",  # patient_id: TCGA_XX_NNNN in the study's name, else the name
    "source",  # the study's path (its FLAIR source for a channel-by-channel study)
    "format",  # NIfTI, channel folder, trio
    "shape",  # [X, Y, Z] of the input grid
    "spacing_mm",  # voxel size along X, Y, Z
    "slice_axis",  # the input's voxel axis closest to superior-inferior
    "slices",
    "slices_flagged",
    "tumour_voxels",  # on the input grid
    "tumour_volume_ml",  # tumour_voxels x prod(spacing_mm) / 1000; empty without geometry
    "slice_range",  # [first, last + 1) input slice indices holding tumour
    "bbox_3d",  # [i0, j0, k0, i1, j1, k1] input voxel indices, ends exclusive
    "mask_nifti",  # relative to OUT
    "error",
)
OUTPUT_COLUMNS = ("mask_path", "overlay_path", "gradcam_path")



@dataclass
class DiagnosisResult:
    """What `run_diagnosis` did: the rows (COLUMNS, input order) and where they were written."""

    out: Path
    rows: list[dict[str, Any]]
    resumed: int = 0  # inputs taken from the journal of an earlier run
    skipped_masks: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    studies: list[dict[str, Any]] = field(default_factory=list)  # volume studies (STUDY_KEYS)

    @property
    def n_failed(self) -> int:
        return sum(1 for row in self.rows if row["error"])

    @property
    def n_flagged(self) -> int:
        """Slices the classifier flagged (with or without anything outlined)."""
        return sum(1 for row in self.rows if row["decision"] in FLAGGED)

    @property
    def n_found(self) -> int:
        """Slices whose final mask is not empty (decision `tumour`)."""
        return sum(1 for row in self.rows if row["decision"] == TUMOUR)

    @property
    def exit_code(self) -> int:
        """0 when every input was diagnosed, 1 when any failed."""
        return 1 if self.n_failed else 0


# --------------------------------------------------------------------------- names and paths







# --------------------------------------------------------------------------- journal


class _Journal:
    """Append-only JSON-lines record of finished inputs: a config line, then one line per input."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.config = {"type": "config", "version": JOURNAL_VERSION, **config}

    def load(self) -> dict[str, dict[str, Any]]:
        """Entries of a journal written with the same config ({} otherwise), keyed by input path.

        Tolerant: unreadable bytes, lines that are not JSON objects and rows missing their keys
        are skipped with a warning (those inputs are diagnosed again); a damaged or different
        first line means starting afresh.
        """
        if not self.path.is_file():
            return {}
        try:
            lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        except OSError as exc:
            log.warning("%s: cannot read the journal (%s); starting afresh", self.path, exc)
            return {}
        header = _json_line(lines[0]) if lines else None
        if header != self.config:
            if isinstance(header, dict) and header.get("type") == "config":
                log.warning("%s was written with other models or settings; starting afresh", self.path)
            else:
                log.warning("%s: damaged journal header; starting afresh", self.path)
            return {}
        entries: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(lines[1:], start=2):
            record = _json_line(line)
            if not (_is_row_record(record) or _is_study_record(record)):  # e.g. cut short: redone
                log.warning("%s: ignoring damaged line %d", self.path, number)
                continue
            entries[record["key"]] = record
        return entries

    def reset(self) -> None:
        with atomic_write(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.config) + "\n")

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append `records` and fsync, so a finished batch survives a crash."""
        if not records:
            return
        with open(self.path, "a+", encoding="utf-8") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(fh.tell() - 1)
                if fh.read(1) != "\n":  # an earlier append was cut short
                    fh.write("\n")
            fh.write("".join(json.dumps(r, default=str) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _is_row_record(record: Any) -> bool:
    """A journal row of this version: its key, the input's signature and a complete row."""
    return (
        isinstance(record, dict)
        and record.get("type") == "row"
        and isinstance(record.get("key"), str)
        and isinstance(record.get("row"), dict)
        and set(COLUMNS) <= set(record["row"])
        and (record.get("signature") is None or isinstance(record.get("signature"), list))
    )


def _is_study_record(record: Any) -> bool:
    """A journalled volume study: its key, signature, complete rows and study record."""
    return (
        isinstance(record, dict)
        and record.get("type") == "study"
        and isinstance(record.get("key"), str)
        and isinstance(record.get("rows"), list)
        and bool(record["rows"])
        and all(isinstance(r, dict) and set(COLUMNS) <= set(r) for r in record["rows"])
        and isinstance(record.get("study"), dict)
        and set(STUDY_KEYS) <= set(record["study"])
        and (record.get("signature") is None or isinstance(record.get("signature"), list))
    )


# --------------------------------------------------------------------------- rows


def _empty_row(path: Path) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["path"] = text(str(path))
    patient = patient_id_from_name(path)
    row["patient_id"] = text(patient) if patient else None
    return row


def _error_row(path: Path, exc: BaseException) -> dict[str, Any]:
    row = _empty_row(path)
    if isinstance(exc, DataError):
        message = str(exc).split("\n")[0]  # the file is in the row already
    else:
        message = f"{type(exc).__name__}: {exc}"
    row["error"] = text(message) or type(exc).__name__
    return row


def _result_row(path: Path, image: np.ndarray, result: Any) -> dict[str, Any]:
    row = _empty_row(path)
    row.update(
        height=int(image.shape[0]),
        width=int(image.shape[1]),
        probability=round(float(result.probability), 6),
        decision=decision(result.is_tumor, result.area_px),
        area_px=int(result.area_px),
        area_fraction=round(float(result.area_fraction_brain), 6),
        area_fraction_slice=round(float(result.area_fraction_slice), 6),
        bbox=list(result.bbox) if result.bbox is not None else None,
        centroid=[round(float(c), 2) for c in result.centroid] if result.centroid is not None else None,
        components=int(result.n_components),
    )
    return row





def _current_words(row: dict[str, Any]) -> dict[str, Any]:
    """A journalled row with today's decision words (journals before FLAGGED_EMPTY said `tumour`)."""
    if row.get("decision") == TUMOUR and not row.get("area_px"):
        row["decision"] = FLAGGED_EMPTY
    return row


def patient_summary(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per patient (rows with a patient id): slices, failed, flagged, tumour volume (px), largest slice."""
    columns = [
        "patient_id",
        "slices",
        "slices_failed",
        "slices_flagged",
        "slices_tumour",
        "tumour_volume_px",
        "largest_slice",
        "largest_area_px",
    ]
    table = pd.DataFrame(list(rows), columns=list(COLUMNS))
    table = table[table["patient_id"].notna()]
    out = []
    for patient, group in table.groupby("patient_id", sort=True):
        ok = group[group["error"].isna()]
        areas = ok["area_px"].fillna(0).astype(int)
        largest = ok.loc[areas.idxmax()] if len(ok) and areas.max() > 0 else None
        out.append(
            {
                "patient_id": patient,
                "slices": len(group),
                "slices_failed": int(group["error"].notna().sum()),
                "slices_flagged": int(ok["decision"].isin(FLAGGED).sum()),
                "slices_tumour": int((ok["decision"] == TUMOUR).sum()),
                "tumour_volume_px": int(areas.sum()),
                "largest_slice": largest["path"] if largest is not None else None,
                "largest_area_px": int(largest["area_px"]) if largest is not None else 0,
            }
        )
    return pd.DataFrame(out, columns=columns)


PATIENT_COLUMNS = (
    "patient_id",
    "slices",
    "slices_failed",
    "slices_flagged",  # flagged by the classifier (decision `tumour` or `flagged, nothing outlined`)
    "slices_tumour",  # with a non-empty final mask (decision `tumour`)
    "tumour_volume_px",  # predicted pixels summed over the rows (a study's: on its model slices)
    "largest_slice",  # its path (a study's: `<source>#slice=<k>`, k an input slice index)
    "largest_area_px",
    # volume studies only (STUDY_KEYS), measured on the input grid
    "source",
    "tumour_voxels",
    "tumour_volume_ml",
    "slice_range",
    "bbox_3d",
    "mask_nifti",
    "error",
)


def study_patient_row(study: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """patients.csv row (PATIENT_COLUMNS) of one volume study from its record and its rows."""
    ok = [r for r in rows if not r["error"]]
    largest = max(ok, key=lambda r: r["area_px"] or 0, default=None)
    if largest is not None and not largest["area_px"]:
        largest = None
    return {
        "patient_id": study["study_id"],
        "slices": len(ok) if ok else 0,
        "slices_failed": len(rows) - len(ok),
        "slices_flagged": sum(1 for r in ok if r["decision"] in FLAGGED),
        "slices_tumour": sum(1 for r in ok if r["decision"] == TUMOUR),
        "tumour_volume_px": sum(int(r["area_px"] or 0) for r in ok),
        "largest_slice": f"{study['source']}#slice={largest['slice']}" if largest is not None else None,
        "largest_area_px": int(largest["area_px"]) if largest is not None else 0,
        "source": study["source"],
        "tumour_voxels": study["tumour_voxels"],
        "tumour_volume_ml": study["tumour_volume_ml"],
        "slice_range": json.dumps(study["slice_range"]) if study["slice_range"] is not None else None,
        "bbox_3d": json.dumps(study["bbox_3d"]) if study["bbox_3d"] is not None else None,
        "mask_nifti": study["mask_nifti"],
        "error": study["error"],
    }


def _write_reports(
    out: Path,
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    studies: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]] = (),
) -> None:
    """report.csv/json and patients.csv from the slice-file `rows` and the volume `studies`
    ((record, rows) each; their rows follow the slice files' in report.csv)."""
    study_rows = [r for _, srows in studies for r in srows]
    csv_rows = []
    for row in [*rows, *study_rows]:
        flat = dict(row)
        for key in ("bbox", "centroid"):
            flat[key] = json.dumps(row[key]) if row[key] is not None else None
        csv_rows.append(flat)
    with atomic_write(out / REPORT_CSV, "w", encoding="utf-8", newline="") as fh:
        table = pd.DataFrame(csv_rows, columns=list(COLUMNS))
        # nullable integers: failed rows leave these empty without turning 64 into "64.0"
        table = table.astype({c: "Int64" for c in INTEGER_COLUMNS})
        table.to_csv(fh, index=False)
    patients = pd.DataFrame(
        [*patient_summary(rows).to_dict("records"), *(study_patient_row(st, sr) for st, sr in studies)],
        columns=list(PATIENT_COLUMNS),
    )
    patients = patients.astype({c: "Int64" for c in ("slices", "slices_failed", "slices_flagged",
                                                     "slices_tumour", "tumour_volume_px", "largest_area_px",
                                                     "tumour_voxels")})
    with atomic_write(out / PATIENTS_CSV, "w", encoding="utf-8", newline="") as fh:
        patients.to_csv(fh, index=False)
    all_rows = [*rows, *study_rows]
    summary = {
        "inputs": len(all_rows),
        "failed": sum(1 for r in all_rows if r["error"]),
        "flagged": sum(1 for r in all_rows if r["decision"] in FLAGGED),
        "found": sum(1 for r in all_rows if r["decision"] == TUMOUR),
        "flagged_nothing_outlined": sum(1 for r in all_rows if r["decision"] == FLAGGED_EMPTY),
        "studies": len(studies),
        "studies_failed": sum(1 for st, _ in studies if st["error"]),
    }
    atomic_write_json(
        out / REPORT_JSON,
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": settings,
            "summary": summary,
            "rows": all_rows,
            "studies": [st for st, _ in studies],
        },
    )


def _write_page(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any],
                studies: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]], paths: Sequence[Path],
                study_inputs: Sequence[StudyInput]) -> None:
    """OUT/index.html (`pipeline.inference.review`); a failure there is logged, never the run's."""
    from pipeline.inference.review.page import write_review_page

    try:
        write_review_page(out, rows, settings, studies, slice_paths=paths, study_inputs=study_inputs)
    except Exception:  # noqa: BLE001 - the reports are written; the page is a view of them
        log.warning("could not write the review page %s", out / "index.html", exc_info=True)


# --------------------------------------------------------------------------- the run





def _work_units(paths: Sequence[Path], batch_size: int, volumes: bool) -> list[tuple[list[Path], bool]]:
    """(inputs, is a study) in the order they are diagnosed and journalled: each study whole
    (`group_volumes`, when `volumes`), single slices in batches of `batch_size`."""
    units = group_volumes(paths) if volumes else [[p] for p in paths]
    work: list[tuple[list[Path], bool]] = []
    singles: list[Path] = []
    for unit in units:
        if len(unit) > 1:
            work.append((unit, True))
        else:
            singles += unit
            if len(singles) == batch_size:
                work.append((singles, False))
                singles = []
    if singles:
        work.append((singles, False))
    return work


def _predict_volume(pipe: Any, images: list[np.ndarray]) -> list[Any]:
    """`pipe.predict_volume` on one study; slice by slice (2D) if the volume route fails."""
    try:
        return list(pipe.predict_volume(images))
    except Exception:  # noqa: BLE001 - e.g. slices of different sizes: fall back to 2D
        log.warning("volume prediction failed; diagnosing its slices one by one", exc_info=True)
    return _predict_batch(pipe, images)


def _predict_batch(pipe: Any, images: list[np.ndarray]) -> list[Any]:
    """`pipe.predict` on the batch; if it fails, slice by slice so one bad slice cannot sink the others.

    Returns one SliceResult or exception per image.
    """
    try:
        return list(pipe.predict(images))
    except Exception:  # noqa: BLE001 - isolated below, slice by slice
        log.warning("batch prediction failed; retrying slice by slice", exc_info=True)
    results: list[Any] = []
    for image in images:
        try:
            results.append(pipe.predict_one(image))
        except Exception as exc:  # noqa: BLE001 - reported in the slice's row
            results.append(exc)
    return results


@dataclass(frozen=True)
class StudyInput:
    """One volume study to diagnose: a path a volume reader takes (`pipeline.volumes.readers`),
    or, with `channels`, the (pre-contrast, FLAIR, post-contrast) sources of one study (3D NIfTI
    files or DICOM series folders, `FOLDER@<SeriesInstanceUID>`; None for a missing one)."""

    path: Path  # the rows' `path`: the study, or its FLAIR source (else the first given)
    channels: tuple[str | None, str | None, str | None] | None = None
    study_id: str | None = None

    @classmethod
    def from_channels(
        cls, pre: str | None, flair: str | None, post: str | None, study_id: str | None = None
    ) -> StudyInput:
        first = next(src for src in (flair, pre, post) if src is not None)
        channels = tuple(None if s is None else str(s) for s in (pre, flair, post))
        return cls(path=_source_root(first).absolute(), channels=channels, study_id=study_id)

    @property
    def key(self) -> str:
        """The journal key: the study's path, or its channel sources."""
        if self.channels is None:
            return str(self.path)
        return "channels:" + "|".join(
            "" if c is None else str(Path(c).expanduser().absolute()) for c in self.channels
        )

    def name(self) -> str:
        """Study id before reading: `study_id`, else the path's name without `.nii[.gz]`."""
        from pipeline.volumes.readers import study_name

        return self.study_id or study_name(self.path)

    def output_name(self) -> str:
        """`<study name>__<hash>`: as `output_name`, without `.nii[.gz]` in the stem."""
        from pipeline.volumes.readers import study_name

        digest = output_name(self.path if self.channels is None else Path(self.key)).rsplit("__", 1)[1]
        return f"{safe_stem(study_name(self.path), 'study')}__{digest}"

    def load(self) -> Any:
        from pipeline.volumes.readers import read_trio, read_volume

        if self.channels is None:
            return read_volume(self.path)
        return read_trio(*self.channels, study_id=self.study_id)

    def files(self) -> list[Path]:
        """Every file the study is read from (for its journal signature)."""
        roots = [self.path] if self.channels is None else [_source_root(c) for c in self.channels if c]
        files: list[Path] = []
        for root in roots:
            if root.is_dir():
                files += sorted(p for p in root.rglob("*") if p.is_file())
            else:
                files.append(root)
        return files

    def signature(self) -> list[int] | None:
        """[files, total size, newest mtime_ns] of the study's files, to notice a changed study."""
        stats = [_signature(p) for p in self.files()]
        if not stats or any(st is None for st in stats):
            return None
        return [len(stats), sum(st[0] for st in stats), max(st[1] for st in stats)]


def _source_root(source: str | os.PathLike) -> Path:
    """The file or folder of a channel source (`FOLDER@<SeriesInstanceUID>` -> FOLDER)."""
    from pipeline.volumes.readers import SERIES_SEPARATOR

    path = Path(source).expanduser()
    if not path.exists() and SERIES_SEPARATOR in path.name:
        path = Path(str(path).rsplit(SERIES_SEPARATOR, 1)[0])
    return path


def _study_patient(name: str) -> str:
    from pipeline.data.readers import patient_id

    return text(patient_id(name) or name)


def _diagnose_study(
    study: StudyInput, pipe: Any, writer: OutputWriter, use_volume: bool, explain: bool
) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Diagnose one volume study -> (its record (STUDY_KEYS), its rows, Grad-CAM impossible).

    Any failure (reading, co-registration, limits, prediction, writing the mask) is the study's
    one error row; the batch goes on.
    """
    from pipeline.volumes.domain import to_model_slices
    from pipeline.volumes.nifti_out import measure_study

    record: dict[str, Any] = dict.fromkeys(STUDY_KEYS)
    record.update(study_id=_study_patient(study.name()), source=text(str(study.path)))
    name = study.output_name()
    explain_failed = False
    try:
        volume = study.load()
        record.update(
            study_id=_study_patient(volume.study_id),
            format=volume.format,
            shape=list(volume.shape),
            spacing_mm=None if volume.nominal_geometry else [round(v, 6) for v in volume.spacing],
            slice_axis=volume.slice_axis,
        )
        slices, grid = to_model_slices(volume)
        predict = pipe.predict_volume if use_volume else pipe.predict
        results = list(predict(slices))
        mask = grid.mask_to_input(np.stack([r.mask for r in results]))
        measures = measure_study(mask, volume)
        record["mask_nifti"] = writer.nifti(f"{VOLUME_DIR}/{name}_mask.nii.gz", mask, volume)
        rows = []
        for k, (image, result) in enumerate(zip(slices, results, strict=True)):
            index = grid.input_slice(k)
            row = _result_row(study.path, image, result)
            row.update(slice=index, patient_id=record["study_id"])
            if result.is_tumor:
                try:
                    if _write_outputs(
                        writer, f"{name}_s{index}", row, image, result, pipe, explain and not explain_failed
                    ):
                        explain_failed = True
                except Exception as exc:  # noqa: BLE001 - this slice's row
                    row = _error_row(study.path, exc)
                    row.update(slice=index, patient_id=record["study_id"])
            rows.append(row)
        rows.sort(key=lambda r: r["slice"])
        record.update(
            slices=len(rows),
            slices_flagged=sum(1 for r in rows if r["decision"] in FLAGGED),
            tumour_voxels=measures.voxels,
            tumour_volume_ml=measures.volume_ml,
            slice_range=list(measures.slice_range) if measures.slice_range else None,
            bbox_3d=list(measures.bbox) if measures.bbox else None,
        )
        return record, rows, explain_failed
    except Exception as exc:  # noqa: BLE001 - DataError or anything else a study can cause: its row
        row = _error_row(study.path, exc)
        row["patient_id"] = record["study_id"]
        record["error"] = row["error"]
        return record, [row], explain_failed


def _study_outputs_present(out: Path, entry: dict[str, Any]) -> bool:
    mask = entry["study"].get("mask_nifti")
    return (not mask or (out / mask).is_file()) and all(_outputs_present(out, r) for r in entry["rows"])


def _prepare_out(out: Path) -> None:
    """Create OUT and check that a file can be written in it; DataError saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        parent = next((q for q in out.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            reason += f"; {parent} is a file"
        raise DataError(f"cannot create or write to the output folder ({reason})", [out]) from exc


def _outputs_present(out: Path, row: dict[str, Any]) -> bool:
    """True when every output file a journalled row names is still in OUT."""
    return all(not row.get(key) or (out / row[key]).is_file() for key in OUTPUT_COLUMNS)


def _check_locations(items: Sequence[str | os.PathLike], out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError("the output path exists and is not a folder", [out])
    root = safe_resolve(out)
    inside = [
        str(item)
        for item in items
        if Path(item).expanduser().exists() and within(Path(item).expanduser(), root)
    ]
    if inside:
        raise DataError(
            f"input lies inside the output folder {root}; choose another --out so that no input "
            "can be overwritten",
            inside,
        )


def _write_outputs(
    writer: OutputWriter, name: str, row: dict[str, Any], image: np.ndarray, result: Any, pipeline: Any,
    explain: bool,
) -> bool:
    """Write the mask, overlay and (with `explain`) Grad-CAM of a flagged slice, filling `row`'s
    paths. Returns True when Grad-CAM is impossible for this classifier (not tried again)."""
    row["mask_path"] = writer.png(f"{MASK_DIR}/{name}_mask.png", result.mask * 255)
    row["overlay_path"] = writer.png(
        f"{OVERLAY_DIR}/{name}_overlay.png", overlay(image, {"prediction": (result.mask, PREDICTION_COLOR)})
    )
    if not explain:
        return False
    from pipeline.inference.gradcam import grad_cam

    try:
        heatmap = grad_cam(pipeline.classifier, image)
    except ValueError as exc:  # a classifier Grad-CAM cannot take apart
        log.warning("no Grad-CAM: %s", exc)
        return True
    row["gradcam_path"] = writer.png(f"{GRADCAM_DIR}/{name}_gradcam.png", heatmap_overlay(image, heatmap))
    return False


Loaded = list[tuple[Path, np.ndarray]]
Rows = dict[Path, dict[str, Any]]


def _load_unit(batch: Sequence[Path]) -> tuple[Loaded, Rows]:
    """Decode a work unit's files -> ([(path, image)], {path: error row} for files that failed)."""
    loaded: Loaded = []
    failed: Rows = {}
    for path in batch:
        try:
            loaded.append((path, load_slice(path)))
        except Exception as exc:  # noqa: BLE001 - DataError, or anything else a file can cause
            failed[path] = _error_row(path, exc)
    return loaded, failed


def _finish_unit(
    writer: OutputWriter, names: dict[Path, str], loaded: Loaded, results: list[Any], failed: Rows,
    pipeline: Any, explain: bool,
) -> tuple[Rows, bool]:
    """Rows of a predicted unit, with the outputs of its flagged slices written
    -> (rows, Grad-CAM impossible)."""
    batch_rows = dict(failed)
    impossible = False
    for (path, image), result in zip(loaded, results, strict=True):
        if isinstance(result, BaseException):
            batch_rows[path] = _error_row(path, result)
            continue
        row = _result_row(path, image, result)
        if result.is_tumor:
            try:
                if _write_outputs(writer, names[path], row, image, result, pipeline,
                                  explain and not impossible):
                    impossible = True
            except Exception as exc:  # noqa: BLE001 - e.g. a symlink in OUT: this input's row
                row = _error_row(path, exc)
        batch_rows[path] = row
    return batch_rows, impossible


def _journal_unit(journal: _Journal, rows: dict[str, dict[str, Any]], batch: list[Path],
                  done: Future) -> None:
    """Record a finished unit's rows (in input order) in `rows` and in the journal."""
    batch_rows, _ = done.result()
    records = []
    for path in batch:
        rows[str(path)] = batch_rows[path]
        records.append(
            {"type": "row", "key": str(path), "signature": _signature(path), "row": batch_rows[path]}
        )
    journal.append(records)


def run_diagnosis(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    pipeline: Any = None,
    models_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    threshold: float | None = None,
    min_component_px: int | None = None,
    batch_size: int = 16,
    explain: bool = False,
    resume: bool = True,
    progress: bool = True,
    include_masks: bool = False,
    volumes: bool = True,
    backend: str = "auto",
    precision: str = "auto",
    pre: str | os.PathLike | None = None,
    flair: str | os.PathLike | None = None,
    post: str | os.PathLike | None = None,
    study_id: str | None = None,
) -> DiagnosisResult:
    """Diagnose every slice and volume study found in `inputs` and write the reports into `out`
    (module docstring).

    inputs: files, folders and glob patterns (slices, NIfTI files, study folders).
    out: the output folder (created).
    pipeline: a ready `TumorPipeline` (tests, notebooks); else one is loaded from the pair
        `pipeline.paths.resolve_pair(models_dir, run_dir)` picks (default: `models/`, else the
        latest run); `allow_unverified` loads a pair without model sums (`load_pair`).
    threshold, min_component_px: override the pair's calibrated values when given.
    batch_size: slices read and predicted together (also the journal's granularity).
    explain: also write a Grad-CAM overlay per flagged slice.
    resume: skip inputs recorded in OUT's journal by an earlier run with the same settings.
    include_masks: also diagnose the dataset's `*_mask.*` files (skipped by default).
    volumes: diagnose inputs that form a study together (`group_volumes`, `predict_volume`);
        volume studies are diagnosed either way, with `predict_volume` only when True.
    pre, flair, post: one more study given channel by channel (3D NIfTI files or DICOM series
        folders, `FOLDER@<SeriesInstanceUID>`); a missing one is that study's error row.
        `study_id` names it (default: the FLAIR source's name).
    backend, precision: what runs the models when the pipeline is loaded here
        (`pipeline.inference.backends`; Grad-CAM always uses Keras); recorded in the settings.

    Returns a DiagnosisResult (its `exit_code` is 1 when any input failed). Raises DataError
    for unusable arguments: no input found, OUT a file, not writable or holding an input, no
    model pair or an invalid one.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from pipeline.volumes.readers import find_studies

    out = Path(out).expanduser().absolute()
    inputs = list(inputs)
    studies: list[StudyInput] = []
    if any(src is not None for src in (pre, flair, post)):
        studies.append(StudyInput.from_channels(
            *(None if s is None else str(s) for s in (pre, flair, post)), study_id=study_id
        ))
    _check_locations([*inputs, *(s.path for s in studies)], out)
    found, slice_items = find_studies(inputs, exclude=[out])
    studies = [StudyInput(p) for p in found] + studies
    paths = expand_inputs(slice_items, include_masks=include_masks, exclude=[out]) if slice_items else []
    skipped_masks = 0
    if not include_masks and slice_items:
        skipped_masks = len(expand_inputs(slice_items, include_masks=True, exclude=[out])) - len(paths)
    if not paths and not studies:
        raise DataError(
            "no input images (TIFF, PNG or JPEG) or volume studies (NIfTI, DICOM) found",
            [str(i) for i in inputs],
        )
    _prepare_out(out)

    if pipeline is None:
        from pipeline.inference.tumor_pipeline import TumorPipeline

        source = resolve_pair(models_dir, run_dir).pair_dir
        pipeline = TumorPipeline.from_dir(
            source,
            allow_unverified=allow_unverified,
            threshold=threshold,
            min_component_px=min_component_px,
            batch_size=batch_size,
            backend=backend,
            precision=precision,
        )
        models_label = text(str(safe_resolve(source)))
    else:
        pipeline.point = pipeline.point.replace(threshold=threshold, min_component_px=min_component_px)
        models_label = text(str(models_dir)) if models_dir else "(pipeline given by the caller)"
    settings = {
        "models": models_label,
        **pipeline.point.to_json(),  # the operating point applied, whole
        "volumes": bool(volumes) and hasattr(pipeline, "predict_volume"),
        "tile_size": int(pipeline.tile_size),
        "explain": bool(explain),
        "backend": str(pipeline.backend_name),
        "volume_domain": "axial PLS, 256x256 padded, uint8 as stored else min..max per channel",
    }

    writer = OutputWriter(out, [*paths, *(s.path for s in studies)])
    names = output_names(paths)
    journal = _Journal(out / JOURNAL, settings)
    done = journal.load() if resume else {}
    if not done:
        journal.reset()
    rows: dict[str, dict[str, Any]] = {}
    for p in paths:
        entry = done.get(str(p))
        if entry is None or entry.get("type") != "row" or not _outputs_present(out, entry["row"]):
            continue
        if entry.get("signature") == _signature(p):
            rows[str(p)] = _current_words(entry["row"])
    study_results: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for study in studies:
        entry = done.get(study.key)
        if entry is None or entry.get("type") != "study" or not _study_outputs_present(out, entry):
            continue
        if entry.get("signature") == study.signature():
            study_results[study.key] = (entry["study"], [_current_words(r) for r in entry["rows"]])
    resumed = len(rows) + len(study_results)
    todo = [p for p in paths if str(p) not in rows]
    studies_todo = [s for s in studies if s.key not in study_results]
    if resumed:
        log.info("resuming: %d of %d inputs already diagnosed in %s", resumed, len(paths) + len(studies), out)

    explain_failed = False
    with tqdm(
        total=len(paths) + len(studies),
        initial=resumed,
        unit="slice",
        desc="diagnose",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        # Overlap (profiled: decoding and writing PNGs are ~10 % of a diagnosis on OpenVINO): a
        # helper thread decodes the next unit and writes the last unit's outputs while the models
        # run; a unit is journalled once its outputs are written, so an interruption loses none.
        # Grad-CAM runs the Keras classifier, so with `explain` outputs are written in line.
        units = _work_units(todo, batch_size, settings["volumes"])
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diagnose-io") as io:
            ahead = io.submit(_load_unit, units[0][0]) if units else None
            pending: tuple[list[Path], Future] | None = None
            try:
                for number, (batch, is_volume) in enumerate(units):
                    loaded, failed = ahead.result()
                    following = number + 1 < len(units)
                    ahead = io.submit(_load_unit, units[number + 1][0]) if following else None
                    predict = _predict_volume if is_volume else _predict_batch
                    results = predict(pipeline, [image for _, image in loaded]) if loaded else []
                    finish = (writer, names, loaded, results, failed, pipeline,
                              explain and not explain_failed)
                    if explain:
                        batch_rows, impossible = _finish_unit(*finish)
                        explain_failed = explain_failed or impossible
                        done_unit: Future = Future()
                        done_unit.set_result((batch_rows, impossible))
                    else:
                        done_unit = io.submit(_finish_unit, *finish)
                    if pending is not None:
                        _journal_unit(journal, rows, *pending)
                        bar.update(len(pending[0]))
                    pending = (batch, done_unit)
            except BaseException:  # an interruption: keep the unit whose outputs are being written
                if pending is not None:
                    with contextlib.suppress(Exception):
                        _journal_unit(journal, rows, *pending)
                raise
            if pending is not None:
                _journal_unit(journal, rows, *pending)
                bar.update(len(pending[0]))
        for study in studies_todo:
            record, study_rows, impossible = _diagnose_study(
                study, pipeline, writer, settings["volumes"], explain and not explain_failed
            )
            explain_failed = explain_failed or impossible
            study_results[study.key] = (record, study_rows)
            journal.append(
                [{"type": "study", "key": study.key, "signature": study.signature(), "rows": study_rows,
                  "study": record}]
            )
            bar.update(1)

    ordered = [rows[str(p)] for p in paths]
    ordered_studies = [study_results[s.key] for s in studies]
    _write_reports(out, ordered, settings, ordered_studies)
    _write_page(out, ordered, settings, ordered_studies, paths, studies)
    return DiagnosisResult(
        out=out,
        rows=ordered + [r for _, srows in ordered_studies for r in srows],
        resumed=resumed,
        skipped_masks=skipped_masks,
        settings=settings,
        studies=[record for record, _ in ordered_studies],
    )

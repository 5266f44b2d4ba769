"""The report's schema: its files, columns and study keys, the rows, and what a run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.inference.image_loading import patient_id_from_name
from pipeline.inference.outputs import FLAGGED_EMPTY, TUMOUR, decision, text

REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PATIENTS_CSV = "patients.csv"
JOURNAL = ".progress.jsonl"
LOCK = ".diagnose.lock"  # flock'ed while a run writes into OUT (`pipeline.io_utils.exclusive_lock`)
MASK_DIR, OVERLAY_DIR, GRADCAM_DIR, VOLUME_DIR = "masks", "overlays", "gradcam", "volumes"
JOURNAL_VERSION = 3  # 2: the `slice` column and study records; 3: the `warning` column, and the header
# records model sums and variants (a header that differs is refused, not silently started afresh)
RETRY = "_retry"  # key of a row (and of its journal record) whose outputs could not be written
# exit codes of a diagnosis (`diagnose` documents them)
EXIT_OK, EXIT_INPUT_FAILED, EXIT_USAGE, EXIT_OUT_IN_USE, EXIT_WRITE_FAILED = 0, 1, 2, 3, 4
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
    "warning",  # diagnosed, but something about the input needs a look (outliers clipped, oblique)
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
    "warning",  # `; `-joined: outliers left out of the intensity scale, an oblique acquisition
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
    write_errors: list[str] = field(default_factory=list)  # outputs, journal or reports not written

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
        """EXIT_WRITE_FAILED (4) when an output, the journal or a report could not be written, else
        EXIT_INPUT_FAILED (1) when any input failed, else EXIT_OK (0)."""
        if self.write_errors:
            return EXIT_WRITE_FAILED
        return EXIT_INPUT_FAILED if self.n_failed else EXIT_OK
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
    "warning",
    "error",
)


def empty_row(path: Path) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["path"] = text(str(path))
    patient = patient_id_from_name(path)
    row["patient_id"] = text(patient) if patient else None
    return row


def error_row(path: Path, exc: BaseException) -> dict[str, Any]:
    row = empty_row(path)
    if isinstance(exc, DataError):
        message = str(exc).split("\n")[0]  # the file is in the row already
    else:
        message = f"{type(exc).__name__}: {exc}"
    row["error"] = text(message) or type(exc).__name__
    return row


def write_failed(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """`row` (its decision kept) whose outputs could not be written (`OutputWriteError`): the
    output paths cleared, the error said, and marked `RETRY` so the journal leaves it to a re-run."""
    row.update(dict.fromkeys(OUTPUT_COLUMNS))
    row["error"] = text(f"outputs not written ({exc}); a re-run retries it")
    row[RETRY] = True
    return row


def result_row(path: Path, image: np.ndarray, result: Any) -> dict[str, Any]:
    row = empty_row(path)
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





def current_words(row: dict[str, Any]) -> dict[str, Any]:
    """A journalled row with today's decision words (journals before FLAGGED_EMPTY said `tumour`)."""
    if row.get("decision") == TUMOUR and not row.get("area_px"):
        row["decision"] = FLAGGED_EMPTY
    return row

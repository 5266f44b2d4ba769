"""The reports of a diagnosis: report.csv, report.json, patients.csv, and the review page."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.inference.diagnosis.schema import (
    COLUMNS,
    FLAGGED,
    INTEGER_COLUMNS,
    PATIENT_COLUMNS,
    PATIENTS_CSV,
    REPORT_CSV,
    REPORT_JSON,
)
from pipeline.inference.outputs import FLAGGED_EMPTY, TUMOUR
from pipeline.io_utils import atomic_write_json, write_csv

log = logging.getLogger(__name__)

StudyRows = tuple[dict[str, Any], list[dict[str, Any]]]  # a volume study's record and its rows


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
        "warning": study.get("warning"),
        "error": study["error"],
    }


def _csv_rows(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """report.csv's table: boxes and centroids as JSON, integer columns without `.0`."""
    flat_rows = []
    for row in rows:
        flat = dict(row)
        for key in ("bbox", "centroid"):
            flat[key] = json.dumps(row[key]) if row[key] is not None else None
        flat_rows.append(flat)
    table = pd.DataFrame(flat_rows, columns=list(COLUMNS))
    # nullable integers: failed rows leave these empty without turning 64 into "64.0"
    return table.astype({c: "Int64" for c in INTEGER_COLUMNS})


def _patients(rows: list[dict[str, Any]], studies: Sequence[StudyRows]) -> pd.DataFrame:
    """patients.csv's table: the slice files' patients, then one row per volume study."""
    patients = pd.DataFrame(
        [*patient_summary(rows).to_dict("records"), *(study_patient_row(st, sr) for st, sr in studies)],
        columns=list(PATIENT_COLUMNS),
    )
    return patients.astype({c: "Int64" for c in ("slices", "slices_failed", "slices_flagged",
                                                 "slices_tumour", "tumour_volume_px", "largest_area_px",
                                                 "tumour_voxels")})


def _summary(all_rows: list[dict[str, Any]], studies: Sequence[StudyRows]) -> dict[str, int]:
    return {
        "inputs": len(all_rows),
        "failed": sum(1 for r in all_rows if r["error"]),
        "flagged": sum(1 for r in all_rows if r["decision"] in FLAGGED),
        "found": sum(1 for r in all_rows if r["decision"] == TUMOUR),
        "flagged_nothing_outlined": sum(1 for r in all_rows if r["decision"] == FLAGGED_EMPTY),
        "studies": len(studies),
        "studies_failed": sum(1 for st, _ in studies if st["error"]),
    }


def write_reports(
    out: Path,
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    studies: Sequence[StudyRows] = (),
) -> None:
    """report.csv/json and patients.csv from the slice-file `rows` and the volume `studies`
    ((record, rows) each; their rows follow the slice files' in report.csv)."""
    all_rows = [*rows, *(r for _, srows in studies for r in srows)]
    write_csv(out / REPORT_CSV, _csv_rows(all_rows))  # cells neutralised; report.json keeps them raw
    write_csv(out / PATIENTS_CSV, _patients(rows, studies))
    atomic_write_json(
        out / REPORT_JSON,
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": settings,
            "summary": _summary(all_rows, studies),
            "rows": all_rows,
            "studies": [st for st, _ in studies],
        },
    )


def write_page(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any],
                studies: Sequence[StudyRows], paths: Sequence[Path],
                study_inputs: Sequence[Any]) -> None:
    """OUT/index.html (`pipeline.inference.review`); a failure there is logged, never the run's."""
    from pipeline.inference.review.page import write_review_page

    try:
        write_review_page(out, rows, settings, studies, slice_paths=paths, study_inputs=study_inputs)
    except Exception:  # noqa: BLE001 - the reports are written; the page is a view of them
        log.warning("could not write the review page %s", out / "index.html", exc_info=True)

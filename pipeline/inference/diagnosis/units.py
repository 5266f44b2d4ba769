"""Diagnosing one work unit, as plain functions taking what they need: reading its files, running
the models (with the fallbacks: a failed batch slice by slice, a failed study as 2D slices),
writing its outputs and returning its rows. Every executor calls these."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, OutputWriteError
from pipeline.inference.diagnosis.journal import slice_records, study_record
from pipeline.inference.diagnosis.outputs import write_slice_outputs
from pipeline.inference.diagnosis.planning import SLICE_STUDY, STUDY, StudyInput, WorkUnit
from pipeline.inference.diagnosis.schema import (
    FLAGGED,
    RETRY,
    STUDY_KEYS,
    VOLUME_DIR,
    error_row,
    result_row,
    write_failed,
)
from pipeline.inference.image_loading import load_slice
from pipeline.inference.outputs import OutputWriter, output_names, text

log = logging.getLogger(__name__)

Loaded = list[tuple[Path, np.ndarray]]
Rows = dict[Path, dict[str, Any]]


@dataclass
class UnitContext:
    """What every unit needs: the pipeline, the writer into OUT and the settings that change
    outputs. `explain_failed` is set once Grad-CAM proved impossible (not tried again)."""

    pipeline: Any
    writer: OutputWriter
    volumes: bool
    explain: bool = False
    explain_failed: bool = False

    @property
    def explaining(self) -> bool:
        return self.explain and not self.explain_failed


def load_unit(batch: Sequence[Path]) -> tuple[Loaded, Rows]:
    """Decode a work unit's files -> ([(path, image)], {path: error row} for files that failed)."""
    loaded: Loaded = []
    failed: Rows = {}
    for path in batch:
        try:
            loaded.append((path, load_slice(path)))
        except Exception as exc:  # noqa: BLE001 - DataError, or anything else a file can cause
            failed[path] = error_row(path, exc)
    return loaded, failed


def predict_volume(pipe: Any, images: list[np.ndarray]) -> list[Any]:
    """`pipe.predict_volume` on one study; slice by slice (2D) if the volume route fails."""
    try:
        return list(pipe.predict_volume(images))
    except Exception:  # noqa: BLE001 - e.g. slices of different sizes: fall back to 2D
        log.warning("volume prediction failed; diagnosing its slices one by one", exc_info=True)
    return predict_batch(pipe, images)


def predict_batch(pipe: Any, images: list[np.ndarray]) -> list[Any]:
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


def predict_unit(pipe: Any, loaded: Loaded, is_volume: bool) -> list[Any]:
    """The models' results of a loaded unit of slice files (one per loaded image)."""
    if not loaded:
        return []
    predict = predict_volume if is_volume else predict_batch
    return predict(pipe, [image for _, image in loaded])


def finish_unit(
    writer: OutputWriter, loaded: Loaded, results: list[Any], failed: Rows, pipeline: Any, explain: bool,
) -> tuple[Rows, bool]:
    """Rows of a predicted unit, with the outputs of its flagged slices written
    -> (rows, Grad-CAM impossible)."""
    names = output_names([path for path, _ in loaded])
    batch_rows = dict(failed)
    impossible = False
    for (path, image), result in zip(loaded, results, strict=True):
        if isinstance(result, BaseException):
            batch_rows[path] = error_row(path, result)
            continue
        row = result_row(path, image, result)
        if result.is_tumor:
            try:
                if write_slice_outputs(writer, names[path], row, image, result, pipeline,
                                       explain and not impossible):
                    impossible = True
            except OutputWriteError as exc:  # full disk, read-only folder: OUT's problem, retried
                row = write_failed(row, exc)
            except Exception as exc:  # noqa: BLE001 - e.g. a symlink in OUT: this input's row
                row = error_row(path, exc)
        batch_rows[path] = row
    return batch_rows, impossible


def study_patient(name: str) -> str:
    from pipeline.data.readers import patient_id

    return text(patient_id(name) or name)


def _study_rows(study: StudyInput, name: str, slices: list[np.ndarray], grid: Any, results: list[Any],
                patient: str, ctx: UnitContext) -> tuple[list[dict[str, Any]], bool]:
    """A predicted volume study's rows, flagged slices' outputs written -> (rows, Grad-CAM impossible)."""
    explain_failed = False
    rows = []
    for k, (image, result) in enumerate(zip(slices, results, strict=True)):
        index = grid.input_slice(k)
        row = result_row(study.path, image, result)
        row.update(slice=index, patient_id=patient)
        if result.is_tumor:
            try:
                if write_slice_outputs(ctx.writer, f"{name}_s{index}", row, image, result, ctx.pipeline,
                                       ctx.explaining and not explain_failed):
                    explain_failed = True
            except OutputWriteError as exc:  # retried by the next run
                row = write_failed(row, exc)
            except Exception as exc:  # noqa: BLE001 - this slice's row
                row = error_row(study.path, exc)
                row.update(slice=index, patient_id=patient)
        rows.append(row)
    rows.sort(key=lambda r: r["slice"])
    return rows, explain_failed


def _noted(volume: Any, rows: list[dict[str, Any]]) -> str | None:
    """The study's warnings (`Volume.warnings`) as one text, put on each of its rows too."""
    warning = text("; ".join(volume.warnings)) if volume.warnings else None
    for row in rows:
        row["warning"] = warning
    return warning


def _skipped_rows(volume: Any, patient: str) -> list[dict[str, Any]]:
    """An error row for each file the reader left out of the study (a FIFO named `.dcm`, ...)."""
    rows = []
    for path, why in volume.skipped:
        row = error_row(path, DataError(why))
        row["patient_id"] = patient
        rows.append(row)
    return rows


def diagnose_study(study: StudyInput, ctx: UnitContext) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Diagnose one volume study -> (its record (STUDY_KEYS), its rows, Grad-CAM impossible).

    Any failure (reading, co-registration, limits, prediction, writing the mask) is the study's
    one error row; the batch goes on.
    """
    from pipeline.volumes.domain import model_volume, to_model_slices
    from pipeline.volumes.nifti_out import measure_study

    record: dict[str, Any] = dict.fromkeys(STUDY_KEYS)
    record.update(study_id=study_patient(study.name()), source=text(str(study.path)))
    name = study.output_name()
    try:
        volume = model_volume(study.load())
        record.update(
            study_id=study_patient(volume.study_id),
            format=volume.format,
            shape=list(volume.shape),
            spacing_mm=None if volume.nominal_geometry else [round(v, 6) for v in volume.spacing],
            slice_axis=volume.slice_axis,
        )
        slices, grid = to_model_slices(volume)
        predict = ctx.pipeline.predict_volume if ctx.volumes else ctx.pipeline.predict
        results = list(predict(slices))
        mask = grid.mask_to_input(np.stack([r.mask for r in results]))
        measures = measure_study(mask, volume)
        record["mask_nifti"] = ctx.writer.nifti(f"{VOLUME_DIR}/{name}_mask.nii.gz", mask, volume)
        rows, explain_failed = _study_rows(study, name, slices, grid, results, record["study_id"], ctx)
        record["warning"] = _noted(volume, rows)
        record.update(
            slices=len(rows),
            slices_flagged=sum(1 for r in rows if r["decision"] in FLAGGED),
            tumour_voxels=measures.voxels,
            tumour_volume_ml=measures.volume_ml,
            slice_range=list(measures.slice_range) if measures.slice_range else None,
            bbox_3d=list(measures.bbox) if measures.bbox else None,
        )
        return record, rows + _skipped_rows(volume, record["study_id"]), explain_failed
    except Exception as exc:  # noqa: BLE001 - DataError or anything else a study can cause: its row
        row = error_row(study.path, exc)
        row["patient_id"] = record["study_id"]
        record["error"] = row["error"]
        if isinstance(exc, OutputWriteError):  # its mask NIfTI: OUT's problem, retried
            row[RETRY] = True
        return record, [row], False


def run_study(unit: WorkUnit, ctx: UnitContext) -> list[dict[str, Any]]:
    """Diagnose a STUDY unit -> its journal record (a list of one)."""
    record, rows, impossible = diagnose_study(unit.study, ctx)
    ctx.explain_failed = ctx.explain_failed or impossible
    return [study_record(unit.study, record, rows)]


def run_unit(unit: WorkUnit, ctx: UnitContext) -> list[dict[str, Any]]:
    """Diagnose `unit` start to end (read, predict, write) -> its journal records."""
    if unit.kind == STUDY:
        return run_study(unit, ctx)
    loaded, failed = load_unit(unit.paths)
    results = predict_unit(ctx.pipeline, loaded, unit.kind == SLICE_STUDY and ctx.volumes)
    rows, impossible = finish_unit(ctx.writer, loaded, results, failed, ctx.pipeline, ctx.explaining)
    ctx.explain_failed = ctx.explain_failed or impossible
    return slice_records(unit.paths, rows)


def failed_study(study: StudyInput, exc: BaseException) -> dict[str, Any]:
    """The journal record of a volume study that could not be diagnosed at all: one error row."""
    record: dict[str, Any] = dict.fromkeys(STUDY_KEYS)
    row = error_row(study.path, exc)
    row["patient_id"] = record["study_id"] = study_patient(study.name())
    record.update(source=text(str(study.path)), error=row["error"])
    return study_record(study, record, [row])


def failed_unit(unit: WorkUnit, exc: BaseException) -> list[dict[str, Any]]:
    """The journal records of a unit that failed as a whole (e.g. its worker died): error rows."""
    if unit.kind == STUDY:
        return [failed_study(unit.study, exc)]
    return slice_records(unit.paths, {p: error_row(p, exc) for p in unit.paths})

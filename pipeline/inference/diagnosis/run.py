"""`run_diagnosis`: plan -> drop what the journal has -> execute -> write the reports and the page.

inputs: files, folders and glob patterns (slices, NIfTI files, study folders).
out: the output folder (created).
pipeline: a ready `TumorPipeline` (tests, notebooks); else one is loaded from the pair
    `pipeline.paths.resolve_pair(models_dir, run_dir)` picks (default: `models/`, else the
    latest run); `allow_unverified` loads a pair without model sums (`load_pair`).
threshold, min_component_px: override the pair's calibrated values when given.
batch_size: slices read and predicted together (also the journal's granularity).
explain: also write a Grad-CAM overlay per flagged slice.
resume: skip inputs recorded in OUT's journal by an earlier run with the same settings (a
    journal made with other settings or models is refused; `resume=False` starts it afresh).
include_masks: also diagnose the dataset's `*_mask.*` files (skipped by default).
volumes: diagnose inputs that form a study together (`group_volumes`, `predict_volume`);
    volume studies are diagnosed either way, with `predict_volume` only when True.
pre, flair, post: one more study given channel by channel (3D NIfTI files or DICOM series
    folders, `FOLDER@<SeriesInstanceUID>`); a missing one is that study's error row.
    `study_id` names it (default: the FLAIR source's name).
backend, precision: what runs the models when the pipeline is loaded here
    (`pipeline.inference.backends`; Grad-CAM always uses Keras); recorded in the settings.
executor: who runs the work units: "local" (this process), "ray", or an `Executor`
    (`executors.make_executor("ray", address=..., concurrency=...)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import OutputWriteError
from pipeline.inference.diagnosis.executors import Executor, make_executor
from pipeline.inference.diagnosis.job import Job
from pipeline.inference.diagnosis.journal import Journal, resumed, retry_messages, take
from pipeline.inference.diagnosis.outputs import out_lock, prepare_out, remove_leftovers
from pipeline.inference.diagnosis.planning import Inputs, find_inputs, plan
from pipeline.inference.diagnosis.reports import write_page, write_reports
from pipeline.inference.diagnosis.schema import JOURNAL, DiagnosisResult, error_row
from pipeline.inference.diagnosis.settings import PipelineSource, load_pipeline, run_settings
from pipeline.inference.diagnosis.units import failed_study

log = logging.getLogger(__name__)


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
    executor: str | Executor = "local",
) -> DiagnosisResult:
    """Diagnose every slice and volume study found in `inputs` and write the reports into `out`
    (the arguments: this module's docstring; the outputs: `pipeline.inference.diagnosis`).

    Returns a DiagnosisResult: its `exit_code` is 1 when any input failed, 4 when outputs, the
    journal or the reports could not be written (`write_errors` says what; those rows are not
    journalled, so a re-run retries them). Raises DataError for unusable arguments (no input
    found, OUT a file, not writable or holding an input, no model pair or an invalid one, a
    journal in OUT made with other settings and `resume`), OutputInUseError when another run
    holds OUT's lock, OutputWriteError when the journal cannot even be started.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner = make_executor(executor) if isinstance(executor, str) else executor
    out = Path(out).expanduser().absolute()
    found = find_inputs(inputs, out, include_masks=include_masks, channels=(pre, flair, post),
                        study_id=study_id)
    prepare_out(out)
    with out_lock(out):  # before the models load: a second run into OUT is refused at once
        remove_leftovers(out)
        pipeline, source, label = load_pipeline(
            pipeline, models_dir, run_dir, allow_unverified=allow_unverified, threshold=threshold,
            min_component_px=min_component_px, batch_size=batch_size, backend=backend, precision=precision)
        settings = run_settings(pipeline, label, volumes, explain)
        failures: list[str] = []
        rows, study_results, n_resumed = _resume_and_execute(
            runner, found, out, settings, pipeline, source, failures, explain=explain, resume=resume,
            batch_size=batch_size, progress=progress,
        )
        ordered, ordered_studies = _in_order(found, rows, study_results, failures)
        _write_outputs(out, ordered, settings, ordered_studies, found, failures)
    return DiagnosisResult(
        out=out, rows=ordered + [r for _, srows in ordered_studies for r in srows], resumed=n_resumed,
        skipped_masks=found.skipped_masks, settings=settings, studies=[rec for rec, _ in ordered_studies],
        write_errors=list(dict.fromkeys(failures)),
    )


def _in_order(found: Inputs, rows: dict, study_results: dict, failures: list[str]) -> tuple[list, list]:
    """The rows and studies in input order; an input the run did not reach (it stopped on a write
    failure) is an error row saying so, never left out."""
    stopped = RuntimeError("not diagnosed: the run stopped because OUT could not be written")
    ordered = [rows.get(str(p)) or error_row(p, stopped) for p in found.paths]
    ordered_studies = []
    for study in found.studies:
        if study.key not in study_results:
            entry = failed_study(study, stopped)
            study_results[study.key] = (entry["study"], entry["rows"])
        ordered_studies.append(study_results[study.key])
    return ordered, ordered_studies


def _write_outputs(out: Path, rows: list, settings: dict[str, Any], studies: list, found: Inputs,
                   failures: list[str]) -> None:
    """The reports and the page, for what is done; a report that cannot be written is a failure
    of the run (`failures`), not a traceback."""
    try:
        write_reports(out, rows, settings, studies)
    except OSError as exc:
        failures.append(f"the reports (report.csv, report.json, patients.csv) were not written: {exc}")
        return
    write_page(out, rows, settings, studies, found.paths, found.studies)


def _resume_and_execute(runner: Executor, found: Inputs, out: Path, settings: dict[str, Any], pipeline: Any,
                        source: PipelineSource, failures: list[str], *, explain: bool, resume: bool,
                        batch_size: int, progress: bool) -> tuple[dict, dict, int]:
    """Drop what OUT's journal already has, execute the rest -> (rows by path, studies by key,
    inputs resumed); what could not be written goes to `failures`."""
    journal = Journal(out / JOURNAL, settings)
    done = journal.load() if resume else {}  # DataError: made with other settings
    if not done:
        journal.reset()
    rows, study_results = resumed(done, out, found.paths, found.studies)
    n_resumed = len(rows) + len(study_results)
    if n_resumed:
        log.info("resuming: %d of %d inputs already diagnosed in %s", n_resumed,
                 len(found.paths) + len(found.studies), out)
    todo = plan([p for p in found.paths if str(p) not in rows],
                [s for s in found.studies if s.key not in study_results], batch_size, settings["volumes"])
    job = Job(todo, out, found.protected, settings["volumes"], explain, pipeline, source)
    try:
        _execute(runner, job, journal, rows, study_results, failures, progress,
                 total=len(found.paths) + len(found.studies), initial=n_resumed)
    except OutputWriteError as exc:  # the journal cannot be written (a full disk): stop here
        log.error("stopping: %s", exc)
        failures.append(f"stopped: the journal could not be written ({exc})")
    return rows, study_results, n_resumed


def _execute(runner: Executor, job: Job, journal: Journal, rows: dict, studies: dict, failures: list[str],
             progress: bool, total: int, initial: int) -> None:
    """Run `job` on `runner`, taking each finished unit's rows and journalling them; rows whose
    outputs could not be written are taken (the report shows them) but not journalled."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, unit="slice", desc="diagnose", disable=not progress,
              dynamic_ncols=True) as bar:
        def record(unit: Any, records: list[dict[str, Any]]) -> None:
            take(records, rows, studies)
            failures.extend(retry_messages(records))
            bar.update(unit.size)
            journal.append(records)  # OutputWriteError stops the executor

        runner.run(job, record)

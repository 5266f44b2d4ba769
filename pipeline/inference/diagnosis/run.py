"""`run_diagnosis`: plan -> drop what the journal has -> execute -> write the reports and the page.

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
executor: who runs the work units: "local" (this process), "ray", or an `Executor`
    (`executors.make_executor("ray", address=..., concurrency=...)`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.inference.diagnosis.executors import Executor, make_executor
from pipeline.inference.diagnosis.job import Job
from pipeline.inference.diagnosis.journal import Journal, resumed, take
from pipeline.inference.diagnosis.outputs import prepare_out
from pipeline.inference.diagnosis.planning import Inputs, find_inputs, plan
from pipeline.inference.diagnosis.reports import write_page, write_reports
from pipeline.inference.diagnosis.schema import JOURNAL, DiagnosisResult
from pipeline.inference.diagnosis.settings import PipelineSource, load_pipeline, run_settings

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

    Returns a DiagnosisResult (its `exit_code` is 1 when any input failed). Raises DataError
    for unusable arguments: no input found, OUT a file, not writable or holding an input, no
    model pair or an invalid one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner = make_executor(executor) if isinstance(executor, str) else executor
    out = Path(out).expanduser().absolute()
    found = find_inputs(inputs, out, include_masks=include_masks, channels=(pre, flair, post),
                        study_id=study_id)
    prepare_out(out)
    pipeline, source, label = load_pipeline(
        pipeline, models_dir, run_dir, allow_unverified=allow_unverified, threshold=threshold,
        min_component_px=min_component_px, batch_size=batch_size, backend=backend, precision=precision,
    )
    settings = run_settings(pipeline, label, volumes, explain)
    rows, study_results, n_resumed = _resume_and_execute(
        runner, found, out, settings, pipeline, source, explain=explain, resume=resume,
        batch_size=batch_size, progress=progress,
    )
    ordered = [rows[str(p)] for p in found.paths]
    ordered_studies = [study_results[s.key] for s in found.studies]
    write_reports(out, ordered, settings, ordered_studies)
    write_page(out, ordered, settings, ordered_studies, found.paths, found.studies)
    return DiagnosisResult(
        out=out, rows=ordered + [r for _, srows in ordered_studies for r in srows], resumed=n_resumed,
        skipped_masks=found.skipped_masks, settings=settings, studies=[rec for rec, _ in ordered_studies],
    )


def _resume_and_execute(runner: Executor, found: Inputs, out: Path, settings: dict[str, Any], pipeline: Any,
                        source: PipelineSource, *, explain: bool, resume: bool, batch_size: int,
                        progress: bool) -> tuple[dict, dict, int]:
    """Drop what OUT's journal already has, execute the rest -> (rows by path, studies by key,
    inputs resumed)."""
    journal = Journal(out / JOURNAL, settings)
    done = journal.load() if resume else {}
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
    _execute(runner, job, journal, rows, study_results, progress, total=len(found.paths) + len(found.studies),
             initial=n_resumed)
    return rows, study_results, n_resumed


def _execute(runner: Executor, job: Job, journal: Journal, rows: dict, studies: dict, progress: bool,
             total: int, initial: int) -> None:
    """Run `job` on `runner`, journalling each finished unit and taking its rows."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, unit="slice", desc="diagnose", disable=not progress,
              dynamic_ncols=True) as bar:
        def record(unit: Any, records: list[dict[str, Any]]) -> None:
            journal.append(records)
            take(records, rows, studies)
            bar.update(unit.size)

        runner.run(job, record)

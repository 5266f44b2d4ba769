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
  The journal's header records the settings, the variant of each model and the model sums:
  resuming with other ones is refused naming the difference (DataError); `resume=False`
  starts the journal afresh. The journal is read tolerantly: a damaged line (cut short, not
  JSON, not a row of this version) is skipped with a warning and its input diagnosed again, a
  damaged header or an older journal version starts afresh;
* one run per OUT: `.diagnose.lock` is flock'ed for the whole run (OutputInUseError for a second
  one; the lock dies with its process); temporary files a killed run left are removed;
* write failures (a full disk, a read-only folder) are not results: the row keeps its decision,
  says its outputs were not written and is not journalled, so the next run retries it; a journal
  that cannot be written stops the run; the reports are written for what is done, and
  `exit_code` is 4 (`DiagnosisResult.write_errors` says what failed);
* reports always get written: text that cannot be encoded (file names with non-UTF-8 bytes)
  is escaped (`\xff`), and terminal escape sequences are stripped from error messages;
* OUT must be a folder that can be created and written, and no input may lie inside OUT
  (refused with DataError); files
  under OUT found through folders or globs are ignored (they are earlier outputs). Each
  output path is checked to lie inside OUT and not to be an input before it is written.
"""

from pipeline.inference.diagnosis.executors import EXECUTORS, LocalExecutor, make_executor
from pipeline.inference.diagnosis.planning import StudyInput, WorkUnit, find_inputs, plan, work_units
from pipeline.inference.diagnosis.reports import patient_summary, study_patient_row
from pipeline.inference.diagnosis.run import run_diagnosis
from pipeline.inference.diagnosis.schema import (
    COLUMNS,
    JOURNAL,
    PATIENT_COLUMNS,
    PATIENTS_CSV,
    REPORT_CSV,
    REPORT_JSON,
    STUDY_KEYS,
    DiagnosisResult,
)
from pipeline.inference.outputs import (
    FLAGGED_EMPTY,
    MIN_VOLUME_SLICES,
    NO_TUMOUR,
    TUMOUR,
    decision,
    group_volumes,
    output_name,
    output_names,
    safe_stem,
    text,
)

__all__ = [
    "COLUMNS",
    "EXECUTORS",
    "FLAGGED_EMPTY",
    "JOURNAL",
    "MIN_VOLUME_SLICES",
    "NO_TUMOUR",
    "PATIENTS_CSV",
    "PATIENT_COLUMNS",
    "REPORT_CSV",
    "REPORT_JSON",
    "STUDY_KEYS",
    "TUMOUR",
    "DiagnosisResult",
    "LocalExecutor",
    "StudyInput",
    "WorkUnit",
    "decision",
    "find_inputs",
    "group_volumes",
    "make_executor",
    "output_name",
    "output_names",
    "patient_summary",
    "plan",
    "run_diagnosis",
    "safe_stem",
    "study_patient_row",
    "text",
    "work_units",
]

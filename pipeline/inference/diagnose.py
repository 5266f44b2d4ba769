"""Batch diagnosis: run the two-stage pipeline over many slices and write reports a person can read.

Inputs are files, folders (recursive) and glob patterns (`image_loading.expand_inputs`).
Everything is written inside the output folder OUT:

    report.csv, report.json   one row per input (COLUMNS); report.json also holds the settings
    patients.csv              per patient: slices, flagged slices, tumour volume in pixels,
                              the slice with the largest tumour area
    masks/<name>_mask.png     predicted mask (0/255) of every tumour-positive slice
    overlays/<name>_overlay.png   the prediction's contour (red) on the FLAIR channel
    gradcam/<name>_gradcam.png    with `explain`: Grad-CAM of the classifier on flagged slices
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

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.readers import SLICE_PATTERN
from pipeline.errors import DataError
from pipeline.inference.image_loading import expand_inputs, load_slice, patient_id_from_name
from pipeline.inference.overlays import PREDICTION_COLOR, encode_png, heatmap_overlay, overlay
from pipeline.io_utils import atomic_write, atomic_write_bytes, atomic_write_json
from pipeline.paths import resolve_pair, safe_resolve

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "DiagnosisResult",
    "output_name",
    "output_names",
    "patient_summary",
    "resolve_models_dir",
    "run_diagnosis",
    "text",
]

REPORT_CSV = "report.csv"
REPORT_JSON = "report.json"
PATIENTS_CSV = "patients.csv"
JOURNAL = ".progress.jsonl"
MASK_DIR, OVERLAY_DIR, GRADCAM_DIR = "masks", "overlays", "gradcam"
JOURNAL_VERSION = 1
MIN_VOLUME_SLICES = 3  # fewer slices of a study are diagnosed one by one
TUMOUR, NO_TUMOUR = "tumour", "no tumour"

COLUMNS = (
    "path",  # absolute path of the input (bytes that are not UTF-8 escaped as \xNN)
    "patient_id",  # TCGA_XX_NNNN from the file or folder name, else empty
    "height",
    "width",
    "probability",  # classifier tumour probability
    "decision",  # "tumour" / "no tumour"; empty when the input failed
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

INTEGER_COLUMNS = ("height", "width", "area_px", "components")
OUTPUT_COLUMNS = ("mask_path", "overlay_path", "gradcam_path")
_TERMINAL_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass
class DiagnosisResult:
    """What `run_diagnosis` did: the rows (COLUMNS, input order) and where they were written."""

    out: Path
    rows: list[dict[str, Any]]
    resumed: int = 0  # inputs taken from the journal of an earlier run
    skipped_masks: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(1 for row in self.rows if row["error"])

    @property
    def n_flagged(self) -> int:
        return sum(1 for row in self.rows if row["decision"] == TUMOUR)

    @property
    def exit_code(self) -> int:
        """0 when every input was diagnosed, 1 when any failed."""
        return 1 if self.n_failed else 0


# --------------------------------------------------------------------------- models


def resolve_models_dir(flag: str | os.PathLike | None = None) -> Path:
    """The pair directory `pipeline.paths.resolve_pair(models=flag)` picks (for `pipeline.benchmarks`)."""
    return resolve_pair(models=flag).pair_dir


# --------------------------------------------------------------------------- names and paths


def text(value: str) -> str:
    """`value` made safe for a report: undecodable file-name bytes (surrogates) as `\\xNN`,
    terminal escape sequences removed, other control characters (newlines too) as one space."""
    escaped = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(" ", _TERMINAL_ESCAPE.sub("", escaped)).strip()


def output_name(path: Path) -> str:
    """Output base name of an input: `<stem>__<hash of its absolute path>` (module docstring)."""
    digest = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:8]
    stem = re.sub(r"[^\w.-]+", "_", text(Path(path).stem)).strip("._") or "slice"
    return f"{stem}__{digest}"


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Input path -> `output_name(path)`: unique per input path, the same in every run."""
    return {p: output_name(p) for p in paths}


def _signature(path: Path) -> list[int] | None:
    """(size, mtime_ns) of an input, to notice when a journalled input has changed since."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _within(path: Path, folder: Path) -> bool:
    path = safe_resolve(path)
    return path == folder or path.is_relative_to(folder)


class _Writer:
    """Writes output files atomically, only inside OUT and never over an input."""

    def __init__(self, out: Path, inputs: Sequence[Path]):
        self.out = out
        self.root = safe_resolve(out)
        self.protected = {safe_resolve(p) for p in inputs}

    def png(self, relative: str, image: np.ndarray) -> str:
        """Write `image` as OUT/`relative`; DataError (the input's row) if that lands outside OUT
        (e.g. through a symlink already there) or on an input."""
        target = self.out / relative
        resolved = safe_resolve(target)
        if not _within(resolved, self.root) or resolved in self.protected:
            raise DataError(
                f"refusing to write {text(relative)}: it resolves to {text(str(resolved))}, "
                "outside the output folder or onto an input file",
                [target],
            )
        atomic_write_bytes(target, encode_png(image))
        return relative


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
            if not _is_row_record(record):  # e.g. a line cut short by an interruption: redone
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
        decision=TUMOUR if result.is_tumor else NO_TUMOUR,
        area_px=int(result.area_px),
        area_fraction=round(float(result.area_fraction_brain), 6),
        area_fraction_slice=round(float(result.area_fraction_slice), 6),
        bbox=list(result.bbox) if result.bbox is not None else None,
        centroid=[round(float(c), 2) for c in result.centroid] if result.centroid is not None else None,
        components=int(result.n_components),
    )
    return row


def patient_summary(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per patient (rows with a patient id): slices, failed, flagged, tumour volume (px), largest slice."""
    columns = [
        "patient_id",
        "slices",
        "slices_failed",
        "slices_flagged",
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
                "slices_flagged": int((ok["decision"] == TUMOUR).sum()),
                "tumour_volume_px": int(areas.sum()),
                "largest_slice": largest["path"] if largest is not None else None,
                "largest_area_px": int(largest["area_px"]) if largest is not None else 0,
            }
        )
    return pd.DataFrame(out, columns=columns)


def _write_reports(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    csv_rows = []
    for row in rows:
        flat = dict(row)
        for key in ("bbox", "centroid"):
            flat[key] = json.dumps(row[key]) if row[key] is not None else None
        csv_rows.append(flat)
    with atomic_write(out / REPORT_CSV, "w", encoding="utf-8", newline="") as fh:
        table = pd.DataFrame(csv_rows, columns=list(COLUMNS))
        # nullable integers: failed rows leave these empty without turning 64 into "64.0"
        table = table.astype({c: "Int64" for c in INTEGER_COLUMNS})
        table.to_csv(fh, index=False)
    with atomic_write(out / PATIENTS_CSV, "w", encoding="utf-8", newline="") as fh:
        patient_summary(rows).to_csv(fh, index=False)
    summary = {
        "inputs": len(rows),
        "failed": sum(1 for r in rows if r["error"]),
        "flagged": sum(1 for r in rows if r["decision"] == TUMOUR),
    }
    atomic_write_json(
        out / REPORT_JSON,
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": settings,
            "summary": summary,
            "rows": rows,
        },
    )


# --------------------------------------------------------------------------- the run


def group_volumes(paths: Sequence[Path]) -> list[list[Path]]:
    """Split `paths` into work units: studies (same folder and `<study>_<n>` stem, at least
    `MIN_VOLUME_SLICES`, sorted by n) and single slices, each single a unit of its own."""
    studies: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    for p in paths:
        match = SLICE_PATTERN.match(p.stem)
        if match is not None and not match["mask"]:
            study = match["stem"][: -len(match["slice"]) - 1]
            studies.setdefault((p.parent, study), []).append((int(match["slice"]), p))
    volume_of: dict[Path, tuple[Path, str]] = {}
    for key, members in studies.items():
        if len(members) >= MIN_VOLUME_SLICES:
            volume_of.update({p: key for _, p in members})
    units: list[list[Path]] = []
    seen: set[tuple[Path, str]] = set()
    for p in paths:
        key = volume_of.get(p)
        if key is None:
            units.append([p])
        elif key not in seen:
            seen.add(key)
            units.append([q for _, q in sorted(studies[key], key=lambda t: t[0])])
    return units


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
        if Path(item).expanduser().exists() and _within(Path(item).expanduser(), root)
    ]
    if inside:
        raise DataError(
            f"input lies inside the output folder {root}; choose another --out so that no input "
            "can be overwritten",
            inside,
        )


def _write_outputs(
    writer: _Writer, name: str, row: dict[str, Any], image: np.ndarray, result: Any, pipeline: Any,
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
) -> DiagnosisResult:
    """Diagnose every slice found in `inputs` and write the reports into `out` (module docstring).

    inputs: files, folders and glob patterns.
    out: the output folder (created).
    pipeline: a ready `TumorPipeline` (tests, notebooks); else one is loaded from the pair
        `pipeline.paths.resolve_pair(models_dir, run_dir)` picks (default: `models/`, else the
        latest run); `allow_unverified` loads a pair without model sums (`load_pair`).
    threshold, min_component_px: override the pair's calibrated values when given.
    batch_size: slices read and predicted together (also the journal's granularity).
    explain: also write a Grad-CAM overlay per flagged slice.
    resume: skip inputs recorded in OUT's journal by an earlier run with the same settings.
    include_masks: also diagnose the dataset's `*_mask.*` files (skipped by default).
    volumes: diagnose inputs that form a study together (`group_volumes`, `predict_volume`).
    backend, precision: what runs the models when the pipeline is loaded here
        (`pipeline.inference.backends`; Grad-CAM always uses Keras); recorded in the settings.

    Returns a DiagnosisResult (its `exit_code` is 1 when any input failed). Raises DataError
    for unusable arguments: no input found, OUT a file, not writable or holding an input, no
    model pair or an invalid one.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out).expanduser().absolute()
    _check_locations(inputs, out)
    paths = expand_inputs(inputs, include_masks=include_masks, exclude=[out])
    skipped_masks = 0
    if not include_masks:
        skipped_masks = len(expand_inputs(inputs, include_masks=True, exclude=[out])) - len(paths)
    if not paths:
        raise DataError("no input images found (TIFF, PNG or JPEG)", [str(i) for i in inputs])
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
        if threshold is not None:
            pipeline.threshold = float(threshold)
        if min_component_px is not None:
            pipeline.min_component_px = int(min_component_px)
        models_label = text(str(models_dir)) if models_dir else "(pipeline given by the caller)"
    settings = {
        "models": models_label,
        "threshold": float(pipeline.threshold),
        "seg_threshold": float(getattr(pipeline, "seg_threshold", 0.5)),
        "min_component_px": int(getattr(pipeline, "min_component_px", 0)),
        "min_volume_px": int(getattr(pipeline, "min_volume_px", 0)),
        "neighbour_weight": float(getattr(pipeline, "neighbour_weight", 0.0)),
        "volumes": bool(volumes) and hasattr(pipeline, "predict_volume"),
        "tile_size": int(getattr(pipeline, "tile_size", 0)),
        "explain": bool(explain),
        "backend": str(getattr(pipeline, "backend_name", "keras")),
    }

    writer = _Writer(out, paths)
    names = output_names(paths)
    journal = _Journal(out / JOURNAL, settings)
    done = journal.load() if resume else {}
    if not done:
        journal.reset()
    rows: dict[str, dict[str, Any]] = {}
    for p in paths:
        entry = done.get(str(p))
        if entry is None or not _outputs_present(out, entry["row"]):
            continue
        if entry.get("signature") == _signature(p):
            rows[str(p)] = entry["row"]
    resumed = len(rows)
    todo = [p for p in paths if str(p) not in rows]
    if resumed:
        log.info("resuming: %d of %d inputs already diagnosed in %s", resumed, len(paths), out)

    explain_failed = False
    with tqdm(
        total=len(paths),
        initial=resumed,
        unit="slice",
        desc="diagnose",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for batch, is_volume in _work_units(todo, batch_size, settings["volumes"]):
            batch_rows: dict[Path, dict[str, Any]] = {}
            loaded: list[tuple[Path, np.ndarray]] = []
            for path in batch:
                try:
                    loaded.append((path, load_slice(path)))
                except Exception as exc:  # noqa: BLE001 - DataError, or anything else a file can cause
                    batch_rows[path] = _error_row(path, exc)
            predict = _predict_volume if is_volume else _predict_batch
            results = predict(pipeline, [image for _, image in loaded]) if loaded else []
            for (path, image), result in zip(loaded, results, strict=True):
                if isinstance(result, BaseException):
                    batch_rows[path] = _error_row(path, result)
                    continue
                row = _result_row(path, image, result)
                if result.is_tumor:
                    try:
                        if _write_outputs(
                            writer, names[path], row, image, result, pipeline, explain and not explain_failed
                        ):
                            explain_failed = True
                    except Exception as exc:  # noqa: BLE001 - e.g. a symlink in OUT: this input's row
                        row = _error_row(path, exc)
                batch_rows[path] = row
            records = []
            for path in batch:
                rows[str(path)] = batch_rows[path]
                records.append(
                    {"type": "row", "key": str(path), "signature": _signature(path), "row": batch_rows[path]}
                )
            journal.append(records)
            bar.update(len(batch))

    ordered = [rows[str(p)] for p in paths]
    _write_reports(out, ordered, settings)
    return DiagnosisResult(
        out=out, rows=ordered, resumed=resumed, skipped_masks=skipped_masks, settings=settings
    )

"""`make evaluate`: choose the models and the patients, predict, and write the report and figures.

Layers, thinnest on top:

- `evaluate(...)`: from directories (models or run, data root, split file) to a written report;
- `evaluate_pipeline(...)`: a built pipeline and segmenter over in-memory slices;
- `write_evaluation(...)`: predictions already made -> `report.json`, `report.md`, `report.html`
  (figures inline, tables sortable), tables, PNGs.

Tests drive the lower layers with stub models whose outputs are known by hand.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import __version__
from pipeline.data.splits import (
    ALL,
    EVAL_SPLITS,
    load_splits,
    pair_splits_file,
    require_split_file,
    select_positions,
)
from pipeline.evaluation import figures
from pipeline.evaluation.predictions import PipelineLike, SegmentFn, SlicePredictions, predict_slices
from pipeline.evaluation.report import build_report, render_markdown
from pipeline.evaluation.report_html import render_html
from pipeline.io_utils import atomic_write, atomic_write_json, write_csv
from pipeline.paths import MODELS_DIR, RUNS_DIR, resolve_pair
from pipeline.paths import PairSource as ModelSource

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "evaluate", "evaluate_pipeline", "write_evaluation"]

# Which pair: `pipeline.paths.resolve_pair` (`ModelSource` is its `PairSource`), the rule every
# command shares: --models > --run > models/ > the latest run holding a pair. Which split file and
# which rows: `pipeline.data.splits` (`pair_splits_file`, `select_positions`).


# --------------------------------------------------------------------------- writing a report


@dataclass
class EvaluationResult:
    """What an evaluation wrote: the report dict and the paths of every output file."""

    report: dict[str, Any]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def write_evaluation(
    rows: pd.DataFrame,
    images: np.ndarray,
    masks: np.ndarray,
    preds: SlicePredictions,
    out_dir: str | os.PathLike,
    *,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Score `preds` against `masks` and write `report.json`, `report.md`, `report.html`, CSV tables and PNGs.

    rows (N index rows), images (N, H, W, 3) uint8, masks (N, H, W) 0/1 and preds are aligned.
    Every file is written atomically into `out_dir`.
    """
    out_dir = Path(out_dir)
    prov = dict(provenance or {})
    prov.setdefault("n_patients", int(rows["patient_id"].nunique()))
    prov.setdefault("n_slices", int(len(rows)))
    prov.setdefault("n_tumor_slices", int(sum(np.asarray(m).any() for m in masks)))
    prov.setdefault("threshold", float(threshold))
    report, slices, patients = build_report(
        rows, masks, preds, threshold=threshold, n_boot=n_boot, seed=seed, provenance=prov
    )
    files: dict[str, Path] = {}
    clf = report["classifier"]
    files["roc_pr"] = figures.plot_roc_pr(
        slices["has_tumor"],
        slices["probability"],
        threshold,
        out_dir / "roc_pr_curves.png",
        predicted=slices["flagged"],
    )
    files["confusion_matrix"] = figures.plot_confusion_matrix(
        clf["tn"], clf["fp"], clf["fn"], clf["tp"], threshold, out_dir / "confusion_matrix.png"
    )
    files["patient_dice"] = figures.plot_patient_dice(
        patients["e2e_dice"], patients["seg_dice"], out_dir / "patient_dice.png"
    )
    grid = figures.overlay_grid_rows(slices, patients, images, masks, preds.pipeline_masks)
    files["overlays"] = figures.plot_overlay_grid(grid, out_dir / "overlays_best_worst.png")
    report["figures"] = {name: path.name for name, path in files.items()}

    files["slices_csv"] = out_dir / "slices.csv"
    files["patients_csv"] = out_dir / "patients.csv"
    for key, table in (("slices_csv", slices), ("patients_csv", patients)):
        write_csv(files[key], table)
    report["tables"] = {"slices": "slices.csv", "patients": "patients.csv"}

    files["report_json"] = out_dir / "report.json"
    atomic_write_json(files["report_json"], report)
    files["report_md"] = out_dir / "report.md"
    markdown = render_markdown(report, report["figures"])
    with atomic_write(files["report_md"], "w", encoding="utf-8") as fh:
        fh.write(markdown)
    files["report_html"] = out_dir / "report.html"
    with atomic_write(files["report_html"], "w", encoding="utf-8") as fh:
        fh.write(render_html(markdown, out_dir))
    return EvaluationResult(report, out_dir, files)


def evaluate_pipeline(
    pipeline: PipelineLike,
    segment: SegmentFn,
    rows: pd.DataFrame,
    images: np.ndarray,
    masks: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    threshold: float,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = True,
    volume_ids: np.ndarray | None = None,
    min_volume_px: int = 0,
) -> EvaluationResult:
    """Run `pipeline` (end-to-end) and `segment` (segmenter alone) over the slices, then `write_evaluation`.

    `threshold` is the classifier threshold the pipeline gates with; the classifier metrics
    use the same one. `volume_ids` (study per slice, contiguous, in slice order) runs the
    pipeline per patient volume with the 3D steps (`predict_volume`) and applies
    `min_volume_px` to the segmenter-alone masks too.
    """
    preds = predict_slices(pipeline, images, segment, batch_size=batch_size, progress=progress,
                           volume_ids=volume_ids, min_volume_px=min_volume_px)
    return write_evaluation(
        rows,
        images,
        masks,
        preds,
        out_dir,
        threshold=threshold,
        n_boot=n_boot,
        seed=seed,
        provenance=provenance,
    )


# --------------------------------------------------------------------------- from directories


def model_files_provenance(pair_dir: Path, artifact: Any) -> dict[str, str]:
    """sha256 of each model file of the pair: as recorded in its `PairArtifact` (which `load_pair`
    verified on load), else (a pair loaded with `allow_unverified`) computed here."""
    from pipeline.models.model_io import sha256_of

    if artifact.verified:
        return dict(artifact.sha256)
    return {p.name: sha256_of(p) for p in sorted(Path(pair_dir).glob("*.keras"))}


def _split_patients_missing(index_df: pd.DataFrame, split: str, splits_path: Path | None) -> list[str]:
    """Patients the split file puts in `split` that the data root does not hold (reported, not fatal)."""
    if split == ALL or splits_path is None:
        return []
    splits = load_splits(splits_path)
    listed = set(splits.loc[splits["split"] == split, "patient_id"])
    return sorted(listed - set(index_df["patient_id"]))


def _from_scratch(weights: Any) -> bool | None:
    """Whether a backbone-weights label means random initialisation (`backbone_weights.from_scratch`;
    None when the pair records none)."""
    if weights is None:
        return None
    from pipeline.models.backbone_weights import from_scratch

    return from_scratch(weights)


def default_out_dir(source: ModelSource, split: str) -> Path:
    """`<run or models dir>/evaluation/<split>/`."""
    return (source.run_dir or source.pair_dir) / "evaluation" / split


def evaluate(
    *,
    models: str | os.PathLike | None = None,
    run: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    splits: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    runs_dir: str | os.PathLike = RUNS_DIR,
    default_models: str | os.PathLike = MODELS_DIR,
    skip_bad: bool = False,
    allow_unverified: bool = False,
    backend: str = "auto",
    precision: str = "auto",
) -> EvaluationResult:
    """Evaluate a trained pair on the patients of `split` under `data_dir` and write the report.

    models/run: which pair (`pipeline.paths.resolve_pair`); data_dir: `pipeline.paths.resolve_data_dir` rules;
    split: "test" | "val" | "train" (patients of the split file `splits`, default the run's
    copy) or "all" (every patient under the root, no split file needed); threshold: the
    classifier threshold (default: the one calibrated at training, in the pair's meta);
    skip_bad: leave out the slices the index finds bad (`index_dataset(skip_bad=True)`);
    allow_unverified: load a pair without model sums (`load_pair`); backend, precision: what runs
    the models (`pipeline.inference.backends`; the report's provenance says which ran).
    Returns the `EvaluationResult` with the paths written under `out_dir` (default
    `<run or models dir>/evaluation/<split>/`).
    """
    from pipeline.inference.tumor_pipeline import TumorPipeline
    from pipeline.models.pair_artifact import read_pair_meta
    from pipeline.paths import resolve_cache_dir, resolve_data_dir

    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(EVAL_SPLITS)}")
    source = resolve_pair(models, run, runs_dir=runs_dir, default_models=default_models)
    artifact = read_pair_meta(source.pair_dir, allow_unverified=allow_unverified)  # fail fast
    splits_path = pair_splits_file(splits, source, default_models) if split != ALL else None
    root = resolve_data_dir(data_dir)
    require_split_file(split, splits_path)  # before indexing: fail fast
    data = _patients(root, resolve_cache_dir(cache_dir), split, splits_path, skip_bad, progress)

    # The product's own loader: the operating point comes from the validated pipeline.json.
    pipeline = TumorPipeline.from_dir(
        source.pair_dir, allow_unverified=allow_unverified, threshold=threshold, batch_size=batch_size,
        backend=backend, precision=precision,
    )
    provenance = {
        "models_dir": str(source.pair_dir),
        "run_dir": str(source.run_dir) if source.run_dir else None,
        "model_files_sha256": model_files_provenance(source.pair_dir, artifact),
        "data_root": str(root),
        "split": split,
        "split_file": str(splits_path) if splits_path else None,
        "split_patients_missing_from_data": data.missing,
        **_run_provenance(data.rows, pipeline, artifact, threshold_given=threshold is not None),
        "n_boot": n_boot,
        "seed": seed,
    }
    out = Path(out_dir) if out_dir is not None else default_out_dir(source, split)
    log.info("evaluating %s on %d slices of %d patients -> %s", source.pair_dir, len(data.rows),
             provenance["n_patients"], out)
    return evaluate_pipeline(
        pipeline, pipeline.segment_only, data.rows, data.images, data.masks, out,
        threshold=pipeline.point.threshold, batch_size=batch_size, n_boot=n_boot, seed=seed,
        provenance=provenance, progress=progress, volume_ids=data.rows["case"].to_numpy(),
        min_volume_px=pipeline.point.min_volume_px,
    )


@dataclass
class _Patients:
    """The slices of the patients evaluated: index rows, images, masks (aligned), and the split's
    patients missing from the data root."""

    rows: pd.DataFrame
    images: np.ndarray
    masks: np.ndarray
    missing: list[str]


def _patients(root: Path, cache: Path, split: str, splits_path: Path | None, skip_bad: bool,
              progress: bool) -> _Patients:
    """Index `root`, pick the rows of `split` and decode them (the array cache)."""
    from pipeline.data.array_cache import load_arrays
    from pipeline.data.index import index_dataset

    index_df = index_dataset(root, cache_dir=cache, skip_bad=skip_bad, progress=progress)
    positions = select_positions(index_df, split, splits_path)
    missing = _split_patients_missing(index_df, split, splits_path)
    if missing:
        log.warning("%d patient(s) of the %s split are not under %s: %s", len(missing), split, root, missing)
    arrays = load_arrays(index_df, cache, progress=progress)
    rows = index_df.iloc[positions].reset_index(drop=True)
    if len(positions) == len(index_df):
        return _Patients(rows, arrays.images, arrays.masks, missing)  # every row: the memmaps, no copy
    return _Patients(rows, np.asarray(arrays.images[positions]), np.asarray(arrays.masks[positions]), missing)


def _run_provenance(rows: pd.DataFrame, pipeline: Any, artifact: Any, *, threshold_given: bool) -> dict:
    """The provenance of what ran: counts, the operating point applied (whole), tile size, backend,
    the backbone and the models' dates, the date and version."""
    point = pipeline.point.to_json()
    return {
        "n_patients": int(rows["patient_id"].nunique()),
        "n_slices": int(len(rows)),
        "n_tumor_slices": int(rows["has_tumor"].sum()),
        "threshold": point.pop("threshold"),
        "threshold_source": "--threshold" if threshold_given else "pipeline.json (written by make train)",
        **point,
        "volume_route": "per patient study (predict_volume: volume-aware gate, 3D components)",
        "tile_size": pipeline.tile_size,
        **pipeline.backend_info,
        "backbone_trained_from_scratch": (
            artifact.extra["trained_from_scratch"]
            if artifact.extra.get("trained_from_scratch") is not None
            else _from_scratch(artifact.extra.get("backbone_weights"))
        ),
        "backbone_weights": artifact.extra.get("backbone_weights"),
        "classifier_image_size": artifact.classifier_image_size,
        "models_created": artifact.extra.get("created"),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "pipeline_version": __version__,
    }

"""Pooled out-of-fold results of a cross-validation: a variant's folds become one evaluation.

A variant folder holds one run folder per fold (``fold0/``, ``fold1/``, ... from ``train --fold K``),
each evaluated on its own validation fold (``evaluate --run FOLD --split val`` writes
``FOLD/evaluation/val/``). Folds share no patient, so their ``patients.csv`` and ``slices.csv``
concatenate into one out-of-fold evaluation of every train + validation patient, which
`pipeline.evaluation.compare` pairs against another variant's on the same patients.

The epoch curve pools each fold's per-epoch ``val_patient_dice`` (segmenter alone, every
validation slice; `pipeline.training.selection`), weighted by the fold's patients: the epoch
count for a model retrained on all patients is read off it, not off any one fold.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import metrics
from pipeline.data.splits import load_splits
from pipeline.errors import DataError
from pipeline.evaluation.compare import error_counts
from pipeline.io_utils import atomic_write_json, write_csv
from pipeline.paths import SPLITS_FILE
from pipeline.postprocessing import OperatingPoint
from pipeline.training.calibration import choose_point, point_of, set_operating_point

__all__ = ["fold_dirs", "pool_folds", "epoch_curve", "pooled_grid", "apply_pooled_point", "summarize_pooled"]

EVAL_SUBDIR = Path("evaluation") / "val"
POOLED_DIR = "oof"
_FOLD_RE = re.compile(r"^fold(\d+)$")


def fold_dirs(variant: str | os.PathLike) -> list[Path]:
    """The ``fold<K>`` run folders of `variant`, in fold order; DataError when there is none."""
    variant = Path(variant)
    found = sorted((int(m.group(1)), p) for p in variant.glob("fold*") if p.is_dir()
                   and (m := _FOLD_RE.match(p.name)))
    if not found:
        raise DataError("no fold<K> run folders (train --fold K --run-dir VARIANT/foldK)", [variant])
    return [p for _, p in found]


def _read_fold(fold: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    ev = fold / EVAL_SUBDIR
    missing = [n for n in ("patients.csv", "slices.csv") if not (ev / n).is_file()]
    if missing:
        raise DataError(f"fold not evaluated ({', '.join(missing)} missing): run "
                        f"`python -m pipeline evaluate --run {fold} --split val`", [ev])
    return pd.read_csv(ev / "patients.csv"), pd.read_csv(ev / "slices.csv")


def pool_folds(variant: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Concatenate the folds' validation evaluations into `out_dir` (default ``VARIANT/oof``).

    Writes ``patients.csv`` and ``slices.csv`` (with a ``fold`` column) and returns `out_dir`.
    Raises DataError when a patient is in two folds or a fold has no evaluation.
    """
    variant = Path(variant)
    out = Path(out_dir) if out_dir is not None else variant / POOLED_DIR
    patients, slices = [], []
    for k, fold in enumerate(fold_dirs(variant)):
        p, s = _read_fold(fold)
        patients.append(p.assign(fold=k))
        slices.append(s.assign(fold=k))
    pooled_p, pooled_s = pd.concat(patients, ignore_index=True), pd.concat(slices, ignore_index=True)
    twice = pooled_p.loc[pooled_p["patient_id"].duplicated(), "patient_id"].tolist()
    if twice:
        raise DataError(f"patients evaluated in more than one fold: {', '.join(sorted(set(twice)))}",
                        [variant])
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("patients.csv", pooled_p), ("slices.csv", pooled_s)):
        write_csv(out / name, table)
    return out


def epoch_curve(variant: str | os.PathLike, monitor: str = "val_patient_dice") -> pd.DataFrame:
    """Per epoch (1-based) each fold's `monitor` and their mean weighted by the fold's validation patients.

    Only epochs that every fold reached are pooled (``pooled`` is NaN after the shortest fold).
    A variant whose folds were not trained (an ensemble of trained runs) has no curve: an empty table.
    """
    columns = {}
    weights = {}
    for k, fold in enumerate(fold_dirs(variant)):
        if not (fold / "segmenter" / "history.csv").is_file():
            return pd.DataFrame(columns=["epoch", "pooled"])
        history = pd.read_csv(fold / "segmenter" / "history.csv")
        columns[f"fold{k}"] = history[monitor].to_numpy(float)
        splits = load_splits(fold / SPLITS_FILE)
        weights[f"fold{k}"] = int((splits["split"] == "val").sum())
    n = max(len(v) for v in columns.values())
    table = pd.DataFrame({k: np.pad(v, (0, n - len(v)), constant_values=np.nan) for k, v in columns.items()})
    w = np.array([weights[c] for c in table.columns], float)
    values = table.to_numpy(float)
    table["pooled"] = np.where(np.isnan(values).any(axis=1), np.nan, values @ w / w.sum())
    table.insert(0, "epoch", np.arange(1, n + 1))
    return table


GRID_KEYS = ["threshold", "neighbour_weight", "seg_threshold", "min_component_px", "min_volume_px"]
LEGACY_SEG_THRESHOLD = 0.5  # grids written before the mask threshold was searched were all made at 0.5


def pooled_grid(variant: str | os.PathLike) -> pd.DataFrame:
    """The folds' calibration grids (``foldK/calibration_grid.csv``) pooled over all their patients.

    ``mean_patient_dice`` becomes the mean over every fold's validation patients (each fold's
    mean weighted by its patients), the pixel and slice counts are summed. Only grid points
    that every fold searched are kept. The gate's rows use the pair's classifier: where that
    classifier was trained on some of these patients, choose the gate elsewhere and read only
    the segmenter's post-processing off this grid.
    """
    grids = []
    for fold in fold_dirs(variant):
        grid = pd.read_csv(fold / "calibration_grid.csv")
        if "seg_threshold" not in grid:
            grid["seg_threshold"] = LEGACY_SEG_THRESHOLD
        splits = load_splits(fold / SPLITS_FILE)
        grids.append(grid.assign(_n=int((splits["split"] == "val").sum())))
    table = pd.concat(grids, ignore_index=True)
    table["_weighted"] = table["mean_patient_dice"] * table["_n"]
    groups = table.groupby(GRID_KEYS, sort=False, dropna=False)  # NaN threshold: the segmenter alone
    pooled = groups[["_n"]].sum().reset_index()[GRID_KEYS]
    for column in ("_weighted", "_n", "fp_px", "fn_px", "flagged_slices"):
        pooled[column] = groups[column].sum().to_numpy()
    pooled = pooled[groups.size().to_numpy() == len(grids)].copy()
    pooled["mean_patient_dice"] = pooled["_weighted"] / pooled["_n"]
    return pooled.drop(columns=["_weighted"]).rename(columns={"_n": "n_patients"}).reset_index(drop=True)


def apply_pooled_point(variant: str | os.PathLike) -> tuple[OperatingPoint, list[Path]]:
    """Write the best point of `variant`'s pooled grid (`choose_point(pooled_grid(variant))`) into
    every fold's pair (`set_operating_point`: a pair that fails its sums is refused), so each fold
    is scored at one point chosen on all folds' patients instead of at its own fold's best.
    Returns (the point, the fold folders written); their evaluations are stale until `evaluate`
    runs on each again."""
    point = point_of(choose_point(pooled_grid(variant)))
    folds = fold_dirs(variant)
    for fold in folds:
        set_operating_point(fold, point)
    return point, folds


def summarize_pooled(pooled_dir: str | os.PathLike, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean per-patient Dice (end to end, segmenter alone) with bootstrap intervals and error counts.

    ``patients_not_found``: patients with tumour whose prediction overlaps none of it.
    """
    pooled_dir = Path(pooled_dir)
    patients = pd.read_csv(pooled_dir / "patients.csv")
    slices = pd.read_csv(pooled_dir / "slices.csv")
    out: dict[str, Any] = {"n_patients": int(len(patients)), "n_folds": int(patients["fold"].nunique())}
    tumour = patients["gt_pixels"] > 0
    for prefix in ("e2e", "seg"):
        ci = metrics.bootstrap_ci(patients[f"{prefix}_dice"].to_numpy(float), n_boot=n_boot, seed=seed)
        out[prefix] = {
            "mean_patient_dice": float(patients[f"{prefix}_dice"].mean()),
            "ci_low": ci.low, "ci_high": ci.high,
            "median_patient_dice": float(patients[f"{prefix}_dice"].median()),
            **error_counts(slices, prefix),
            "patients_not_found": int((tumour & (patients[f"{prefix}_tp"] == 0)).sum()),
        }
    return out


def render_summary(name: str, summary: dict[str, Any], curve: pd.DataFrame | None = None) -> str:
    """Markdown lines for one variant's pooled summary (and the best pooled epoch, if a curve is given)."""
    lines = [f"{name}: {summary['n_patients']} patients in {summary['n_folds']} folds, out of fold"]
    for prefix, label in (("e2e", "end to end"), ("seg", "segmenter alone")):
        s = summary[prefix]
        lines.append(
            f"  {label}: mean per-patient Dice {s['mean_patient_dice']:.3f} [{s['ci_low']:.3f}, "
            f"{s['ci_high']:.3f}], median {s['median_patient_dice']:.3f}; missed px {s['fn_px']:,}, "
            f"false-positive px on tumour slices {s['fp_px_on_tumour_slices']:,}, on slices without tumour "
            f"{s['fp_px_on_empty_slices']:,}; patients not found {s['patients_not_found']}"
        )
    if curve is not None and curve["pooled"].notna().any():
        best = curve.loc[curve["pooled"].idxmax()]
        lines.append(f"  pooled epoch curve: best epoch {int(best['epoch'])} "
                     f"(val_patient_dice {best['pooled']:.3f}); folds reached {len(curve)} epochs at most")
    return "\n".join(lines) + "\n"


def write_summary(variant: str | os.PathLike, n_boot: int = 2000) -> tuple[dict[str, Any], pd.DataFrame]:
    """Pool `variant`'s folds, summarise them, write ``oof/summary.json`` and ``oof/epochs.csv``.

    Returns (the summary, the pooled epoch curve)."""
    pooled = pool_folds(variant)
    summary = summarize_pooled(pooled, n_boot=n_boot)
    curve = epoch_curve(variant)
    write_csv(pooled / "epochs.csv", curve)
    summary["epoch_curve"] = "epochs.csv"
    if all((fold / "calibration_grid.csv").is_file() for fold in fold_dirs(variant)):
        grid = pooled_grid(variant)
        write_csv(pooled / "calibration_grid.csv", grid)
        best = choose_point(grid)
        summary["pooled_operating_point"] = {k: float(best[k]) for k in (*GRID_KEYS, "mean_patient_dice")}
    atomic_write_json(pooled / "summary.json", summary)
    return summary, curve

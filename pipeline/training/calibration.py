"""Choose the pipeline's operating point on the validation patients: gate, mask threshold, 2D and 3D
post-processing.

The pipeline gates every slice with the classifier, segments the flagged ones and cleans the
masks (`pipeline.postprocessing`). Calibration searches, on the VALIDATION patients only
(never the test patients), the grid

* ``threshold``: classifier probability at or above which a slice is segmented;
* ``seg_threshold``: segmenter probability above which a pixel is tumour (one value, or several:
  an ensemble's averaged probability sits lower than a single model's where only some members fire);
* ``neighbour_weight``: the volume-aware gate (a slice scores ``max(p, w * max neighbour p)``);
* ``min_component_px``: 2D components dropped below this size;
* ``min_volume_px``: 3D components (over a patient's adjacent slices) dropped below this size,

and keeps the point with the highest mean per-patient volume Dice of the end-to-end pipeline
run on each patient as a volume (`TumorPipeline.predict_volume`). Ties go to the threshold
closer to 0.5, then the mask threshold closer to 0.5, then to the plainer post-processing
(smaller weight, volume, component).
Per-patient Dice follows `pipeline.metrics`: TP/FP/FN summed over the patient's slices, and a
patient with no tumour and no predicted pixel scores 1 (empty="one").

The search is cheap: both models run once per validation slice (the segmenter on every slice,
which gives the same masks as segmenting the flagged ones only); each candidate gate only
re-labels the 3D components of each patient once, and every ``min_volume_px`` is read off
the component sizes of that one labelling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from pipeline.inference.tumor_pipeline import TumorPipeline
from pipeline.io_utils import write_csv
from pipeline.metrics import dice_from_counts
from pipeline.postprocessing import (
    CONNECTIVITY_3D,
    OperatingPoint,
    gate,
    postprocess_mask,
    volume_gate,
    volume_spans,
)
from pipeline.training.config import mask_thresholds

log = logging.getLogger(__name__)

EMPTY = "one"


@dataclass
class CalibrationResult:
    """The chosen operating point and the validation numbers behind it."""

    params: OperatingPoint
    val_patient_dice: float  # end-to-end mean per-patient Dice at the chosen point
    segmenter_only_patient_dice: float  # every slice segmented, no gating, same post-processing
    classifier: dict[str, Any]
    n_patients: int
    n_slices: int
    grid: pd.DataFrame = field(repr=False)

    @property
    def threshold(self) -> float:
        return self.params.threshold

    @property
    def min_component_px(self) -> int:
        return self.params.min_component_px

    def to_json(self) -> dict[str, Any]:
        return {
            **self.params.to_json(),
            "val_mean_patient_dice": self.val_patient_dice,
            "val_segmenter_only_mean_patient_dice": self.segmenter_only_patient_dice,
            "val_classifier": self.classifier,
            "val_patients": self.n_patients,
            "val_slices": self.n_slices,
            "empty_convention": "a patient with no tumour and no predicted pixel scores 1.0",
            "selection": "max mean per-patient Dice of the volume pipeline; ties -> threshold closer "
            "to 0.5, then seg_threshold closer to 0.5, then smaller neighbour_weight, min_volume_px, "
            "min_component_px",
        }


MaskKey = tuple[float, int]  # (seg_threshold, min_component_px) of a set of segmenter masks


def predict_slices(
    pipe: TumorPipeline, images: np.ndarray, min_component_px: tuple[int, ...],
    seg_thresholds: tuple[float, ...] | None = None, chunk: int = 64,
) -> tuple[np.ndarray, dict[MaskKey, np.ndarray]]:
    """Run both models of `pipe` on every raw uint8 slice (N, H, W, 3), ungated.

    Returns the classifier probabilities (N,) and, for each (mask threshold, `min_component_px`)
    - the thresholds `seg_thresholds`, default the pipeline's own - the segmenter masks
    (N, H, W) uint8 0/1 after the 2D post-processing (`postprocess_mask`). Works through
    `chunk` slices at a time so only masks, not float maps, are kept.
    """
    n = len(images)
    keys = [(float(t), int(m)) for t in (seg_thresholds or (pipe.seg_threshold,)) for m in min_component_px]
    probs = np.zeros(n, dtype=np.float64)
    masks = {key: np.zeros(images.shape[:3], dtype=np.uint8) for key in keys}
    for start in range(0, n, chunk):
        batch = [np.asarray(im) for im in images[start : start + chunk]]
        probs[start : start + len(batch)] = pipe.classify(batch)
        for k, prob_map in enumerate(pipe.segment_probabilities(batch)):
            for t, m in keys:
                masks[(t, m)][start + k] = postprocess_mask(prob_map, t, m)
    return probs, masks


def _component_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and true-positive voxels of each 26-connected component of `pred` (S, H, W)."""
    labels, n = ndimage.label(pred, structure=CONNECTIVITY_3D)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    tps = np.bincount(flat, weights=gt.ravel(), minlength=n + 1)[1:]
    return sizes, tps


def volume_grid(
    probs: np.ndarray,
    masks: dict[MaskKey, np.ndarray],
    gt_masks: np.ndarray,
    volume_ids: np.ndarray,
    thresholds: tuple[float, ...],
    neighbour_weights: tuple[float, ...] = (0.0,),
    min_volume_px: tuple[int, ...] = (0,),
) -> pd.DataFrame:
    """Mean per-patient Dice for every grid point (module doc); one row per point.

    `probs` (N,), `masks` {(seg_threshold, min_component_px): (N, H, W) 0/1 segmenter masks of
    every slice}, `gt_masks` (N, H, W), `volume_ids` (N,): the patient (study) of each slice, whose
    slices must be contiguous and in slice order. Rows with threshold NaN are the segmenter
    alone (every slice segmented) with the same 2D/3D post-processing.
    """
    probs = np.asarray(probs, dtype=np.float64)
    gt = np.asarray(gt_masks) > 0
    spans = [np.arange(r.start, r.stop) for r in volume_spans(volume_ids)]
    gt_total = [int(gt[idx].sum()) for idx in spans]
    vols = sorted({int(v) for v in min_volume_px})
    rows = []
    for seg_t, mcp in sorted(masks):
        pred_all = np.asarray(masks[(seg_t, mcp)]) > 0
        cache: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}
        points = [(None, 0.0)] + [(float(t), float(w)) for w in sorted(set(neighbour_weights))
                                  for t in sorted(set(thresholds))]
        for t, w in points:
            params = None if t is None else OperatingPoint(threshold=t, neighbour_weight=w)
            per_vol = np.zeros((len(vols), len(spans), 3))  # tp, fp, fn
            flagged_total = 0
            for p_i, idx in enumerate(spans):
                flagged = np.ones(len(idx), bool) if params is None else volume_gate(probs[idx], params)[1]
                flagged_total += int(flagged.sum())
                key = (p_i, flagged.tobytes())
                if key not in cache:
                    pred = pred_all[idx] & flagged[:, None, None]
                    cache[key] = _component_counts(pred, gt[idx])
                sizes, tps = cache[key]
                for v_i, v in enumerate(vols):
                    keep = sizes >= max(v, 1)
                    tp = float(tps[keep].sum())
                    per_vol[v_i, p_i] = (tp, float(sizes[keep].sum()) - tp, gt_total[p_i] - tp)
            for v_i, v in enumerate(vols):
                dice = dice_from_counts(per_vol[v_i, :, 0], per_vol[v_i, :, 1], per_vol[v_i, :, 2], EMPTY)
                rows.append({
                    "threshold": t if t is not None else np.nan,
                    "neighbour_weight": w,
                    "seg_threshold": float(seg_t),
                    "min_component_px": int(mcp),
                    "min_volume_px": int(v),
                    "mean_patient_dice": float(np.mean(dice)),
                    "fp_px": float(per_vol[v_i, :, 1].sum()),
                    "fn_px": float(per_vol[v_i, :, 2].sum()),
                    "flagged_slices": flagged_total,
                })
    return pd.DataFrame(rows)


def choose_point(grid: pd.DataFrame) -> pd.Series:
    """The best gated row of `volume_grid` under the tie rule of the module doc."""
    gated = grid[grid["threshold"].notna()].copy()
    gated["_dist"] = (gated["threshold"] - 0.5).abs().round(9)
    gated["_seg_dist"] = (gated["seg_threshold"] - 0.5).abs().round(9)
    gated["_score"] = gated["mean_patient_dice"].round(9)
    order = ["_score", "_dist", "_seg_dist", "neighbour_weight", "min_volume_px", "min_component_px"]
    best = gated.sort_values(order, ascending=[False, True, True, True, True, True]).iloc[0]
    return best.drop(["_dist", "_seg_dist", "_score"])


def point_of(row: pd.Series) -> OperatingPoint:
    """A grid row (`volume_grid`, `choose_point`) as the `OperatingPoint` it describes."""
    return OperatingPoint(
        threshold=float(row["threshold"]), seg_threshold=float(row["seg_threshold"]),
        min_component_px=int(row["min_component_px"]), min_volume_px=int(row["min_volume_px"]),
        neighbour_weight=float(row["neighbour_weight"]),
    )


def classifier_summary(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """Validation slice metrics of the classifier at `threshold` (AUC is threshold-free)."""
    labels = np.asarray(labels).astype(bool)
    pred = gate(probs, threshold)
    out: dict[str, Any] = {
        "accuracy": float(np.mean(pred == labels)),
        "sensitivity": float(pred[labels].mean()) if labels.any() else None,
        "specificity": float((~pred[~labels]).mean()) if (~labels).any() else None,
    }
    out["roc_auc"] = float(roc_auc_score(labels, probs)) if 0 < labels.sum() < len(labels) else None
    return out


def calibrate(
    classifier: keras.Model,
    segmenter: keras.Model,
    images: np.ndarray,
    gt_masks: np.ndarray,
    volume_ids: np.ndarray,
    thresholds: tuple[float, ...],
    min_component_px: tuple[int, ...] = (0,),
    seg_threshold: float | tuple[float, ...] = 0.5,
    batch_size: int = 16,
    neighbour_weights: tuple[float, ...] = (0.0,),
    min_volume_px: tuple[int, ...] = (0,),
) -> CalibrationResult:
    """Predict the validation slices with both models and pick the operating point (see module doc).

    `images` raw uint8 (N, H, W, 3), `gt_masks` 0/1 (N, H, W), `volume_ids` (N,): every slice
    of the validation patients, tumour or not, each patient's slices contiguous and in slice
    order (the index order). The models run inside a `TumorPipeline`, so the gate and the
    post-processing are exactly those of inference and evaluation. `seg_threshold`: one mask
    threshold or several to search.
    """
    images = np.asarray(images)
    seg_thresholds = mask_thresholds(seg_threshold)
    pipe = TumorPipeline(classifier, segmenter, seg_threshold=seg_thresholds[0],
                         tile_size=int(images.shape[1]), batch_size=batch_size)
    mcps = tuple(sorted({int(m) for m in min_component_px}))
    probs, masks = predict_slices(pipe, images, mcps, seg_thresholds)
    return calibrate_from_predictions(probs, masks, gt_masks, volume_ids, thresholds, neighbour_weights,
                                      min_volume_px)


def calibrate_from_predictions(
    probs: np.ndarray,
    masks: dict[MaskKey, np.ndarray],
    gt_masks: np.ndarray,
    volume_ids: np.ndarray,
    thresholds: tuple[float, ...],
    neighbour_weights: tuple[float, ...] = (0.0,),
    min_volume_px: tuple[int, ...] = (0,),
) -> CalibrationResult:
    """`calibrate` after the models have run (`masks` as in `volume_grid`): `volume_grid`,
    `choose_point`, the validation numbers."""
    grid = volume_grid(probs, masks, gt_masks, volume_ids, thresholds, neighbour_weights, min_volume_px)
    best = choose_point(grid)
    params = point_of(best)
    alone = grid[grid["threshold"].isna() & (grid["seg_threshold"] == params.seg_threshold)
                 & (grid["min_component_px"] == params.min_component_px)
                 & (grid["min_volume_px"] == params.min_volume_px)]
    labels = np.asarray(gt_masks).reshape(len(gt_masks), -1).any(axis=1)
    result = CalibrationResult(
        params=params,
        val_patient_dice=float(best["mean_patient_dice"]),
        segmenter_only_patient_dice=float(alone["mean_patient_dice"].iloc[0]),
        classifier=classifier_summary(labels, probs, params.threshold),
        n_patients=int(len(set(np.asarray(volume_ids).tolist()))),
        n_slices=int(len(probs)),
        grid=grid,
    )
    log.info(
        "calibration on %d validation patients: %s -> mean per-patient Dice %.4f "
        "(segmenter alone on every slice: %.4f)",
        result.n_patients, params, result.val_patient_dice, result.segmenter_only_patient_dice,
    )
    return result


def calibrate_on_validation(classifier: keras.Model, segmenter: keras.Model, data, cal, grid_csv,
                            batch_size: int = 16) -> CalibrationResult:
    """`calibrate` on every slice of the validation patients of `data` (`TrainingData`) with the
    grid of `cal` (`CalibrationConfig`), one volume per study; the grid goes to `grid_csv`."""
    pos = data.val_pos
    result = calibrate(
        classifier, segmenter,
        np.asarray(data.arrays.images[pos]), np.asarray(data.arrays.masks[pos]),
        data.index["case"].to_numpy()[pos],  # one volume per study, slices in index (slice) order
        cal.thresholds, cal.min_component_px, cal.mask_threshold,
        batch_size=batch_size, neighbour_weights=cal.neighbour_weights, min_volume_px=cal.min_volume_px,
    )
    write_csv(grid_csv, result.grid)
    return result


def recalibrate_pair(pair_dir, config, batch_size: int = 16) -> CalibrationResult:
    """Re-choose the operating point of the pair in `pair_dir` on the validation patients of
    `config.data` and rewrite its `pipeline.json` (the model files, and so their sha256, stay).

    For a pair trained before the volume steps existed, or after changing the grid in
    `config.calibration`. Writes ``calibration_grid.csv`` beside the pair.
    """
    from pathlib import Path

    from pipeline.models.model_io import load_pair
    from pipeline.training.data_prep import prepare_data

    pair_dir = Path(pair_dir)
    pair = load_pair(pair_dir)
    cal = config.calibration
    result = calibrate_on_validation(pair.classifier, pair.segmenter, prepare_data(config.data), cal,
                                     pair_dir / "calibration_grid.csv", batch_size)
    calibration = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cal).items()}
    _write_point(pair_dir, pair.meta, result.params, {**result.to_json(), "fixed": False}, calibration)
    return result


def set_operating_point(pair_dir, point: OperatingPoint) -> OperatingPoint:
    """Write `point` as the operating point of the pair in `pair_dir` without a search - e.g. the
    one chosen on pooled out-of-fold predictions for a pair retrained on every fold - and mark it
    `fixed` in its validation record. The files and their sums stay; a pair whose files do not
    match its sums is refused (DataError). Returns `point`."""
    from pathlib import Path

    from pipeline.models.pair_artifact import read_pair_record
    from pipeline.models.release import verify_release

    pair_dir = Path(pair_dir)
    verify_release(pair_dir)  # never re-sign a tampered pair: its record, then every file it sums
    _write_point(pair_dir, read_pair_record(pair_dir), point, {**point.to_json(), "fixed": True},
                 {"fixed": point.to_json()})
    return point


# what a search records in `validation`: replaced, not merged, when the point is written again
_SEARCH_KEYS = ("val_mean_patient_dice", "val_segmenter_only_mean_patient_dice", "val_classifier",
                "val_patients", "val_slices", "empty_convention", "selection")


def _write_point(pair_dir, meta, point: OperatingPoint, validation: dict[str, Any],
                 calibration: dict[str, Any]) -> None:
    """Rewrite the pair's `pipeline.json` with `point`, its `validation` record (the training's
    own entries kept) and the `calibration` that chose it. A segmenter variant record checked at
    another mask threshold is dropped (`variant_check` compares masks at the pair's)."""
    from pipeline.models.pair_artifact import write_pair_meta
    from pipeline.models.variant_record import VARIANTS_KEY

    meta = dict(meta)
    moved = float(meta.get("seg_threshold", point.seg_threshold)) != point.seg_threshold
    if moved and meta.get(VARIANTS_KEY):
        meta[VARIANTS_KEY] = {r: v for r, v in meta[VARIANTS_KEY].items() if r != "segmenter"}
        if not meta[VARIANTS_KEY]:
            del meta[VARIANTS_KEY]
        log.warning("the segmenter's variant record was checked at another mask threshold: dropped "
                    "(run `python -m pipeline variants` again)")
    meta.update(point.to_json())
    kept = {k: v for k, v in (meta.get("validation") or {}).items() if k not in _SEARCH_KEYS}
    meta["validation"] = {**kept, **validation}
    meta["calibration"] = calibration
    write_pair_meta(pair_dir, meta)  # validated, sums kept, paths made portable

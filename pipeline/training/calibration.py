"""Choose the classifier threshold (and small-blob filter) of the end-to-end pipeline on validation patients.

The pipeline gates every slice with the classifier: a slice whose tumour probability is at
least the threshold goes to the segmenter, every other slice is predicted empty. The
threshold that maximises the mean per-patient volume Dice of that pipeline on the
VALIDATION patients is kept (never the test patients); ties go to the threshold closer to
0.5, then to the smaller `min_component_px`. Per-patient Dice follows `pipeline.metrics`:
TP/FP/FN summed over the patient's slices, and a patient with no tumour and no predicted
pixel scores 1 (empty="one").

The search is cheap: both models run once per validation slice, per-slice TP/FP/FN are
counted once per `min_component_px`, and each threshold only re-weights those counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pipeline.inference.tumor_pipeline import TumorPipeline, postprocess_mask
from pipeline.metrics import dice_from_counts, slice_scores

log = logging.getLogger(__name__)

EMPTY = "one"


@dataclass
class CalibrationResult:
    """The chosen operating point and the validation numbers behind it."""

    threshold: float
    min_component_px: int
    val_patient_dice: float  # end-to-end mean per-patient Dice at the chosen point
    segmenter_only_patient_dice: float  # every slice segmented, no gating, same post-processing
    classifier: dict[str, Any]
    n_patients: int
    n_slices: int
    grid: pd.DataFrame = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "min_component_px": self.min_component_px,
            "val_mean_patient_dice": self.val_patient_dice,
            "val_segmenter_only_mean_patient_dice": self.segmenter_only_patient_dice,
            "val_classifier": self.classifier,
            "val_patients": self.n_patients,
            "val_slices": self.n_slices,
            "empty_convention": "a patient with no tumour and no predicted pixel scores 1.0",
            "selection": "max mean per-patient Dice; ties -> threshold closer to 0.5, "
            "then smaller min_component_px",
        }


def predict_slices(
    pipe: TumorPipeline, images: np.ndarray, min_component_px: tuple[int, ...], chunk: int = 64
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Run both models of `pipe` on every raw uint8 slice (N, H, W, 3), ungated.

    Returns the classifier probabilities (N,) and, for each `min_component_px`, the segmenter
    masks (N, H, W) uint8 0/1 after the pipeline's own post-processing
    (`postprocess_mask`: probability > seg_threshold, small components dropped). Works
    through `chunk` slices at a time so only masks, not float maps, are kept.
    """
    n = len(images)
    probs = np.zeros(n, dtype=np.float64)
    masks = {m: np.zeros(images.shape[:3], dtype=np.uint8) for m in min_component_px}
    for start in range(0, n, chunk):
        batch = [np.asarray(im) for im in images[start : start + chunk]]
        probs[start : start + len(batch)] = pipe.classify(batch)
        for k, prob_map in enumerate(pipe.segment_probabilities(batch)):
            for m in min_component_px:
                masks[m][start + k] = postprocess_mask(prob_map, pipe.seg_threshold, m)
    return probs, masks


def search_operating_point(
    probs: np.ndarray,
    masks_by_min_px: dict[int, np.ndarray],
    gt_masks: np.ndarray,
    patient_ids: np.ndarray,
    thresholds: tuple[float, ...],
) -> tuple[pd.DataFrame, pd.Series]:
    """Grid of (threshold, min_component_px) -> mean per-patient Dice; returns (grid, chosen row).

    `probs` (N,) classifier probabilities; `masks_by_min_px` maps each min_component_px to the
    segmenter's 0/1 masks (N, H, W) of every slice; `gt_masks` (N, H, W) 0/1 ground truth;
    `patient_ids` (N,). A slice is flagged when its probability is >= the threshold (as
    `TumorPipeline`); the grid also holds a row per min_component_px with threshold NaN:
    the segmenter alone on every slice.
    """
    probs = np.asarray(probs, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(patient_ids))
    n_pat = len(uniques)
    gt_px = np.asarray(gt_masks).reshape(len(gt_masks), -1).sum(axis=1).astype(np.int64)
    rows = []
    for mcp in sorted(masks_by_min_px):
        counts = slice_scores(gt_masks, masks_by_min_px[mcp], threshold=0.5, empty=EMPTY)
        tp, fp, fn = (counts[c].to_numpy(np.int64) for c in ("tp", "fp", "fn"))
        for t in [None, *sorted(set(float(x) for x in thresholds))]:
            gate = np.ones_like(probs, dtype=bool) if t is None else probs >= t
            p_tp = np.bincount(codes, weights=tp * gate, minlength=n_pat)
            p_fp = np.bincount(codes, weights=fp * gate, minlength=n_pat)
            p_fn = np.bincount(codes, weights=np.where(gate, fn, gt_px), minlength=n_pat)
            dice = dice_from_counts(p_tp, p_fp, p_fn, EMPTY)
            rows.append(
                {
                    "threshold": t,
                    "min_component_px": int(mcp),
                    "mean_patient_dice": float(np.mean(dice)),
                    "flagged_slices": int(gate.sum()),
                }
            )
    grid = pd.DataFrame(rows)
    gated = grid[grid["threshold"].notna()].copy()
    gated["_dist"] = (gated["threshold"] - 0.5).abs()
    gated["_score"] = gated["mean_patient_dice"].round(9)
    best = gated.sort_values(["_score", "_dist", "min_component_px"], ascending=[False, True, True]).iloc[0]
    return grid, best.drop(["_dist", "_score"])


def classifier_summary(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """Validation slice metrics of the classifier at `threshold` (AUC is threshold-free)."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
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
    patient_ids: np.ndarray,
    thresholds: tuple[float, ...],
    min_component_px: tuple[int, ...] = (0,),
    seg_threshold: float = 0.5,
    batch_size: int = 16,
) -> CalibrationResult:
    """Predict the validation slices with both models and pick the operating point (see module doc).

    `images` raw uint8 (N, H, W, 3), `gt_masks` 0/1 (N, H, W), `patient_ids` (N,): every slice of
    the validation patients, tumour or not. The models run inside a `TumorPipeline`, so the
    gate and the post-processing are exactly those of inference and evaluation.
    """
    images = np.asarray(images)
    pipe = TumorPipeline(
        classifier,
        segmenter,
        seg_threshold=seg_threshold,
        tile_size=int(images.shape[1]),
        batch_size=batch_size,
    )
    mcps = tuple(sorted({int(m) for m in min_component_px}))
    probs, masks = predict_slices(pipe, images, mcps)
    grid, best = search_operating_point(probs, masks, gt_masks, patient_ids, thresholds)
    mcp = int(best["min_component_px"])
    seg_only = grid[grid["threshold"].isna() & (grid["min_component_px"] == mcp)]["mean_patient_dice"].iloc[0]
    labels = np.asarray(gt_masks).reshape(len(gt_masks), -1).any(axis=1)
    result = CalibrationResult(
        threshold=float(best["threshold"]),
        min_component_px=mcp,
        val_patient_dice=float(best["mean_patient_dice"]),
        segmenter_only_patient_dice=float(seg_only),
        classifier=classifier_summary(labels, probs, float(best["threshold"])),
        n_patients=int(len(set(np.asarray(patient_ids).tolist()))),
        n_slices=int(len(images)),
        grid=grid,
    )
    log.info(
        "calibration on %d validation patients: threshold %.2f, min_component_px %d -> mean per-patient "
        "Dice %.4f (segmenter alone on every slice: %.4f)",
        result.n_patients,
        result.threshold,
        result.min_component_px,
        result.val_patient_dice,
        result.segmenter_only_patient_dice,
    )
    return result

"""Evaluation metrics: hard Dice/IoU from one TP/FP/FN count, classification summaries, bootstrap CIs.

Binarisation: ground truth is tumour where `y_true > 0.5`; a prediction is tumour where
`y_pred > threshold` (default 0.5; strictly greater, as Keras's `BinaryAccuracy`).

Dice = 2 TP / (2 TP + FP + FN) and IoU = TP / (TP + FP + FN), both from the same counts
(`confusion_counts`). Soft, smoothed Dice is a *loss* (`pipeline.losses.DiceLoss`); every
number here is the hard score.

Empty-mask convention (the `empty` argument, always explicit):
  - ground truth and prediction both empty: the score is undefined (0/0). With
    `empty="one"` it counts as a perfect 1.0 (correctly predicted "no tumour"); with
    `empty="nan"` it is NaN and callers exclude it with NaN-aware means (`np.nanmean`).
  - prediction on an empty ground truth (FP > 0, TP = 0): 0.0 under both conventions.
  - empty prediction on a non-empty ground truth (FN > 0, TP = 0): 0.0.
  Reports state the convention and the counts of empty cases (`score_summary`).

Per-slice and per-patient scores are different numbers and never share a column:
`slice_scores` gives one Dice per slice; `patient_scores` sums TP/FP/FN over all of a
patient's slices and computes one volume Dice per patient (the protocol of Buda et al.,
2019, for this LGG dataset), so a patient's small slices weigh by their pixel counts.

Keras metrics (`DiceMetric`, `IoUMetric`) accumulate TP/FP/FN over every batch of an epoch
in float32 variables and report one global score for the epoch (not a mean of batch
scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import keras
import numpy as np
import pandas as pd
from keras import ops
from sklearn import metrics as skm

from pipeline.postprocessing import gate

__all__ = [
    "EMPTY_CONVENTIONS",
    "BootstrapCI",
    "DiceMetric",
    "IoUMetric",
    "bootstrap_ci",
    "classification_summary",
    "confusion_counts",
    "dice_from_counts",
    "dice_score",
    "iou_from_counts",
    "iou_score",
    "patient_dice",
    "patient_scores",
    "patient_scores_from_counts",
    "score_summary",
    "slice_scores",
]

Empty = Literal["one", "nan"]
EMPTY_CONVENTIONS: tuple[str, ...] = ("one", "nan")
_CHUNK = 64  # slices per chunk when counting, so (N, 256, 256) memmaps never become full bool copies


# --------------------------------------------------------------------------- counts and scores


def confusion_counts(y_true, y_pred, threshold: float = 0.5, axis=None):
    """Pixel counts `(tp, fp, fn, tn)` of binarised arrays of the same shape.

    `y_true` is tumour where > 0.5, `y_pred` where > `threshold` (bool arrays work as is).
    `axis=None` counts over everything (int64 scalars); e.g. `axis=(1, 2)` on (N, H, W)
    gives per-slice int64 arrays of shape (N,).
    """
    truth = np.asarray(y_true) > 0.5
    pred = np.asarray(y_pred) > threshold
    if truth.shape != pred.shape:
        raise ValueError(f"y_true and y_pred shapes differ: {truth.shape} vs {pred.shape}")
    tp = np.count_nonzero(truth & pred, axis=axis)
    n_true = np.count_nonzero(truth, axis=axis)
    n_pred = np.count_nonzero(pred, axis=axis)
    size = truth.size if axis is None else int(np.prod([truth.shape[a] for a in np.atleast_1d(axis)]))
    counts = (tp, n_pred - tp, n_true - tp, size - n_pred - n_true + tp)
    if axis is None:
        return tuple(np.int64(c) for c in counts)
    return tuple(np.asarray(c, dtype=np.int64) for c in counts)


def _check_empty(empty: str) -> None:
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, got {empty!r}")


def _ratio(numerator, denominator, empty: str):
    """numerator / denominator, with 0/0 -> 1.0 or NaN; float for scalars, float64 array otherwise."""
    _check_empty(empty)
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    fill = 1.0 if empty == "one" else np.nan
    out = np.divide(num, den, out=np.full(np.broadcast(num, den).shape, fill), where=den > 0)
    return float(out) if out.ndim == 0 else out


def dice_from_counts(tp, fp, fn, empty: Empty = "one"):
    """Dice 2TP / (2TP + FP + FN) from counts (scalars or arrays); 0/0 -> 1.0 or NaN per `empty`."""
    tp = np.asarray(tp)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn), empty)


def iou_from_counts(tp, fp, fn, empty: Empty = "one"):
    """IoU TP / (TP + FP + FN) from counts (scalars or arrays); 0/0 -> 1.0 or NaN per `empty`."""
    tp = np.asarray(tp)
    return _ratio(tp, tp + np.asarray(fp) + np.asarray(fn), empty)


def dice_score(y_true, y_pred, threshold: float = 0.5, empty: Empty = "one") -> float:
    """One Dice over all pixels of `y_true`/`y_pred` (any matching shapes)."""
    tp, fp, fn, _ = confusion_counts(y_true, y_pred, threshold)
    return dice_from_counts(tp, fp, fn, empty)


def iou_score(y_true, y_pred, threshold: float = 0.5, empty: Empty = "one") -> float:
    """One IoU (Jaccard) over all pixels of `y_true`/`y_pred` (any matching shapes)."""
    tp, fp, fn, _ = confusion_counts(y_true, y_pred, threshold)
    return iou_from_counts(tp, fp, fn, empty)


def _per_slice_counts(masks, preds, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per slice of (N, H, W[, 1]) arrays, counted in chunks of slices."""
    if len(masks) != len(preds):
        raise ValueError(f"masks and preds hold different numbers of slices: {len(masks)} vs {len(preds)}")
    counts = np.zeros((3, len(masks)), dtype=np.int64)
    for start in range(0, len(masks), _CHUNK):
        m = np.asarray(masks[start:start + _CHUNK])
        p = np.asarray(preds[start:start + _CHUNK])
        if m.ndim < 2:
            raise ValueError(f"expected (N, H, W) arrays, got shape {m.shape}")
        tp, fp, fn, _ = confusion_counts(m, p, threshold, axis=tuple(range(1, m.ndim)))
        counts[:, start:start + len(m)] = tp, fp, fn
    return counts[0], counts[1], counts[2]


def slice_scores(masks, preds, threshold: float = 0.5, empty: Empty = "one") -> pd.DataFrame:
    """Per-slice scores of masks/predictions (N, H, W) or (N, H, W, 1) in the same order.

    Returns a DataFrame with one row per slice (same order): `tp, fp, fn, gt_pixels,
    pred_pixels, dice, iou`.
    """
    _check_empty(empty)
    tp, fp, fn = _per_slice_counts(masks, preds, threshold)
    return pd.DataFrame({
        "tp": tp, "fp": fp, "fn": fn,
        "gt_pixels": tp + fn, "pred_pixels": tp + fp,
        "dice": dice_from_counts(tp, fp, fn, empty),
        "iou": iou_from_counts(tp, fp, fn, empty),
    })


def patient_scores(patient_ids: Sequence[str], masks, preds, threshold: float = 0.5,
                   empty: Empty = "one") -> pd.DataFrame:
    """Per-patient volume scores: TP/FP/FN summed over all of a patient's slices (Buda et al.).

    `patient_ids` has one entry per slice of `masks`/`preds` (N, H, W). Returns one row per
    patient, sorted by `patient_id`: `patient_id, n_slices, tp, fp, fn, gt_pixels,
    pred_pixels, dice, iou`. A patient without tumour and without any predicted pixel
    scores 1.0 or NaN per `empty`.
    """
    _check_empty(empty)
    patient_ids = np.asarray(patient_ids)
    if len(patient_ids) != len(masks):
        raise ValueError(f"{len(patient_ids)} patient ids for {len(masks)} slices")
    tp, fp, fn = _per_slice_counts(masks, preds, threshold)
    return patient_scores_from_counts(patient_ids, tp, fp, fn, empty)


def patient_scores_from_counts(patient_ids: Sequence[str], tp, fp, fn, empty: Empty = "one") -> pd.DataFrame:
    """`patient_scores` from per-slice counts already made (e.g. a `slice_scores` table's columns)."""
    _check_empty(empty)
    per_slice = pd.DataFrame({"patient_id": np.asarray(patient_ids), "tp": tp, "fp": fp, "fn": fn})
    out = per_slice.groupby("patient_id", sort=True).agg(
        n_slices=("tp", "size"), tp=("tp", "sum"), fp=("fp", "sum"), fn=("fn", "sum")).reset_index()
    out["gt_pixels"] = out["tp"] + out["fn"]
    out["pred_pixels"] = out["tp"] + out["fp"]
    out["dice"] = dice_from_counts(out["tp"].to_numpy(), out["fp"].to_numpy(), out["fn"].to_numpy(), empty)
    out["iou"] = iou_from_counts(out["tp"].to_numpy(), out["fp"].to_numpy(), out["fn"].to_numpy(), empty)
    return out


def patient_dice(patient_ids: Sequence[str], masks, preds, threshold: float = 0.5,
                 empty: Empty = "one") -> pd.Series:
    """Volume Dice per patient as a Series indexed by `patient_id` (see `patient_scores`)."""
    return patient_scores(patient_ids, masks, preds, threshold, empty).set_index("patient_id")["dice"]


def score_summary(scores: pd.DataFrame, empty: Empty = "one") -> dict[str, Any]:
    """Summary of a `slice_scores` or `patient_scores` table, with the counts of empty cases.

    Means and medians are NaN-aware, so rows that are NaN under `empty="nan"` are excluded
    (`n_scored` says how many rows were averaged).
    """
    _check_empty(empty)
    gt_empty = scores["gt_pixels"].to_numpy() == 0
    pred_empty = scores["pred_pixels"].to_numpy() == 0
    dice = scores["dice"].to_numpy(dtype=np.float64)
    iou = scores["iou"].to_numpy(dtype=np.float64)

    def _stat(fn, x):
        return float(fn(x)) if np.any(~np.isnan(x)) else float("nan")

    return {
        "empty": empty,
        "n": int(len(scores)),
        "n_scored": int(np.count_nonzero(~np.isnan(dice))),
        "n_gt_empty": int(gt_empty.sum()),
        "n_both_empty": int((gt_empty & pred_empty).sum()),
        "n_pred_on_empty_gt": int((gt_empty & ~pred_empty).sum()),
        "n_missed_gt": int((~gt_empty & pred_empty).sum()),
        "dice_mean": _stat(np.nanmean, dice),
        "dice_median": _stat(np.nanmedian, dice),
        "iou_mean": _stat(np.nanmean, iou),
    }


# --------------------------------------------------------------------------- classification


def classification_summary(labels, probs, threshold: float = 0.5) -> dict[str, Any]:
    """Stage-1 metrics from binary `labels` (0/1) and tumour probabilities, via scikit-learn.

    A slice is predicted positive when `prob >= threshold`, the rule of the pipeline's gate
    (`TumorPipeline`), so these numbers describe what the product decides. Returns a JSON-friendly dict:
    `n, n_positive, n_negative, threshold, accuracy, sensitivity (= recall), recall,
    specificity, precision, f1, roc_auc, pr_auc (average precision), confusion_matrix
    ([[tn, fp], [fn, tp]], labels [0, 1]), tp, fp, fn, tn, notes`. Undefined ratios (no
    positives, no predicted positives, a single class so no ROC/PR curve) are NaN and
    explained in `notes` instead of raising.
    """
    labels = np.asarray(labels).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if labels.shape != probs.shape:
        raise ValueError(f"labels and probs differ in length: {labels.size} vs {probs.size}")
    if labels.size == 0:
        raise ValueError("classification_summary needs at least one sample")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:10].tolist()}")
    labels = labels.astype(np.int64)
    preds = gate(probs, threshold).astype(np.int64)
    notes: list[str] = []

    cm = skm.confusion_matrix(labels, preds, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    n_pos, n_neg = int(labels.sum()), int(labels.size - labels.sum())

    recall = skm.recall_score(labels, preds, zero_division=np.nan)
    specificity = skm.recall_score(labels, preds, pos_label=0, zero_division=np.nan)
    precision = skm.precision_score(labels, preds, zero_division=np.nan)
    f1 = skm.f1_score(labels, preds, zero_division=np.nan)
    if n_pos == 0:
        notes.append("no positive labels: sensitivity and F1 are undefined (NaN)")
    if n_neg == 0:
        notes.append("no negative labels: specificity is undefined (NaN)")
    if tp + fp == 0:
        notes.append("no positive predictions: precision is undefined (NaN)")

    if n_pos == 0 or n_neg == 0:
        roc_auc = pr_auc = float("nan")
        notes.append("only one class in labels: ROC-AUC and PR-AUC are undefined (NaN)")
    else:
        roc_auc = skm.roc_auc_score(labels, probs)
        pr_auc = skm.average_precision_score(labels, probs)

    return {
        "n": int(labels.size), "n_positive": n_pos, "n_negative": n_neg, "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "sensitivity": float(recall), "recall": float(recall), "specificity": float(specificity),
        "precision": float(precision), "f1": float(f1),
        "roc_auc": float(roc_auc), "pr_auc": float(pr_auc),
        "confusion_matrix": cm.astype(int).tolist(),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "notes": notes,
    }


# --------------------------------------------------------------------------- bootstrap


class BootstrapCI(NamedTuple):
    """Point estimate and percentile interval [low, high] at level 1 - alpha."""

    estimate: float
    low: float
    high: float
    n_boot: int
    alpha: float
    n_groups: int


def bootstrap_ci(values_or_fn: Sequence[float] | np.ndarray | Callable[[np.ndarray], float],
                 groups: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> BootstrapCI:
    """Percentile bootstrap over patients (resampling whole groups with replacement).

    Three uses:
    - `values` (one per patient, e.g. `patient_scores(...)["dice"]`), `groups=None`: the
      statistic is the NaN-aware mean of the values; patients are resampled.
    - `values` (one per row, e.g. per-slice Dice) and `groups` (the row's patient id): the
      statistic is the NaN-aware mean over all rows of the resampled patients (a cluster
      bootstrap), vectorised through per-patient sums and counts.
    - `fn` (callable) and `groups` (patient id per row): `fn(row_indices) -> float` is
      recomputed on the rows of each resample (a resampled patient's rows appear once per
      draw), e.g. `lambda i: classification_summary(y[i], p[i])["roc_auc"]`.

    Resamples where the statistic is NaN are ignored. Reproducible for a given `seed`.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)

    if callable(values_or_fn):
        if groups is None:
            raise ValueError("bootstrap_ci with a function needs `groups` (one patient id per row)")
        codes, n_groups = _group_codes(groups)
        order = np.argsort(codes, kind="stable")
        rows_by_group = np.split(order, np.cumsum(np.bincount(codes, minlength=n_groups))[:-1])
        draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
        estimate = float(values_or_fn(np.arange(len(codes))))
        stats = np.array([float(values_or_fn(np.concatenate([rows_by_group[g] for g in draw])))
                          for draw in draws])
    else:
        values = np.asarray(values_or_fn, dtype=np.float64).ravel()
        if groups is None:
            codes, n_groups = np.arange(values.size), values.size
        else:
            if len(groups) != values.size:
                raise ValueError(f"{len(groups)} groups for {values.size} values")
            codes, n_groups = _group_codes(groups)
        valid = ~np.isnan(values)
        sums = np.bincount(codes[valid], weights=values[valid], minlength=n_groups)
        counts = np.bincount(codes[valid], minlength=n_groups).astype(np.float64)
        draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = float(sums.sum() / counts.sum()) if counts.sum() else float("nan")
            stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)

    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        low = high = float("nan")
    else:
        low, high = (float(v) for v in np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return BootstrapCI(estimate, low, high, int(n_boot), float(alpha), int(n_groups))


def _group_codes(groups: Sequence) -> tuple[np.ndarray, int]:
    """Integer code per row and the number of distinct groups."""
    uniques, codes = np.unique(np.asarray(groups), return_inverse=True)
    return codes.ravel(), len(uniques)


# --------------------------------------------------------------------------- Keras metrics


def _binarise(y_true, y_pred, threshold: float):
    """float32 0/1 tensors from labels (> 0.5) and probabilities (> threshold)."""
    truth = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
    pred = ops.cast(ops.cast(y_pred, "float32") > threshold, "float32")
    return truth, pred


class _EpochCountsMetric(keras.metrics.Metric):
    """Accumulates hard TP/FP/FN over all batches in float32 variables; ignores sample_weight."""

    def __init__(self, threshold: float = 0.5, name: str | None = None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.threshold = float(threshold)
        self.tp = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="tp")
        self.fp = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="fp")
        self.fn = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="fn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        # sample_weight (e.g. the border weight map) is deliberately ignored: the score is
        # the plain pixel Dice/IoU whatever the loss weighting.
        truth, pred = _binarise(y_true, y_pred, self.threshold)
        tp = ops.sum(truth * pred)
        self.tp.assign_add(tp)
        self.fp.assign_add(ops.sum(pred) - tp)
        self.fn.assign_add(ops.sum(truth) - tp)

    def _score(self, numerator, denominator):
        # nothing to find and nothing predicted over the whole epoch -> 1.0 (empty="one")
        return ops.where(denominator > 0, ops.divide_no_nan(numerator, denominator), 1.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="pipeline")
class DiceMetric(_EpochCountsMetric):
    """Global hard Dice over the epoch: 2TP / (2TP + FP + FN) from counts summed over batches."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", dtype=None):
        super().__init__(threshold=threshold, name=name, dtype=dtype)

    def result(self):
        return self._score(2.0 * self.tp, 2.0 * self.tp + self.fp + self.fn)


@keras.saving.register_keras_serializable(package="pipeline")
class IoUMetric(_EpochCountsMetric):
    """Global hard IoU over the epoch: TP / (TP + FP + FN) from counts summed over batches."""

    def __init__(self, threshold: float = 0.5, name: str = "iou", dtype=None):
        super().__init__(threshold=threshold, name=name, dtype=dtype)

    def result(self):
        return self._score(self.tp, self.tp + self.fp + self.fn)

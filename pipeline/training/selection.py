"""Checkpoint selection of the segmenter by what the pipeline is judged on, not Dice on tumour slices.

`PipelineSelection` runs the segmenter on EVERY validation slice (tumour or not) at the end
of each epoch and writes into the epoch's logs, before ModelCheckpoint, EarlyStopping and
ReduceLROnPlateau read them:

* ``val_patient_dice``: mean per-patient volume Dice of the segmenter alone (no gate),
  TP/FP/FN summed over each patient's slices, a patient with no tumour and no prediction
  scoring 1. Pixels predicted on normal slices count as false positives, so a model that
  outlines normal cortex loses here even when it outlines tumours well;
* ``val_fp_px_empty``: false-positive pixels summed over the validation slices without tumour;
* ``val_dice``: one Dice over all validation pixels; ``val_tumor_slice_dice``: mean per-slice
  Dice on tumour slices (the old criterion, logged for comparison only).

`segmenter.monitor` chooses which of these drives selection (`SELECTION_METRICS`).
With `segmenter.validate_every` N > 1 only every N-th epoch and the last are scored; the others
log NaN, which no checkpoint takes and the history's readers skip.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline import metrics

__all__ = ["SELECTION_METRICS", "PipelineSelection"]

SELECTION_METRICS = ("val_patient_dice", "val_dice", "val_tumor_slice_dice")
_LOGGED = ("val_patient_dice", "val_fp_px_empty", "val_dice", "val_tumor_slice_dice")


class PipelineSelection(keras.callbacks.Callback):
    """Adds the selection metrics (module doc) to each epoch's logs.

    images: uint8 (N, H, W, 3) every validation slice; masks: 0/1 (N, H, W); patient_ids: (N,).
    Must come before the callbacks that read the metrics (it writes into the shared logs).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, patient_ids: np.ndarray,
                 batch_size: int = 16, seg_threshold: float = 0.5, *, every: int = 1,
                 epochs: int | None = None) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.epochs = epochs
        self.images = images
        self.masks = np.asarray(masks)
        self.patient_ids = np.asarray(patient_ids)
        self.batch_size = int(batch_size)
        self.seg_threshold = float(seg_threshold)

    def predict_masks(self) -> np.ndarray:
        """0/1 masks (N, H, W) of the current model on every validation slice."""
        n = len(self.images)
        out = np.zeros(self.masks.shape, np.uint8)
        for start in range(0, n, self.batch_size):
            chunk = np.asarray(self.images[start : start + self.batch_size], np.float32)
            x = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)  # fixed shape: one trace
            x[: len(chunk)] = chunk
            prob = np.asarray(self.model.predict_on_batch(x), np.float32)[: len(chunk), ..., 0]
            out[start : start + len(chunk)] = prob > self.seg_threshold
        return out

    def scores(self, pred: np.ndarray) -> dict[str, float]:
        slices = metrics.slice_scores(self.masks, pred, empty="one")
        tp, fp, fn = (slices[c].to_numpy() for c in ("tp", "fp", "fn"))
        per_patient = metrics.patient_scores_from_counts(self.patient_ids, tp, fp, fn, "one")["dice"]
        tumour = slices["gt_pixels"].to_numpy() > 0
        return {
            "val_patient_dice": float(per_patient.mean()),
            "val_fp_px_empty": float(fp[~tumour].sum()),
            "val_dice": float(metrics.dice_from_counts(tp.sum(), fp.sum(), fn.sum(), "one")),
            "val_tumor_slice_dice": float(slices["dice"][tumour].mean()) if tumour.any() else 1.0,
        }

    def validates(self, epoch: int) -> bool:
        """True when the 0-based `epoch` is scored: every `every`-th and the last of `epochs`."""
        done = epoch + 1
        return done % self.every == 0 or (self.epochs is not None and done >= self.epochs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.validates(epoch):
            logs.update(self.scores(self.predict_masks()))
        else:  # the same columns every epoch, for the CSV history
            logs.update(dict.fromkeys(_LOGGED, float("nan")))

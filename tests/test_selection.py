"""Segmenter selection: the configured metric, computed on every validation slice, drives checkpointing."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.training.config import load_config
from pipeline.training.selection import SELECTION_METRICS, PipelineSelection


class Painter(keras.Model):
    """Predicts the FLAIR channel > level: a 'segmenter' whose false positives we control."""

    def __init__(self, level: float, **kwargs):
        super().__init__(**kwargs)
        self.level = level

    def call(self, x):
        return keras.ops.cast(x[..., 1:2] > self.level, "float32")


def _validation():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    masks = np.zeros((4, 8, 8), np.uint8)
    images[0, 2:4, 2:4, 1] = 200
    masks[0, 2:4, 2:4] = 1  # patient A: a tumour (4 px) ...
    images[1, :, :, 1] = 120  # ... and a normal slice of bright tissue
    images[2:, :, :, 1] = 60  # patient B: no tumour
    return images, masks, np.array(["A", "A", "B", "B"])


def test_patient_dice_punishes_false_positives_on_normal_slices_which_tumour_slice_dice_ignores():
    images, masks, ids = _validation()
    callback = PipelineSelection(images, masks, ids, batch_size=4)
    callback.set_model(Painter(150.0))
    quiet = callback.scores(callback.predict_masks())
    callback.set_model(Painter(100.0))  # also paints the bright normal slice (64 px)
    noisy = callback.scores(callback.predict_masks())
    assert quiet["val_patient_dice"] == 1.0 and quiet["val_fp_px_empty"] == 0
    assert noisy["val_tumor_slice_dice"] == quiet["val_tumor_slice_dice"] == 1.0
    assert noisy["val_patient_dice"] == pytest.approx((8 / (8 + 64) + 1.0) / 2)
    assert noisy["val_fp_px_empty"] == 64


def test_selection_writes_the_monitored_metric_into_the_epoch_logs():
    images, masks, ids = _validation()
    callback = PipelineSelection(images, masks, ids, batch_size=3)  # odd batch: padded, not retraced
    callback.set_model(Painter(150.0))
    logs: dict[str, float] = {"loss": 0.1}
    callback.on_epoch_end(0, logs)
    assert set(SELECTION_METRICS) <= set(logs) and logs["val_patient_dice"] == 1.0


def test_the_default_config_selects_by_patient_dice_over_all_validation_slices():
    config = load_config()
    assert config.segmenter.monitor == "val_patient_dice" and config.segmenter.train_on == "mix"

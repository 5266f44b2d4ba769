"""Segmenter selection: the configured metric, computed on every validation slice, drives checkpointing."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

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


def test_validate_every_scores_every_nth_epoch_and_the_last_and_logs_nan_between():
    images, masks, ids = _validation()
    callback = PipelineSelection(images, masks, ids, batch_size=4, every=3, epochs=5)
    callback.set_model(Painter(150.0))
    scored = []
    for epoch in range(5):
        logs: dict[str, float] = {"loss": 0.1}
        callback.on_epoch_end(epoch, logs)
        assert set(SELECTION_METRICS) <= set(logs)  # the same CSV columns every epoch
        scored.append(not np.isnan(logs["val_patient_dice"]))
    assert scored == [False, False, True, False, True]  # epochs 3 and 5 (the last)


def test_epochs_without_validation_neither_checkpoint_nor_stop_nor_slow_the_run(tmp_path):
    """Validation every 2nd epoch with patience 1 (early stopping and plateau): a 4-epoch phase runs
    to its end at its first rate, keeps a validated epoch, and logs NaN for the epochs it did not
    score. (Keras' callbacks, left alone, take the first NaN as their best and then stop.)"""
    from pipeline.training import callbacks as cb
    from pipeline.training.config import TrainingConfig
    from pipeline.training.phase import fit_phase

    images, masks, ids = _validation()
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    train = tf.data.Dataset.from_tensor_slices(
        (images.astype(np.float32), masks[..., None].astype(np.float32))).batch(4)
    result = fit_phase(
        model, stage_dir=tmp_path, name="train", label="segmenter/train", train=train, val=None,
        epochs=4, steps_per_epoch=None, monitor="val_patient_dice",
        training=TrainingConfig(patience=1, plateau_patience=1, lr_schedule="plateau"), budget_minutes=60.0,
        checkpoint_path=tmp_path / "best.keras",
        extra_callbacks=[PipelineSelection(images, masks, ids, batch_size=4, every=2, epochs=4)],
    )
    rows = cb.read_history(cb.history_path(tmp_path, "train"))
    values = [float(r["val_patient_dice"]) for r in rows]
    assert result.epochs_run == 4  # not stopped after epoch 2 or 3
    assert np.isnan(values[0]) and np.isnan(values[2]) and np.isfinite([values[1], values[3]]).all()
    assert [float(r["learning_rate"]) for r in rows[:3]] == pytest.approx([1e-3] * 3)
    assert result.best == max(values[1], values[3])
    assert (tmp_path / "best.keras").is_file()

"""Stage 2: train the ResUNet on tumour-positive training slices (or all slices).

The classifier gates which slices reach the segmenter, so by default (``train_on: tumor``)
the segmenter only learns to outline tumours on slices that have one, as in the design the
project follows; ``train_on: all`` also shows it empty slices. Validation uses the same
kind of slices of the validation patients. Loss from the config (default ``bce_dice``; a
loss with a ``weight_map`` method, such as ``border_bce``, gets its per-pixel weights from
the dataset), augmentation from the data layer, Dice and IoU as metrics; ``val_dice``
drives checkpointing, early stopping and the learning rate.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import tensorflow as tf

from pipeline.data.augment import AugmentParams
from pipeline.data.dataset import make_dataset
from pipeline.losses import get_loss
from pipeline.metrics import DiceMetric, IoUMetric
from pipeline.models.model_io import load_model, save_model
from pipeline.models.resunet import build_resunet
from pipeline.training import callbacks as cb
from pipeline.training.classifier_training import StageResult
from pipeline.training.config import Config
from pipeline.training.data_prep import TrainingData
from pipeline.training.phase import fit_phase, make_optimizer, read_marker, write_marker

log = logging.getLogger(__name__)

STAGE = "segmenter"
MONITOR = "val_dice"


def segmenter_positions(cfg: Config, data: TrainingData) -> tuple:
    """(train positions, val positions) the segmenter uses under `segmenter.train_on`."""
    if cfg.segmenter.train_on == "all":
        return data.train_pos, data.val_pos
    return data.tumor_positions(data.train_pos), data.tumor_positions(data.val_pos)


def augment_params(cfg: Config) -> AugmentParams:
    """`AugmentParams` from `segmenter.augment.params` (YAML lists become the tuples it expects)."""
    params = cfg.segmenter.augment.params
    return AugmentParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def train_segmenter(
    cfg: Config, data: TrainingData, stage_dir: Path, strategy: tf.distribute.Strategy
) -> StageResult:
    """Train (or resume) the segmenter in `stage_dir`; returns the best model on validation Dice."""
    s, t = cfg.segmenter, cfg.training
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    train_pos, val_pos = segmenter_positions(cfg, data)
    if len(train_pos) == 0 or len(val_pos) == 0:
        raise ValueError(
            f"segmenter: {len(train_pos)} training / {len(val_pos)} validation slices "
            f"with train_on={s.train_on!r}; both must be non-empty"
        )
    result = read_marker(stage_dir, "train")
    if result is not None:
        log.info(
            "segmenter: already done (%d epochs, best val_dice %s), skipping", result.epochs_run, result.best
        )
    else:
        started = time.monotonic()
        steps = max(1, math.ceil(len(train_pos) / s.batch_size))
        steps = min(steps, s.steps_per_epoch) if s.steps_per_epoch else steps
        with strategy.scope():
            model = build_resunet(base_filters=s.base_filters, depth=s.depth)
            loss = get_loss(s.loss.name, **s.loss.kwargs)
            model.compile(
                optimizer=make_optimizer(s.lr, t.lr_schedule, s.epochs, steps),
                loss=loss,
                metrics=[DiceMetric(name="dice"), IoUMetric(name="iou")],
                run_eagerly=t.run_eagerly,
            )
        weight_map = getattr(loss, "weight_map", None)  # e.g. border_bce: U-Net border weights per pixel
        train = make_dataset(
            data.arrays,
            train_pos,
            task="segment",
            batch_size=s.batch_size,
            shuffle=True,
            augment=s.augment.enabled,
            augment_params=augment_params(cfg),
            seed=t.seed,
            repeat=True,
            weight_map=weight_map,
            crop_size=s.crop_size,
        )
        val = make_dataset(
            data.arrays,
            val_pos,
            task="segment",
            batch_size=s.batch_size,
            shuffle=False,
            augment=False,
            seed=t.seed,
            weight_map=weight_map,
        )
        log.info(
            "segmenter: ResUNet base %d depth %d on %d train / %d val slices (%s), loss %s, %d steps/epoch",
            s.base_filters,
            s.depth,
            len(train_pos),
            len(val_pos),
            s.train_on,
            s.loss.name,
            steps,
        )
        result = fit_phase(
            model,
            stage_dir=stage_dir,
            name="train",
            label=f"{STAGE}/train",
            train=train,
            val=val,
            epochs=s.epochs,
            steps_per_epoch=steps,
            validation_steps=math.ceil(len(val_pos) / s.batch_size),
            monitor=MONITOR,
            training=t,
            budget_minutes=t.budget_minutes.segmenter,
            checkpoint_path=stage_dir / "best.keras",
            started_at=started,
        )
        if not (stage_dir / "best.keras").is_file():  # zero epochs or never a finite val_dice
            save_model(model, stage_dir / "best.keras")
        write_marker(stage_dir, result)
    rows = cb.merge_histories([("train", cb.history_path(stage_dir, "train"))], stage_dir / "history.csv")
    cb.plot_curves(rows, "dice", stage_dir / "curves.png", "segmenter: loss and Dice per epoch")
    with strategy.scope():
        model = load_model(stage_dir / "best.keras")
    info = {
        "train_on": s.train_on,
        "loss": s.loss.name,
        "train_slices": int(len(train_pos)),
        "val_slices": int(len(val_pos)),
    }
    return StageResult(model, [result], result.best, MONITOR, rows, info)

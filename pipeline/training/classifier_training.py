"""Stage 1: train the ResNet50 slice classifier (tumour / no tumour) on all training slices.

Phase 1, ``head``: the backbone is frozen, so its pooled features never change. They are
computed ONCE for the training and validation slices (a feature model from the raw input
to the GlobalAveragePooling output) and the head (Dropout -> Dense -> Dropout -> Dense) is
fitted on those vectors: an epoch takes seconds instead of a full ResNet50 pass. The head
model is built from the same layer objects as the classifier, so its trained weights are
the classifier's. Phase 2, ``finetune``: the top backbone stages are unfrozen
(`classifier.finetune_mode`) and the whole model trains on images with light augmentation
at a ~10x smaller learning rate.

Class imbalance (~2 no-tumour slices per tumour slice) is handled with class weights from
the data layer. Files in the stage folder: ``best.keras`` (best validation AUC over both
phases), ``head.keras`` (the model after phase 1), ``history.csv`` and ``curves.png``,
``tensorboard/``, per-phase histories and completion markers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.data.augment import AugmentParams
from pipeline.data.dataset import class_weights, make_dataset
from pipeline.models.backbone_weights import from_scratch
from pipeline.models.model_io import load_model, save_model
from pipeline.models.resnet_classifier import build_classifier, set_backbone_trainable
from pipeline.training import callbacks as cb
from pipeline.training.config import Config
from pipeline.training.data_prep import TrainingData
from pipeline.training.phase import PhaseResult, fit_phase, make_optimizer, read_marker, write_marker

log = logging.getLogger(__name__)

STAGE = "classifier"
MONITOR = "val_auc"
# "Light" augmentation for fine-tuning: left-right flips, mild affine and intensity, no elastic
# warps (a label does not depend on the tumour's exact shape, and warps cost CPU time).
LIGHT_AUGMENT = AugmentParams(p_affine=0.3, max_rotation=10.0, p_elastic=0.0)


@dataclass
class StageResult:
    """A trained stage: its best model, the phase results and the merged history."""

    model: keras.Model
    phases: list[PhaseResult]
    best: float | None
    monitor: str
    history_rows: list[dict[str, str]]
    info: dict[str, Any]

    @property
    def minutes(self) -> float:
        return sum(p.minutes for p in self.phases)


def classifier_metrics() -> list[keras.metrics.Metric]:
    """Metrics logged for the classifier; ``auc`` (ROC) drives checkpointing and early stopping."""
    return [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]


def split_at_pooling(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Split a classifier into (feature model, head model) at its global pooling layer.

    The feature model maps raw images to pooled backbone features (B, C). The head model
    takes (B, C) vectors through the SAME layer objects that follow the pooling layer in the
    classifier, so training it trains the classifier's head. Raises ValueError when the
    model has no top-level GlobalAveragePooling2D followed by a chain of layers.
    """
    layers = model.layers
    pool_idx = next(
        (i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.GlobalAveragePooling2D)), None
    )
    if pool_idx is None:
        raise ValueError(f"model {model.name!r} has no top-level GlobalAveragePooling2D layer")
    pool = layers[pool_idx]
    features = keras.Model(model.inputs, pool.output, name="pooled_features")
    head_layers = layers[pool_idx + 1 :]
    inp = keras.Input(shape=pool.output.shape[1:], name="features")
    x = inp
    for layer in head_layers:
        x = layer(x)
    head = keras.Model(inp, x, name="classifier_head")
    return features, head


def _steps(n: int, batch_size: int, cap: int | None) -> int:
    steps = max(1, math.ceil(n / batch_size))
    return min(steps, cap) if cap else steps


def _predict_features(
    feature_model: keras.Model, data: TrainingData, positions: np.ndarray, batch_size: int, eager: bool
) -> np.ndarray:
    """Pooled features (N, C) float32 of the slices at `positions`, in order (no augmentation)."""
    ds = make_dataset(
        data.arrays, positions, task="classify", batch_size=batch_size, shuffle=False, augment=False, seed=0
    ).map(lambda x, y: x)
    if eager:  # tiny runs: direct calls skip tracing a predict graph
        feats = np.concatenate([np.asarray(feature_model(x, training=False)) for x in ds])
    else:
        feats = feature_model.predict(ds, steps=math.ceil(len(positions) / batch_size), verbose=0)
    return np.asarray(feats, dtype=np.float32)


def _class_weight(cfg: Config, data: TrainingData) -> dict[int, float] | None:
    if not cfg.classifier.class_weighting:
        return None
    weights = class_weights(data.labels[data.train_pos])
    log.info("classifier: class weights %s", {k: round(float(v), 3) for k, v in weights.items()})
    return {int(k): float(v) for k, v in weights.items()}


def _from_scratch(cfg: Config) -> bool:
    return from_scratch(cfg.classifier.weights)


def _build(cfg: Config) -> keras.Model:
    c = cfg.classifier
    if _from_scratch(cfg):
        log.warning(
            "classifier: ResNet50 backbone trained from scratch (weights: none, no ImageNet transfer)"
        )
    return build_classifier(
        image_size=c.image_size, weights=c.weights, dropout=c.dropout, dense_units=c.dense_units
    )


def train_head(
    cfg: Config, data: TrainingData, stage_dir: Path, strategy: tf.distribute.Strategy
) -> tuple[PhaseResult, keras.Model]:
    """Phase 1: fit the head on frozen-backbone features; writes ``head.keras`` and ``best.keras``.

    Returns the phase result and the classifier holding the best head.
    """
    c, t = cfg.classifier, cfg.training
    started = time.monotonic()
    with strategy.scope():
        model = _build(cfg)
        set_backbone_trainable(model, "frozen")
        feature_model, head = split_at_pooling(model)
        head.compile(
            optimizer=make_optimizer(
                c.head_lr, t.lr_schedule, c.head_epochs, _steps(len(data.train_pos), c.batch_size, None)
            ),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=classifier_metrics(),
            run_eagerly=t.run_eagerly,
        )
    log.info(
        "classifier/head: computing frozen-backbone features of %d train + %d val slices once",
        len(data.train_pos),
        len(data.val_pos),
    )
    # One pass over train + val slices together: a single predict graph for both.
    feats = _predict_features(
        feature_model, data, np.concatenate([data.train_pos, data.val_pos]), c.batch_size, t.run_eagerly
    )
    f_train, f_val = feats[: len(data.train_pos)], feats[len(data.train_pos) :]
    y_train = data.labels[data.train_pos][:, None]
    y_val = data.labels[data.val_pos][:, None]
    log.info("classifier/head: features %s in %.1f s", f_train.shape[1:], time.monotonic() - started)
    head_best = stage_dir / "head_best.weights.h5"
    result = fit_phase(
        head,
        stage_dir=stage_dir,
        name="head",
        label=f"{STAGE}/head",
        train=f_train,
        val=(f_val, y_val),
        epochs=c.head_epochs,
        steps_per_epoch=None,
        monitor=MONITOR,
        training=t,
        budget_minutes=t.budget_minutes.classifier_head,
        checkpoint_path=head_best,
        save_weights_only=True,
        class_weight=_class_weight(cfg, data),
        started_at=started,
        fit_kwargs={"y": y_train, "batch_size": c.batch_size, "shuffle": True},
    )
    if head_best.is_file():
        head.load_weights(str(head_best))  # the head layers are the classifier's: this sets its best head
    for name in ("head.keras", "best.keras"):
        save_model(model, stage_dir / name)
    write_marker(stage_dir, result)
    return result, model


def train_finetune(
    cfg: Config,
    data: TrainingData,
    stage_dir: Path,
    strategy: tf.distribute.Strategy,
    initial_best: float | None,
    model: keras.Model | None = None,
) -> PhaseResult:
    """Phase 2: unfreeze the top of the backbone and train on images; improves ``best.keras`` or keeps it.

    `model` is the classifier after phase 1 when it is still in memory; otherwise (a resumed
    run) it is loaded from ``head.keras``.
    """
    c, t = cfg.classifier, cfg.training
    started = time.monotonic()
    steps = _steps(len(data.train_pos), c.batch_size, c.steps_per_epoch)
    with strategy.scope():
        if model is None:
            model = load_model(stage_dir / "head.keras")
        # From scratch there are no ImageNet BN statistics to protect, so BN trains too.
        set_backbone_trainable(model, c.finetune_mode, freeze_batchnorm=not _from_scratch(cfg))
        model.compile(
            optimizer=make_optimizer(c.finetune_lr, t.lr_schedule, c.finetune_epochs, steps),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=classifier_metrics(),
            run_eagerly=t.run_eagerly,
        )
    train = make_dataset(
        data.arrays,
        data.train_pos,
        task="classify",
        batch_size=c.batch_size,
        shuffle=True,
        augment=c.augment,
        augment_params=LIGHT_AUGMENT,
        seed=t.seed,
        repeat=True,
    )
    val = make_dataset(
        data.arrays,
        data.val_pos,
        task="classify",
        batch_size=c.batch_size,
        shuffle=False,
        augment=False,
        seed=t.seed,
    )
    log.info(
        "classifier/finetune: %s trainable, lr %.2g, %d steps/epoch", c.finetune_mode, c.finetune_lr, steps
    )
    result = fit_phase(
        model,
        stage_dir=stage_dir,
        name="finetune",
        label=f"{STAGE}/finetune",
        train=train,
        val=val,
        epochs=c.finetune_epochs,
        steps_per_epoch=steps,
        validation_steps=_steps(len(data.val_pos), c.batch_size, None),
        monitor=MONITOR,
        training=t,
        budget_minutes=t.budget_minutes.classifier_finetune,
        checkpoint_path=stage_dir / "best.keras",
        initial_best=initial_best,
        class_weight=_class_weight(cfg, data),
        started_at=started,
    )
    write_marker(stage_dir, result)
    return result


def train_classifier(
    cfg: Config, data: TrainingData, stage_dir: Path, strategy: tf.distribute.Strategy
) -> StageResult:
    """Run (or resume) both classifier phases in `stage_dir`; returns the best model over both phases.

    Completed phases (marker files) are skipped; an interrupted phase resumes from its last
    finished epoch.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    phases = []
    head, model = read_marker(stage_dir, "head"), None
    if head is None:
        head, model = train_head(cfg, data, stage_dir, strategy)
    else:
        log.info(
            "classifier/head: already done (%d epochs, best val_auc %s), skipping", head.epochs_run, head.best
        )
    phases.append(head)
    finetune = read_marker(stage_dir, "finetune")
    if finetune is None:
        finetune = train_finetune(cfg, data, stage_dir, strategy, head.best, model)
    else:
        log.info("classifier/finetune: already done (%d epochs), skipping", finetune.epochs_run)
    phases.append(finetune)
    rows = cb.merge_histories(
        [("head", cb.history_path(stage_dir, "head")), ("finetune", cb.history_path(stage_dir, "finetune"))],
        stage_dir / "history.csv",
    )
    cb.plot_curves(rows, "auc", stage_dir / "curves.png", "classifier: loss and ROC-AUC per epoch")
    with strategy.scope():
        model = load_model(stage_dir / "best.keras")
    best = max((p.best for p in phases if p.best is not None), default=None)
    info = {
        "weights": cfg.classifier.weights,
        "trained_from_scratch": _from_scratch(cfg),
        "image_size": cfg.classifier.image_size,
    }
    return StageResult(model, phases, best, MONITOR, rows, info)

"""Stage 2: train the ResUNet on what the pipeline shows it, selected by the pipeline's metric.

``train_on: mix`` (default) draws training crops from `pipeline.data.crop_sampler` in the
configured `segmenter.crop_mix`: around tumours, around random head pixels of any slice, and
on slices without tumour, preferring hard negatives (normal slices the classifier scores
high, and the pixels where a reference segmenter fired, `pipeline.training.hard_negatives`).
The older modes stay available: ``tumor`` (tumour slices only, the course design) and
``all`` (every slice). Loss from the config (a loss with a ``weight_map`` method, such as
``border_bce``, gets its per-pixel weights from the dataset).

Selection: with ``segmenter.monitor: val_patient_dice`` (default) every validation slice is
segmented after each epoch and the mean per-patient Dice of the segmenter alone drives
checkpointing, early stopping and the learning rate (`pipeline.training.selection`);
``val_dice`` keeps Keras's Dice over the validation slices of the `train_on` kind.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.data.augment import AugmentParams
from pipeline.data.crop_sampler import CropMix, make_crop_dataset
from pipeline.data.dataset import make_dataset
from pipeline.losses import get_loss
from pipeline.metrics import DiceMetric, IoUMetric
from pipeline.models.model_io import SEGMENTER_FILE, load_model, load_pair, save_model
from pipeline.models.pair_artifact import read_pair_meta
from pipeline.models.resnet_unet import build_resnet_unet
from pipeline.models.resunet import build_resunet
from pipeline.training import callbacks as cb
from pipeline.training.classifier_training import StageResult
from pipeline.training.config import Config, SegmenterConfig, project_path
from pipeline.training.data_prep import TrainingData
from pipeline.training.hard_negatives import sampler_pools
from pipeline.training.phase import fit_phase, make_optimizer, read_marker, write_marker
from pipeline.training.selection import PipelineSelection

log = logging.getLogger(__name__)

STAGE = "segmenter"


# segmenter.encoder -> (builder from the config section, one-line description for the log)
SEGMENTER_BUILDERS = {
    "resunet": lambda s: build_resunet(base_filters=s.base_filters, depth=s.depth),
    "resnet50": lambda s: build_resnet_unet(s.encoder_stages, s.decoder_filters, s.encoder_trainable,
                                            weights=s.encoder_weights),
}


def describe(s: SegmenterConfig) -> str:
    """One line naming the segmenter design of `s`, for logs and the run summary."""
    if s.encoder == "resnet50":
        return (f"ResNet50-encoder U-Net ({s.encoder_weights}, stages 1-{s.encoder_stages}, top "
                f"{s.encoder_trainable} fine-tuned, decoder {list(s.decoder_filters)})")
    return f"ResUNet base {s.base_filters} depth {s.depth}"


def build_segmenter(s: SegmenterConfig) -> keras.Model:
    """The untrained segmenter that `segmenter.encoder` names (`SEGMENTER_BUILDERS`)."""
    return SEGMENTER_BUILDERS[s.encoder](s)


def segmenter_positions(cfg: Config, data: TrainingData) -> tuple:
    """(train positions, val positions) the segmenter uses under `segmenter.train_on`."""
    if cfg.segmenter.train_on in ("all", "mix"):
        return data.train_pos, data.val_pos
    return data.tumor_positions(data.train_pos), data.tumor_positions(data.val_pos)


def augment_params(cfg: Config) -> AugmentParams:
    """`AugmentParams` from `segmenter.augment.params` (YAML lists become the tuples it expects)."""
    params = cfg.segmenter.augment.params
    return AugmentParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def _reference_dir(cfg: Config, *, warn: bool = False) -> Path | None:
    """The pair folder of `segmenter.hard_negatives.reference`, or None when unset or without a segmenter."""
    ref = cfg.segmenter.hard_negatives.reference
    if not ref:
        return None
    path = project_path(ref)
    if not (path / SEGMENTER_FILE).is_file():
        if warn:
            log.warning("segmenter: hard-negative reference %s has no %s; empty crops use the classifier "
                        "only", path, SEGMENTER_FILE)
        return None
    return path


def _reference_segmenter(cfg: Config) -> keras.Model | None:
    """The segmenter of `segmenter.hard_negatives.reference` (a pair folder), or None when unset or absent."""
    path = _reference_dir(cfg, warn=True)
    return load_pair(path).segmenter if path is not None else None


def reference_record(cfg: Config) -> dict[str, str] | None:
    """Which pair placed the hard negatives: {"pair": folder, "segmenter_sha256": its recorded sum},
    or None without one. For the run's summary: `reference: models` names whatever release is
    committed when the run starts, so the folder alone does not say which segmenter it was."""
    path = _reference_dir(cfg)
    if path is None:
        return None
    return {"pair": str(path), "segmenter_sha256": read_pair_meta(path).sha256.get(SEGMENTER_FILE, "")}


def _mix_dataset(cfg: Config, data: TrainingData, train_pos, stage_dir: Path, classifier, weight_map):
    s = cfg.segmenter
    pools = sampler_pools(
        data.arrays, train_pos, data.index["has_tumor"].to_numpy(bool),
        classifier=classifier, reference_segmenter=_reference_segmenter(cfg),
        weight=s.hard_negatives.weight, cache_dir=stage_dir,
    )
    mix = CropMix(s.crop_mix.tumor, s.crop_mix.random, s.crop_mix.empty)
    return make_crop_dataset(
        data.arrays, pools, mix, batch_size=s.batch_size, crop_size=s.crop_size, seed=cfg.training.seed,
        augment=s.augment.enabled, augment_params=augment_params(cfg), weight_map=weight_map,
    )


def _steps_per_epoch(cfg: Config, data: TrainingData, train_pos: np.ndarray) -> int:
    """Steps between validations: `segmenter.steps_per_epoch`, else one pass (mix: over tumour slices)."""
    s = cfg.segmenter
    n = len(data.tumor_positions(train_pos)) if s.train_on == "mix" else len(train_pos)
    return s.steps_per_epoch or max(1, math.ceil(n / s.batch_size))


def _compiled_model(cfg: Config, steps: int, strategy: tf.distribute.Strategy) -> tuple[keras.Model, object]:
    """(untrained segmenter compiled with the configured loss and optimizer, that loss)."""
    s, t = cfg.segmenter, cfg.training
    with strategy.scope():
        model = build_segmenter(s)
        loss = get_loss(s.loss.name, **s.loss.kwargs)
        model.compile(
            optimizer=make_optimizer(s.lr, t.lr_schedule, s.epochs, steps),
            loss=loss,
            metrics=[DiceMetric(name="dice"), IoUMetric(name="iou")],
            run_eagerly=t.run_eagerly,
        )
    return model, loss


def _inputs(cfg: Config, data: TrainingData, train_pos, val_pos, stage_dir: Path, classifier, weight_map):
    """(training dataset, validation dataset or None, validation steps or None, extra callbacks)."""
    s, t = cfg.segmenter, cfg.training
    if s.train_on == "mix":
        train = _mix_dataset(cfg, data, train_pos, stage_dir, classifier, weight_map)
    else:
        train = make_dataset(
            data.arrays, train_pos, task="segment", batch_size=s.batch_size, shuffle=True,
            augment=s.augment.enabled, augment_params=augment_params(cfg), seed=t.seed, repeat=True,
            weight_map=weight_map, crop_size=s.crop_size,
        )
    if s.monitor == "val_dice" and s.train_on != "mix":
        val = make_dataset(data.arrays, val_pos, task="segment", batch_size=s.batch_size, shuffle=False,
                           augment=False, seed=t.seed, weight_map=weight_map)
        return train, val, math.ceil(len(val_pos) / s.batch_size), []
    if len(data.val_pos) == 0:  # data.fold all: nothing validates
        return train, None, None, []
    # every validation slice, scored like the pipeline (also for monitor val_dice with mix)
    pos = data.val_pos
    images, masks = np.asarray(data.arrays.images[pos]), np.asarray(data.arrays.masks[pos])
    selection = PipelineSelection(images, masks, data.patient_ids[pos], batch_size=s.batch_size,
                                  every=s.validate_every, epochs=s.epochs)
    return train, None, None, [selection]


def _fit(cfg: Config, data: TrainingData, train_pos, val_pos, stage_dir: Path, strategy, classifier):
    """Train the segmenter in `stage_dir` (resuming an interrupted phase); returns its PhaseResult."""
    s, t = cfg.segmenter, cfg.training
    started = time.monotonic()
    steps = _steps_per_epoch(cfg, data, train_pos)
    model, loss = _compiled_model(cfg, steps, strategy)
    weight_map = getattr(loss, "weight_map", None)  # e.g. border_bce: U-Net border weights per pixel
    train, val, val_steps, extra = _inputs(cfg, data, train_pos, val_pos, stage_dir, classifier, weight_map)
    monitor = s.monitor if len(val_pos) else None  # None: the last of `epochs` epochs is kept
    log.info("segmenter: %s on %d train / %d val slices (%s), loss %s, %d steps/epoch, selection by %s",
             describe(s), len(train_pos), len(val_pos), s.train_on, s.loss.name, steps,
             monitor or f"none (the last of {s.epochs} epochs)")
    result = fit_phase(
        model, stage_dir=stage_dir, name="train", label=f"{STAGE}/train", train=train, val=val,
        epochs=s.epochs, steps_per_epoch=steps, validation_steps=val_steps, monitor=monitor,
        extra_callbacks=extra, training=t, budget_minutes=t.budget_minutes.segmenter,
        checkpoint_path=stage_dir / "best.keras", started_at=started,
    )
    if not (stage_dir / "best.keras").is_file():  # zero epochs or never a finite monitor value
        save_model(model, stage_dir / "best.keras")
    write_marker(stage_dir, result)
    return result


def train_segmenter(
    cfg: Config, data: TrainingData, stage_dir: Path, strategy: tf.distribute.Strategy,
    classifier: keras.Model | None = None,
) -> StageResult:
    """Train (or resume) the segmenter in `stage_dir`; returns the best model on `segmenter.monitor`.

    `classifier` scores the empty training slices for hard negatives (``train_on: mix``);
    without one they are weighted by the reference segmenter alone.
    """
    s = cfg.segmenter
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    train_pos, val_pos = segmenter_positions(cfg, data)
    if len(train_pos) == 0 or (len(val_pos) == 0 and len(data.val_pos) > 0):
        raise ValueError(
            f"segmenter: {len(train_pos)} training / {len(val_pos)} validation slices "
            f"with train_on={s.train_on!r}; both must be non-empty"
        )
    result = read_marker(stage_dir, "train")
    if result is not None:
        log.info("segmenter: already done (%d epochs, best %s %s), skipping",
                 result.epochs_run, s.monitor, result.best)
    else:
        result = _fit(cfg, data, train_pos, val_pos, stage_dir, strategy, classifier)
    rows = cb.merge_histories([("train", cb.history_path(stage_dir, "train"))], stage_dir / "history.csv")
    cb.plot_curves(rows, "dice", stage_dir / "curves.png", "segmenter: loss and Dice per epoch")
    with strategy.scope():
        model = load_model(stage_dir / "best.keras")
    info = {
        "design": describe(s),
        "train_on": s.train_on,
        "crop_mix": {"tumor": s.crop_mix.tumor, "random": s.crop_mix.random, "empty": s.crop_mix.empty},
        "loss": s.loss.name,
        "train_slices": int(len(train_pos)),
        "val_slices": int(len(val_pos)),
        "hard_negative_reference": reference_record(cfg) if s.train_on == "mix" else None,
    }
    return StageResult(model, [result], result.best, s.monitor, rows, info)

"""One resumable training phase: optimizer, callbacks, `fit`, and a completion marker.

A phase (classifier/head, classifier/finetune, segmenter/train) that finished writes
``<stage_dir>/<phase>.done.json``; a resumed run reads it and skips the phase. A phase that
was interrupted resumes from its last finished epoch through Keras' BackupAndRestore.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from pipeline.io_utils import atomic_write_json
from pipeline.training import callbacks as cb
from pipeline.training.config import TrainingConfig

log = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """What a phase did: epochs finished, best validation value, minutes, and why it stopped."""

    name: str
    epochs_run: int
    best: float | None
    minutes: float
    stopped_by: str  # "epochs" | "early_stopping" | "time_budget" | "skipped"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epochs_run": self.epochs_run,
            "best": self.best,
            "minutes": round(self.minutes, 3),
            "stopped_by": self.stopped_by,
            **self.extra,
        }


def marker_path(stage_dir: Path, name: str) -> Path:
    return Path(stage_dir) / f"{name}.done.json"


def read_marker(stage_dir: Path, name: str) -> PhaseResult | None:
    """The result recorded when phase `name` completed, or None when it has not completed."""
    path = marker_path(stage_dir, name)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    extra = {
        k: v for k, v in data.items() if k not in ("name", "epochs_run", "best", "minutes", "stopped_by")
    }
    return PhaseResult(
        data["name"], data["epochs_run"], data["best"], data["minutes"], data["stopped_by"], extra
    )


def write_marker(stage_dir: Path, result: PhaseResult) -> None:
    atomic_write_json(marker_path(stage_dir, result.name), result.to_json())


def make_optimizer(lr: float, schedule: str, epochs: int, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam with a constant rate (ReduceLROnPlateau adjusts it) or a cosine decay over the phase."""
    if schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=max(1, epochs * steps_per_epoch), alpha=0.01
        )
    return keras.optimizers.Adam(learning_rate=lr)


def fit_phase(
    model: keras.Model,
    *,
    stage_dir: Path,
    name: str,
    label: str,
    train,
    val,
    epochs: int,
    steps_per_epoch: int | None,
    validation_steps: int | None = None,
    monitor: str | None,
    training: TrainingConfig,
    budget_minutes: float,
    checkpoint_path: Path,
    save_weights_only: bool = False,
    initial_best: float | None = None,
    class_weight: dict[int, float] | None = None,
    started_at: float | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
) -> PhaseResult:
    """Fit a compiled `model` for phase `name` of a stage and write its completion marker.

    The caller writes the completion marker (`write_marker`) once its own follow-up (saving
    models) is done, so a crash in between re-runs the phase instead of skipping it.
    `train`/`val` are what `model.fit` takes (a `tf.data.Dataset` or a (x, y) tuple for `train`
    with `fit_kwargs` such as ``batch_size``). The best epoch on `monitor` (mode max; None: the
    last epoch) is saved to `checkpoint_path`; the best value (including `initial_best` and the
    rows of an interrupted run) is returned in the result. `extra_callbacks` run first each
    epoch, so metrics they add to the logs (`pipeline.training.selection`) can be monitored.
    """
    stage_dir = Path(stage_dir)
    started_at = time.monotonic() if started_at is None else started_at
    history_csv = cb.history_path(stage_dir, name)
    done_epochs = cb.restored_epoch(stage_dir, name)
    cb.trim_history(history_csv, done_epochs)  # CSV rows == epochs the backup holds
    best_so_far = _max(initial_best, _best(history_csv, monitor) if done_epochs else None)
    if done_epochs:
        log.info("%s: resuming after epoch %d of %d (best %s so far %s)",
                 label, done_epochs, epochs, monitor, best_so_far)
    callbacks, budget = cb.phase_callbacks(
        label=label,
        phase_dir=stage_dir,
        name=name,
        monitor=monitor,
        epochs=epochs,
        patience=training.patience,
        lr_schedule=training.lr_schedule,
        plateau_factor=training.plateau_factor,
        plateau_patience=training.plateau_patience,
        min_lr=training.min_lr,
        budget_minutes=budget_minutes,
        started_at=started_at,
        checkpoint_path=checkpoint_path,
        save_weights_only=save_weights_only,
        initial_best=best_so_far,
    )
    callbacks = [*(extra_callbacks or []), *callbacks]
    if epochs > 0:
        kwargs = {"shuffle": False, **(fit_kwargs or {})}  # datasets shuffle themselves
        model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=training.verbose,
            **kwargs,
        )
    rows = cb.read_history(history_csv)
    best = _max(initial_best, _best(history_csv, monitor))
    stopped_by = _stopped_by(callbacks, budget)
    result = PhaseResult(name, len(rows), best, (time.monotonic() - started_at) / 60, stopped_by,
                         {"monitor": monitor, "planned_epochs": epochs})
    log.info("%s: done after %d epoch(s), best %s=%s, %.1f min, stopped by %s",
             label, len(rows), monitor or "(nothing validates)", _fmt(best), result.minutes, stopped_by)
    return result


def _stopped_by(callbacks: list[keras.callbacks.Callback], budget: Any) -> str:
    """Why a phase ended: `time_budget`, `early_stopping` or `epochs`."""
    early = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
    if budget.stopped:
        return "time_budget"
    if early is not None and early.stopped_epoch > 0:
        return "early_stopping"
    return "epochs"


def _best(history_csv: Path, monitor: str | None) -> float | None:
    """Best `monitor` value in the phase's history so far (None when nothing validates)."""
    return cb.best_in_history(history_csv, monitor) if monitor else None


def _max(a: float | None, b: float | None) -> float | None:
    vals = [v for v in (a, b) if v is not None and math.isfinite(v)]
    return max(vals) if vals else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"

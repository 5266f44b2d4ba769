"""Keras callbacks of one training phase, the time budget, the test interruption hook and curves.

`phase_callbacks` assembles, in this order: ModelCheckpoint (best on the validation metric),
EarlyStopping, ReduceLROnPlateau (when the schedule is "plateau"), BackupAndRestore,
CSVLogger (appending, so a resumed phase continues its history), TensorBoard (when the
`tensorboard` package is installed), `EpochLogger`,
`TimeBudget` and, only when asked for by the environment, `InterruptAfterEpoch`.

Test hook: set ``LGG_TRAIN_INTERRUPT_AFTER=<stage>/<phase>:<N>`` (e.g.
``segmenter/train:1``) and the process ends with ``os._exit(INTERRUPT_EXIT_CODE)`` right after
epoch N (1-based, counted from the start of the phase, so it never fires again on a resumed
run that is already past N) has been fully recorded - checkpoint, backup and CSV row. It
simulates a run killed between two epochs; nothing else uses it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import matplotlib.pyplot as plt  # the backend is the caller's (the commands choose Agg)

from pipeline.io_utils import atomic_save, atomic_write, csv_cell

log = logging.getLogger(__name__)

INTERRUPT_ENV = "LGG_TRAIN_INTERRUPT_AFTER"
INTERRUPT_EXIT_CODE = 75


class TimeBudget(keras.callbacks.Callback):
    """Stops training once a wall-clock budget is used up.

    After each epoch it stops if another epoch of the mean length seen so far would overrun
    the budget; within an epoch it stops at the first batch past the budget (Keras then
    still validates and ends the epoch cleanly). `started_at` (``time.monotonic()``) lets the
    budget include work done before `fit`, e.g. computing cached features.
    """

    def __init__(self, minutes: float, label: str = "phase", started_at: float | None = None):
        super().__init__()
        self.seconds = float(minutes) * 60.0
        self.label = label
        self.started_at = started_at
        self.stopped = False
        self._epoch_times: list[float] = []
        self._epoch_start = 0.0

    def _elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def on_train_begin(self, logs=None):
        if self.started_at is None:
            self.started_at = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()
        if self._elapsed() >= self.seconds:
            self._stop(f"budget of {self.seconds / 60:.1f} min used before epoch {epoch + 1}")

    def on_train_batch_end(self, batch, logs=None):
        if not self.stopped and self._elapsed() >= self.seconds:
            self._stop(f"budget of {self.seconds / 60:.1f} min used during an epoch")

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_times.append(time.monotonic() - self._epoch_start)
        mean = sum(self._epoch_times) / len(self._epoch_times)
        if not self.stopped and self._elapsed() + mean > self.seconds:
            self._stop(
                f"another epoch (~{mean:.0f} s) would overrun the budget of "
                f"{self.seconds / 60:.1f} min after epoch {epoch + 1}"
            )

    def _stop(self, reason: str) -> None:
        self.stopped = True
        self.model.stop_training = True
        log.warning("%s: stopping early, %s (%.1f min elapsed)", self.label, reason, self._elapsed() / 60)


class EpochLogger(keras.callbacks.Callback):
    """Logs one line per finished epoch: the phase, epoch k/n, every metric and the seconds taken."""

    def __init__(self, label: str, epochs: int):
        super().__init__()
        self.label = label
        self.epochs = epochs
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in sorted((logs or {}).items())
                         if not _is_nan(v))  # NaN: an epoch without validation (segmenter.validate_every)
        log.info(
            "%s epoch %d/%d: %s (%.1f s)",
            self.label,
            epoch + 1,
            self.epochs,
            shown,
            time.monotonic() - self._start,
        )


def _is_nan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _fmt(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class InterruptAfterEpoch(keras.callbacks.Callback):
    """Test hook: ends the process with `os._exit` after epoch `after` (1-based) of this phase."""

    def __init__(self, after: int, label: str):
        super().__init__()
        self.after = after
        self.label = label

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after:
            log.warning(
                "%s: %s set, exiting after epoch %d to simulate a killed run",
                self.label,
                INTERRUPT_ENV,
                self.after,
            )
            logging.shutdown()
            os._exit(INTERRUPT_EXIT_CODE)


def interrupt_from_env(label: str) -> InterruptAfterEpoch | None:
    """The `InterruptAfterEpoch` hook when ``$LGG_TRAIN_INTERRUPT_AFTER`` names this phase, else None."""
    spec = os.environ.get(INTERRUPT_ENV, "").strip()
    if not spec:
        return None
    target, _, count = spec.rpartition(":")
    if target != label:
        return None
    try:
        return InterruptAfterEpoch(int(count), label)
    except ValueError as exc:
        raise ValueError(f"{INTERRUPT_ENV}={spec!r}: expected '<stage>/<phase>:<epoch>'") from exc


def phase_callbacks(
    *,
    label: str,
    phase_dir: Path,
    name: str,
    monitor: str | None,
    epochs: int,
    patience: int,
    lr_schedule: str,
    plateau_factor: float,
    plateau_patience: int,
    min_lr: float,
    budget_minutes: float,
    started_at: float | None,
    checkpoint_path: Path,
    save_weights_only: bool,
    initial_best: float | None,
) -> tuple[list[keras.callbacks.Callback], TimeBudget]:
    """Callbacks of one phase writing into `phase_dir` (the stage folder); returns them and the budget.

    `monitor` None (no validation data): no selection, early stopping or plateau; the
    checkpoint holds the last finished epoch.

    Files: `checkpoint_path` (best epoch on `monitor`, mode max), ``history_<name>.csv``,
    ``tensorboard/<name>/`` and the BackupAndRestore state in ``backup_<name>/`` (removed by
    Keras once the phase finishes). `initial_best` carries the best value of earlier phases
    or of the run before a resume, so the checkpoint only moves on real improvement.
    """
    budget = TimeBudget(budget_minutes, label=label, started_at=started_at)
    if monitor is None:  # nothing validates: every epoch overwrites the checkpoint, the last one stays
        callbacks: list[keras.callbacks.Callback] = [keras.callbacks.ModelCheckpoint(
            str(checkpoint_path), save_best_only=False, save_weights_only=save_weights_only)]
    else:
        callbacks = _selection_callbacks(monitor, patience, checkpoint_path, save_weights_only, initial_best)
    if lr_schedule == "plateau" and monitor is not None:
        callbacks.append(
            _Plateau(monitor=monitor, mode="max", factor=plateau_factor, patience=plateau_patience,
                     min_lr=min_lr)
        )
    callbacks += [
        # After the LR callback, so the backed-up optimizer state holds the reduced rate.
        keras.callbacks.BackupAndRestore(backup_dir=str(backup_dir(phase_dir, name))),
        keras.callbacks.CSVLogger(str(history_path(phase_dir, name)), append=True),
        EpochLogger(label, epochs),
        budget,
    ]
    if tensorboard_available():
        callbacks.insert(
            -2, keras.callbacks.TensorBoard(log_dir=str(phase_dir / "tensorboard" / name), write_graph=False)
        )
    hook = interrupt_from_env(label)
    if hook is not None:
        callbacks.append(hook)  # last: everything about the epoch is on disk when it fires
    return callbacks, budget


def _selection_callbacks(monitor: str, patience: int, checkpoint_path: Path, save_weights_only: bool,
                         initial_best: float | None) -> list[keras.callbacks.Callback]:
    """ModelCheckpoint of the best epoch on `monitor` (mode max) and EarlyStopping on it."""
    return [
        _Checkpoint(
            str(checkpoint_path),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            save_weights_only=save_weights_only,
            initial_value_threshold=initial_best,
        ),
        _EarlyStopping(monitor=monitor, mode="max", patience=patience, restore_best_weights=True),
    ]


def _unvalidated(logs, monitor: str) -> bool:
    """True when `monitor` is NaN in `logs`: an epoch the selection did not score
    (`segmenter.validate_every`)."""
    return _is_nan((logs or {}).get(monitor))


# Keras' monitor callbacks start from best=None and would take a NaN as their best, after which
# nothing improves on it; these pass over the epochs without validation instead, so patience
# counts validations (as with Keras' own validation_freq, where the key is absent).
class _ValidatedEpochsOnly:
    """Mixin for a Keras monitor callback: `on_epoch_end` runs only on validated epochs."""

    def on_epoch_end(self, epoch, logs=None):
        if not _unvalidated(logs, self.monitor):
            super().on_epoch_end(epoch, logs)


class _Checkpoint(_ValidatedEpochsOnly, keras.callbacks.ModelCheckpoint):
    pass


class _EarlyStopping(_ValidatedEpochsOnly, keras.callbacks.EarlyStopping):
    pass


class _Plateau(_ValidatedEpochsOnly, keras.callbacks.ReduceLROnPlateau):
    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if logs is not None and _unvalidated(logs, self.monitor):  # the history keeps its rate column
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def tensorboard_available() -> bool:
    """True when the `tensorboard` package (which `tf.summary` needs) is installed; warns once otherwise."""
    global _TB_WARNED
    if importlib.util.find_spec("tensorboard") is not None:
        return True
    if not _TB_WARNED:
        log.warning(
            "TensorBoard logs skipped: the `tensorboard` package is not installed "
            "(pip install tensorboard); CSV histories and curves.png are still written"
        )
        _TB_WARNED = True
    return False


_TB_WARNED = False


def backup_dir(phase_dir: Path, name: str) -> Path:
    """Folder of the BackupAndRestore state of phase `name`."""
    return Path(phase_dir) / f"backup_{name}"


def history_path(phase_dir: Path, name: str) -> Path:
    """CSV history of phase `name` (one row per finished epoch)."""
    return Path(phase_dir) / f"history_{name}.csv"


def restored_epoch(phase_dir: Path, name: str) -> int:
    """Number of finished epochs BackupAndRestore will resume after (0 when there is no backup)."""
    meta = backup_dir(phase_dir, name) / "training_metadata.json"
    if not meta.is_file():
        return 0
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (ValueError, KeyError, json.JSONDecodeError):
        return 0


def read_history(path: Path) -> list[dict[str, str]]:
    """Rows of a CSVLogger file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def trim_history(path: Path, keep_epochs: int) -> None:
    """Keep only rows of epochs < `keep_epochs` (and the last row of each epoch).

    A run killed after the CSV row but before the backup of an epoch would otherwise list
    that epoch twice once the resumed run repeats it.
    """
    rows = read_history(path)
    if not rows:
        return
    by_epoch: dict[int, dict[str, str]] = {}
    for row in rows:
        epoch = int(row["epoch"])
        if epoch < keep_epochs:
            by_epoch[epoch] = row
    if len(by_epoch) == len(rows):
        return
    fields = list(rows[0].keys())
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for epoch in sorted(by_epoch):
            writer.writerow({k: csv_cell(v) for k, v in by_epoch[epoch].items()})


def best_in_history(path: Path, monitor: str) -> float | None:
    """Highest finite value of `monitor` in a history CSV, or None."""
    values = []
    for row in read_history(path):
        try:
            v = float(row.get(monitor, "nan"))
        except ValueError:
            continue
        if math.isfinite(v):
            values.append(v)
    return max(values) if values else None


def merge_histories(phases: Sequence[tuple[str, Path]], out_path: Path) -> list[dict[str, str]]:
    """Concatenate per-phase CSVs into one stage history with `phase` and `stage_epoch` columns."""
    merged: list[dict[str, str]] = []
    for phase, path in phases:
        for row in read_history(path):
            merged.append({"stage_epoch": str(len(merged)), "phase": phase, **row})
    fields: list[str] = []
    for row in merged:
        fields += [k for k in row if k not in fields]
    with atomic_write(out_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields or ["stage_epoch", "phase", "epoch"])
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in merged)
    return merged


def plot_curves(rows: Sequence[dict[str, str]], metric: str, out_path: Path, title: str) -> Path:
    """Write a PNG with loss and `metric` (train and validation) per epoch; phases are marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = list(range(1, len(rows) + 1))
    for ax, key in zip(axes, ("loss", metric), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            col = prefix + key
            ys = [_num(r.get(col)) for r in rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot(x, ys, style, marker="o", ms=3, label=("validation " if prefix else "train ") + key)
        previous = None
        for i, r in enumerate(rows):
            if previous is not None and r.get("phase") != previous:
                ax.axvline(i + 0.5, color="grey", lw=0.8, ls=":")
                ax.text(i + 0.6, ax.get_ylim()[1], r.get("phase", ""), va="top", fontsize=8, color="grey")
            previous = r.get("phase")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_save(out_path, lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)
    return Path(out_path)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan

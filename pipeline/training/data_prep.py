"""The slices a training run uses: index, patient split, decoded arrays and train/val positions.

Built once per run by `prepare_data` and shared by both stages and the calibration. Only
the train and validation patients of the split are ever handed to the trainers; the test
patients stay untouched for `make evaluate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.array_cache import load_arrays
from pipeline.data.index import index_dataset, summarize
from pipeline.data.splits import (
    SPLITS_FILE,
    all_folds_split,
    assert_no_leakage,
    ensure_splits,
    fold_split,
    make_folds,
    positions_for_split,
    save_splits,
)
from pipeline.errors import DataError
from pipeline.paths import resolve_cache_dir, resolve_data_dir
from pipeline.training.config import DataConfig, project_path

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Index rows and decoded arrays of the train and validation patients.

    `arrays.images[i]`/`arrays.masks[i]` belong to `index.iloc[i]`; `train_pos`/`val_pos`
    are row positions of the training and validation slices (sorted).
    """

    index: pd.DataFrame
    splits: pd.DataFrame
    splits_path: Path
    arrays: Any  # pipeline.data.array_cache.SliceArrays
    train_pos: np.ndarray
    val_pos: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """Slice labels (1 = tumour) as float32, aligned with the arrays."""
        return self.index["has_tumor"].to_numpy(dtype=np.float32)

    @property
    def patient_ids(self) -> np.ndarray:
        return self.index["patient_id"].to_numpy()

    def patients(self, positions: np.ndarray) -> list[str]:
        """Sorted unique patient ids of the slices at `positions`."""
        return sorted(set(self.patient_ids[positions].tolist()))

    def tumor_positions(self, positions: np.ndarray) -> np.ndarray:
        """The subset of `positions` whose slice has tumour."""
        return positions[self.index["has_tumor"].to_numpy()[positions]]

    def summary(self) -> dict[str, Any]:
        """Counts per split (patients, slices, tumour slices) and the patient lists used."""
        out: dict[str, Any] = {
            "data_dir": self.index.attrs.get("root"),
            "splits_file": str(self.splits_path),
            "dataset": summarize(self.index),
        }
        for name, pos in (("train", self.train_pos), ("val", self.val_pos)):
            out[name] = {
                "patients": len(self.patients(pos)),
                "slices": int(len(pos)),
                "tumor_slices": int(len(self.tumor_positions(pos))),
                "patient_ids": self.patients(pos),
            }
        out["test_patients_held_out"] = int((self.splits["split"] == "test").sum())
        return out


def prepare_data(cfg: DataConfig) -> TrainingData:
    """Index `cfg.data_dir`, load or create the patient split, decode the slices (cached).

    The split file (`cfg.splits`, relative to the project root) is created on first use
    with `cfg.fractions` and `cfg.seed` and reused afterwards, so `make evaluate` tests on
    the same patients. Raises DataError when the split leaks a patient or leaves the
    training or validation side empty.
    """
    root = resolve_data_dir(cfg.data_dir)
    cache = resolve_cache_dir(cfg.cache_dir)
    index = index_dataset(root, cache_dir=cache, skip_bad=cfg.skip_bad).reset_index(drop=True)
    splits_path = project_path(cfg.splits)
    splits = ensure_splits(index, splits_path, fractions=tuple(cfg.fractions), seed=cfg.seed)
    assert_no_leakage(splits)
    log.info("patient split %s: %s", splits.attrs.get("source", "loaded"), splits_path)
    if cfg.fold == "all":
        splits = all_folds_split(splits)
        log.info("final model: all %d train + validation patients train, none validates (test held out)",
                 (splits["split"] == "train").sum())
    elif cfg.fold is not None:
        splits = fold_split(splits, make_folds(index, splits, cfg.folds, cfg.seed), cfg.fold)
        log.info("cross-validation fold %d of %d: %d train / %d validation patients (test held out)",
                 cfg.fold, cfg.folds, (splits["split"] == "train").sum(), (splits["split"] == "val").sum())
    train_pos = positions_for_split(index, splits, "train")
    val_pos = positions_for_split(index, splits, "val")
    if len(train_pos) == 0 or (len(val_pos) == 0 and cfg.fold != "all"):
        raise DataError(
            f"the split leaves {len(train_pos)} training and {len(val_pos)} validation slices; "
            "both stages need some of each (only data.fold 'all' trains without validation)",
            [splits_path],
        )
    arrays = load_arrays(index, cache)
    data = TrainingData(index, splits, splits_path, arrays, train_pos, val_pos)
    s = data.summary()
    log.info(
        "data: %s -- train %d patients / %d slices (%d tumour), val %d patients / %d slices (%d tumour), "
        "%d test patients held out",
        root,
        s["train"]["patients"],
        s["train"]["slices"],
        s["train"]["tumor_slices"],
        s["val"]["patients"],
        s["val"]["slices"],
        s["val"]["tumor_slices"],
        s["test_patients_held_out"],
    )
    return data


def copy_splits(data: TrainingData, run_dir: Path) -> Path:
    """Write the split used (a fold's split under cross-validation) into the run directory (`SPLITS_FILE`).

    The run's pair is then evaluated on exactly the patients it was validated on (`evaluate --split val`).
    """
    dest = Path(run_dir) / SPLITS_FILE
    save_splits(data.splits, dest)
    return dest

"""A pair whose segmenter is the ensemble of several runs' segmenters (`pipeline.models.ensemble`).

The classifier, the operating point, the split and the config come from the first run, so an
ensemble of fold-K runs validates on fold K (`calibrate --run OUT`, `evaluate --run OUT
--split val`) exactly as its members did; `pipeline.json` records the member runs, their sums
and their training minutes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.splits import SPLITS_FILE
from pipeline.models.ensemble import build_ensemble
from pipeline.models.model_io import load_pair, save_pair
from pipeline.paths import RUN_CONFIG_FILE

__all__ = ["save_ensemble_pair"]


def save_ensemble_pair(runs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Pairs in `runs` (at least two) -> a pair in `out_dir` segmenting with the mean of their segmenters.

    Each run's files are checked against their sums when loaded. `out_dir` gets the first run's
    classifier, operating point, `splits.csv` and `config.yaml` (when present). Returns `out_dir`.
    Raises ValueError for fewer than two runs, DataError for a run that is not a valid pair.
    """
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(runs)}")
    pairs = [load_pair(run) for run in runs]
    first, out_dir = Path(runs[0]), Path(out_dir)
    meta = {k: v for k, v in pairs[0].meta.items() if k not in ("sha256", "created", "versions")}
    minutes = [p.meta.get("durations_minutes") or {} for p in pairs]
    meta["ensemble"] = {"members": [str(run) for run in runs],
                        "member_sha256": [p.meta["sha256"]["segmenter.keras"] for p in pairs],
                        "member_minutes": minutes}
    # the ensemble's training time is its members' (the first run's alone would understate it)
    total = sum(m.get("segmenter_train", 0.0) for m in minutes)
    meta["durations_minutes"] = {"segmenter_train": round(total, 2)}
    save_pair(out_dir, pairs[0].classifier, build_ensemble([p.segmenter for p in pairs]), meta)
    for name in (SPLITS_FILE, RUN_CONFIG_FILE):
        if (first / name).is_file():
            shutil.copyfile(first / name, out_dir / name)
    return out_dir

"""Helpers for the training tests: the quick-preset command line and running it in a subprocess."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from pipeline.paths import PROJECT_ROOT


def quick_args(data_dir: Path, work: Path, run_dir: Path, *extra: str) -> list[str]:
    """`train` arguments for a quick run whose every output (split, caches, runs) stays under `work`."""
    return [
        "train",
        "--quick",
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.splits={work / 'splits.csv'}",
        "--set",
        f"data.cache_dir={work / 'cache'}",
        "--set",
        f"output.runs_dir={work / 'runs'}",
        *extra,
    ]


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300):
    """Run `python -m pipeline <args>` in a fresh process; returns the CompletedProcess (output captured)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def history_epochs(path: Path) -> list[int]:
    """The `epoch` column of a CSVLogger file."""
    with Path(path).open(newline="") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]

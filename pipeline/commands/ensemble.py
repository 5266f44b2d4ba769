"""`ensemble`: one pair whose segmenter averages the segmenters of several runs.

    python -m pipeline ensemble runs/cv/resnet50/fold0 runs/cv/resunet/fold0 --out runs/cv/ensemble/fold0
    python -m pipeline calibrate --run runs/cv/ensemble/fold0      # its operating point on fold 0
    python -m pipeline evaluate --run runs/cv/ensemble/fold0 --split val
    python -m pipeline ensemble runs/new-resnet50 models#1 --out runs/swap   # member 1 of models/ kept

The classifier, operating point, split and config are the first run's
(`pipeline.models.ensemble_pair`). An ensemble given whole gives each of its members; DIR#K
takes its member K. Exit codes: 0 written, 2 a run is not a valid pair or names no member.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `ensemble`."""
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run (or pair) folders whose segmenters are averaged; an ensemble counts as "
                             "its members, DIR#K as its member K (0-based)")
    parser.add_argument("--out", type=Path, required=True, help="folder the ensemble pair is written into")


def run(args: argparse.Namespace) -> int:
    """Write the ensemble pair; returns the exit code."""
    from pipeline.errors import DataError
    from pipeline.models.ensemble_pair import save_ensemble_pair

    try:
        out = save_ensemble_pair(args.runs, args.out)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ensemble pair of {len(args.runs)} sources: {out}")
    return 0

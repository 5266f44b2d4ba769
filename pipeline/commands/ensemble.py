"""`ensemble`: one pair whose segmenter averages the segmenters of several runs.

    python -m pipeline ensemble runs/cv/resnet50/fold0 runs/cv/resunet/fold0 --out runs/cv/ensemble/fold0
    python -m pipeline calibrate --run runs/cv/ensemble/fold0      # its operating point on fold 0
    python -m pipeline evaluate --run runs/cv/ensemble/fold0 --split val

The classifier, operating point, split and config are the first run's
(`pipeline.models.ensemble_pair`). Exit codes: 0 written, 2 a run is not a valid pair.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `ensemble`."""
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run (or pair) folders whose segmenters are averaged")
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
    print(f"ensemble pair of {len(args.runs)} segmenters: {out}")
    return 0

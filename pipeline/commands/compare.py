"""`compare`: paired per-patient comparison of two evaluation folders (`pipeline.evaluation.compare`).

    python -m pipeline compare runs/A/evaluation/val runs/B/evaluation/val [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("baseline", help="evaluation folder of the baseline (holds patients.csv, slices.csv)")
    parser.add_argument("candidate", help="evaluation folder of the candidate, same patients")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the result as JSON")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluation.compare import compare_evaluations, render_comparison
    from pipeline.io_utils import atomic_write_json

    try:
        result = compare_evaluations(args.baseline, args.candidate, n_boot=args.n_boot)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_comparison(result), end="")
    if args.json:
        atomic_write_json(args.json, result)
    return 0

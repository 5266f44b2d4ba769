"""`cv`: pooled out-of-fold results of cross-validated variants, paired against a baseline.

    python -m pipeline cv runs/cv/resnet50 runs/cv/resunet [--baseline runs/cv/resunet] [--json OUT]

Each VARIANT folder holds ``fold<K>/`` runs (``train --fold K``), each evaluated on its own
fold (``evaluate --run VARIANT/foldK --split val``). Per variant: the pooled out-of-fold
mean per-patient Dice with bootstrap intervals, missed and false-positive pixels, patients
not found and the pooled epoch curve (`pipeline.evaluation.cross_validation`, written to
``VARIANT/oof/``); then every variant paired against the baseline (the last one by default)
on the patients they share.

``--apply-point`` instead writes each variant's pooled grid's best point (its folds'
``calibration_grid.csv`` pooled, `apply_pooled_point`) into every one of its fold pairs; evaluate
the folds again, then run ``cv`` to read them at that one point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `cv`."""
    parser.add_argument("variants", nargs="+", type=Path, help="variant folders holding fold<K>/ runs")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="variant the others are paired against (default: the last one given)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the results as JSON")
    parser.add_argument("--apply-point", action="store_true",
                        help="write each variant's pooled operating point into its fold pairs, then stop")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Pool, summarise and pair the variants; returns 2 on missing folds or evaluations."""
    from pipeline.errors import DataError
    from pipeline.evaluation.compare import compare_evaluations, render_comparison
    from pipeline.evaluation.cross_validation import POOLED_DIR, render_summary, write_summary
    from pipeline.io_utils import atomic_write_json

    if args.apply_point:
        return _apply_points(args.variants)
    baseline = args.baseline or args.variants[-1]
    results: dict[str, dict] = {"variants": {}, "paired": {}}
    try:
        for variant in dict.fromkeys([*args.variants, baseline]):
            summary, curve = write_summary(variant, n_boot=args.n_boot)
            print(render_summary(str(variant), summary, curve))
            results["variants"][str(variant)] = summary
        for variant in args.variants:
            if variant == baseline:
                continue
            paired = compare_evaluations(baseline / POOLED_DIR, variant / POOLED_DIR, n_boot=args.n_boot)
            print(render_comparison(paired))
            results["paired"][str(variant)] = paired
    except (DataError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_json(args.json, results)
    return 0


def _apply_points(variants: list[Path]) -> int:
    """`--apply-point`: each variant's pooled point into its fold pairs; 2 on a missing grid or pair."""
    from pipeline.errors import DataError
    from pipeline.evaluation.cross_validation import apply_pooled_point

    try:
        for variant in variants:
            point, folds = apply_pooled_point(variant)
            print(f"{variant}: pooled operating point {point.to_json()} written into {len(folds)} fold "
                  f"pairs; evaluate each again (evaluate --run {folds[0]} --split val, ...), then run cv")
    except (DataError, OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

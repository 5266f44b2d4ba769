"""`python -m pipeline quantize`: optional INT8 copies of a pair's models for the OpenVINO backend.

Post-training quantization with NNCF on training-patient slices; a variant is kept only when the
validation end-to-end Dice drops by at most --max-drop (see `pipeline.quantization.int8`).
Needs `pip install -r requirements-int8.txt` and the data root with the pair's split.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the `quantize` sub-command."""
    from pipeline.commands.arguments import add_data_arguments, add_pair_arguments
    from pipeline.quantization import DEFAULT_CALIBRATION_SLICES, MAX_DROP, PRESETS

    add_pair_arguments(parser, unverified=False)
    add_data_arguments(parser)
    parser.add_argument("--calibration-slices", type=int, default=DEFAULT_CALIBRATION_SLICES,
                        help="training-patient slices for the statistics "
                             f"(default {DEFAULT_CALIBRATION_SLICES})")
    parser.add_argument("--max-drop", type=float, default=MAX_DROP,
                        help=f"largest validation end-to-end Dice drop to accept (default {MAX_DROP})")
    parser.add_argument("--preset", choices=PRESETS, default=PRESETS[0],
                        help="NNCF quantization preset (default %(default)s: asymmetric activations; "
                             "`performance` makes them symmetric too)")
    parser.add_argument("--dry-run", action="store_true", help="measure only; write nothing into the pair")
    parser.add_argument("--work-dir", default=None,
                        help="where the candidates and evaluations go (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    """Quantize, print the measurements and the decision; 2 on bad input."""
    import matplotlib

    matplotlib.use("Agg")
    from pipeline.commands.arguments import resolve_pair_args
    from pipeline.errors import DataError
    from pipeline.quantization.int8 import quantize_pair

    try:
        pair_dir = resolve_pair_args(args).pair_dir
        report = quantize_pair(pair_dir, data_dir=args.data_dir, cache_dir=args.cache_dir,
                               n_calibration=args.calibration_slices, max_drop=args.max_drop,
                               write=not args.dry_run, work_dir=args.work_dir, preset=args.preset)
    except (DataError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    kept = report["kept"]
    print(f"kept: {kept or 'nothing (no variant within the tolerance)'}"
          + ("" if not kept or args.dry_run else f"; written into {pair_dir}"))
    return 0

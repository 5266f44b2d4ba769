"""`python -m pipeline variants`: which OpenVINO variants of a pair's models give Keras' answers here.

Runs each model (classifier, segmenter) as f32, bf16 (where the CPU runs it natively) and the
pair's INT8 IR (where it ships one) against Keras on the probe batch and the validation patients'
slices, and files the results in the pair's `pipeline.json` under this CPU's class (and its
`SHA256SUMS`); `--precision auto` then runs the fastest variant that passed
(`pipeline.inference.backends.variant_check`). Exit codes: 0 checked, 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the `variants` sub-command."""
    from pipeline.commands.arguments import add_data_arguments, add_pair_arguments

    add_pair_arguments(parser, unverified=False)
    add_data_arguments(parser)
    parser.add_argument("--max-slices", type=int, default=None, metavar="N",
                        help="validation slices to check on, evenly spaced (default: every one)")
    parser.add_argument("--openvino-cache", metavar="DIR", default=None,
                        help="OpenVINO IR cache root (default: $LGG_OPENVINO_CACHE, else .cache/openvino)")
    parser.add_argument("--dry-run", action="store_true", help="check only; write nothing into the pair")
    parser.add_argument("--json", action="store_true", help="print the full results as JSON")


def format_results(report: dict) -> list[str]:
    """One line per model and variant: passed or not, the drift, the slices."""
    lines = [f"CPU class {report['cpu']}:"]
    for role, by_variant in report["results"].items():
        for variant, r in by_variant.items():
            dice = r.get("mask_dice", float("nan"))
            drift = (f"masks agree {100 * r['mask_agreement']:.3f} %, mask Dice {dice:.4f}"
                     if r["kind"] == "map"
                     else f"max |p - p_keras| {r['max_abs_diff']:.4f}, gate flips {r.get('gate_flips', 0)} "
                          f"({r.get('gate_flips_beyond_tolerance', 0)} beyond the tolerance)")
            lines.append(f"  {role:<10} {variant:<5} {'ok    ' if r['ok'] else 'FAILED'} {drift} "
                         f"on {r['n_slices']} slices")
    return lines


def run(args: argparse.Namespace) -> int:
    """Check the variants, print them; 2 on bad input."""
    from pipeline.commands.arguments import resolve_pair_args
    from pipeline.errors import DataError
    from pipeline.inference.backends import BackendError, openvino_available

    if args.max_slices is not None and args.max_slices < 1:
        print("error: --max-slices must be >= 1", file=sys.stderr)
        return 2
    if not openvino_available():
        print("error: the variant check needs the `openvino` package (requirements.txt)", file=sys.stderr)
        return 2
    from pipeline.inference.backends.variant_check import check_pair_variants

    try:
        pair_dir = resolve_pair_args(args).pair_dir
        report = check_pair_variants(pair_dir, data_dir=args.data_dir, cache_dir=args.cache_dir,
                                     openvino_cache=args.openvino_cache, max_slices=args.max_slices,
                                     write=not args.dry_run)
    except (DataError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else "\n".join(format_results(report)))
    print(f"written into {pair_dir / 'pipeline.json'}" if report["written"] else "(dry run: nothing written)")
    return 0

"""`evaluate`: score a trained model pair on test patients (or any Kaggle-layout root) and write a report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from pipeline.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lgg-pipeline evaluate`."""
    from pipeline.commands.arguments import (
        add_backend_arguments,
        add_data_arguments,
        add_out_argument,
        add_pair_arguments,
        add_point_arguments,
    )
    from pipeline.data.splits import EVAL_SPLITS

    add_pair_arguments(parser)
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out slices whose files are bad (missing mask, unreadable, ...) instead of stopping",
    )
    parser.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default=EVAL_SPLITS[0],
        help="patients to evaluate: a split of the split file, or 'all' patients under "
        "--data-dir (no split file needed) (default: %(default)s)",
    )
    parser.add_argument(
        "--splits", metavar="CSV",
        help="split file (default: the run's splits.csv, else the pair's, else models/splits.csv)"
    )
    add_data_arguments(parser)
    add_out_argument(parser, "report.json, report.md, the tables and figures",
                     default="<run or models>/evaluation/<split>/")
    add_point_arguments(parser, min_component=False)
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="slices per batch (default: 16)"
    )
    parser.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the confidence intervals (default: 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    add_backend_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _ci_text(ci: Mapping[str, Any] | None) -> str:
    if not ci or ci.get("low") is None:
        return ""
    return f"[{ci['low']:.4f}, {ci['high']:.4f}]"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The short stdout summary: headline numbers with their 95% CIs."""
    prov = report["provenance"]
    lines = [
        f"Evaluated {prov.get('n_patients')} patients / {prov.get('n_slices')} slices "
        f"(split {prov.get('split')}) with models {prov.get('models_dir')}"
        + (f" on {prov['backend']} ({prov.get('segmenter_precision')})" if prov.get("backend") else ""),
        "",
    ]
    rows = [
        (
            r["metric"],
            "n/a"
            if r["value"] is None
            else (f"{r['value']:.4f}" if isinstance(r["value"], float) else str(r["value"])),
            _ci_text({"low": r["ci_low"], "high": r["ci_high"]}),
        )
        for r in report["headline"]
    ]
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'metric':<{width}}  {'value':>8}  95% CI")
    lines += [f"{name:<{width}}  {value:>8}  {ci}".rstrip() for name, value, ci in rows]
    return lines


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the headline table and where the report is; 2 on bad input."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the figures are written to files only
    from pipeline.commands.arguments import point_overrides
    from pipeline.evaluation.evaluate import evaluate

    if args.batch_size < 1 or args.n_boot < 1:
        print("error: --batch-size and --n-boot must be >= 1", file=sys.stderr)
        return 2
    try:
        point_overrides(args)
    except ValueError as exc:
        print(f"error: --threshold: {exc}", file=sys.stderr)
        return 2
    try:
        result = evaluate(
            models=args.models,
            run=args.run,
            data_dir=args.data_dir,
            split=args.split,
            splits=args.splits,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            threshold=args.threshold,
            batch_size=args.batch_size,
            n_boot=args.n_boot,
            seed=args.seed,
            progress=not args.no_progress,
            skip_bad=args.skip_bad,
            allow_unverified=args.allow_unverified,
            backend=args.backend,
            precision=args.precision,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(result.report)))
    print(f"\nReport: {result.files['report_md']}\n        {result.files['report_json']}"
          f"\n        {result.files['report_html']}")
    print(f"Figures: {result.out_dir}")
    return 0

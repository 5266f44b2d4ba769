"""`index` command: index a Kaggle-layout root, write (or reuse) the patient split, print the counts."""

from __future__ import annotations

import argparse
import sys

from pipeline.paths import MODELS_DIR, SPLITS_FILE

DEFAULT_SPLITS = MODELS_DIR / SPLITS_FILE


def _fractions(text: str) -> tuple[float, float, float]:
    """'0.7,0.15,0.15' -> (0.7, 0.15, 0.15); argparse turns a ValueError into a usage error."""
    try:
        values = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r}") from exc
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"need three non-negative fractions summing to 1, got {text!r}")
    return values  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `index` options on `parser`."""
    from pipeline.commands.arguments import add_data_arguments

    add_data_arguments(parser)
    parser.add_argument(
        "--splits", default=str(DEFAULT_SPLITS), help="patient split CSV, written once (default: %(default)s)"
    )
    parser.add_argument(
        "--resplit", action="store_true", help="make a new split even if the split file exists"
    )
    parser.add_argument("--seed", type=int, default=42, help="split seed (default: %(default)s)")
    parser.add_argument(
        "--fractions",
        type=_fractions,
        default=(0.7, 0.15, 0.15),
        help="train,val,test patient fractions (default: 0.7,0.15,0.15)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="list bad files and go on with the good slices instead of failing",
    )


def run(args: argparse.Namespace) -> int:
    """Index, split and print; returns 0, or 1 with the DataError message on stderr."""
    from pipeline.data.index import index_dataset, summarize
    from pipeline.data.splits import ensure_splits, split_table
    from pipeline.errors import DataError
    from pipeline.paths import resolve_data_dir

    root = resolve_data_dir(args.data_dir)
    try:
        df = index_dataset(root, cache_dir=args.cache_dir, skip_bad=args.skip_bad)
        splits = ensure_splits(df, args.splits, fractions=args.fractions, seed=args.seed, force=args.resplit)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts = summarize(df)
    skipped = df.attrs.get("skipped", [])
    print(f"Data root:        {root}")
    print(f"Patients:         {counts['patients']}")
    print(f"Slices:           {counts['slices']}")
    print(f"Tumour slices:    {counts['tumor_slices']}")
    print(f"Tumour patients:  {counts['tumor_patients']}")
    if skipped:
        print(f"Skipped files:    {len(skipped)} (see the warnings above)")
    print()
    table = split_table(df, splits).rename(columns=lambda c: c.replace("_", " "))
    print(table.to_string())
    verb = "written" if splits.attrs.get("source") == "created" else "reused (pass --resplit to redo)"
    print(f"\nSplit file {verb}: {args.splits}")
    return 0

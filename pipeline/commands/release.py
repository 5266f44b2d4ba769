"""`release`: export a training run's pair to `models/` - weights stored in float16, checked, fingerprinted.

Exit codes: 0 release written, 2 unusable input (no run, a check failed, a release exists
without --force). See `pipeline.models.release` for what is written and checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.paths import PROJECT_ROOT

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_OUT = PROJECT_ROOT / "models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the release options on `parser`."""
    parser.add_argument("--run", metavar="DIR",
                        help="training run holding the final pair (default: the latest run, runs/LATEST)")
    parser.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT),
                        help=f"release directory (default: {DEFAULT_OUT})")
    parser.add_argument("--weights-dtype", choices=("float16", "float32"), default="float16",
                        help="how the weights are stored; the models compute in float32 either way "
                        "(default: float16)")
    parser.add_argument("--segmenter-weights-dtype", choices=("float16", "float32"), default=None,
                        help="the segmenter's storage when it differs from --weights-dtype")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing release (and a differing splits.csv) in --out")
    parser.add_argument("--max-mb", type=float, default=100.0, metavar="MB",
                        help="cap on both model files together, in MB (default: 100)")
    parser.add_argument("--probe-size", type=int, default=256, metavar="PX",
                        help="side of the synthetic probe slices the outputs are compared on (default: 256)")
    parser.add_argument("--probe-n", type=int, default=8, metavar="N",
                        help="number of synthetic probe slices (default: 8)")
    parser.add_argument("--probe-images", nargs="+", metavar="FILE", default=None,
                        help="real slices (equal sizes) compared as well, e.g. a few test-patient TIFFs")


def _default_run() -> Path | None:
    from pipeline.training.config import Config
    from pipeline.training.runner import latest_run, runs_root

    return latest_run(runs_root(Config()))


def _load_probe_images(paths: list[str]):
    import numpy as np

    from pipeline.errors import DataError
    from pipeline.inference.image_loading import load_slice

    images = [load_slice(p) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"--probe-images must all have one size, got {sorted(shapes)}", files=paths)
    return np.stack(images)


def format_report(result: dict) -> list[str]:
    """Lines printed after an export: sizes, measured drift against tolerance, the sha256 list."""
    measured, tol = result["measured"], result["tolerance"]
    lines = [f"Release of {result['source_run']}", f"     in {result['out_dir']} "
             f"(weights stored as {result['weights_dtype']}, computing in float32)", ""]
    for name, info in result["files"].items():
        lines.append(f"  {name:<16} {info['bytes'] / 1e6:9.2f} MB")
    lines.append(f"  models together  {result['model_bytes'] / 1e6:9.2f} MB "
                 f"(run's float32 files: {result['source_model_bytes'] / 1e6:.2f} MB)")
    lines += ["", "Drift from the run's models on the probe batch:",
              f"  classifier probability max abs diff {measured['classifier_max_abs_diff']:.2e} "
              f"(tolerance {tol['classifier_max_abs']:g})",
              f"  segmenter probability max abs diff  {measured['segmenter_max_abs_diff']:.2e} "
              f"(tolerance {tol['segmenter_max_abs']:g})",
              f"  mask agreement at {tol['mask_threshold']:g}              "
              f"{100 * measured['mask_agreement']:.3f} % (at least {100 * tol['min_mask_agreement']:.1f} %)",
              "", "SHA256SUMS:"]
    lines += [f"  {info['sha256']}  {name}" for name, info in result["files"].items()]
    return lines


def run(args: argparse.Namespace) -> int:
    """Export the release, print the report; 2 on unusable input."""
    from pipeline.errors import DataError
    from pipeline.models.release import ProbeSpec, export_release

    if args.max_mb <= 0 or args.probe_n < 1 or args.probe_size < 8:
        print("error: --max-mb must be > 0, --probe-n >= 1 and --probe-size >= 8", file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(args.run) if args.run else _default_run()
    if run_dir is None:
        print("error: no training run found (runs/LATEST is missing); pass --run DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        probe_images = _load_probe_images(args.probe_images) if args.probe_images else None
        result = export_release(
            run_dir,
            args.out,
            weights_dtype=args.weights_dtype,
            segmenter_weights_dtype=getattr(args, "segmenter_weights_dtype", None),
            probe=ProbeSpec(n=args.probe_n, size=args.probe_size),
            probe_images=probe_images,
            max_total_bytes=int(args.max_mb * 1e6),
            force=args.force,
        )
    except (DataError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(format_report(result)))
    return EXIT_OK

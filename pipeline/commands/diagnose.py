"""`diagnose`: run the two-stage pipeline over MRI slices and write reports, masks and overlays.

Volume studies go next to slices: a NIfTI file (X, Y, Z, 3), a study folder of channel-named
NIfTI files or DICOM series folders (`..._pre`, `..._flair`, `..._post`), given as INPUT or found
inside a folder given, or one study channel by channel with --pre/--flair/--post. Each gets a
mask NIfTI on its own grid and affine in OUT/volumes/, and its tumour volume in mL, slice range
and 3D bounding box in patients.csv and report.json. OUT/index.html is the review page (opens
from disk): the summary, a card per study or patient with its 3D view, the slices' table.

Also the console script `lgg-diagnose` (`main`). Exit codes:

  0  every input diagnosed
  1  at least one input failed (its row in report.csv says why)
  2  unusable arguments: no input found, OUT is a file, cannot be written or contains an input,
     no trained model pair or an invalid one (its pipeline.json out of range, missing a key, its
     sha256 sums or its SHA256SUMS, a file not matching them), or OUT's journal was made with
     other settings or models (--no-resume starts over)
  3  another diagnose is writing into OUT (one run per output folder at a time)
  4  outputs, the journal or the reports could not be written (a full disk, a read-only
     folder): what is done is journalled, and the same command run again does the rest
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_INPUT_FAILED, EXIT_USAGE, EXIT_OUT_IN_USE, EXIT_WRITE_FAILED = 0, 1, 2, 3, 4
MAX_LISTED = 5  # write failures printed one by one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the diagnose options on `parser` (its help ends with the exit codes)."""
    parser.epilog = _exit_codes()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    from pipeline.commands.arguments import (
        add_backend_arguments,
        add_out_argument,
        add_pair_arguments,
        add_point_arguments,
    )

    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="slice files (TIFF, PNG, JPEG), volume studies (a .nii/.nii.gz file holding the three "
        "channels on its 4th axis; a folder of NIfTI files or DICOM series folders named ..._pre, "
        "..._flair, ..._post), folders (searched recursively for both) or glob patterns",
    )
    add_out_argument(parser, "report.csv/json, patients.csv, masks/, overlays/ and volumes/ "
                     "(the mask NIfTI of each volume study)", required=True)
    add_pair_arguments(parser)
    add_point_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="slices per batch (default: 16)")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also write a Grad-CAM heatmap of the classifier for each flagged slice",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="ignore the progress journal in OUT and diagnose every input again",
    )
    parser.add_argument(
        "--include-masks",
        action="store_true",
        help="also diagnose the dataset's *_mask.* files (skipped by default)",
    )
    parser.add_argument(
        "--no-volumes",
        action="store_true",
        help="diagnose every slice on its own; by default the slices of a study (one folder, files "
        "<study>_<n>.tif) are diagnosed together with the volume-aware gate and 3D post-processing",
    )
    study = parser.add_argument_group(
        "one study channel by channel",
        "each a 3D NIfTI file or a folder holding one DICOM series; a folder with several series "
        "takes FOLDER@<SeriesInstanceUID> (the error for such a folder lists them). The channels "
        "must share one grid (shape and affine).",
    )
    for flag, channel in (("--pre", "pre-contrast"), ("--flair", "FLAIR"), ("--post", "post-contrast")):
        study.add_argument(flag, metavar="SOURCE", default=None, help=f"the {channel} channel")
    study.add_argument(
        "--study-id", metavar="NAME", default=None, help="name of that study (default: the FLAIR source's)"
    )
    add_backend_arguments(parser)
    _add_executor_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _exit_codes() -> str:
    """The exit-code table of this module's docstring, for `--help`."""
    return "exit codes:" + __doc__.split("Exit codes:", 1)[1].rstrip()


def _add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "executor", "who runs the work: this process, or a Ray cluster. With ray, every node writes "
        "into OUT itself: OUT and the inputs must be on a filesystem every node sees at the same path.",
    )
    group.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local (default): this process; ray: a Ray Data job, the models loaded "
                       "once per actor")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="an existing Ray cluster (auto: the one `ray start` made here); "
                       "default: a local instance")
    group.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                       help="CPUs of the local instance (default: all)")
    group.add_argument("--concurrency", type=int, default=1, metavar="N",
                       help="Ray actors, each with its own copy of the models (default: 1)")
    group.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="N",
                       help="CPUs each actor reserves (default: 1)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="N",
                       help="GPUs each actor reserves (default: 0)")


def _executor(args: argparse.Namespace) -> object:
    """The executor `args` ask for: "local", or a RayExecutor with the cluster options."""
    if args.executor == "local":
        return "local"
    from pipeline.inference.diagnosis.executors import make_executor

    return make_executor(
        "ray", address=args.ray_address, concurrency=args.concurrency, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, num_cpus=args.ray_cpus,
    )


def run(args: argparse.Namespace) -> int:
    """Run the diagnosis described by `args`; print a summary and return the exit code."""
    from pipeline.commands.arguments import point_overrides
    from pipeline.errors import DataError, OutputInUseError, OutputWriteError
    from pipeline.inference.diagnosis import run_diagnosis

    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_USAGE
    trio = (args.pre, args.flair, args.post)
    if not args.inputs and all(src is None for src in trio):
        print("error: give at least one INPUT, or a study with --pre/--flair/--post", file=sys.stderr)
        return EXIT_USAGE
    try:
        point_overrides(args)
        executor = _executor(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_diagnosis(
            args.inputs,
            args.out,
            models_dir=args.models,
            run_dir=args.run,
            allow_unverified=args.allow_unverified,
            threshold=args.threshold,
            min_component_px=args.min_component_px,
            batch_size=args.batch_size,
            explain=args.explain,
            resume=not args.no_resume,
            progress=not args.quiet,
            include_masks=args.include_masks,
            volumes=not args.no_volumes,
            pre=args.pre,
            flair=args.flair,
            post=args.post,
            study_id=args.study_id,
            backend=args.backend,
            precision=args.precision,
            executor=executor,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUT_IN_USE
    except OutputWriteError as exc:
        print(f"error: {exc}; nothing was diagnosed", file=sys.stderr)
        return EXIT_WRITE_FAILED
    _print_summary(result)
    return result.exit_code


def _print_summary(result: object) -> None:
    """What a finished diagnosis found, where its reports are, and what failed (stderr)."""
    n = len(result.rows)
    empty = result.n_flagged - result.n_found
    print(
        f"{n} slice(s): {result.n_found} with tumour, {empty} flagged with nothing outlined, "
        f"{n - result.n_flagged - result.n_failed} without, "
        f"{result.n_failed} failed" + (f" ({result.resumed} from an earlier run)" if result.resumed else "")
    )
    if result.skipped_masks:
        print(
            f"skipped {result.skipped_masks} ground-truth *_mask file(s) "
            "(use --include-masks to diagnose them)"
        )
    variants = ", ".join(f"{role} {v}" for role, v in result.settings.get("variants", {}).items())
    print(f"models: {result.settings['models']} (threshold {result.settings['threshold']:.3f}, "
          f"backend {result.settings.get('backend', 'keras')}" + (f": {variants}" if variants else "") + ")")
    if result.studies:
        failed = sum(1 for st in result.studies if st["error"])
        print(f"{len(result.studies)} volume stud{'y' if len(result.studies) == 1 else 'ies'}: "
              f"{len(result.studies) - failed} diagnosed, {failed} failed")
        for st in result.studies:
            if not st["error"]:
                ml = st["tumour_volume_ml"]
                size = f"{ml:.2f} mL" if ml is not None else "(no voxel spacing: Kaggle slices)"
                print(f"  {st['study_id']}: tumour {st['tumour_voxels']} voxels {size}, "
                      f"slices {st['slice_range']}, mask {result.out / st['mask_nifti']}")
    print(f"report: {result.out / 'report.csv'}; review page: {(result.out / 'index.html').as_uri()}")
    for st in result.studies:
        if st.get("warning"):
            print(f"warning: {st['source']}: {st['warning']}", file=sys.stderr)
    for row in result.rows:
        if row["error"]:
            print(f"failed: {row['path']}: {row['error']}", file=sys.stderr)
    _print_write_errors(result.write_errors)


def _print_write_errors(errors: list[str]) -> None:
    if not errors:
        return
    print(f"error: {len(errors)} write failure(s) in the output folder (a full disk or a read-only "
          "folder?):", file=sys.stderr)
    for message in errors[:MAX_LISTED]:
        print(f"  {message}", file=sys.stderr)
    if len(errors) > MAX_LISTED:
        print(f"  ... and {len(errors) - MAX_LISTED} more", file=sys.stderr)
    print("what was written is journalled: fix the folder, then run the same command again to do "
          "the rest", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Console script `lgg-diagnose`: the `diagnose` sub-command on its own."""
    from pipeline.quiet import VERBOSE_HELP, quiet_frameworks

    argv = sys.argv[1:] if argv is None else argv
    quiet_frameworks(verbose="--verbose" in argv)
    parser = argparse.ArgumentParser(prog="lgg-diagnose", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

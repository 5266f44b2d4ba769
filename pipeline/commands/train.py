"""`train`: train both stages from a YAML config (plus a preset and `--set` overrides) into a run directory.

Examples::

    python -m pipeline train                                   # configs/default.yaml -> runs/<timestamp>/
    python -m pipeline train --quick --run-dir /tmp/smoke      # tiny smoke run
    python -m pipeline train --set classifier.image_size=224 --set segmenter.epochs=60
    python -m pipeline train --resume                          # continue the latest run (runs/LATEST)
    python -m pipeline train --preset configs/release.yaml --stage segmenter   # the released segmenter
    python -m pipeline train --preset configs/cv_resnet50.yaml --stage segmenter --folds 3 --fold 0 \
        --run-dir runs/cv/resnet50/fold0                       # one cross-validation fold (resumable)

Re-running with the same ``--run-dir`` (or ``--resume``) continues an interrupted run; the
run's saved ``config.yaml`` is then the base config and ``--set`` overrides still apply.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `train` (nothing heavy is imported here)."""
    from pipeline.training.config import DEFAULT_CONFIG

    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="base YAML config (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="layer the quick preset (configs/quick.yaml: tiny images, 1-2 short epochs) on top",
    )
    parser.add_argument(
        "--preset",
        dest="presets",
        action="append",
        default=[],
        metavar="YAML",
        help="layer a preset file on top of --config (repeatable), e.g. configs/release.yaml",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set classifier.image_size=224 (repeatable; values are YAML)",
    )
    parser.add_argument(
        "--data-dir", help="dataset root (default: config, else $LGG_DATA_DIR, else data/kaggle_3m)"
    )
    parser.add_argument(
        "--run-dir", help="run directory (default: runs/<timestamp>); an existing one is resumed"
    )
    parser.add_argument("--resume", action="store_true", help="resume the latest run (runs/LATEST)")
    parser.add_argument(
        "--stage",
        choices=("classifier", "segmenter", "all"),
        default="all",
        help="which stage(s) to train (default: %(default)s)",
    )
    parser.add_argument(
        "--fold", type=_fold, metavar="K",
        help="cross-validation: train on the other folds of the train + validation patients and validate "
        "on fold K (0-based; the test patients never enter a fold); 'all': every fold trains, none "
        "validates (the final model; needs calibration.fixed); sets data.fold",
    )
    parser.add_argument("--folds", type=int, metavar="N",
                        help="number of folds with --fold (data.folds, default 5)")
    parser.add_argument(
        "--classifier-from",
        default="models",
        metavar="PAIR",
        help="with --stage segmenter and no classifier in the run: take the classifier of this pair "
        "folder (default: %(default)s, the committed release); 'none' to leave the pair unsaved",
    )


def _fold(text: str) -> int | str:
    """`--fold` value: a fold number or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or 'all', got {text!r}") from None


def resolve_config(args: argparse.Namespace):
    """(Config, run directory) for the parsed arguments; see the module docstring for the rules."""
    from pipeline.training.config import QUICK_PRESET, load_config
    from pipeline.training.runner import latest_run, new_run_dir, runs_root

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "fold", None) is not None:
        overrides.append(f"data.fold={args.fold}")
    if getattr(args, "folds", None) is not None:
        overrides.append(f"data.folds={args.folds}")
    presets = [*getattr(args, "presets", []), *([QUICK_PRESET] if args.quick else [])]
    fresh = load_config(args.config, presets, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.resume and run_dir is None:
        run_dir = latest_run(runs_root(fresh))
        if run_dir is None:
            raise SystemExit(f"--resume: no run to resume ({runs_root(fresh) / 'LATEST'} is missing)")
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        log.info("resuming %s with its saved config.yaml (plus any --set overrides)", run_dir)
        config = load_config(run_dir / "config.yaml", [], overrides)
        return config, run_dir
    return fresh, (run_dir or new_run_dir(fresh))


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train, print where the results are; returns the exit code."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the training curves are written to files only
    from pipeline.errors import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, run_dir = resolve_config(args)
        from pipeline.training.runner import train_run

        classifier_from = None if str(args.classifier_from).lower() == "none" else args.classifier_from
        summary = train_run(config, run_dir, stage=args.stage, classifier_from=classifier_from)
    except DataError as exc:
        log.error("%s", exc)
        return 2
    print(f"run directory: {summary['run_dir']}")
    if summary["pair_saved"]:
        cal = summary["calibration"]
        scored = ("operating point fixed by calibration.fixed" if cal.get("fixed") else
                  f"validation mean per-patient Dice {cal['val_mean_patient_dice']:.4f}")
        print(f"model pair: {summary['run_dir']}/classifier.keras, segmenter.keras, pipeline.json "
              f"(threshold {cal['threshold']:.2f}, {scored})")
    return 0

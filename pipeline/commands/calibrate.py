"""`calibrate`: re-choose a saved pair's operating point (gate, mask threshold, 2D and 3D
post-processing) on the validation patients, and rewrite its `pipeline.json`.

    python -m pipeline calibrate --run runs/<timestamp>      # the run's pair, the run's config
    python -m pipeline calibrate --models /tmp/pair --data-dir DATA
    python -m pipeline calibrate --models models --set "calibration.fixed={threshold: 0.25, \
        seg_threshold: 0.4, min_component_px: 30, min_volume_px: 800}"

Only the validation patients of the split file are used (never the test patients). With
`calibration.fixed` (e.g. the point the pooled out-of-fold grid chose, for a pair retrained on
every fold) that point is written as it is, nothing searched.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands.arguments import add_pair_arguments
    from pipeline.training.config import DEFAULT_CONFIG

    add_pair_arguments(parser, unverified=False, required=True)  # it rewrites the pair: never a default
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="config for --models (default: %(default)s); a run uses its own config.yaml")
    parser.add_argument("--data-dir",
                        help="dataset root (default: config, else $LGG_DATA_DIR, else data/kaggle_3m)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set calibration.min_volume_px=[0,100]")


def run(args: argparse.Namespace) -> int:
    from pipeline.commands.arguments import resolve_pair_args
    from pipeline.errors import DataError
    from pipeline.training.calibration import recalibrate_pair, set_operating_point
    from pipeline.training.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    try:
        source = resolve_pair_args(args)
        pair_dir = source.pair_dir
        run_config = Path(source.run_dir) / "config.yaml" if source.run_dir else None
        config_file = run_config if run_config is not None and run_config.is_file() else args.config
        config = load_config(config_file, [], overrides)
        if config.calibration.fixed is not None:
            point = set_operating_point(pair_dir, _fixed_point(config.calibration.fixed))
            print(f"{pair_dir}: operating point fixed (not searched): {point}")
            return 0
        result = recalibrate_pair(pair_dir, config)
    except DataError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 2
    p = result.params
    print(f"{pair_dir}: threshold {p.threshold:.2f}, neighbour_weight {p.neighbour_weight}, seg_threshold "
          f"{p.seg_threshold:.2f}, min_component_px "
          f"{p.min_component_px}, min_volume_px {p.min_volume_px} -> validation mean per-patient Dice "
          f"{result.val_patient_dice:.4f} (segmenter alone {result.segmenter_only_patient_dice:.4f})")
    return 0


def _fixed_point(fixed: dict):
    """`calibration.fixed` as an `OperatingPoint`; ConfigError naming the key for a bad field or value."""
    from pipeline.postprocessing import OperatingPoint
    from pipeline.training.config import ConfigError

    try:
        return OperatingPoint(**fixed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"calibration.fixed: {exc}", []) from exc

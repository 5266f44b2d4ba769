"""The flags several commands share, each defined once with one default and one help text.

    pair      --models DIR | --run DIR, --allow-unverified  (`resolve_pair_args`: `paths.resolve_pair`)
    data      --data-dir PATH, --cache-dir PATH        (`paths.resolve_data_dir`, `resolve_cache_dir`)
    backend   --backend, --precision                   (`pipeline.inference.backends`)
    point     --threshold, --min-component-px          (checked by `OperatingPoint`)
    output    --out                                    (each command says what goes there)

Light at import: nothing here loads TensorFlow.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.paths import DEFAULT_PAIR_RULE, PairSource, resolve_pair

__all__ = [
    "add_backend_arguments",
    "add_data_arguments",
    "add_out_argument",
    "add_pair_arguments",
    "add_point_arguments",
    "point_overrides",
    "resolve_pair_args",
]


def add_pair_arguments(parser: Any, *, unverified: bool = True, required: bool = False) -> None:
    """`--models DIR` | `--run DIR` (which pair, `paths.resolve_pair`) and `--allow-unverified`;
    `required`: one of the two must be given (a command that rewrites the pair)."""
    which = parser.add_mutually_exclusive_group(required=required)
    default = "" if required else f" ({DEFAULT_PAIR_RULE})"
    which.add_argument("--models", metavar="DIR", default=None,
                       help=f"a model pair directory (classifier, segmenter, pipeline.json){default}")
    which.add_argument("--run", metavar="DIR", default=None,
                       help="a training run directory: use the pair it holds (and its split file)")
    if unverified:
        parser.add_argument("--allow-unverified", action="store_true",
                            help="load a pair whose pipeline.json records no sha256 of its model files, "
                                 "whose SHA256SUMS is missing or does not vouch for its pipeline.json, or "
                                 "whose INT8 files fail their sums (refused otherwise), with a loud warning")


def resolve_pair_args(args: argparse.Namespace) -> PairSource:
    """The pair the pair flags name (`paths.resolve_pair`; DataError when there is none)."""
    return resolve_pair(getattr(args, "models", None), getattr(args, "run", None))


def add_data_arguments(parser: Any, *, required: bool = False, cache: bool = True) -> None:
    """`--data-dir PATH` (a Kaggle-layout root) and, with `cache`, `--cache-dir PATH` (index and
    decoded arrays)."""
    parser.add_argument("--data-dir", metavar="PATH", default=None, required=required,
                        help="Kaggle-layout data root" + ("" if required else
                                                          " (default: $LGG_DATA_DIR, else data/kaggle_3m)"))
    if cache:
        parser.add_argument("--cache-dir", metavar="PATH", default=None,
                            help="index and decoded-array cache (default: $LGG_CACHE_DIR, else .cache/)")


def add_backend_arguments(parser: Any) -> None:
    """`--backend` and `--precision`, the same on every command that runs the models."""
    from pipeline.inference.backends import AUTO, PRECISION_CHOICES, choices

    parser.add_argument(
        "--backend", choices=choices(), default=AUTO,
        help="what runs the models: openvino (CPU, IR cached under .cache/openvino), keras (the "
             "reference; Grad-CAM always uses it) or auto (default: $LGG_BACKEND, else openvino on a "
             "CPU when installed)")
    parser.add_argument(
        "--precision", choices=PRECISION_CHOICES, default=AUTO,
        help="OpenVINO variant of each model: auto (default: the fastest of f32, bf16 and the pair's "
             "INT8 IR that the pair's variant record marks ok for this CPU class, timed once; see "
             "`python -m pipeline variants`), or force f32, bf16 or int8 (refused when the record "
             "marks it failed); ignored by keras")


def add_point_arguments(parser: Any, *, min_component: bool = True) -> None:
    """`--threshold` (and `--min-component-px`): override the pair's calibrated operating point."""
    parser.add_argument("--threshold", type=float, default=None, metavar="P",
                        help="classifier probability at or above which a slice is segmented "
                             "(default: the pair's calibrated one, in pipeline.json)")
    if min_component:
        parser.add_argument("--min-component-px", type=int, default=None, metavar="N",
                            help="drop predicted tumour regions smaller than this many pixels "
                                 "(default: the pair's)")


def point_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The operating-point flags given, checked by `OperatingPoint` (ValueError naming the flag's field)."""
    from pipeline.postprocessing import OperatingPoint

    given = {name: getattr(args, name) for name in OperatingPoint.names()
             if getattr(args, name, None) is not None}
    OperatingPoint().replace(**given)  # validates: the one place ranges are checked
    return given


def add_out_argument(parser: Any, what: str, *, default: str | None = None, required: bool = False) -> None:
    """`--out DIR`: the folder a command writes `what` into (`default` describes its default)."""
    suffix = "" if required or default is None else f" (default: {default})"
    parser.add_argument("--out", metavar="DIR", required=required, default=None,
                        help=f"output folder for {what}{suffix}")

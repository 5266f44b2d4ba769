"""`python -m pipeline bench {models,pipeline,diagnosis}`: throughput benchmarks (measurements, not tests).

`models` times training and inference of each stage at 256x256 under each dtype policy of
`--policies` (`pipeline.benchmarks.models`); `pipeline` runs the end-to-end benchmark of
`pipeline.benchmarks.end_to_end` (whose flags it adds), each backend side by side; `diagnosis`
a whole `diagnose` run per executor (`--executors local,ray`) on the same slice files
(`pipeline.benchmarks.diagnosis`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.benchmarks import end_to_end

TARGETS = ("models", "pipeline", "diagnosis")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the `bench` sub-command."""
    from pipeline.commands.arguments import add_data_arguments, add_pair_arguments

    parser.add_argument("target", nargs="?", choices=TARGETS, default="models",
                        help="models: each stage alone (default); pipeline: the whole two-stage pipeline")
    parser.add_argument("--policies", type=_csv, default=("float32", "auto"),
                        help="comma-separated dtype policies to compare (float32, auto, mixed_bfloat16, "
                             "mixed_float16); duplicates after resolving `auto` run once. "
                             "Default: float32,auto")
    parser.add_argument("--stages", type=_csv, default=("classifier", "segmenter"),
                        help="comma-separated stages for `models`: classifier, segmenter (the ResUNet), "
                             "resnet_unet (the ResNet50-encoder U-Net) (default: classifier,segmenter)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="square input side in pixels (default 256)")
    parser.add_argument("--classifier-mode", default="all",
                        help="backbone trainability while timing classifier training: frozen, all or "
                             "a number of top stages (default all = fine-tuning)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the results as JSON")
    group = parser.add_argument_group("pipeline benchmark")
    add_pair_arguments(group, unverified=False)
    add_data_arguments(group, cache=False)
    end_to_end.add_arguments(group)
    group = parser.add_argument_group("diagnosis benchmark (also --n-slices, --batch-size, --models)")
    group.add_argument("--executors", type=_csv, default=("local", "ray"),
                       help="comma-separated executors to time (default local,ray)")
    group.add_argument("--concurrency", type=int, default=1, help="Ray actors (default 1)")
    group.add_argument("--ray-address", default=None,
                       help="an existing Ray cluster (default: a local instance)")
    group.add_argument("--ray-cpus", type=int, default=None,
                       help="CPUs of the local Ray instance (default: all)")


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark, print its table, optionally write JSON. Returns the exit code."""
    if args.target == "pipeline":
        return int(end_to_end.run(args) or 0)
    if args.target == "diagnosis":
        from pipeline.benchmarks import diagnosis

        return int(diagnosis.run(args) or 0)

    from pipeline.benchmarks import models as bench_models
    from pipeline.io_utils import atomic_write_json

    for name in ("batch_size", "steps", "image_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    unknown = [s for s in args.stages if s not in bench_models.STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; valid: {', '.join(bench_models.STAGES)}")
    config = bench_models.BenchConfig(
        policies=tuple(args.policies), stages=tuple(args.stages), batch_size=args.batch_size,
        steps=args.steps, warmup=max(0, args.warmup), image_size=args.image_size,
        classifier_mode=args.classifier_mode)
    print(f"benchmarking {', '.join(config.stages)} at {config.image_size}x{config.image_size}, "
          f"batch {config.batch_size}, {config.warmup} warm-up + {config.steps} timed steps, "
          f"policies {', '.join(config.policies)} (one fresh process each)", flush=True)
    report = bench_models.run(config, progress=lambda msg: print(msg, flush=True))
    print()
    print(bench_models.format_report(report))
    if args.json:
        atomic_write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0

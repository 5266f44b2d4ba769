"""`python -m pipeline viewer`: provision NiiVue, the review page's 3D viewer, offline.

Fetches `@niivue/niivue@0.69.0` with `npm pack` (or takes `--tarball`), checks the registry's
sha512 and sha1 of the tarball and the sha256 of `dist/niivue.umd.js`, and writes the script
with its BSD-2-Clause licence into `third_party/niivue/` (git-ignored; `$LGG_NIIVUE_DIR`).
`diagnose` copies it once into each OUT/review/; without it the page has no 3D views.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the `viewer` sub-command."""
    parser.add_argument("--tarball", type=Path, default=None,
                        help="local niivue-niivue-0.69.0.tgz (skips `npm pack`)")
    exists = parser.add_mutually_exclusive_group()
    exists.add_argument("--if-missing", action="store_true", help="do nothing when it is already provisioned")
    exists.add_argument("--force", action="store_true", help="provision again even when present")


def run(args: argparse.Namespace) -> int:
    """Provision the script; print what was done. Returns the exit code."""
    from pipeline.errors import DataError
    from pipeline.inference.review import niivue

    present = niivue.script_path()
    if present is not None and not args.force:
        print(f"NiiVue {niivue.VERSION} present: {present}")
        return 0
    source = str(args.tarball) if args.tarball else f"npm pack {niivue.NPM_PACKAGE}"
    print(f"provisioning NiiVue from {source} ...", flush=True)
    try:
        path = niivue.provision(tarball=args.tarball)
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB; tarball sha512 and sha1 verified); "
          f"licence: {path.parent / niivue.LICENSE_NAME}")
    return 0

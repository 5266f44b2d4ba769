"""`notebook`: execute notebooks/exploration.ipynb on a real data root and keep its outputs.

    python -m pipeline notebook --data-dir ../shared/data/kaggle_3m [--models DIR | --run RUN]
                                [--curves RUN]

The notebook reads `LGG_DATA_DIR`, `LGG_MODELS_DIR`, `LGG_RUN_DIR` and `LGG_CACHE_DIR`; this
command sets them from its flags (the pair as every command resolves it, `paths.resolve_pair`;
the curves of `--curves`, else of the run the pair comes from), runs every cell in a fresh
kernel of this interpreter and writes the executed notebook back atomically (or to `--out`), so
it reads with its figures on a repository page. It refuses to write a notebook above `--max-mb`
(figures are PNGs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.paths import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "exploration.ipynb"
# start-up chatter of TensorFlow and tqdm on stderr: says nothing about the data, so not kept
NOISE = ("oneDNN custom operations", "absl::InitializeLog", "TqdmWarning", "cpu_feature_guard")


def drop_noise(nb) -> None:
    """Remove stderr outputs that only hold library start-up chatter (`NOISE`) from every cell."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [
                out for out in cell.outputs
                if not (out.output_type == "stream" and out.name == "stderr"
                        and any(marker in out.text for marker in NOISE))
            ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.commands.arguments import add_data_arguments, add_pair_arguments

    add_data_arguments(parser, required=True)
    add_pair_arguments(parser, unverified=False)
    parser.add_argument("--curves", metavar="RUN", default=None,
                        help="training run whose curves are shown (default: the run the pair comes from, "
                             "else the one its pipeline.json names)")
    parser.add_argument("--out", type=Path, default=NOTEBOOK,
                        help="the executed notebook's file (default: in place)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default: %(default)s)")
    parser.add_argument("--max-mb", type=float, default=3.0, help="largest notebook written (default: 3)")


def run(args: argparse.Namespace) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from pipeline.commands.arguments import resolve_pair_args
    from pipeline.errors import DataError
    from pipeline.io_utils import atomic_write

    try:
        source = resolve_pair_args(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # absolute: the kernel runs in notebooks/, where a path relative to here means something else
    env = {"LGG_DATA_DIR": os.path.abspath(args.data_dir), "LGG_MODELS_DIR": os.path.abspath(source.pair_dir),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    curves = args.curves or source.run_dir
    if curves:
        env["LGG_RUN_DIR"] = os.path.abspath(curves)
    if args.cache_dir:
        env["LGG_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    os.environ.update(env)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"error: a cell failed; the notebook was not written\n{str(exc)[-2000:]}", file=sys.stderr)
        return 2
    drop_noise(nb)
    text = nbformat.writes(nb)
    size_mb = len(text.encode("utf-8")) / 1e6
    if size_mb > args.max_mb:
        print(f"error: the executed notebook is {size_mb:.1f} MB, above --max-mb {args.max_mb}; not written",
              file=sys.stderr)
        return 2
    with atomic_write(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"{args.out}: executed, {size_mb:.2f} MB")
    return 0

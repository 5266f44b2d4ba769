"""Where things live: the data root, caches, runs and the model pair, resolved the same way by every command.

Which model pair (`resolve_pair`, used by diagnose, evaluate, bench and the notebook): `--models
DIR`, else `--run DIR` (the pair inside that training run), else `models/` (the committed
release) when it holds a pair, else the latest training run in `runs/` that holds one
(`runs/LATEST`, `runs/latest`, then the newest folder). The committed release wins over a new
run so that a smoke run never silently replaces it; evaluate a run with `--run runs/latest`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = PROJECT_ROOT / "data" / "kaggle_3m"
DATA_DIR_ENV = "LGG_DATA_DIR"
CACHE_DIR_ENV = "LGG_CACHE_DIR"
RUNS_DIR = PROJECT_ROOT / "runs"
MODELS_DIR = PROJECT_ROOT / "models"
PAIR_META_FILE = "pipeline.json"  # a pair's metadata, written last: marks a complete pair
SPLITS_FILE = "splits.csv"  # the patient split's file name in models/, in a run and in a pair
RUN_CONFIG_FILE = "config.yaml"  # a training run's resolved config (written by the runner)
LATEST_FILE = "LATEST"  # runs/LATEST: a text file naming the newest run (written by make train)
LATEST_LINK = "latest"  # runs/latest: the symlink to it, where symlinks work
DEFAULT_PAIR_RULE = (
    "default: models/ (the committed release) if it holds a pair, else the latest run in runs/ with one"
)


def resolve_data_dir(flag: str | os.PathLike | None = None) -> Path:
    """Return the dataset root: the command-line flag, else `$LGG_DATA_DIR`, else `data/kaggle_3m`."""
    if flag:
        return Path(flag).expanduser().resolve()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return DEFAULT_DATA_DIR


def resolve_cache_dir(flag: str | os.PathLike | None = None) -> Path:
    """Return the cache directory (indexes, decoded arrays): flag, else `$LGG_CACHE_DIR`, else `.cache/`."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return PROJECT_ROOT / ".cache"


def safe_resolve(path: str | os.PathLike) -> Path:
    """`Path(path).resolve()`, or the absolute path when resolving fails (a symlink loop raises
    RuntimeError on Python 3.11 and OSError later; neither should stop a batch)."""
    path = Path(path)
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path.absolute()


def project_relative(value: str | os.PathLike) -> str | None:
    """An absolute path inside the project as a path relative to `PROJECT_ROOT` (`runs/2026...`);
    None for an absolute path outside it (a machine's own layout, not worth recording);
    a relative path unchanged. For files that are committed or copied between machines."""
    text = os.fspath(value)
    if not os.path.isabs(text):
        return text
    normal = Path(os.path.normpath(text))
    try:
        return normal.relative_to(PROJECT_ROOT).as_posix() or "."
    except ValueError:
        return None


def from_project(value: str | os.PathLike) -> Path:
    """The inverse of `project_relative`: a relative path is taken from `PROJECT_ROOT`."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


# --------------------------------------------------------------------------- which model pair


@dataclass(frozen=True)
class PairSource:
    """Where a pair comes from: its directory and, if any, the training run it belongs to."""

    pair_dir: Path
    run_dir: Path | None = None


def is_pair_dir(path: str | os.PathLike) -> bool:
    """True if `path` holds a complete pair (its `pipeline.json`, written last)."""
    return (Path(path) / PAIR_META_FILE).is_file()


def find_pair_dir(run_dir: str | os.PathLike) -> Path | None:
    """The pair of a run directory: the run itself, else its newest sub-directory holding one."""
    run_dir = Path(run_dir)
    if is_pair_dir(run_dir):
        return run_dir
    if not run_dir.is_dir():
        return None
    candidates = [p for p in run_dir.iterdir() if p.is_dir() and is_pair_dir(p)]
    return max(candidates, key=lambda p: (p / PAIR_META_FILE).stat().st_mtime, default=None)


def latest_run(runs_dir: str | os.PathLike = RUNS_DIR, *, with_pair: bool = False) -> Path | None:
    """The newest training run: the folder `<runs_dir>/LATEST` names (a name or an absolute path).

    with_pair: only a run holding a pair counts; when LATEST names none, the `runs/latest`
    symlink, else the newest `runs/*/` holding a pair. None when there is no such run.
    """
    runs_dir = Path(runs_dir)
    pointer = runs_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        target = runs_dir / name  # an absolute name replaces runs_dir
        if name and target.is_dir() and (not with_pair or find_pair_dir(target)):
            return target
        if with_pair:
            log.warning("%s names %r, which holds no model pair; looking for the newest run", pointer, name)
    if not with_pair or not runs_dir.is_dir():
        return None
    link = runs_dir / LATEST_LINK
    if link.exists() and find_pair_dir(link):
        return link.resolve()
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink() and find_pair_dir(p)]
    return max(runs, key=lambda p: p.stat().st_mtime, default=None)


def resolve_pair(
    models: str | os.PathLike | None = None,
    run: str | os.PathLike | None = None,
    *,
    runs_dir: str | os.PathLike = RUNS_DIR,
    default_models: str | os.PathLike = MODELS_DIR,
) -> PairSource:
    """Which pair to use: `models` (a pair directory) > `run` (a training run) > `default_models`
    (`models/`, the committed release) if it holds a pair > the latest run holding one.

    Raises DataError naming what was looked at when nothing holds a pair.
    """
    if models is not None and run is not None:
        raise DataError("give either --models or --run, not both", [models, run])
    if models is not None:
        path = Path(models).expanduser()
        if not is_pair_dir(path):
            raise DataError(
                f"not a model pair directory (no {PAIR_META_FILE}); pass models/ or a `make train` run",
                [path],
            )
        return PairSource(path)
    if run is not None:
        pair = find_pair_dir(Path(run).expanduser())
        if pair is None:
            raise DataError(
                f"no model pair ({PAIR_META_FILE}) in this run directory; did the run finish?", [run]
            )
        return PairSource(pair, Path(run).expanduser())
    if is_pair_dir(default_models):
        return PairSource(Path(default_models))
    latest = latest_run(runs_dir, with_pair=True)
    if latest is not None:
        return PairSource(find_pair_dir(latest), latest)
    raise DataError(
        "no trained model pair found: run `make train` first, or pass --models DIR / --run DIR",
        [default_models, runs_dir],
    )

"""Where things live: the data root, caches and runs, resolved the same way by every command."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = PROJECT_ROOT / "data" / "kaggle_3m"
DATA_DIR_ENV = "LGG_DATA_DIR"
CACHE_DIR_ENV = "LGG_CACHE_DIR"


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

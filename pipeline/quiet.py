"""Quiet by default: no TensorFlow / absl / oneDNN start-up chatter from a command (`--verbose` keeps it).

TensorFlow 2.21 logs through absl's C++ logging before `absl::InitializeLog` runs, so
`TF_CPP_MIN_LOG_LEVEL` does not reach its import-time lines ("All log messages before
absl::InitializeLog() ...", "oneDNN custom operations are on ..."), printed once per native
library. `quiet_frameworks()` sets `TF_CPP_MIN_LOG_LEVEL=2` for what follows and installs an
import hook that, while `tensorflow` itself is imported, sends the process's file descriptor 2
to /dev/null (an import error still propagates and is printed after), then lowers absl's and
TensorFlow's Python loggers to errors. oneDNN stays on (`TF_ENABLE_ONEDNN_OPTS` untouched: the
numbers do not change). Nothing is imported here until a command imports TensorFlow, so `--help`
stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["VERBOSE_HELP", "quiet_frameworks", "silenced_fd2"]

VERBOSE_HELP = "keep TensorFlow's and absl's start-up and log messages (hidden by default)"
QUIET_LEVEL = "2"  # TF_CPP_MIN_LOG_LEVEL: errors only
_MODULE = "tensorflow"


@contextlib.contextmanager
def silenced_fd2() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null inside the block, then back to where it went.

    An exception raised inside still propagates (and is printed after the block)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with silenced_fd2():
            self.loader.exec_module(module)
        for name in ("absl", "tensorflow"):
            logging.getLogger(name).setLevel(logging.ERROR)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the first `import tensorflow` in `_QuietLoader`, then steps aside."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_frameworks(verbose: bool = False) -> None:
    """Silence the frameworks' start-up chatter for the rest of the process, unless `verbose`."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)
    if _MODULE not in sys.modules and not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())

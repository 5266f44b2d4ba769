"""Error types: bad input (naming the offending files), and an output folder that cannot be used."""

from __future__ import annotations

import os
from collections.abc import Iterable


class DataError(ValueError):
    """Bad input data. `files` lists every offending path; the message names them and the problem."""

    def __init__(self, message: str, files: Iterable[str | os.PathLike] = ()):
        self.files = [str(f) for f in files]
        if self.files:
            listed = "\n".join(f"  - {f}" for f in self.files)
            message = f"{message}\n{listed}"
        super().__init__(message)


class OutputInUseError(RuntimeError):
    """Another process is writing into the same output folder (its lock is held)."""

    def __init__(self, message: str, folder: str | os.PathLike):
        self.folder = str(folder)
        super().__init__(f"{message}\n  - {folder}")


class OutputWriteError(OSError):
    """An output file could not be written (full disk, read-only folder, I/O error): not a
    problem of the input, so it is retried by the next run. `errno` and `filename` as OSError's."""

"""Error types raised on bad input; each names the offending files."""

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
